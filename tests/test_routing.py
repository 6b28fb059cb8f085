"""Routed bricked FFNs: equivalence at full activity, decode == grouped == masked reference, accounting."""

import pytest
import torch

import bricks
from bricks.arch import ffns
from bricks.routing import ROUTERS, BrickedFFN, bricked, compute_fraction, cpu_kernels


def _shared_brickset(model, tok, n=8, shared=0.125, method="param-kmeans"):
    from bricks.analysis.partition import activation_statistics

    stats = activation_statistics(model, tok, ["code=builtin:code"], windows=4, seq_len=16)
    return bricks.partition(model, method, n, stats, shared_fraction=shared)


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_full_activity_is_the_dense_model(tiny_dirs, family, router):
    model, tok = bricks.load_model(tiny_dirs[family])
    bs = _shared_brickset(model, tok)
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        dense = model(ids).logits
        with bricked(model, bs, router=router, active=1.0):
            routed = model(ids).logits
            step = model(ids[:1, :1]).logits  # the batch-1 decode shape too
            assert compute_fraction(model) == pytest.approx(1.0)
    assert (routed - dense).abs().max() <= 1e-5
    assert (step - dense[:1, :1]).abs().max() <= 1e-5


def _masked_reference(f, x, chosen, shared_neurons):
    """Dense FFN output with every neuron outside the chosen bricks zeroed, token by token."""
    h = x @ f.up_weight().t()
    a = f.act(x @ f.gate_weight().t()) * h
    keep = torch.zeros_like(a)
    for t, neurons in enumerate(chosen):
        keep[t, neurons] = 1
        keep[t, shared_neurons] = 1
    return (a * keep) @ f.down_weight().t()


