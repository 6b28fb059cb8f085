"""Configured MoE models: moefy, save, reload in a fresh process with the same logits; eval."""

import json

import pytest
import torch

import bricks
from bricks.routing import BrickedFFN, set_path

from .conftest import assert_configured_dir_serves, run


@pytest.fixture(scope="module")
def brickset_dir(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bs") / "bs"
    assert run("partition", llama_dir, "--method", "param-kmeans", "--bricks", 8, "--out", out).exit_code == 0
    return out


def test_moefy_save_reload_same_logits(llama_dir, brickset_dir, tmp_path):
    out = tmp_path / "moe"
    r = run("moefy", llama_dir, "--bricks", brickset_dir, "--router", "centroid", "--active", 0.5, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    model, tok = bricks.load_model(out)
    assert sum(isinstance(m, BrickedFFN) for m in model.modules()) == 2
    # Same logits in a fresh process; the dense base inside is the original model, the MoE differs from it.
    assert_configured_dir_serves(out, llama_dir, tmp_path)


def test_eval_with_baseline(llama_dir, brickset_dir, tmp_path):
    out = tmp_path / "moe"
    assert run("moefy", llama_dir, "--router", "centroid", "--bricks", brickset_dir, "--active", 1.0, "--out", out).exit_code == 0
    r = run("eval", out, "--data", "code=builtin:code", "--data", "math=builtin:math", "--windows", 2, "--seq-len", 32,
            "--baseline", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["model_eval"]["compute_fraction"] == pytest.approx(1.0)
    for d in ("code", "math"):  # all bricks active: the dense model's perplexity
        assert res["ratio"]["ppl"][d] == pytest.approx(1.0, abs=1e-5)
    assert res["baseline"]["compute_fraction"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--router", "centroid", "--active", 0], "--active must be in (0, 1]"),
    (["--router", "centroid", "--active", 1.5], "--active must be in (0, 1]"),
    (["--router", "telepathy", "--active", 0.5], "unknown router 'telepathy'"),
])
def test_moefy_bad_input(llama_dir, brickset_dir, tmp_path, args, message):
    out = tmp_path / "moe"
    r = run("moefy", llama_dir, "--router", "centroid", "--bricks", brickset_dir, *args, "--out", out)
    assert r.exit_code == 1 and message in r.stderr and not out.exists()


def test_moefy_brickset_from_other_model(tiny_dirs, brickset_dir, tmp_path):
    out = tmp_path / "moe"
    r = run("moefy", tiny_dirs["qwen2"], "--router", "centroid", "--bricks", brickset_dir, "--out", out)
    assert r.exit_code == 1 and "not from this model" in r.stderr and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".moe")]


