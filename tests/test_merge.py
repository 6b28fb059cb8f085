"""Merge methods (against their definitions) and the out-of-core YAML merge on tiny checkpoints."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

import bricks
from bricks.cli import main
from bricks.merge.methods import METHODS, merge, sparsify
from bricks.merge.config import load_config

from .test_adapters import make_adapter


def test_linear_task_arithmetic_and_ties_by_definition():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    a = torch.tensor([1.0, -2.0, 0.5, 1.0])
    b = torch.tensor([3.0, 1.0, -0.1, 1.5])
    w = [{"weight": 1.0}, {"weight": 3.0}]
    torch.testing.assert_close(merge("linear", None, [a, b], w), (a + 3 * b) / 4)
    torch.testing.assert_close(merge("linear", None, [a, b], w, {"normalize": False}), a + 3 * b)
    torch.testing.assert_close(merge("task_arithmetic", base, [a, b], w, {"lambda": 0.5}), base + 0.5 * ((a - base) + 3 * (b - base)))
    # TIES, density 1: elected sign per element = sign of the weighted sum; disagreeing entries drop out.
    taus = torch.stack([a - base, 3 * (b - base)])
    elected = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    agree = (taus.sign() == elected).float()
    expected = base + (taus * agree).sum(0) / (torch.tensor([[1.0], [3.0]]) * agree).sum(0).clamp(min=1)
    torch.testing.assert_close(merge("ties", base, [a, b], w), expected)
    # TIES with density 0.5 keeps the 2 largest |τ| of each model before electing.
    t = merge("ties", base, [a, b], [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}])
    # kept: τa = [1, -2, 0, 0], τb = [3, 1, 0, 0]; elected signs [+, -]: (1 + 3) / 2, then a's -2 alone
    torch.testing.assert_close(t, base + torch.tensor([2.0, -2.0, 0, 0]))


def test_slerp_and_model_stock():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = merge("slerp", v0, [v1], [{}], {"t": 0.5})
    torch.testing.assert_close(mid, torch.tensor([2**-0.5, 2**-0.5]))  # on the arc, not the chord
    torch.testing.assert_close(merge("slerp", v0, [v0 * 2], [{}], {"t": 0.5}), v0 * 1.5)  # collinear: linear
    base = torch.zeros(3)
    same = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(merge("model_stock", base, [same, same], [{}, {}]), same)  # cos 1: the average
    with pytest.raises(bricks.BricksError, match="exactly one other model"):
        merge("slerp", v0, [v1, v1], [{}, {}], {"t": 0.5})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dare_is_seeded_and_unbiased(seed):
    # Data and masks from unrelated seeds: randn and the mask draws from one seed are correlated streams.
    tau = torch.randn(200_000, generator=torch.Generator().manual_seed(1000 + seed))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = sparsify(tau, "random", 0.3, rescale=True, generator=g1)
    assert torch.equal(a, sparsify(tau, "random", 0.3, rescale=True, generator=g2))  # same seed, same mask
    kept = (a != 0).float().mean()
    assert abs(float(kept) - 0.3) < 0.01  # density is the keep probability
    assert float(a.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-4)  # rescaled to the L1 norm (mergekit 0.1.5)
    b = sparsify(tau, "random", 0.3, rescale=True, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(a, b)
    # DELLA: larger |τ| are kept more often.
    d = sparsify(tau[None], "della", 0.5, rescale=False, epsilon=0.2, generator=torch.Generator().manual_seed(seed))[0]
    big = tau.abs() > tau.abs().median()
    # keep probability 0.3 + 0.4 * rank/n: 0.6 on average for the larger half, 0.4 for the smaller
    assert abs(float((d[big] != 0).float().mean()) - 0.6) < 0.01 and abs(float((d[~big] != 0).float().mean()) - 0.4) < 0.01


def test_every_method_is_registered_and_runs():
    base = torch.randn(6, 4)
    xs = [base + torch.randn(6, 4) * 0.1 for _ in range(3)]
    for m in METHODS:
        inputs = xs[:1] if m in ("slerp", "passthrough", "nearswap", "arcee_fusion") else xs[:2] if m == "nuslerp" else xs
        params = {"t": 0.3} if m == "slerp" else {"t": 0.05} if m == "nearswap" else {}
        per_model = [{"weight": 1.0, "density": 0.6} for _ in inputs]
        out = merge(m, base, inputs, per_model, params, torch.Generator().manual_seed(0))
        assert out.shape == base.shape and torch.isfinite(out).all(), m
        assert (out - base).abs().max() > 1e-3, m  # the models moved it away from the base
        # Models identical to the base (every task vector zero) merge to the base itself.
        same = merge(m, base, [base.clone() for _ in inputs], per_model, params, torch.Generator().manual_seed(0))
        torch.testing.assert_close(same, base, rtol=1e-6, atol=1e-6, msg=m)


@pytest.fixture
def tuned(tiny_dirs, tmp_path):
    """Three 'fine-tuned' copies of the tiny llama (base + noise), saved as checkpoints."""
    out = []
    for i in range(3):
        model, tok = bricks.load_model(tiny_dirs["llama"])
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        d = tmp_path / f"tuned{i}"
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out.append(d)
    return out


def write_config(path, **cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


def _state(d):
    state = {}
    for f in sorted(d.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def test_yaml_ties_merge_streams_into_shards(tiny_dirs, tuned, tmp_path):
    base = tiny_dirs["llama"]
    cfg = write_config(tmp_path / "ties.yaml", merge_method="ties", base_model=str(base),
                       models=[{"model": str(d), "parameters": {"weight": w, "density": 0.5}} for d, w in zip(tuned, (1.0, 0.5, [0.2, 1.0]))],
                       parameters={"normalize": True, "int8_mask": True}, dtype="float32")
    out = tmp_path / "merged"
    r = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(out), "--max-shard-size", "40KB", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["shards"] > 1 and (out / "model.safetensors.index.json").is_file()
    merged = _state(out)
    inputs = [_state(d) for d in tuned]
    ref = _state(base)
    assert set(merged) == set(ref)
    for name in ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"]:
        # Gradient [0.2, 1.0] over the 2 layers; tensors outside the layers read it at 0, as mergekit 0.1.5 does.
        layer_t = 1.0 if ".layers.1." in name else 0.0
        w3 = 0.2 + 0.8 * layer_t
        expected = merge("ties", ref[name], [x[name] for x in inputs],
                         [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}, {"weight": w3, "density": 0.5}],
                         {"normalize": True})
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=0)
    model, _ = bricks.load_model(out)  # a loadable model with config and tokenizer
    assert model(torch.randint(0, 300, (1, 5))).logits.isfinite().all()
    # The same config again: an existing output is refused, the first merge untouched.
    r = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(out)])
    assert r.exit_code == 1 and "already exists" in r.stderr


@pytest.mark.parametrize("shape", [(37, 5), (41,), ()])
def test_row_chunks_give_the_whole_tensor_merge(monkeypatch, shape):
    """Pass 2 runs in row chunks (chunk sizes forced tiny here): every task method, row loaders included,
    must give exactly what one whole-tensor pass gives."""
    import bricks.merge.methods as methods

    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    xs = [base + torch.randn(shape, generator=g) * 0.1 for _ in range(3)]
    per_model = [{"weight": w, "density": 0.6} for w in (1.0, 0.7, -0.4)]
    loaders = [lambda rows=None, x=x: (x if rows is None else x[rows]).clone() for x in xs]
    originals = [x.clone() for x in [base, *xs]]
    for m in [m for m in methods.METHODS if methods.is_task_method(m)]:
        whole = merge(m, base, xs, per_model, {}, torch.Generator().manual_seed(1))
        monkeypatch.setattr(methods, "CHUNK_ENTRIES", 7)
        chunked = merge(m, lambda: base.clone(), loaders, per_model, {}, torch.Generator().manual_seed(1))
        monkeypatch.setattr(methods, "CHUNK_ENTRIES", 1 << 22)
        assert torch.equal(whole, chunked), m
    assert all(torch.equal(x, y) for x, y in zip([base, *xs], originals))  # inputs untouched


def test_row_reads_and_row_deltas(tiny_dirs, tmp_path):
    from bricks.adapters import AdapterBrick
    from bricks.merge.safetensors_io import Checkpoint

    ckpt = Checkpoint(tiny_dirs["llama"])
    name = next(n for n in ckpt.names() if len(ckpt.shape(n)) == 2)
    whole = ckpt.get(name)
    assert torch.equal(ckpt.get(name, slice(2, 5)), whole[2:5])
    assert ckpt.get(name, slice(3, 3)).shape == (0, *whole.shape[1:])
    brick = AdapterBrick.load(make_adapter(tiny_dirs["llama"], tmp_path / "lora"))
    lora = next(iter(brick.modules.values()))
    torch.testing.assert_close(lora.delta(rows=slice(1, 4)), lora.delta()[1:4])
    lora.fan_in_fan_out = True  # the layout's rows are then A's columns
    torch.testing.assert_close(lora.delta(rows=slice(1, 4)), lora.delta()[1:4])


def test_model_plus_adapter_in_a_merge(tiny_dirs, tmp_path):
    base = tiny_dirs["llama"]
    adapter = make_adapter(base, tmp_path / "lora")
    cfg = write_config(tmp_path / "lin.yaml", merge_method="linear",
                       models=[{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}])
    out = tmp_path / "applied"
    assert CliRunner().invoke(main, ["merge", str(cfg), "--out", str(out)]).exit_code == 0
    from peft import PeftModel

    m, _ = bricks.load_model(base)
    expected = PeftModel.from_pretrained(m, adapter).merge_and_unload().state_dict()
    merged = _state(out)
    # Every tensor is there under PEFT's own names (a tied LM head is stored once, as the embeddings).
    assert set(expected) - set(merged) <= {"lm_head.weight"} and set(merged) <= set(expected)
    for k, v in merged.items():
        assert (v - expected[k]).abs().max() <= 1e-5, k
    original, _ = bricks.load_model(base)
    assert any((merged[k] - v).abs().max() > 1e-4 for k, v in original.state_dict().items() if k in merged)  # changed


@pytest.mark.parametrize("cfg, message", [
    ({"merge_method": "ties", "base_model": "B", "models": [{"model": "A", "parameters": {"weight": 1}}], "colour": 1},
     "colour: unknown key"),
    ({"merge_method": "mystery", "models": [{"model": "A"}]}, "unknown merge method 'mystery'"),
    ({"merge_method": "ties", "models": [{"model": "A", "parameters": {"weight": 1}}]}, "needs base_model"),
    ({"merge_method": "ties", "base_model": "B", "models": [{"model": "A", "parameters": {"weight": 1, "density": 2}}]},
     "density must be in"),
    ({"merge_method": "ties", "base_model": "B", "models": [{"model": "A", "parameters": {"wieght": 1}}]},
     "unknown model parameter 'wieght'"),
    ({"merge_method": "linear", "slices": []}, "'slices'"),
    ({"merge_method": "linear", "models": []}, "'models' is empty"),
])
def test_bad_configs_fail_before_any_work(tmp_path, cfg, message):
    path = write_config(tmp_path / "bad.yaml", **cfg)
    with pytest.raises(bricks.BricksError, match=message.replace("(", r"\(")):
        load_config(path)
    r = CliRunner().invoke(main, ["merge", str(path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and not (tmp_path / "o").exists()


def test_mismatched_models_are_refused(tiny_dirs, tuned, tmp_path):
    cfg = write_config(tmp_path / "x.yaml", merge_method="task_arithmetic", base_model=str(tiny_dirs["llama"]),
                       models=[{"model": str(tiny_dirs["qwen2"]), "parameters": {"weight": 1.0}}])
    r = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and ("differ in architecture" in r.stderr or "shape mismatch" in r.stderr)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))
    # A truncated input shard.
    f = tuned[0] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    cfg = write_config(tmp_path / "y.yaml", merge_method="task_arithmetic", base_model=str(tiny_dirs["llama"]),
                       models=[{"model": str(tuned[0]), "parameters": {"weight": 1.0}}])
    r = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "truncated" in r.stderr and not (tmp_path / "o").exists()


def test_nan_weights_are_refused(tiny_dirs, tuned, tmp_path):
    from safetensors.torch import save_file

    f = tuned[1] / "model.safetensors"
    state = load_file(str(f))
    name = next(k for k, v in state.items() if v.dim() == 2)
    state[name][3, 1] = float("nan")
    save_file(state, str(f), metadata={"format": "pt"})
    cfg = write_config(tmp_path / "n.yaml", merge_method="ties", base_model=str(tiny_dirs["llama"]),
                       models=[{"model": str(d), "parameters": {"weight": 1.0, "density": 0.5}} for d in tuned])
    r = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "NaN" in r.stderr and name in r.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


def test_slerp_over_slices_follows_the_gradient_within_the_slice(tiny_dirs, tuned, tmp_path):
    """mergekit's most common config: SLERP over layer ranges with a gradient t. Layer i of a slice of n layers
    reads t at i / (n - 1); the tensors outside the layers at 0 (mergekit 0.1.5)."""
    base, other = tiny_dirs["llama"], tuned[0]
    cfg = write_config(tmp_path / "slerp.yaml", merge_method="slerp", base_model=str(base), dtype="float32",
                       slices=[{"sources": [{"model": str(base), "layer_range": [0, 2]},
                                            {"model": str(other), "layer_range": [0, 2]}]}],
                       parameters={"t": [0.0, 1.0]})
    r = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(tmp_path / "m"), "--json"])
    assert r.exit_code == 0, r.output
    merged, a, b = _state(tmp_path / "m"), _state(base), _state(other)
    assert set(merged) == set(a)
    for name in merged:
        t = 1.0 if ".layers.1." in name else 0.0
        torch.testing.assert_close(merged[name], merge("slerp", a[name], [b[name]], [{}], {"t": t}), rtol=0, atol=0)
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], merged["model.layers.1.mlp.up_proj.weight"])


def test_passthrough_frankenmerge_stacks_layers(tiny_dirs, tuned, tmp_path):
    a_dir, b_dir = tiny_dirs["llama"], tuned[1]
    cfg = write_config(tmp_path / "frank.yaml", merge_method="passthrough", dtype="float32",
                       slices=[{"sources": [{"model": str(a_dir), "layer_range": [0, 2]}]},
                               {"sources": [{"model": str(b_dir), "layer_range": [1, 2]}]}])
    out = tmp_path / "frank"
    r = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["layers"] == 3 and json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    merged, a, b = _state(out), _state(a_dir), _state(b_dir)
    for k in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(merged[f"model.layers.0.{k}"], a[f"model.layers.0.{k}"])
        assert torch.equal(merged[f"model.layers.1.{k}"], a[f"model.layers.1.{k}"])
        assert torch.equal(merged[f"model.layers.2.{k}"], b[f"model.layers.1.{k}"])
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # from the first slice
    assert torch.equal(merged["model.norm.weight"], b["model.norm.weight"])  # from the last slice
    model, _ = bricks.load_model(out)
    assert len(model.model.layers) == 3 and model(torch.randint(0, 300, (1, 5))).logits.isfinite().all()


def test_default_module_is_the_same_merge(tiny_dirs, tuned, tmp_path):
    """mergekit's `modules:` form with the one module of a decoder-only model, `default`: the same tensors as the
    top-level form, the module's parameters overriding the global ones."""
    base, other = str(tiny_dirs["llama"]), str(tuned[0])
    slices = [{"sources": [{"model": base, "layer_range": [0, 2]}, {"model": other, "layer_range": [0, 2]}]}]
    flat = write_config(tmp_path / "flat.yaml", merge_method="slerp", base_model=base, dtype="float32", slices=slices,
                        parameters={"t": [0.2, 0.9]})
    moduled = write_config(tmp_path / "mod.yaml", merge_method="slerp", base_model=base, dtype="float32",
                           parameters={"t": 0.5}, modules={"default": {"slices": slices, "parameters": {"t": [0.2, 0.9]}}})
    for cfg, out in ((flat, "flat"), (moduled, "mod")):
        r = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
    a, b = _state(tmp_path / "flat"), _state(tmp_path / "mod")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("modules, extra, message", [
    ({"text_decoder": {"models": []}, "vision_tower": {"models": []}}, {}, "multimodal modules are not supported"),
    ({"default": {"models": "{models}"}}, {"models": "{models}"}, "exactly one"),
    ({"default": {"models": "{models}", "residual": 1}}, {}, "not ['residual']"),
    ([], {}, "maps module names"),
])
def test_bad_modules(tiny_dirs, tuned, tmp_path, modules, extra, message):
    models = [{"model": str(d), "parameters": {"weight": 1.0}} for d in tuned]
    fill = json.loads(json.dumps({"modules": modules, **extra}).replace('"{models}"', json.dumps(models)))
    cfg = write_config(tmp_path / "bad.yaml", merge_method="linear", **fill)
    r = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("slices, method, message", [
    ([{"sources": [{"model": "{a}", "layer_range": [0, 2]}, {"model": "{b}", "layer_range": [0, 1]}]}], "slerp",
     "same number of layers"),
    ([{"sources": [{"model": "{a}", "layer_range": [0, 2]}, {"model": "{b}", "layer_range": [0, 2]}]}], "passthrough",
     "one source per slice"),
    ([{"sources": [{"model": "{b}", "layer_range": [0, 2]}]}], "slerp", "must be among the slice's sources"),
    ([{"sources": [{"model": "{a}", "layer_range": [2, 1]}]}], "passthrough", "0 <= start < end"),
    ([{"sources": [{"model": "{a}", "layer_range": [0, 5]}]}], "passthrough", "goes past its 2 layers"),
])
def test_bad_slices(tiny_dirs, tuned, tmp_path, slices, method, message):
    fill = {"a": str(tiny_dirs["llama"]), "b": str(tuned[0])}
    for sl in slices:
        for s in sl["sources"]:
            s["model"] = s["model"].format(**fill)
    cfg = write_config(tmp_path / "bad.yaml", merge_method=method, base_model=fill["a"], slices=slices,
                       parameters={"t": 0.5} if method == "slerp" else {})
    r = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and message in r.stderr and not (tmp_path / "o").exists(), r.output


