"""Adapter bricks: PEFT LoRA import/export round trips and merges, checked against PEFT itself."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import bricks
from bricks.adapters import AdapterBrick


def make_adapter(model_dir, out, seed=0, **lora):
    """A PEFT LoRA adapter on a tiny model, with random (non-zero) B so that it changes the outputs."""
    torch.manual_seed(seed)
    base, _ = bricks.load_model(model_dir)
    cfg = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"], **lora})
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(out)
    return out


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


CASES = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"v_proj": 2, "model.layers.1.mlp.up_proj": 6}, "alpha_pattern": {"down_proj": 3.0}},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_export_round_trip_and_merge_match_peft(llama_dir, tmp_path, case):
    src = make_adapter(llama_dir, tmp_path / "peft", **CASES[case])
    brick = AdapterBrick.from_peft(src)
    if case == "patterns":
        ranks = {n: m.rank for n, m in brick.modules.items()}
        assert ranks["model.layers.0.self_attn.v_proj"] == 2 and ranks["model.layers.1.mlp.up_proj"] == 6
        assert ranks["model.layers.0.mlp.up_proj"] == 4
        assert brick.modules["model.layers.0.mlp.down_proj"].scaling == pytest.approx(3.0 / 4)
    if case == "rslora":
        assert brick.modules["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(8 / 2)
    brick.save(tmp_path / "brick")
    again = AdapterBrick.load(tmp_path / "brick")
    out = again.to_peft(tmp_path / "exported")
    ids = torch.randint(0, 300, (2, 12))

    base, _ = bricks.load_model(llama_dir)
    original = logits_of(PeftModel.from_pretrained(base, src), ids)
    base, _ = bricks.load_model(llama_dir)
    exported = logits_of(PeftModel.from_pretrained(base, out), ids)
    assert (original - exported).abs().max() <= 1e-6

    base, _ = bricks.load_model(llama_dir)
    merged_peft = PeftModel.from_pretrained(base, src).merge_and_unload()
    base, _ = bricks.load_model(llama_dir)
    again.merge_into(base)
    for (n, a), (_, b) in zip(merged_peft.state_dict().items(), base.state_dict().items()):
        assert (a - b).abs().max() <= 1e-5, n
    assert (logits_of(base, ids) - original).abs().max() <= 1e-5
    again.merge_into(base, weight=-1.0)  # detach
    plain, _ = bricks.load_model(llama_dir)
    assert (logits_of(base, ids) - logits_of(plain, ids)).abs().max() <= 1e-5


def test_conv1d_fan_in_fan_out(tiny_dirs, tmp_path):
    src = make_adapter(tiny_dirs["gpt2"], tmp_path / "peft", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    brick = AdapterBrick.from_peft(src)
    base, _ = bricks.load_model(tiny_dirs["gpt2"])
    merged = PeftModel.from_pretrained(base, src).merge_and_unload()
    base, _ = bricks.load_model(tiny_dirs["gpt2"])
    brick.merge_into(base)
    for (n, a), (_, b) in zip(merged.state_dict().items(), base.state_dict().items()):
        assert (a - b).abs().max() <= 1e-5, n


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias='all'"),
    ({"peft_type": "IA3"}, "PEFT type 'IA3' is not supported"),
    ({"r": 7}, "rank 4 in its weights but 7"),
])
def test_unsupported_or_inconsistent_adapters_are_refused(llama_dir, tmp_path, change, message):
    src = make_adapter(llama_dir, tmp_path / "peft")
    _edit_config(src, **change)
    with pytest.raises(bricks.BricksError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AdapterBrick.from_peft(src)


def test_bad_weights_are_refused(llama_dir, tiny_dirs, tmp_path):
    src = make_adapter(llama_dir, tmp_path / "peft")
    weights = src / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if "lora_A" in k)
    nan = dict(state)
    nan[key] = torch.full_like(state[key], float("nan"))
    save_file(nan, str(weights))
    with pytest.raises(bricks.BricksError, match="NaN"):
        AdapterBrick.from_peft(src)
    bad = dict(state)
    bad[key] = state[key][:2]  # rank 2 against B's rank 4
    save_file(bad, str(weights))
    with pytest.raises(bricks.BricksError, match="ranks do not match|rank 2"):
        AdapterBrick.from_peft(src)
    weights.write_bytes(b"\x00" * 20)
    with pytest.raises(bricks.BricksError, match="corrupt"):
        AdapterBrick.from_peft(src)
    # An adapter for another base: a missing target module, or other shapes.
    good = AdapterBrick.from_peft(make_adapter(llama_dir, tmp_path / "peft2"))
    other, _ = bricks.load_model(tiny_dirs["gpt2"])
    with pytest.raises(bricks.BricksError, match="does not have"):
        good.merge_into(other)


def test_merging_adapters_in_delta_space(llama_dir, tmp_path):
    from bricks.merge import merge_adapters
    from bricks.merge.methods import merge

    a = AdapterBrick.from_peft(make_adapter(llama_dir, tmp_path / "a", seed=1))
    b = AdapterBrick.from_peft(make_adapter(llama_dir, tmp_path / "b", seed=2, r=2, lora_alpha=5))  # another rank
    exact, report = merge_adapters([a, b], [0.7, 0.3])
    assert report["ranks"] == [6] and report["truncation_error"]["max"] == 0.0
    for n in a.modules:
        want = (0.7 * a.modules[n].delta() + 0.3 * b.modules[n].delta()) / 1.0
        torch.testing.assert_close(exact.modules[n].delta(), want, rtol=1e-5, atol=1e-6)
    # Re-factored to rank 1: the best rank-1 approximation, and its error reported.
    low, report = merge_adapters([a, b], [0.7, 0.3], rank=1)
    n = "model.layers.0.self_attn.q_proj"
    full = exact.modules[n].delta().double()
    s = torch.linalg.svdvals(full)
    assert low.modules[n].rank == 1
    err = float((full - low.modules[n].delta().double()).norm() / full.norm())
    assert err == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-4)
    assert report["truncation_error"]["max"] >= err - 1e-9 > 0
    # TIES on the dense deltas, kept at full rank: the merge method's result exactly.
    ties, _ = merge_adapters([a, b], [1.0, 1.0], method="ties", rank=64, model_params=[{"density": 0.5}] * 2)
    d = [a.modules[n].delta(), b.modules[n].delta()]
    want = merge("ties", torch.zeros_like(d[0]), d, [{"weight": 1.0, "density": 0.5}] * 2)
    torch.testing.assert_close(ties.modules[n].delta(), want, rtol=1e-4, atol=1e-5)
    # The merged brick is a normal PEFT adapter: exported, PEFT gives base + merged delta.
    out = exact.to_peft(tmp_path / "merged")
    base, _ = bricks.load_model(llama_dir)
    ids = torch.randint(0, 300, (1, 8))
    via_peft = logits_of(PeftModel.from_pretrained(base, out), ids)
    base, _ = bricks.load_model(llama_dir)
    exact.merge_into(base)
    assert (logits_of(base, ids) - via_peft).abs().max() <= 1e-5
    # Refusals: different target modules; different bases.
    c = AdapterBrick.from_peft(make_adapter(llama_dir, tmp_path / "c", target_modules=["q_proj"]))
    with pytest.raises(bricks.BricksError, match="different modules"):
        merge_adapters([a, c])
    b.config["base_model_name_or_path"] = "some/other-model"
    with pytest.raises(bricks.BricksError, match="different bases"):
        merge_adapters([a, b])


def test_adapter_cli(llama_dir, tmp_path):
    from click.testing import CliRunner

    from bricks.cli import main

    a = make_adapter(llama_dir, tmp_path / "a", seed=1)
    b = make_adapter(llama_dir, tmp_path / "b", seed=2)
    run = CliRunner().invoke
    r = run(main, ["adapter", "import", str(a), "--out", str(tmp_path / "brick"), "--base", str(llama_dir), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["modules"] == 8
    assert run(main, ["adapter", "export", str(tmp_path / "brick"), "--out", str(tmp_path / "peft")]).exit_code == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    r = run(main, ["adapter", "merge", str(tmp_path / "brick"), str(b), "--weights", "0.5,0.5", "--rank", "2",
                   "--out", str(tmp_path / "m"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["ranks"] == [2]
    # The merged brick is the best rank-2 approximation of the mean delta: its error is the reported SVD error.
    merged, da, db = (AdapterBrick.load(p).deltas() for p in (tmp_path / "m", a, b))
    assert set(merged) == set(da)
    errors = [float((merged[k] - (da[k] + db[k]) / 2).norm() / ((da[k] + db[k]) / 2).norm()) for k in merged]
    assert max(errors) == pytest.approx(report["truncation_error"]["max"], rel=1e-3)
    assert 0 < min(errors) and max(errors) < 1
    # info and export describe and write the same brick.
    r = run(main, ["adapter", "info", str(tmp_path / "brick"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["modules"] == 8 and json.loads(r.stdout)["ranks"] == [4]
    exported, imported = AdapterBrick.load(tmp_path / "peft").deltas(), AdapterBrick.load(tmp_path / "brick").deltas()
    assert all(torch.equal(exported[k], imported[k]) for k in imported)
    r = run(main, ["adapter", "merge", str(a), str(b), "--weights", "x", "--out", str(tmp_path / "m2")])
    assert r.exit_code == 1 and "bad --weights" in r.stderr and not (tmp_path / "m2").exists()
    r = run(main, ["adapter", "import", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "not a PEFT adapter directory" in r.stderr and not (tmp_path / "x").exists()


def test_train_lora_returns_a_peft_brick_and_leaves_the_model(llama_dir, tmp_path):
    from bricks.adapters import train_lora

    model, _ = bricks.load_model(llama_dir)
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 300, (6, 12))
    brick, report = train_lora(model, ids, "t", rank=2, targets=("q_proj", "down_proj"), steps=4, lr=1e-2, batch_size=2)
    assert report["steps"] == 4 and report["tokens"] == 4 * 2 * 12 and report["loss_first"] > 0
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q) and p.requires_grad  # unloaded, flags restored
    assert brick.info()["ranks"] == [2] and any(m.B.abs().sum() > 0 for m in brick.modules.values())  # B trained
    brick.to_peft(tmp_path / "peft")
    with torch.no_grad():
        peft_out = PeftModel.from_pretrained(bricks.load_model(llama_dir)[0], tmp_path / "peft")(ids).logits
        brick.merge_into(model)
        assert (model(ids).logits - peft_out).abs().max() <= 1e-5
    with pytest.raises(bricks.BricksError, match="do not exist"):
        train_lora(model, ids, targets=("nope",))
