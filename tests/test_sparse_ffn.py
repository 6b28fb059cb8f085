"""The activation-sparse FFN (router `teal`): equivalences, accounting, moefy / save / reload, recovery."""

import json

import pytest
import torch

import bricks
from bricks.arch import ffns
from bricks.routing import SparseFFN, assemble_sparse, compute_fraction, executed_fraction, set_path

from .conftest import assert_configured_dir_serves, run


def _layers(model):
    return [m for m in model.modules() if isinstance(m, SparseFFN)]


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_full_compute_is_the_dense_model(tiny_dirs, family):
    model, _ = bricks.load_model(tiny_dirs[family])
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        dense = model(ids).logits
        assemble_sparse(model, 1.0)
        assert compute_fraction(model) == 1.0
        assert (model(ids).logits - dense).abs().max() <= 1e-5
        assert (model(ids[:1, :1]).logits - dense[:1, :1]).abs().max() <= 1e-5


def _reference(f, x, n_in, n_act):
    """Dense FFN of the original module's weights, with each token's smallest inputs and activations zeroed."""
    def top(v, n):
        return torch.zeros_like(v).scatter_(-1, v.abs().topk(n, dim=-1).indices, 1.0)

    xm = x * top(x, n_in)
    up = xm @ f.up_weight().t() + (0 if f.up_bias() is None else f.up_bias())
    if f.gate_weight() is not None:
        gate = xm @ f.gate_weight().t() + (0 if f.gate_bias() is None else f.gate_bias())
        a = f.act(gate) * up
    else:
        a = f.act(up)
    y = (a * top(a, n_act)) @ f.down_weight().t()
    return y if f.down_bias() is None else y + f.down_bias()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_sparse_path_matches_the_masked_reference(tiny_dirs, family, tokens):
    model, _ = bricks.load_model(tiny_dirs[family])
    f = ffns(model)[0]
    sparse = SparseFFN(f, compute=0.5)
    assert 0.45 < sparse.compute_fraction() <= 0.51
    x = torch.randn(tokens, f.down_weight().shape[0])
    with torch.no_grad():
        ref = _reference(f, x, sparse.n_in, sparse.n_act)
        for path in (None, *sparse.paths):  # chosen by timing, then each path forced: the same function
            sparse.set_path(path)
            assert torch.allclose(sparse(x), ref, atol=1e-5, rtol=1e-4), path
        # Training runs dense matmuls on the zeroed entries: the same function.
        sparse.train()
        with torch.enable_grad():
            assert torch.allclose(sparse(x), ref, atol=1e-5, rtol=1e-4)
    # What ran is counted: the rows the bags read (the configured share); the dense matmuls of the masked paths,
    # inference or training, count as the whole FFN.
    for path, executed in (("bags", sparse.compute_fraction()), ("split", sparse.compute_fraction()), ("masked", 1.0)):
        sparse.set_path(path)
        sparse.reset_counts()
        with torch.no_grad():
            sparse.eval()(x)
        assert sparse.executed_fraction() == pytest.approx(executed), path
        assert sparse.routed_fraction() == pytest.approx(sparse.compute_fraction()), path  # what was selected
    with pytest.raises(bricks.BricksError, match="unknown execution path 'bricks'"):
        sparse.set_path("bricks")
    sparse.reset_counts()
    with torch.enable_grad():
        sparse.train()(x)
    assert sparse.executed_fraction() == pytest.approx(1.0)
    # The top-k choice is reported beside the fraction: hidden + d_ff values ranked per token.
    assert sparse.selection_fraction() == pytest.approx((x.shape[1] + f.d_ff) / sparse.dense_macs_per_token())


