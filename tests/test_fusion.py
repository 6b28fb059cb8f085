"""Fused specialists (UltraFuser): equivalences, gate, training, serving, files, CLI and bad input, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

import bricks
from bricks.adapters import AdapterBrick
from bricks.fusion import (AdapterSpecialists, FusedModel, ModelSpecialists, compare_fusion, fuse, fused_loss,
                           gate_shares, save_fused, train_fusion)

from .conftest import logits_in_fresh_process, one_line_error, run
from .test_adapters import make_adapter


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("specialists")
    return [make_adapter(llama_dir, root / name, seed=seed) for name, seed in (("code", 1), ("math", 2))]


def _merged(llama_dir, adapter):
    model, _ = bricks.load_model(llama_dir)
    AdapterBrick.load(adapter).merge_into(model)
    return model


def test_one_specialist_is_the_specialist(llama_dir, adapters):
    ids = torch.randint(0, 300, (2, 10))
    for spec in ([str(adapters[0])], [f"{llama_dir}+{adapters[0]}"]):
        fused, _ = fuse(spec, base=str(llama_dir) if "+" not in spec[0] else None)
        with torch.no_grad():
            out = fused(ids)
            assert out.weights.shape == (2, 1, 10) and torch.equal(out.weights, torch.ones_like(out.weights))
            assert (out.logits - _merged(llama_dir, adapters[0])(ids).logits).abs().max() <= 1e-5


def test_adapter_rows_and_full_models_fuse_alike_and_generate_with_cache(llama_dir, adapters):
    """K adapters as rows of one batch, and K merged full models each with its KV cache: the same fused model."""
    rows, _ = fuse([str(a) for a in adapters], base=str(llama_dir))
    assert isinstance(rows.specialists, AdapterSpecialists)
    assert rows.specialists.head_is_linear()  # so the rows share one head row per token: checked against K heads
    full = FusedModel(ModelSpecialists([_merged(llama_dir, a) for a in adapters], rows.names), gate=rows.gate)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        out = rows.specialists(ids)  # an untrained gate is the uniform logit average
        torch.testing.assert_close(rows(ids).logits, out.logits.mean(1), rtol=1e-5, atol=1e-5)
        torch.nn.init.normal_(rows.gate.second.weight, std=1.0)  # a gate that weighs the specialists apart
        a, b = rows(ids), full(ids)
        assert torch.allclose(a.weights.sum(1), torch.ones(2, 9), atol=1e-6)
        assert (a.logits - b.logits).abs().max() <= 1e-5
        assert 0.01 < float(a.weights.std())  # a random gate does not weigh every specialist alike
        for fused in (rows, full):
            assert torch.equal(fused.generate(ids[:1, :5], 6, use_cache=True), fused.generate(ids[:1, :5], 6, use_cache=False))


def test_a_soft_capped_head_is_not_shared(tiny_dirs, tmp_path):
    """Gemma-2 soft-caps its logits: mixing hidden states is not mixing logits there, so each row keeps its head."""
    base = tiny_dirs["gemma2"]
    brick = make_adapter(base, tmp_path / "g", seed=3)
    fused, _ = fuse([str(brick), str(brick)], base=str(base), names=["a", "b"])
    assert not fused.specialists.head_is_linear()
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        out = fused.specialists(ids)
        want = (fused.gate(out.hidden)[..., None] * out.logits).sum(1)
        torch.testing.assert_close(fused(ids).logits, want)


def test_stage1_trains_the_gate_alone_and_balanced_batches(llama_dir, adapters, tokenizer):
    fused, tok = fuse([str(a) for a in adapters], base=str(llama_dir))
    train = bricks.load_domains(["code=builtin:code", "math=builtin:math"], tok, "train", 16, 8)
    train[0].name, train[1].name = "code", "math"
    x = torch.cat([d.windows for d in train])
    base_before = {k: v.clone() for k, v in fused.specialists.base.state_dict().items()}
    flags = [p.requires_grad for p in fused.parameters()]
    with torch.no_grad():
        before = float(fused_loss(fused, x))
    report = train_fusion(fused, train, stage1_steps=40, lr=3e-3, batch_size=4)
    with torch.no_grad():
        after = float(fused_loss(fused, x))
    assert after < before and report["stage1"]["loss_last"] < report["stage1"]["loss_first"]
    assert all(torch.equal(v, base_before[k]) for k, v in fused.specialists.base.state_dict().items())
    assert [p.requires_grad for p in fused.parameters()] == flags and not fused.training  # left as it was
    shares = gate_shares(fused, train)
    assert set(shares) == {"code", "math"} and all(sum(s.values()) == pytest.approx(1.0, abs=1e-3) for s in shares.values())


def test_stage2_trains_adapter_factors_and_saves_them(llama_dir, adapters, tmp_path):
    """Stage 2 on adapter specialists trains their LoRA factors (through the batched rows), and the trained
    bricks are what gets saved: the reopened model gives the trained model's logits."""
    fused, tok = fuse([str(a) for a in adapters], base=str(llama_dir), names=["code", "math"])
    train = bricks.load_domains(["code=builtin:code", "math=builtin:math"], tok, "train", 16, 8)
    x = torch.cat([d.windows for d in train])
    before_a = fused.specialists.multi.bricks[0].modules["model.layers.0.self_attn.q_proj"].A.clone()
    with torch.no_grad():
        before = float(fused_loss(fused, x))
    train_fusion(fused, train, stage1_steps=0, stage2_steps=30, stage2_lr=3e-3, batch_size=4)
    with torch.no_grad():
        after = float(fused_loss(fused, x))
        logits = fused(x[:2]).logits
    assert after < before
    assert not torch.equal(fused.specialists.multi.bricks[0].modules["model.layers.0.self_attn.q_proj"].A, before_a)
    out = save_fused(fused, tok, tmp_path / "fused")
    with torch.no_grad():
        assert (bricks.load_model(out)[0](x[:2]).logits - logits).abs().max() <= 1e-4