def test_mlp_router_trains_saves_and_reloads(llama_dir, brickset_dir, tmp_path):
    out = tmp_path / "moe"
    r = run("moefy", llama_dir, "--bricks", brickset_dir, "--router", "mlp", "--active", 0.25, "--out", out)
    assert r.exit_code == 1 and "must be trained" in r.stderr and not out.exists()
    r = run("moefy", llama_dir, "--bricks", brickset_dir, "--router", "mlp", "--active", 0.25, "--out", out,
            "--data", "code=builtin:code", "--data", "math=builtin:math", "--windows", 8, "--seq-len", 32, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["router_training"]
    assert len(report) == 2 and all(0 <= x["recall_at_k"] <= 1 for x in report)
    # Far better than chance (k/n = 0.25) at finding the oracle's top bricks (0.70 / 0.53 measured).
    assert sum(x["recall_at_k"] for x in report) / 2 > 0.45 and min(x["recall_at_k"] for x in report) > 0.35
    model, _ = bricks.load_model(out)
    again, _ = bricks.load_model(out)
    for m in (model, again):  # the execution paths round differently: one path for a bit-for-bit comparison
        set_path(m, "bricks")
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_untrained_mlp_router_refuses(llama_dir):
    model, _ = bricks.load_model(llama_dir)
    bs = bricks.partition(model, "random", 4)
    with bricks.bricked(model, bs, router="mlp", active=0.5):
        with pytest.raises(bricks.BricksError, match="untrained"):
            model(torch.randint(0, 300, (1, 4)))


def test_moefy_compute_target(llama_dir, tmp_path):
    bs_dir = tmp_path / "bs"
    assert run("partition", llama_dir, "--method", "random", "--bricks", 8, "--shared", 0.125,
               "--data", "code=builtin:code", "--windows", 2, "--seq-len", 16, "--out", bs_dir).exit_code == 0
    out = tmp_path / "moe"
    r = run("moefy", llama_dir, "--router", "centroid", "--bricks", bs_dir, "--compute", 0.5, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    model, _ = bricks.load_model(out)
    layers = [m for m in model.modules() if isinstance(m, BrickedFFN)]
    for m in layers:  # as many bricks as fit: one more would exceed the target
        assert m.compute_fraction() <= 0.5
        m.active += 1 / m.n_bricks
        assert m.compute_fraction() > 0.5
    cfg = json.loads((out / "bricks_model.json").read_text())
    assert cfg["compute"] == 0.5 and len(cfg["active"]) == 2
    r = run("moefy", llama_dir, "--router", "centroid", "--bricks", bs_dir, "--compute", 0.1, "--out", tmp_path / "moe2")
    assert r.exit_code == 1 and "leaves no room" in r.stderr and not (tmp_path / "moe2").exists()


def test_sensitivity_budget(llama_dir, tmp_path):
    """Per-layer shares by calibrated sensitivity: within the compute target, saved per layer, reloaded as is."""
    from bricks.routing.budget import error_curve

    bs_dir = tmp_path / "bs"
    assert run("partition", llama_dir, "--method", "random", "--bricks", 8, "--out", bs_dir).exit_code == 0
    out = tmp_path / "moe"
    args = ["--router", "threshold", "--compute", 0.6, "--data", "code=builtin:code", "--windows", 4, "--seq-len", 32]
    r = run("moefy", llama_dir, "--router", "centroid", "--bricks", bs_dir, "--budget", "sensitivity", "--compute", 0.6, "--out", out)
    assert r.exit_code == 1 and "needs --compute F and --data" in r.stderr and not out.exists()
    r = run("moefy", llama_dir, "--router", "centroid", "--bricks", bs_dir, "--budget", "sensitivity", *args, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    budget = json.loads(r.stdout)["budget"]
    assert [x["layer"] for x in budget["layers"]] == [0, 1] and all(x["sensitivity"] >= 0 for x in budget["layers"])
    model, _ = bricks.load_model(out)
    layers = [m for m in model.modules() if isinstance(m, BrickedFFN)]
    assert [round(m.active * 8) for m in layers] == [x["bricks"] for x in budget["layers"]]
    assert sum(m.compute_fraction() for m in layers) / 2 <= 0.6 + 1e-9
    # Nothing left unspent: one more brick in any layer would go over the target.
    dense_macs = sum(m.dense_macs_per_token() for m in layers)
    spent = sum(m._macs(m.k_active) for m in layers)
    for m in layers:
        if m.k_active < m.n_bricks:
            assert spent - m._macs(m.k_active) + m._macs(m.k_active + 1) > 0.6 * dense_macs
    x = torch.randn(50, 32)
    with torch.no_grad():
        curve = error_curve(layers[0], x)
    # Output error of the router's best k bricks: everything missing at k = 0, nothing at k = n.
    assert curve[0] == pytest.approx(1.0, abs=1e-5) and curve[-1] == pytest.approx(0.0, abs=1e-5)
    assert len(curve) == 9


@pytest.mark.parametrize("router,objective", [("centroid", "lm"), ("mlp", "lm"), ("mlp", "distill")])
def test_recovery_trains_under_routing_and_reloads(llama_dir, brickset_dir, tmp_path, router, objective):
    """Recovery fine-tunes the bricks with the routers in the loop: the routed loss falls, the routers stay as
    they were, and the saved model (its BrickSet re-fingerprinted) reloads with the same logits."""
    from bricks.routing.recovery import dense_teacher, distill_loss, recover

    model, tok = bricks.load_model(llama_dir)
    train = bricks.load_domains(["code=builtin:code"], tok, "train", 32, 8)
    bs = bricks.BrickSet.load(brickset_dir)
    bricks.moefy(model, bs, router=router, active=0.5, train_domains=train, epochs=2)
    layers = [m for m in model.modules() if isinstance(m, BrickedFFN)]
    routers_before = [{k: v.clone() for k, v in m.router.state_dict().items()} for m in layers]
    w_before = layers[0].w_in.detach().clone()
    windows = train[0].windows[:4]
    with pytest.raises(bricks.BricksError, match="steps >= 1"):
        recover(model, windows, steps=0)
    with pytest.raises(bricks.BricksError, match="unknown recovery objective"):
        recover(model, windows, steps=1, objective="mse")
    teacher = dense_teacher(model)  # the dense model before recovery, for the distillation check
    with torch.no_grad():
        kl_before = float(distill_loss(teacher)(model, windows))
    # Adam's first steps move weights by about lr: small against the tiny model's KL to itself.
    report = recover(model, windows, steps=30, lr=3e-3 if objective == "lm" else 3e-4, batch_size=4, objective=objective)
    assert report["objective"] == objective
    # It learns the four windows under routing: the LM loss, or the distance to the dense model, falls.
    assert report["loss_last"] < 0.8 * report["loss_first"]
    if objective == "distill":
        with torch.no_grad():
            assert float(distill_loss(teacher)(model, windows)) < 0.5 * kl_before
    assert not torch.equal(layers[0].w_in, w_before) and not layers[0].w_in.requires_grad
    for m, before in zip(layers, routers_before):
        if router == "mlp":  # fitted routers are frozen
            assert all(torch.equal(v, before[k]) for k, v in m.router.state_dict().items())
        else:  # weight-derived routers follow the new weights
            assert not torch.equal(m.router.centroids, before["centroids"])
    bricks.configuration(model).recovery = {"steps": 30}
    out = bricks.save_configured(model, tok, tmp_path / "moe")
    assert bricks.BrickSet.load(out / "bricks").info["fingerprint_before_recovery"] == bs.fingerprint
    ids = torch.randint(0, 300, (2, 10))
    again, _ = bricks.load_model(out)
    for m in (model, again):
        set_path(m, "bricks")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert json.loads((out / "bricks_model.json").read_text())["recovery"] == {"steps": 30}


def test_recovery_refits_mlp_routers_to_the_changing_weights(llama_dir, brickset_dir):
    """With refit_routers the MLP routers learn alongside the bricks, towards the oracle top-k of the current
    weights: their loss falls, the reported loss is the objective alone, and everything is frozen afterwards."""
    from bricks.routing.recovery import recover

    model, tok = bricks.load_model(llama_dir)
    train = bricks.load_domains(["code=builtin:code"], tok, "train", 32, 8)
    bs = bricks.BrickSet.load(brickset_dir)
    bricks.moefy(model, bs, router="mlp", active=0.5, train_domains=train, epochs=1)
    layers = [m for m in model.modules() if isinstance(m, BrickedFFN)]
    before = [m.router.net[0].weight.detach().clone() for m in layers]
    grads_before = [p.requires_grad for m in layers for p in m.router.parameters()]
    windows = train[0].windows[:4]
    with pytest.raises(bricks.BricksError, match="router_lr > 0"):
        recover(model, windows, steps=1, refit_routers=True, router_lr=0.0)
    report = recover(model, windows, steps=30, lr=3e-4, batch_size=4, refit_routers=True, router_lr=3e-3)
    assert report["router_refit"] and report["router_loss_last"] < 0.9 * report["router_loss_first"]
    assert all(not torch.equal(m.router.net[0].weight, w) for m, w in zip(layers, before))
    assert all(not m.refit_router and m.router_loss is None and not m.training for m in layers)
    assert [p.requires_grad for m in layers for p in m.router.parameters()] == grads_before
    # Refit touches the routers only: the same run without it moves the bricks the same way at step one.
    a, _ = bricks.load_model(llama_dir)
    b, _ = bricks.load_model(llama_dir)
    for m in (a, b):
        torch.manual_seed(0)
        bricks.moefy(m, bs, router="mlp", active=0.5, train_domains=train, epochs=1)
    ra = recover(a, windows, steps=1, lr=1e-3, batch_size=4, objective="lm")
    rb = recover(b, windows, steps=1, lr=1e-3, batch_size=4, objective="lm", refit_routers=True)
    assert ra["loss_first"] == pytest.approx(rb["loss_first"], rel=1e-6)
    wa, wb = (next(x for x in m.modules() if isinstance(x, BrickedFFN)).w_in for m in (a, b))
    assert torch.allclose(wa, wb, atol=1e-7)


def test_router_refit_needs_a_trainable_router(llama_dir, brickset_dir):
    from bricks.routing.recovery import recover

    model, tok = bricks.load_model(llama_dir)
    bricks.moefy(model, bricks.BrickSet.load(brickset_dir), router="centroid", active=0.5)
    with pytest.raises(bricks.BricksError, match="learns by gradient"):
        recover(model, torch.randint(0, 300, (2, 8)), steps=1, refit_routers=True)


def test_distillation_recovery_needs_a_bricked_model(llama_dir):
    from bricks.routing.recovery import recover

    model, _ = bricks.load_model(llama_dir)
    with pytest.raises(bricks.BricksError, match="needs a bricked model"):
        recover(model, torch.randint(0, 300, (2, 8)), steps=1)
    assert recover(model, torch.randint(0, 300, (2, 8)), steps=1, objective="lm")["objective"] == "lm"


def test_moefy_cli_recovery(llama_dir, brickset_dir, tmp_path):
    out = tmp_path / "moe"
    data = ["--data", "code=builtin:code", "--seq-len", 16, "--windows", 2]
    r = run("moefy", llama_dir, "--router", "centroid", "--bricks", brickset_dir, "--recover-steps", 2, "--out", out)
    assert r.exit_code == 1 and "--recover-steps needs --data" in r.stderr and not out.exists()
    r = run("moefy", llama_dir, "--router", "centroid", "--bricks", brickset_dir, *data, "--recover-steps", 2, "--recover-windows", 4,
            "--recover-refit-routers", "--out", out)  # the centroid router has nothing to refit
    assert r.exit_code == 1 and "learns by gradient" in r.stderr and not out.exists()
    r = run("moefy", llama_dir, "--router", "centroid", "--bricks", brickset_dir, *data, "--recover-steps", 2, "--recover-batch-size", 0, "--out", out)
    assert r.exit_code == 1 and "--recover-batch-size >= 1" in r.stderr and not out.exists()
    r = run("moefy", llama_dir, "--router", "centroid", "--bricks", brickset_dir, *data, "--recover-steps", 2, "--recover-windows", 4,
            "--recover-batch-size", 3, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["recovery"]
    assert report["steps"] == 2 and report["batch_size"] == 3 and report["tokens"] == 2 * 3 * 16
    cfg = json.loads((out / "bricks_model.json").read_text())
    assert cfg["recovery"]["objective"] == "distill" and cfg["recovery"]["batch_size"] == 3
    assert cfg["recovery"]["base_model"] == str(llama_dir)
    r = run("eval", out, "--data", "code=builtin:code", "--windows", 1, "--seq-len", 16, "--baseline", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["baseline_model"] == str(llama_dir)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("router", ["teal", "mlp"])
def test_interrupted_recovery_resumes_to_the_same_weights(llama_dir, brickset_dir, tmp_path, router):
    """A recovery stopped mid-way and resumed from its checkpoint ends with exactly the weights (and report) of
    an uninterrupted run; a checkpoint from other settings, or a corrupt one, is refused."""
    from bricks.routing.recovery import recover

    train = None

    def routed():
        nonlocal train
        model, tok = bricks.load_model(llama_dir)
        train = train or bricks.load_domains(["code=builtin:code"], tok, "train", 32, 8)
        torch.manual_seed(0)
        if router == "teal":
            bricks.moefy(model, None, router="teal", compute=0.5)
        else:
            bricks.moefy(model, bricks.BrickSet.load(brickset_dir), router="mlp", active=0.5, train_domains=train, epochs=1)
        return model

    refit = router == "mlp"  # router weights train too: they must come back from the checkpoint as well
    settings = dict(steps=6, lr=3e-4, batch_size=2, refit_routers=refit)
    whole = routed()
    expected = recover(whole, train[0].windows, **settings)

    def stop_at_step_5(line):
        if "step 5/" in line:
            raise _Interrupt
    ckpt = tmp_path / "recovery.pt"
    with pytest.raises(_Interrupt):
        recover(routed(), train[0].windows, log=stop_at_step_5, checkpoint=ckpt, checkpoint_every=2, **settings)
    assert ckpt.exists()  # written at step 4

    lines = []
    resumed = routed()
    report = recover(resumed, train[0].windows, log=lines.append, checkpoint=ckpt, checkpoint_every=2, **settings)
    assert any("resumed at step 4/6" in x for x in lines)
    assert report["loss_first"] == expected["loss_first"] and report["loss_last"] == expected["loss_last"]
    want = whole.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in resumed.state_dict().items())

    with pytest.raises(bricks.BricksError, match=r"from another run \(lr=0.0003 there, 0.001 here\)"):
        recover(routed(), train[0].windows, checkpoint=ckpt, **{**settings, "lr": 1e-3})
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(bricks.BricksError, match="cannot read training checkpoint"):
        recover(routed(), train[0].windows, checkpoint=ckpt, **settings)


def test_moefy_recovery_checkpoint_on_the_cli(llama_dir, tmp_path):
    ckpt = tmp_path / "state" / "recovery.pt"
    args = ["moefy", llama_dir, "--router", "teal", "--compute", 0.5, "--out", tmp_path / "teal", "--recover-steps", 2,
            "--recover-windows", 2, "--seq-len", 32, "--data", "code=builtin:code", "--recover-checkpoint", ckpt, "--json"]
    # The option reaches the training loop: an unreadable file there is refused, and nothing is written.
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"not a checkpoint")
    r = run(*args)
    assert r.exit_code == 1 and "cannot read training checkpoint" in r.stderr and not (tmp_path / "teal").exists()
    ckpt.unlink()
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "teal" / "bricks_model.json").exists() and not ckpt.exists()  # removed once the model is saved
    r = run("moefy", llama_dir, "--router", "teal", "--compute", 0.5, "--out", tmp_path / "other", "--recover-checkpoint", ckpt)
    assert r.exit_code != 0 and "give --recover-steps" in r.output and not (tmp_path / "other").exists()


def test_moefy_settings_from_a_yaml_file(llama_dir, tmp_path):
    """moefy's flags and its YAML file share one schema: unknown keys are one-line errors, flags win over the file."""
    from .conftest import one_line_error

    bad = tmp_path / "bad.yaml"
    bad.write_text("router: teal\ncompute: 0.5\nrecover_stpes: 3\n")
    line = one_line_error(run("moefy", llama_dir, "--config", bad, "--out", tmp_path / "o"))
    assert "recover_stpes" in line and "unknown key" in line and not (tmp_path / "o").exists()
    good = tmp_path / "good.yaml"
    good.write_text("router: teal\ncompute: 0.25\n")
    r = run("moefy", llama_dir, "--config", good, "--compute", 0.5, "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["router"] == "teal" and 0.45 < json.loads(r.stdout)["compute_fraction"] <= 0.5
    assert json.loads((tmp_path / "o" / "bricks_model.json").read_text())["active"] == 0.5


def test_default_router_is_the_recommended_one(llama_dir, brickset_dir, tmp_path):
    """Without --router: teal when there is no BrickSet, a trained router over a BrickSet (as the README advises)."""
    r = run("moefy", llama_dir, "--compute", 0.5, "--out", tmp_path / "t", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["router"] == "teal"
    from .conftest import one_line_error

    shared = any(s is not None for s in bricks.BrickSet.load(brickset_dir).shared)
    line = one_line_error(run("moefy", llama_dir, "--bricks", brickset_dir, "--out", tmp_path / "b"))
    assert f"router '{'hybrid' if shared else 'mlp'}' must be trained" in line