@pytest.mark.parametrize("router", ["oracle", "centroid", "threshold"])
@pytest.mark.parametrize("shared", [0.0, 0.125])
def test_decode_grouped_and_masked_reference_agree(llama, router, shared, tokenizer):
    model, tok = llama
    stats = None
    if shared:
        from bricks.analysis.partition import activation_statistics

        stats = activation_statistics(model, tok, ["code=builtin:code"], windows=4, seq_len=16)
    bs = bricks.partition(model, "random", 7, stats, shared_fraction=shared)  # sizes 8 and 9: padding in use
    f = ffns(model)[0]
    ffn = BrickedFFN(f, bs.assignments[0], bs.shared[0], router=router, active=0.4)
    x = torch.randn(5, 32)
    with torch.no_grad():
        if ffn.router.trainable:
            ffn.router.fit(torch.randn(64, 32), None, ffn.k_active, 1, 0.0, torch.Generator())
        sel = ffn.select(x)  # [5, n] mask
        assert sel.shape == (5, 7) and sel.any(1).all()
        if router != "threshold":
            assert (sel.sum(1) == round(0.4 * 7)).all()
        ffn.set_path("bricks")
        grouped = ffn(x)
        decoded = torch.cat([ffn(x[t : t + 1]) for t in range(5)])
        if router != "threshold":  # the accelerator decode path, forced on CPU: the same function
            ffn._gathers = lambda x: True
            gathered = torch.cat([ffn(x[t : t + 1]) for t in range(5)])
            del ffn._gathers
        ffn.set_path("masked")  # every brick computed, the unselected ones zeroed: the same function again
        masked = [ffn(x), torch.cat([ffn(x[t : t + 1]) for t in range(5)])]
        if "kernel" in ffn.paths:  # one token per call of the compiled CPU kernel, where it is built
            ffn.set_path("kernel")
            masked += [ffn(x), torch.cat([ffn(x[t : t + 1]) for t in range(5)])]
            ffn.set_path("masked")
        # where it is built, and for routers that do not compute the gate rows themselves (the kernel would again)
        assert ("kernel" in ffn.paths) == (cpu_kernels.available() and not ffn.router.reuses_gate)
        routed = [b for b in bs.bricks(0) if not b.shared]
        chosen = [torch.cat([routed[b].neurons for b in torch.nonzero(s).flatten().tolist()]) for s in sel]
        shared_neurons = [b.neurons for b in bs.bricks(0) if b.shared]
        ref = _masked_reference(f, x, chosen, shared_neurons[0] if shared_neurons else torch.empty(0, dtype=torch.long))
    for out in (grouped, decoded, *masked):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    if router != "threshold":
        torch.testing.assert_close(gathered, ref, rtol=1e-5, atol=1e-6)
    # Training (recovery) computes all bricks and masks: the same outputs and the same weight gradients.
    grads = []
    for mode in (True, False):  # train mode: masked path; eval mode with gradients: grouped path
        ffn.train(mode)
        ffn.zero_grad(set_to_none=True)
        for p in (ffn.w_in, ffn.w_down):
            p.requires_grad_(True)
        out = ffn(x)
        out.square().sum().backward()
        grads.append((out.detach(), ffn.w_in.grad.clone(), ffn.w_down.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(grads[0][1].flatten(1).abs().sum(1) > 0, sel.any(0))  # bricks no token ran get no gradient
    # What runs is counted: the masked training path computes every brick, the whole FFN, while the routed
    # function selected its share (counted apart).
    ffn.train()
    ffn.reset_counts()
    ffn(x)
    assert ffn.executed_fraction() == pytest.approx(1.0)
    assert ffn.routed_fraction() == pytest.approx(ffn._macs(float(sel.sum()) / len(x)) / ffn.dense_macs_per_token())


def test_oracle_picks_the_heaviest_bricks(llama):
    model, _ = llama
    bs = bricks.partition(model, "random", 8)
    f = ffns(model)[1]
    ffn = BrickedFFN(f, bs.assignments[1], router="oracle", active=0.25)
    x = torch.randn(3, 32)
    with torch.no_grad():
        a = f.act(x @ f.gate_weight().t()) * (x @ f.up_weight().t())
        contrib = a.abs() * f.down_weight().norm(dim=0)
        mass = torch.stack([contrib[:, b.neurons].sum(1) for b in bs.bricks(1)], 1)
        expected = mass.topk(2, dim=1).indices.sort(1).values
        assert torch.equal(torch.nonzero(ffn.select(x))[:, 1].view(3, 2), expected)


def test_threshold_router_calibrates_to_the_target_share(llama):
    """CATS-style gating: per-layer threshold from calibration quantiles; bricks reuse the router's gate rows."""
    model, _ = llama
    bs = bricks.partition(model, "random", 16)
    f = ffns(model)[0]
    ffn = BrickedFFN(f, bs.assignments[0], router="threshold", active=0.25)
    calib = torch.randn(4000, 32)
    with torch.no_grad():
        with pytest.raises(bricks.BricksError, match="uncalibrated"):
            ffn(calib[:2])
        ffn.router.fit(calib, None, ffn.k_active, 1, 0.0, torch.Generator())
        x = torch.randn(4000, 32)
        for active in (0.25, 0.5):
            ffn.active = active
            share = ffn.select(x).float().mean()
            assert share == pytest.approx(active, abs=0.02)  # same distribution as calibration: the target share
        # One threshold per layer: every brick chosen on its own merit outscores every brick left out
        # (a token whose bricks all fall short still runs its best one).
        scores, sel = ffn.router(x[:100]), ffn.select(x[:100])
        several = sel.sum(1) > 1
        assert scores[several][sel[several]].min() >= scores[~sel].max()
        ffn.reset_counts()
        ffn.set_path("bricks")  # reads only the selected bricks (the `masked` path counts every brick)
        ffn(x[:100])
        ran = float(sel.sum()) / 100
        # Counted independently of `_macs`: the router reads every brick's gate rows once, and each brick that
        # runs reads its up and down rows (its gate rows come from the router).
        size, n = ffn.brick_size, ffn.n_bricks
        assert ffn.executed_fraction() == pytest.approx((n * size * 32 + ran * 2 * size * 32) / (3 * 64 * 32))
        # Gate rows are computed once (router) and not again by the bricks: 2 of 3 blocks per brick.
        per_brick = 2 * ffn.brick_size * 32
        assert ffn._macs(2) == 2 * per_brick + 16 * ffn.brick_size * 32


def test_hybrid_router_needs_a_shared_brick(llama, tokenizer):
    model, tok = llama
    f = ffns(model)[0]
    with pytest.raises(bricks.BricksError, match="shared brick.*--shared"):
        BrickedFFN(f, bricks.partition(model, "random", 4).assignments[0], router="hybrid", active=0.5)
    bs = _shared_brickset(model, tok, n=5, shared=0.25, method="random")
    assert BrickedFFN(f, bs.assignments[0], bs.shared[0], router="hybrid", active=0.5).router.trainable


def test_compute_fraction_counts_router_and_bricks(llama):
    model, _ = llama
    bs = bricks.partition(model, "random", 8)  # 8 bricks of 8 neurons, no padding
    ffn = BrickedFFN(ffns(model)[0], bs.assignments[0], router="centroid", active=0.5)
    with torch.no_grad():
        ffn(torch.randn(4, 32))
    dense = 3 * 64 * 32
    assert ffn.compute_fraction() == pytest.approx((4 * 3 * 8 * 32 + 8 * 32) / dense)


def test_bad_routing_requests(llama):
    model, _ = llama
    bs = bricks.partition(model, "random", 4)
    f = ffns(model)[0]
    for active in (0.0, 1.5, -0.1):
        with pytest.raises(bricks.BricksError, match=r"active fraction must be in \(0, 1\]"):
            BrickedFFN(f, bs.assignments[0], router="centroid", active=active)
    with pytest.raises(bricks.BricksError, match="unknown router 'magic'.*centroid"):
        BrickedFFN(f, bs.assignments[0], router="magic", active=0.5)
    with pytest.raises(bricks.BricksError, match="no router"):
        BrickedFFN(f, bs.assignments[0], active=0.5)(torch.randn(2, 32))


def test_generate_with_routed_bricks(llama):
    model, _ = llama
    bs = bricks.partition(model, "param-kmeans", 8)
    ids = torch.randint(0, 300, (1, 6))
    with bricked(model, bs, router="centroid", active=0.5):
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 11)
        assert compute_fraction(model) < 0.6
    assert all(not isinstance(m, BrickedFFN) for m in model.modules())  # dense FFNs back


def test_bench_ffn_cli_small():
    import json

    from click.testing import CliRunner

    from bricks.cli import main

    r = CliRunner().invoke(main, ["bench", "ffn", "--shape", "64x256", "--dtype", "float32", "--batch", "1",
                                  "--batch", "4", "--active", "0.5", "--bricks", "8", "--reps", "2", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 2 and all(0.5 < row["compute_fraction"] < 0.7 for row in rows)
    for row in rows:  # the ratio is dense over routed time, both measured
        assert row["dense_ms"] > 0 and row["bricked_ms"] > 0
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["bricked_ms"], rel=0.05, abs=0.002)
    bad = CliRunner().invoke(main, ["bench", "ffn", "--active", "2"])
    assert bad.exit_code == 1 and "active fraction" in bad.stderr


def test_half_precision_layout(llama_dir):
    """bf16 stores W_down's rows brick by brick, as fp32 does ([n, size, hidden]: a token's down projection sums its
    bricks' rows); every path computes the routed function, and at full activity the dense bf16 FFN."""
    model, _ = bricks.load_model(llama_dir, dtype="bfloat16")
    bs = bricks.partition(model, "random", 8)
    f = ffns(model)[0]
    ffn = BrickedFFN(f, bs.assignments[0], router="centroid", active=1.0)
    assert ffn.w_down.shape == (8, 8, 32)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x).float(), f.module(x).float(), rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(ffn(x[:1]).float(), f.module(x[:1]).float(), rtol=2e-2, atol=2e-3)
        ffn.set_path("dense")  # every brick: the dense function again
        ffn.active = 0.5
        torch.testing.assert_close(ffn(x).float(), f.module(x).float(), rtol=2e-2, atol=2e-3)
        sel = ffn.select(x)
        xf = x.float()
        h = xf @ f.gate_weight().float().t()
        a = torch.nn.functional.silu(h) * (xf @ f.up_weight().float().t())
        keep = sel.float()[:, bs.assignments[0]]  # [tokens, d_ff]: the neurons of each token's bricks
        ref = (a * keep) @ f.down_weight().float().t()
        scale = ref.abs().max()
        for path in ffn.paths:
            ffn.set_path(path)
            for out in (ffn(x), torch.cat([ffn(x[t:t + 1]) for t in range(3)])):
                assert (out.float() - ref).abs().max() < 2e-2 * scale, path


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "gpt_neox", "gemma"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_weights_rebuilt_from_bricks(tiny_dirs, family, dtype):
    """The bricked copy holds every weight exactly once: writing it back gives the dense module bit for bit."""
    import copy

    from bricks.arch import FFN

    model, tok = bricks.load_model(tiny_dirs[family], dtype=dtype)
    assignment = torch.randperm(64, generator=torch.Generator().manual_seed(0)) % 7  # sizes 9 and 10: padding
    f = ffns(model)[1]
    bricked_ffn = BrickedFFN(f, assignment, shared=3)
    skeleton = copy.deepcopy(f.module).to("meta")
    rebuilt = skeleton.to_empty(device="cpu")
    for p in rebuilt.parameters():
        p.data.fill_(7.0)  # anything not rewritten would show
    bricked_ffn.write_dense(FFN(None, 1, f.layout, module=rebuilt))
    original = f.module.state_dict()
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, original[k]), k