def test_stage2_trains_full_model_specialists(llama_dir, adapters, tokenizer):
    fused, tok = fuse([f"{llama_dir}+{a}" for a in adapters[:1]] + [str(llama_dir)], names=["code", "plain"])
    assert isinstance(fused.specialists, ModelSpecialists)
    train = bricks.load_domains(["c=builtin:code"], tok, "train", 16, 4)
    w = fused.specialists.models[1].lm_head.weight.detach().clone()
    report = train_fusion(fused, train, stage1_steps=2, stage2_steps=3, lr=1e-3, stage2_lr=1e-3, batch_size=2)
    assert {"stage1", "stage2"} <= set(report) and not torch.equal(fused.specialists.models[1].lm_head.weight, w)


def test_save_and_reopen(llama_dir, adapters, tmp_path):
    fused, tok = fuse([str(a) for a in adapters], base=str(llama_dir))
    torch.nn.init.normal_(fused.gate.second.weight, std=1.0)
    out = save_fused(fused, tok, tmp_path / "fused")
    ids = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        logits = fused(ids).logits
        again, _ = bricks.load_model(out)
        assert torch.equal(again(ids).logits, logits)
    assert torch.equal(logits_in_fresh_process(out, ids, tmp_path), logits)
    dense, _ = bricks.load_model(out, configured=False)  # plain transformers sees the base
    original, _ = bricks.load_model(llama_dir)
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, original(ids).logits)


def test_full_model_specialists_are_referenced_and_checked(llama_dir, adapters, tmp_path):
    import shutil

    spec_dir = tmp_path / "spec"
    shutil.copytree(llama_dir, spec_dir)
    fused, tok = fuse([str(spec_dir), f"{llama_dir}+{adapters[0]}"], names=["a", "b"])
    with pytest.raises(bricks.BricksError, match="needs the path"):
        save_fused(fused, tok, tmp_path / "nope")
    out = save_fused(fused, tok, tmp_path / "fused", sources=[str(spec_dir), f"{llama_dir}+{adapters[0]}"])
    assert bricks.load_model(out)[0].names == ["a", "b"]
    AdapterBrick.load(adapters[0]).merge_into(model := bricks.load_model(spec_dir)[0])  # the specialist changes
    model.save_pretrained(spec_dir)
    with pytest.raises(bricks.BricksError, match="changed since"):
        bricks.load_model(out)
    shutil.rmtree(spec_dir)
    with pytest.raises(bricks.BricksError, match="no longer exists"):
        bricks.load_model(out)


def test_compare_fusion_rows(llama_dir, adapters):
    fused, tok = fuse([str(a) for a in adapters], base=str(llama_dir), names=["code", "math"])
    held = bricks.load_domains(["code=builtin:code"], tok, "heldout", 16, 4)
    ppl = compare_fusion(fused, held)
    assert list(ppl) == ["fused", "code", "math", "uniform"] and all(set(r) == {"code", "mixed"} for r in ppl.values())
    with torch.no_grad():  # the "code" row is the code specialist alone
        expected = bricks.perplexity(_merged(llama_dir, adapters[0]), held[0].windows)
    assert ppl["code"]["code"] == pytest.approx(expected, rel=1e-5)