def test_budget_split_and_accounting(llama_dir):
    model, _ = bricks.load_model(llama_dir)
    f = ffns(model)[0]
    hidden, d_ff = f.down_weight().shape
    m = SparseFFN(f, compute=0.5)
    assert (m.keep_in, m.keep_act) == pytest.approx((0.6, 0.3))
    assert m.compute_fraction() == pytest.approx((2 * d_ff * m.n_in + hidden * m.n_act) / (3 * d_ff * hidden))
    for target in (0.25, 0.3, 0.5, 0.7):  # counts round down: never above the target
        m.set_compute(target)
        assert target - 0.05 < m.compute_fraction() <= target
    m.set_compute(0.9)  # inputs capped at all of them, the rest on neurons
    assert m.keep_in == 1.0 and m.keep_act == pytest.approx(0.7)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(bricks.BricksError, match=r"compute fraction must be in \(0, 1\]"):
            m.set_compute(bad)


def test_bfloat16_sparse_path(llama_dir):
    model, _ = bricks.load_model(llama_dir, dtype="bfloat16")
    f = ffns(model)[0]
    sparse = SparseFFN(f, compute=0.5)
    x = torch.randn(3, f.down_weight().shape[0], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        out = sparse(x)
        model.float()  # the same bf16 values, computed in fp32
        ref = _reference(f, x.float(), sparse.n_in, sparse.n_act)
    assert out.dtype == torch.bfloat16
    # bf16 rounding can swap a neuron at the top-k boundary with its neighbour: compare whole outputs, not entries.
    assert (out.float() - ref).norm() <= 0.1 * ref.norm()


def test_moefy_teal_saves_and_reloads_in_a_fresh_process(llama_dir, tmp_path):
    out = tmp_path / "teal"
    r = run("moefy", llama_dir, "--router", "teal", "--compute", 0.5, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["router"] == "teal" and 0.45 < res["compute_fraction"] <= 0.5 + 1e-3
    assert not (out / "bricks").exists()
    model, _ = bricks.load_model(out)
    assert len(_layers(model)) == 2
    assert_configured_dir_serves(out, llama_dir, tmp_path)
    r = run("eval", out, "--data", "code=builtin:code", "--windows", 2, "--seq-len", 16, "--baseline", "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)["model_eval"]
    assert ev["compute_fraction"] == pytest.approx(res["compute_fraction"])  # what each token selected
    assert res["compute_fraction"] - 1e-6 <= ev["executed_fraction"] <= 1.0  # what the chosen paths ran


@pytest.mark.parametrize("args, message", [
    (["--router", "teal", "--bricks", "BS"], "not a BrickSet: drop --bricks"),
    (["--router", "centroid"], "give --bricks DIR"),
    (["--router", "teal", "--compute", 0.5, "--budget", "sensitivity", "--data", "code=builtin:code"],
     "one compute fraction for every layer"),
    (["--router", "teal", "--compute", 1.5], "--compute must be in (0, 1]"),
    (["--router", "teal", "--selection", "threshold"], "--selection threshold calibrates its magnitudes on data"),
    (["--router", "centroid", "--bricks", "BS", "--selection", "threshold"], "use it with --router teal"),
])
def test_moefy_teal_bad_input(llama_dir, tmp_path, args, message):
    out = tmp_path / "teal"
    args = [tmp_path if a == "BS" else a for a in args]
    r = run("moefy", llama_dir, *args, "--out", out)
    assert r.exit_code == 1 and message in r.stderr and not out.exists()


def test_recovery_under_teal_sparsity(llama_dir, tmp_path):
    """Distillation recovery trains the sparse model towards the dense one; the saved model reloads the same."""
    from bricks.routing.recovery import dense_teacher, distill_loss, recover

    model, tok = bricks.load_model(llama_dir)
    bricks.moefy(model, None, router="teal", compute=0.5)
    windows = bricks.load_domains(["code=builtin:code"], tok, "train", 32, 4)[0].windows
    teacher = dense_teacher(model)
    assert all(m.full for m in _layers(teacher))
    with torch.no_grad():
        kl_before = float(distill_loss(teacher)(model, windows))
    w_before = _layers(model)[0].w_in_t.detach().clone()
    report = recover(model, windows, steps=30, lr=3e-4, batch_size=4)
    assert report["loss_last"] < 0.8 * report["loss_first"]
    with torch.no_grad():
        assert float(distill_loss(teacher)(model, windows)) < 0.5 * kl_before
    layer = _layers(model)[0]
    assert not torch.equal(layer.w_in_t, w_before) and not layer.w_in_t.requires_grad and not layer.training
    executed_fraction(model, reset=True)
    out = bricks.save_configured(model, tok, tmp_path / "teal")
    ids = torch.randint(0, 300, (2, 10))
    again, _ = bricks.load_model(out)
    for m in (model, again):  # one path: the paths round differently, and `bags` reads only the kept rows
        set_path(m, "bags")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert executed_fraction(model, reset=True) == pytest.approx(compute_fraction(model))
    # The dense matmuls on zeroed entries compute the same function, and count as the whole FFN.
    set_path(model, "masked")
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-5)
    assert executed_fraction(model) == pytest.approx(1.0)


def test_moefy_api_needs_a_brickset_for_brick_routers(llama_dir):
    model, _ = bricks.load_model(llama_dir)
    with pytest.raises(bricks.BricksError, match="routes bricks: give a BrickSet"):
        bricks.moefy(model, None, router="centroid")


def test_sparsified_context_restores_the_dense_ffns(llama_dir):
    from bricks.routing import sparsified

    model, _ = bricks.load_model(llama_dir)
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        dense = model(ids).logits
        with sparsified(model, 0.5):
            assert len(_layers(model)) == 2
            assert not torch.allclose(model(ids).logits, dense)
            gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert not _layers(model) and torch.equal(model(ids).logits, dense)
    assert gen.shape == (1, 11)


def test_teal_output_refers_to_its_source(llama_dir, tmp_path):
    """teal without recovery changes no weight: the directory holds a reference to the source model (spec and
    fingerprint), not a copy of its checkpoint, and refuses a source that changed."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(llama_dir, source)
    out = tmp_path / "teal"
    assert run("moefy", source, "--router", "teal", "--compute", 0.5, "--out", out).exit_code == 0
    assert not list(out.glob("*.safetensors")) and sum(f.stat().st_size for f in out.iterdir()) < 1_000_000
    assert json.loads((out / "bricks_model.json").read_text())["source"]["spec"] == str(source.resolve())
    model, _ = bricks.load_model(out)
    assert len(_layers(model)) == 2
    changed, _ = bricks.load_model(source)
    with torch.no_grad():
        changed.lm_head.weight.mul_(2)
        changed.model.layers[0].mlp.down_proj.weight.mul_(2)
    changed.save_pretrained(source)
    with pytest.raises(bricks.BricksError, match="has changed since"):
        bricks.load_model(out)


def _threshold_reference(f, x, t_in, t_act):
    """Dense FFN with each token's inputs and activations at or below the thresholds zeroed."""
    xm = x * (x.abs() > t_in)
    a = f.act(xm @ f.gate_weight().t()) * (xm @ f.up_weight().t())
    return (a * (a.abs() > t_act)) @ f.down_weight().t()


def test_threshold_selection_keeps_the_configured_share_on_average(llama_dir):
    """TEAL's calibrated magnitudes: every path computes the thresholded function, and the mean share kept on the
    calibration data is the configured one (the share varies per token: the routed fraction counts it)."""
    from bricks.routing import calibrate_thresholds

    model, _ = bricks.load_model(llama_dir)
    windows = torch.randint(0, 300, (16, 24))
    assemble_sparse(model, 0.5)
    layers = _layers(model)
    with torch.no_grad():
        with pytest.raises(bricks.BricksError, match="no activation-sparse FFN"):
            calibrate_thresholds(torch.nn.Linear(2, 2), windows)
        layers[0].selection = "threshold"
        with pytest.raises(bricks.BricksError, match="uncalibrated: run bricks.routing.calibrate_thresholds"):
            model(windows[:1])
        thresholds = calibrate_thresholds(model, windows, max_tokens=10_000)
        assert len(thresholds) == len(layers) and all(m.selection == "threshold" for m in layers)
        executed_fraction(model, reset=True)
        set_path(model, "masked")
        model(windows)
    # Calibrated on the same windows: the mean compute is the configured one, to the sampling's precision.
    routed = [m.routed_fraction() for m in layers]
    assert all(abs(r - m.compute_fraction()) < 0.03 for r, m in zip(routed, layers)), routed
    f = ffns(bricks.load_model(llama_dir)[0])[0]
    sparse = SparseFFN(f, 0.5, selection="threshold")
    with torch.no_grad():
        sparse.fit_thresholds(torch.randn(4000, 32))
        assert sparse.selection_fraction() == 0.0  # comparisons, no ranking
        for tokens in (1, 5):
            x = torch.randn(tokens, 32)
            ref = _threshold_reference(f, x, *sparse.thresholds)
            for path in sparse.paths:
                sparse.set_path(path)
                torch.testing.assert_close(sparse(x), ref, rtol=1e-4, atol=1e-5)
        # A token whose entries all lie below the magnitudes keeps nothing: zeros on every path, no error.
        sparse.thresholds = (1e9, 1e9)
        for path in sparse.paths:
            sparse.set_path(path)
            assert torch.equal(sparse(x[:1]), torch.zeros(1, 32)) and torch.equal(sparse(x), torch.zeros(5, 32))
        sparse.set_compute(0.3)  # new shares: the old magnitudes no longer fit
        with pytest.raises(bricks.BricksError, match="uncalibrated"):
            sparse(x)
    with pytest.raises(bricks.BricksError, match="unknown selection 'random'"):
        SparseFFN(f, 0.5, selection="random")


def test_moefy_teal_threshold_saves_its_magnitudes(llama_dir, tmp_path):
    out = tmp_path / "teal-t"
    r = run("moefy", llama_dir, "--router", "teal", "--compute", 0.5, "--selection", "threshold", "--data",
            "code=builtin:code", "--windows", 8, "--seq-len", 32, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["selection"] == "threshold" and len(res["thresholds"]) == 2 and all(t[0] > 0 for t in res["thresholds"])
    doc = json.loads((out / "bricks_model.json").read_text())
    assert doc["selection"] == "threshold" and doc["thresholds"] == res["thresholds"]
    model, _ = bricks.load_model(out)
    assert [list(m.thresholds) for m in _layers(model)] == res["thresholds"]
    assert_configured_dir_serves(out, llama_dir, tmp_path)
    # A marker whose thresholds do not fit the model is refused in one line.
    doc["thresholds"] = doc["thresholds"][:1]
    (out / "bricks_model.json").write_text(json.dumps(doc))
    with pytest.raises(bricks.BricksError, match="one \\(inputs, neurons\\) threshold pair per layer"):
        bricks.load_model(out)


def test_threshold_magnitudes_are_recalibrated_after_recovery(llama_dir):
    model, tok = bricks.load_model(llama_dir)
    domains = bricks.load_domains(["code=builtin:code"], tok, "train", 24, 8)
    with pytest.raises(bricks.BricksError, match="threshold selection is calibrated on data"):
        bricks.moefy(model, None, router="teal", compute=0.5, selection="threshold")
    bricks.moefy(model, None, router="teal", compute=0.5, selection="threshold", train_domains=domains)
    before = [m.thresholds for m in _layers(model)]
    model2, _ = bricks.load_model(llama_dir)
    bricks.moefy(model2, None, router="teal", compute=0.5, selection="threshold", train_domains=domains,
                 recover_steps=3, recover_lr=1e-2, recover_batch_size=2, recover_windows=domains[0].windows)
    after = [m.thresholds for m in _layers(model2)]
    assert bricks.configuration(model2).thresholds == after and after != before  # the weights moved, and so did they