# ------------------------------------------------------------------ spherical and entry-selecting methods


def _unit(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_spherical_means_of_two_orthogonal_directions_are_the_geodesic_midpoint():
    a, b = _unit(1.0, 0.0, 0.0), _unit(0.0, 1.0, 0.0)
    mid = _unit(1.0, 1.0, 0.0) / 2 ** 0.5  # on the sphere; the linear mean would have norm 0.707
    w = [{"weight": 1.0}, {"weight": 1.0}]
    for method in ("nuslerp", "multislerp", "karcher"):
        torch.testing.assert_close(merge(method, None, [a, b], w), mid, msg=method)
    # nuslerp's t is w1 / (w0 + w1): weight 3:1 is a quarter of the way from a.
    quarter = _unit(torch.cos(torch.tensor(torch.pi / 8)).item(), torch.sin(torch.tensor(torch.pi / 8)).item(), 0.0)
    torch.testing.assert_close(merge("nuslerp", None, [a, b], [{"weight": 3.0}, {"weight": 1.0}]), quarter)
    # With a base: the task vectors are interpolated, then added back.
    base = _unit(5.0, 5.0, 5.0)
    torch.testing.assert_close(merge("nuslerp", base, [a + base, b + base], w), mid + base)


def test_nearswap_takes_the_other_value_only_where_it_is_close():
    base, other = _unit(0.0, 0.0, 0.0, 0.0), _unit(0.001, -0.002, 0.5, -1.0)
    out = merge("nearswap", base, [other], [{}], {"t": 0.01})
    torch.testing.assert_close(out[:2], other[:2])  # within t: the other model's value
    torch.testing.assert_close(out[2:], _unit(0.01, -0.01))  # far: moved by t / |a - b| of the way only


def test_ram_keeps_unique_changes_whole_and_averages_shared_ones():
    base = torch.zeros(3)
    m1, m2 = _unit(1.0, 0.0, 2.0), _unit(0.0, 3.0, 4.0)
    out = merge("ram", base, [m1, m2], [{}, {}], {"epsilon": 1e-5})
    torch.testing.assert_close(out, _unit(1.0, 3.0, 3.0))  # task arithmetic would give 1, 3, 6; an average 0.5, 1.5, 3
    # ramplus_tl scales each model's unique changes up by 1 + r * min(shared/unique, alpha).
    plus = merge("ramplus_tl", base, [m1, m2], [{}, {}], {"epsilon": 1e-5, "r": 0.5, "alpha": 0.2})
    torch.testing.assert_close(plus, _unit(1.1, 3.3, 3.0))


def test_sce_erases_sign_conflicts_and_weights_by_energy():
    base = torch.zeros(2)
    m1, m2 = _unit(1.0, 1.0), _unit(3.0, -3.0)  # second entry: the signs disagree, the larger (negative) sum wins
    out = merge("sce", base, [m1, m2], [{}, {}])
    assert out[0] == pytest.approx((0.1 * 1 + 0.9 * 3) / 1.0)  # weights 1:9 from the mean squared task vectors
    assert out[1] == pytest.approx(-3.0)  # model 1's +1 is erased


def test_arcee_fusion_keeps_only_outlying_changes():
    torch.manual_seed(0)
    base = torch.randn(64, 64)
    other = base + 1e-3 * torch.randn(64, 64)
    other[3, 5] += 5.0  # one large, important change
    out = merge("arcee_fusion", base, [other], [{}], generator=torch.Generator().manual_seed(0))
    changed = out != base
    assert changed[3, 5] and changed.float().mean() < 0.2
    torch.testing.assert_close(out[changed], other[changed])


# ------------------------------------------------------------------ tokenizer and chat template


def test_chat_template_builtin_auto_and_inline(tiny_dirs, tuned, tmp_path):
    from transformers import AutoTokenizer

    from bricks.merge.tokenizers import BUILTIN_TEMPLATES

    messages = [{"role": "user", "content": "hi"}]
    models = [{"model": str(d), "parameters": {"weight": 1.0}} for d in tuned]
    out = tmp_path / "chatml"
    cfg = write_config(tmp_path / "a.yaml", merge_method="linear", models=models, chat_template="chatml")
    assert CliRunner().invoke(main, ["merge", str(cfg), "--out", str(out)]).exit_code == 0
    text = AutoTokenizer.from_pretrained(out).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # auto: the template most inputs use (two of three here).
    for d in tuned[:2]:
        (d / "chat_template.jinja").write_text(BUILTIN_TEMPLATES["alpaca"])
    out = tmp_path / "auto"
    cfg = write_config(tmp_path / "b.yaml", merge_method="linear", models=models, chat_template="auto", tokenizer_source=str(tuned[2]))
    assert CliRunner().invoke(main, ["merge", str(cfg), "--out", str(out)]).exit_code == 0
    assert AutoTokenizer.from_pretrained(out).chat_template == BUILTIN_TEMPLATES["alpaca"]
    inline = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    out = tmp_path / "inline"
    cfg = write_config(tmp_path / "c.yaml", merge_method="linear", models=models, chat_template=inline)
    assert CliRunner().invoke(main, ["merge", str(cfg), "--out", str(out)]).exit_code == 0
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(messages, tokenize=False) == "<<hi>>"


def test_bad_chat_templates_in_one_line(tiny_dirs, tuned, tmp_path):
    models = [{"model": str(d), "parameters": {"weight": 1.0}} for d in tuned]
    for bad, message in (("chatmlx", "neither auto, a built-in"), ("{x}", "neither auto")):
        cfg = write_config(tmp_path / "t.yaml", merge_method="linear", models=models, chat_template=bad)
        r = CliRunner().invoke(main, ["merge", str(cfg), "--out", str(tmp_path / "t")])
        assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1