def test_fuse_cli(llama_dir, adapters, tmp_path):
    out = tmp_path / "fused"
    r = run("fuse", *adapters, "--base", llama_dir, "--name", "code", "--name", "math", "--data", "code=builtin:code",
            "--data", "math=builtin:math", "--stage1-steps", 5, "--windows", 4, "--eval-windows", 2, "--seq-len", 16,
            "--batch-size", 2, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert set(res["ppl"]) == {"fused", "code", "math", "uniform"} and set(res["gate_shares"]) == {"code", "math"}
    model, _ = bricks.load_model(out)
    assert isinstance(model, FusedModel) and model.names == ["code", "math"]
    import matplotlib.image

    for png in ("gate_shares", "token_gates"):
        image = matplotlib.image.imread(out / f"{png}.png")
        assert image.shape[0] > 100 and image[..., :3].std() > 0.05, png
    r = run("eval", out, "--data", "code=builtin:code", "--windows", 2, "--seq-len", 16, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model_eval"]["ppl"]["code"] == pytest.approx(res["ppl"]["fused"]["code"], rel=0.2)
    # --baseline of a fused model: each specialist alone and their average, on the same windows as the fused model.
    r = run("eval", out, "--data", "code=builtin:code", "--data", "math=builtin:math", "--windows", 2, "--seq-len", 16,
            "--baseline", "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert set(ev["baseline"]["specialists"]) == {"code", "math"}
    for d in ("code", "math", "mixed"):
        best = min(ev["baseline"]["specialists"][n][d] for n in ("code", "math"))
        fused = ev["model_eval"]["ppl"][d] if d != "mixed" else None
        if fused is not None:
            assert ev["ratio"]["ppl_vs_best_specialist"][d] == pytest.approx(fused / best, rel=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--base", "{model}", "--data", "c=builtin:code"], "at least one specialist"),
    (["{model}", "{other}", "--data", "c=builtin:code"], "another tokenizer"),
    (["{model}", "--data", "c=builtin:code", "--stage1-steps", 0], "both are 0"),
    (["{model}", "--data", "c=builtin:code", "--config", "{bad_yaml}"], "stage3_steps: unknown key"),
])
def test_fuse_bad_input(args, message, llama_dir, tiny_dirs, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("stage3_steps: 4\n")
    other = tmp_path / "other"  # the same model with another tokenizer
    import shutil

    shutil.copytree(tiny_dirs["mistral"], other)
    tok_json = json.loads((other / "tokenizer.json").read_text())
    vocab = tok_json["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # a valid tokenizer, with two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok_json))
    fields = {"model": llama_dir, "other": other, "bad_yaml": bad_yaml}
    out = tmp_path / "out"
    line = one_line_error(run("fuse", *[str(a).format(**fields) for a in args], "--out", out))
    assert message in line and not out.exists(), line


class _Interrupt(Exception):
    pass


def test_interrupted_stage2_resumes_to_the_same_factors(llama_dir, adapters, tmp_path):
    def fresh():
        torch.manual_seed(0)  # the gate's random start
        fused, tok = fuse([str(a) for a in adapters], base=str(llama_dir), names=["code", "math"])
        torch.nn.init.normal_(fused.gate.second.weight, std=0.1)
        return fused, bricks.load_domains(["code=builtin:code", "math=builtin:math"], tok, "train", 16, 4)

    settings = dict(stage1_steps=0, stage2_steps=6, stage2_lr=3e-3, batch_size=2)
    whole, train = fresh()
    expected = train_fusion(whole, train, **settings)

    def stop_at_step_5(line):
        if "step 5/" in line:
            raise _Interrupt
    interrupted, train = fresh()
    with pytest.raises(_Interrupt):
        train_fusion(interrupted, train, log=stop_at_step_5, checkpoint=str(tmp_path / "fuse"), checkpoint_every=2, **settings)
    resumed, train = fresh()
    report = train_fusion(resumed, train, checkpoint=str(tmp_path / "fuse"), checkpoint_every=2, **settings)
    assert report["stage2"]["loss_last"] == pytest.approx(expected["stage2"]["loss_last"], rel=1e-6)
    for a, b in zip(whole.specialists.multi.bricks, resumed.specialists.multi.bricks):
        assert all(torch.equal(a.modules[k].A, b.modules[k].A) and torch.equal(a.modules[k].B, b.modules[k].B) for k in a.modules)
    assert all(torch.equal(x, y) for x, y in zip(whole.gate.state_dict().values(), resumed.gate.state_dict().values()))
