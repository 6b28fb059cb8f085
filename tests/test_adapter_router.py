"""Routing between adapter bricks: arrow, prototype and trained gate routers on a tiny llama."""

import json

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel

import bricks
from bricks.cli import main
from bricks.data import Domain
from bricks.adapters import AdapterBrick
from bricks.adapters.routers import AdapterRouter, fit_router
from bricks.adapters import attach_adapters

from .test_adapters import make_adapter


@pytest.fixture
def pair(llama_dir, tmp_path):
    dirs = [make_adapter(llama_dir, tmp_path / "low", seed=1, r=4),
            make_adapter(llama_dir, tmp_path / "high", seed=2, r=8, target_modules=["q_proj", "v_proj", "down_proj"])]
    brs = [AdapterBrick.from_peft(d) for d in dirs]
    brs[0].name, brs[1].name = "low", "high"
    return dirs, brs


def _domains(n=6, seq=16, seed=0):
    """Two 'domains' a random tiny model can tell apart: each drawn from its own few tokens."""
    g = torch.Generator().manual_seed(seed)
    return [Domain("low", "test", torch.randint(10, 16, (n, seq), generator=g)),
            Domain("high", "test", torch.randint(200, 206, (n, seq), generator=g))]


def test_arrow_directions_are_each_bricks_top_input_direction(llama_dir, pair):
    _, brs = pair
    model, _ = bricks.load_model(llama_dir)
    multi = attach_adapters(model, brs)
    router = fit_router(multi, "arrow")
    name = "model.layers.0.self_attn.q_proj"
    dirs = router.gates[name.replace(".", "/")].directions
    for k, b in enumerate(brs):
        _, _, vh = torch.linalg.svd(b.modules[name].delta().double())
        assert abs(torch.dot(dirs[k].double(), vh[0])) == pytest.approx(1.0, abs=1e-5)  # same line, either sign
    # A brick that does not adapt a layer never wins there.
    up = router.gates["model.layers.0.mlp.up_proj".replace(".", "/")]
    assert up.directions[1].abs().sum() == 0 and up.directions[0].abs().sum() > 0
    x = torch.randn(1, 3, dirs.shape[1])
    w = router.gates[name.replace(".", "/")](x)
    assert w.shape == (1, 3, 2) and torch.all((w == 0) | (w == 1))  # arrow's default here: top-1
    x = dirs[1].expand(1, 1, -1) * 5
    assert router.gates[name.replace(".", "/")](x)[0, 0].argmax() == 1


def test_prototype_router_sends_each_domain_to_its_brick(llama_dir, pair):
    _, brs = pair
    model, _ = bricks.load_model(llama_dir)
    multi = attach_adapters(model, brs)
    router = fit_router(multi, "prototype", _domains(), temperature=0.05)
    held = _domains(seed=1)
    for k, d in enumerate(held):
        shares = router.brick_shares(d.windows)
        assert shares[k] > 0.6, (d.name, shares)
    assert all(m.weights is None and m.gate is None for m in multi.layers.values())  # nothing left installed


def test_routed_forward_matches_the_chosen_brick_alone(llama_dir, pair):
    dirs, brs = pair
    model, _ = bricks.load_model(llama_dir)
    multi = attach_adapters(model, brs)
    router = fit_router(multi, "prototype", _domains())
    for g in router.gates.values():  # force every token onto brick 1
        g.bias.data = torch.tensor([-1e4, 1e4])
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad(), router.active():
        routed = model(ids).logits
    base, _ = bricks.load_model(llama_dir)
    with torch.no_grad():
        ref = PeftModel.from_pretrained(base, dirs[1])(ids).logits
    assert (routed - ref).abs().max() <= 1e-5
    # Generation with a KV cache routes each new token too.
    with torch.no_grad(), router.active():
        out = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False)
    base, _ = bricks.load_model(llama_dir)
    peft = PeftModel.from_pretrained(base, dirs[1])
    with torch.no_grad():
        assert torch.equal(out, peft.generate(input_ids=ids[:1, :4], max_new_tokens=4, do_sample=False))


def test_trained_gate_changes_only_the_gate_and_round_trips(llama_dir, pair, tmp_path):
    _, brs = pair
    model, _ = bricks.load_model(llama_dir)
    multi = attach_adapters(model, brs)
    before = [p.detach().clone() for p in model.parameters()]
    start = fit_router(multi, "prototype", _domains())
    router = fit_router(multi, "gate", _domains(), steps=5, lr=0.1, batch_size=4)
    assert router.meta["steps"] == 5
    assert not torch.equal(start.gates["0"].weight, router.gates["0"].weight)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q) and p.requires_grad  # the model untouched, its flags restored
    ids = torch.randint(0, 300, (2, 8))
    with torch.no_grad(), router.active():
        want = model(ids).logits
    router.save(tmp_path / "r")
    again = AdapterRouter.load(tmp_path / "r", multi)
    with torch.no_grad(), again.active():
        assert torch.equal(model(ids).logits, want)
    other = attach_adapters(bricks.load_model(llama_dir)[0], brs[::-1])
    with pytest.raises(bricks.BricksError, match="same bricks in the same order"):
        AdapterRouter.load(tmp_path / "r", other)


def test_bad_router_requests(llama_dir, pair):
    _, brs = pair
    model, _ = bricks.load_model(llama_dir)
    multi = attach_adapters(model, brs)
    with pytest.raises(bricks.BricksError, match="unknown adapter router"):
        fit_router(multi, "oracle")
    with pytest.raises(bricks.BricksError, match="no sample data for brick"):
        fit_router(multi, "prototype", _domains()[:1])
    with pytest.raises(bricks.BricksError, match="top_k must be in"):
        fit_router(multi, "arrow", top_k=3)
    with pytest.raises(bricks.BricksError, match="gets no gradient"):
        fit_router(multi, "gate", _domains(), top_k=1)


def test_route_cli_compares_settings(llama_dir, pair, tmp_path):
    dirs, _ = pair
    texts = {}
    for name, words in (("low", "def f(x): return x + 1"), ("high", "What is 12 + 30? The answer is 42.")):
        p = tmp_path / f"{name}.txt"
        p.write_text("\n\n".join(f"{words} {i}" * 6 for i in range(80)))
        texts[name] = p
    args = ["route", str(llama_dir), "--adapter", f"low={dirs[0]}", "--adapter", f"high={dirs[1]}",
            "--data", f"low={texts['low']}", "--data", f"high={texts['high']}", "--seq-len", "16", "--windows", "8",
            "--eval-windows", "4", "--json"]
    r = CliRunner().invoke(main, args + ["--router", "prototype", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert set(rep["ppl"]) == {"base", "low", "high", "uniform", "routed"}
    assert set(rep["ppl"]["routed"]) == {"low", "high", "mixed"}
    assert json.loads((tmp_path / "r" / "report.json").read_text())["router"] == "prototype"
    r = CliRunner().invoke(main, args + ["--router", "nope", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "unknown adapter router" in r.stderr and not (tmp_path / "x").exists()
    r = CliRunner().invoke(main, args[:4] + ["--data", f"low={texts['low']}", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "at least two adapters" in r.stderr
