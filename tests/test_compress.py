"""Compressors (pruning, quantization) and CPET: recovery bricks, inheritance, distillation, directories, bad input."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from .conftest import one_line_error, run, tiny_config, tiny_tokenizer
from transformers import AutoModelForCausalLM

import bricks
from bricks.adapters import AdapterBrick, RecoveryBrick
from bricks.compress import (CompressConfig, attach_cpet, bf16_bytes, compress, cpet_loss, differentiable_4bit,
                             measured_sparsity, nm_violations, prune, save_compressed, train_cpet, weight_bytes)
from bricks.compress.pruning import mask, prunable
from bricks.errors import BricksError
from bricks.routing import SparseFFN, assemble_sparse


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A tiny Llama wide enough for bitsandbytes' CPU 4-bit kernels (inputs of 64, outputs in multiples of 32)."""
    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 64, 128, 2, 2, 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    d = tmp_path_factory.mktemp("tiny64") / "llama"
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 384, (16, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def lora_t(tiny64, windows):
    model, _ = bricks.load_model(tiny64)
    brick, _ = bricks.train_lora(model, windows, "code", rank=4, steps=8, lr=1e-2)
    return brick


def groups_nonzero(weight: torch.Tensor, m: int = 4) -> torch.Tensor:
    return (weight.reshape(weight.shape[0], -1, m) != 0).sum(2)


# ------------------------------------------------------------------ pruning


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nm_pattern_keeps_exactly_n_of_every_m(tiny64, windows, method):
    model, _ = bricks.load_model(tiny64)
    report = prune(model, method, pattern="2:4", windows=windows)
    assert report["sparsity"] == 0.5
    for name, lin in prunable(model).items():
        assert (groups_nonzero(lin.weight) == 2).all(), name  # every group of 4 inputs: exactly two non-zeros
        assert nm_violations(lin.weight, (2, 4)) == 0


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_sparsity_is_the_target(tiny64, windows, method):
    model, _ = bricks.load_model(tiny64)
    prune(model, method, sparsity=0.3, windows=windows)
    measured = measured_sparsity(model)
    assert measured["sparsity"] == pytest.approx(0.3, abs=0.005)
    if method == "wanda":  # compared per output row: every row loses the same share
        for lin in prunable(model).values():
            zeros = (lin.weight == 0).sum(1)
            assert zeros.min() == zeros.max() == round(0.3 * lin.in_features)


def test_wanda_scores_weights_by_their_inputs():
    # Column 0 has the smallest weights but by far the largest inputs: Wanda keeps it, magnitude drops it.
    w = torch.tensor([[0.1, 0.5, 0.6, 0.7]])
    norms = torch.tensor([100.0, 1.0, 1.0, 1.0])
    assert mask(w.abs(), 0.25, None, per_row=True).tolist() == [[False, True, True, True]]
    assert mask(w.abs() * norms, 0.25, None, per_row=True).tolist() == [[True, False, True, True]]


def test_wanda_calibration_is_sequential(tiny64, windows):
    """Block 1's input norms are measured after block 0 was pruned, as in the paper: pruning block 0 alone first
    changes block 1's choices, so a one-shot calibration on the dense model would prune differently."""
    model, _ = bricks.load_model(tiny64)
    seq = copy.deepcopy(model)
    prune(seq, "wanda", sparsity=0.5, windows=windows)
    # One-shot: norms of every layer from the dense model.
    from bricks.compress.pruning import _input_norms
    from bricks.arch import decoder_layers
    layers = prunable(model)
    block1 = decoder_layers(model)[1]
    own = {n: lin for n, lin in layers.items() if ".layers.1." in n}
    norms = _input_norms(model, block1, own, windows, 8)
    name = next(n for n in own if n.endswith("q_proj"))
    one_shot = mask(own[name].weight.abs() * norms[name], 0.5, None, per_row=True)
    assert not torch.equal(one_shot, prunable(seq)[name].weight != 0)


# ------------------------------------------------------------------ quantization and directories


@pytest.mark.parametrize("method,bound", [("int8", 0.55), ("int4", 0.3)])
def test_quantized_directory_reopens_in_bricks_and_transformers(tiny64, tmp_path, method, bound):
    model, tok = bricks.load_model(tiny64)
    fingerprint = bricks.model_fingerprint(model)
    small, report = compress(copy.deepcopy(model), tok, CompressConfig(methods=[method]))
    b, b16 = weight_bytes(small), bf16_bytes(model)
    assert b["linear"] <= bound * b16["linear"]
    out = save_compressed(small, tok, tmp_path / "c", report, str(tiny64), fingerprint)
    x = torch.randint(0, 384, (2, 16))
    first, _ = bricks.load_model(out)
    plain = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, with the library installed
    with torch.no_grad():
        a, p, dense = first(x).logits, plain(x).logits, model(x).logits
    assert torch.equal(a, p)
    assert 0 < (a - dense).abs().max() < 0.5 * dense.abs().max()  # changed, but still the same model
    doc = json.loads((out / "bricks_model.json").read_text())
    assert doc["kind"] == "compressed" and doc["source"]["fingerprint"] == fingerprint


def test_pruning_then_int8_keeps_the_pattern(tiny64, windows, tmp_path):
    model, tok = bricks.load_model(tiny64)
    small, report = compress(model, tok, CompressConfig(methods=["wanda", "int8"], pattern="2:4"), windows)
    assert report["achieved"]["sparsity"] == 0.5
    w = small.model.layers[0].mlp.up_proj.weight.dequantize()
    assert (groups_nonzero(w) <= 2).all()  # a zero quantizes to zero


# ------------------------------------------------------------------ CPET


def test_recovery_bricks_change_no_logit_at_initialisation(tiny64, lora_t):
    model, _ = bricks.load_model(tiny64)
    x = torch.randint(0, 384, (2, 16))
    lora_only = attach_cpet(model, lora_t, recovery_rank=None)
    with torch.no_grad():
        before = model(x).logits
    lora_only.detach()
    attach_cpet(model, lora_t, recovery_rank=8)
    with torch.no_grad():
        after = model(x).logits
    assert torch.equal(before, after)


def test_identity_compression_has_zero_distillation_loss(tiny64, lora_t, windows):
    teacher, _ = bricks.load_model(tiny64)
    lora_t.merge_into(teacher)
    student, _ = bricks.load_model(tiny64)
    attach_cpet(student, lora_t)  # inherited LoRA_T, recovery bricks at zero
    _, parts = cpet_loss(student, teacher, windows[:4], beta=0.01)
    assert parts["mse"] < 1e-10
    fresh, _ = bricks.load_model(tiny64)
    attach_cpet(fresh, lora_t, inherit=False)
    assert cpet_loss(fresh, teacher, windows[:4], beta=0.01)[1]["mse"] > 1e-6  # without inheritance it is not


def test_int4_gradients_equal_those_of_the_dequantized_model(tiny64, lora_t):
    """bitsandbytes' CPU inference kernel for 4-bit weights has no autograd (gradients through it came out 84% off):
    after an inference pass, gradients through the quantized projections are still those of the same weights in
    float."""
    import bitsandbytes as bnb

    model, tok = bricks.load_model(tiny64)
    q, _ = compress(copy.deepcopy(model), tok, CompressConfig(methods=["int4"]))
    named = dict(q.named_modules())
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(named.get(n), bnb.nn.Linear4bit):
                w = named[n].weight
                m.weight.copy_(bnb.functional.dequantize_4bit(w.data, w.quant_state).float())
    x = torch.randint(0, 384, (4, 16))
    differentiable_4bit(q)
    with torch.no_grad():  # an inference pass: without the call above, bitsandbytes would repack for its kernel
        q(x)
    grads = []
    for m in (q, model):
        parts = attach_cpet(m, lora_t, recovery_rank=4)
        m.train()
        cpet_loss(m, None, x, 0.0)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in parts.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    # A 4-bit model that already ran inference (repacked, no autograd) is refused by training, in one line. Only a
    # CPU with AVX-512 bf16 has that kernel: elsewhere bitsandbytes leaves the weights as they are, and training runs.
    fresh, _ = compress(bricks.load_model(tiny64)[0], tok, CompressConfig(methods=["int4"]))
    with torch.no_grad():
        fresh(x)
    repacked = any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
                   for m in fresh.modules() if isinstance(m, bnb.nn.Linear4bit))
    if repacked:
        with pytest.raises(BricksError, match="repacked its weights"):
            train_cpet(attach_cpet(fresh, lora_t), None, x, steps=1)
    else:
        train_cpet(attach_cpet(fresh, lora_t), None, x, steps=1)


def test_cpet_training_resumes_to_the_uninterrupted_result(tiny64, lora_t, windows, tmp_path):
    teacher, _ = bricks.load_model(tiny64)
    lora_t.merge_into(teacher)

    def fresh():
        student, _ = bricks.load_model(tiny64)
        return attach_cpet(student, lora_t, recovery_rank=4)

    whole = fresh()
    train_cpet(whole, teacher, windows, steps=4, batch_size=4)

    def interrupt(line):
        if "step 3/4" in line:
            raise KeyboardInterrupt

    ckpt = tmp_path / "cpet.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_cpet(fresh(), teacher, windows, steps=4, batch_size=4, log=interrupt, checkpoint=ckpt, checkpoint_every=2)
    resumed = fresh()
    train_cpet(resumed, teacher, windows, steps=4, batch_size=4, checkpoint=ckpt, checkpoint_every=2)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_cli_compress_then_cpet_writes_directories_that_serve(tiny64, tmp_path):
    c, lt, out = tmp_path / "c", tmp_path / "lt", tmp_path / "cpet"
    res = run("compress", tiny64, "--method", "wanda", "--pattern", "2:4", "--bits", "4", "--data", "code=builtin:code",
              "--windows", "4", "--eval-windows", "2", "--seq-len", "32", "--out", c, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["compression"]["achieved"]["sparsity"] == 0.5
    assert doc["compressed"]["bytes"]["linear"] < 0.3 * doc["source"]["bf16_bytes"]["linear"]
    ev = run("eval", c, "--data", "code=builtin:code", "--windows", "2", "--seq-len", "32", "--baseline", "--json")
    assert ev.exit_code == 0, ev.output
    ev = json.loads(ev.stdout)  # the baseline of a compressed model is the model it was compressed from
    assert ev["baseline_model"] == str(tiny64.resolve()) and ev["ratio"]["ppl"]["code"] != 1.0
    assert run("adapter", "train", tiny64, "--data", "code=builtin:code", "--out", lt, "--steps", "3", "--rank", "4",
               "--windows", "8", "--seq-len", "32").exit_code == 0
    res = run("cpet", c, "--adapter", lt, "--data", "code=builtin:code", "--steps", "3", "--batch-size", "2",
              "--windows", "8", "--eval-windows", "2", "--seq-len", "32", "--recovery-rank", "4", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc["heldout_ppl"]) == {"uncompressed + LoRA_T", "compressed + LoRA_T", "CPET"}
    model, _ = bricks.load_model(out)
    x = torch.randint(0, 384, (1, 6))
    assert model.generate(x, max_new_tokens=3, do_sample=False).shape == (1, 9)
    assert RecoveryBrick.load(out / "recovery").info()["ranks"] == [4]
    info = run("adapter", "info", out / "recovery", "--json")
    assert json.loads(info.stdout)["kind"] == "recovery"
    assert "recovery brick" in one_line_error(run("adapter", "export", out / "recovery", "--out", tmp_path / "peft"))
    assert not (tmp_path / "peft").exists()
    assert "recovery brick" in str(pytest.raises(BricksError, AdapterBrick.load, out / "recovery").value)
    # The LoRA part is a plain adapter: it exports to PEFT.
    assert run("adapter", "export", out / "adapter", "--out", tmp_path / "peft2").exit_code == 0


# ------------------------------------------------------------------ teal as the compression


def test_cpet_bricks_beside_a_teal_ffn_compute_what_they_compute_beside_the_dense_projections(tiny64, lora_t, windows):
    """The LoRA of gate, up and down sits where it sits in the dense model: at full compute a teal model with LoRA_T
    beside it is the dense model with LoRA_T merged; at 0.5 every execution path computes the same function."""
    merged, _ = bricks.load_model(tiny64)
    lora_t.merge_into(merged)
    model, _ = bricks.load_model(tiny64)
    assemble_sparse(model, 1.0)
    attach_cpet(model, lora_t, recovery_rank=4)
    x = torch.randint(0, 384, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, merged(x).logits, rtol=1e-4, atol=1e-5)
    sparse, _ = bricks.load_model(tiny64)
    compress(sparse, None, CompressConfig(methods=["teal"], sparsity=0.5), windows)
    parts = attach_cpet(sparse, lora_t, recovery_rank=4)
    with torch.no_grad():
        for p in parts.recovery.parameters():  # recovery bricks that do something, so that their placement counts
            p.add_(torch.randn_like(p) * 0.1)
    ffn = next(m for m in sparse.modules() if isinstance(m, SparseFFN))
    h = torch.randn(1, 64)
    with torch.no_grad():
        ffn.set_path("masked")
        ref = ffn(h)
        for path in ffn.paths:
            ffn.set_path(path)
            torch.testing.assert_close(ffn(h), ref, rtol=1e-4, atol=1e-5)
        ffn.set_path("masked")
        parts.detach()
        assert not torch.allclose(ffn(h), ref)  # the bricks changed the output, and detaching took them away
    assert all(m.beside is None for m in sparse.modules() if isinstance(m, SparseFFN))  # detached


# ------------------------------------------------------------------ routed bricks (MoEfication) as the compression


def _moe_with_bricks(path, lora, n_bricks: int, shared: float, active: float):
    """A MoEfied model (random bricks, a shared brick when `shared`) with LoRA_T and perturbed recovery bricks."""
    from bricks.analysis.partition import activation_statistics

    model, tok = bricks.load_model(path)
    stats = activation_statistics(model, tok, ["code=builtin:code"], windows=2, seq_len=16) if shared else None
    bricks.moefy(model, bricks.partition(model, "random", n_bricks, stats, shared_fraction=shared), "centroid", active)
    parts = attach_cpet(model, lora, recovery_rank=4)
    with torch.no_grad():
        for p in parts.recovery.parameters():  # recovery bricks that do something, so that their placement counts
            p.add_(torch.randn_like(p) * 0.1)
    return model, parts


@pytest.mark.parametrize("n_bricks,shared", [(7, 0.125), (6, 0.0)])  # 7: 16 neurons each (grouped GEMM); 6: padding
def test_cpet_bricks_beside_routed_bricks_compute_what_they_compute_beside_the_dense_projections(tiny64, lora_t, n_bricks,
                                                                                               shared):
    """Gathered into brick order and scattered back, the bricks beside a MoEfied FFN act where they act beside the
    dense projections: with every brick running, the model is the dense model with LoRA_T and the same recovery
    bricks; with half the bricks, every execution path computes the masked reference."""
    from bricks.routing import BrickedFFN
    from bricks.routing.beside import BesideRun

    merged, _ = bricks.load_model(tiny64)
    reference = attach_cpet(merged, lora_t, recovery_rank=4)
    full, parts = _moe_with_bricks(tiny64, lora_t, n_bricks, shared, 1.0)
    reference.load_state_dict(parts.state_dict())
    x = torch.randint(0, 384, (2, 12))
    layers = [m for m in full.modules() if isinstance(m, BrickedFFN)]
    with torch.no_grad():
        want = merged(x).logits
        torch.testing.assert_close(full(x).logits, want, rtol=1e-4, atol=1e-5)  # dense at full activity
        for m in layers:
            m.dense_at_full = False  # brick by brick, every brick selected
        for path in ("bricks", "masked"):
            bricks.routing.set_path(full, path)
            torch.testing.assert_close(full(x).logits, want, rtol=1e-4, atol=1e-5)
    half, parts = _moe_with_bricks(tiny64, lora_t, n_bricks, shared, 0.5)
    ffn = next(m for m in half.modules() if isinstance(m, BrickedFFN))
    with torch.no_grad():
        for tokens in (1, 5):
            h = torch.randn(tokens, 64)
            ffn.set_path("masked")
            ref = ffn(h)
            for path in ffn.paths_for(tokens):
                ffn.set_path(path)
                torch.testing.assert_close(ffn(h), ref, rtol=1e-4, atol=1e-5)
        sel = ffn.select(h[:1])  # the accelerator's one-token path, called on the CPU
        run_ = BesideRun(ffn, h[:1])
        y = ffn._shared(h[:1], run_) if ffn.shared_in is not None else torch.zeros(1, 64)
        ffn._gathered(h[:1], sel, y, run_)
        torch.testing.assert_close(y + run_.output(), ffn(h[:1]), rtol=1e-4, atol=1e-5)
        assert ("grouped" in ffn.paths_for(5)) == (n_bricks == 7)
        ffn.set_path("masked")
        parts.detach()
        assert not torch.allclose(ffn(h), ref) and ffn.beside is None  # the bricks changed it; detaching removed them


def test_cpet_trains_on_a_moefied_base(tiny64, lora_t, windows):
    """CPET on routed bricks: the LoRA and recovery bricks train through the masked path and the loss falls."""
    moe, _ = bricks.load_model(tiny64)
    bricks.moefy(moe, bricks.partition(moe, "random", 4), "centroid", 0.5)
    teacher, _ = bricks.load_model(tiny64)
    lora_t.merge_into(teacher)
    parts = attach_cpet(moe, lora_t, recovery_rank=4)
    before = {k: v.clone() for k, v in parts.state_dict().items()}
    report = train_cpet(parts, teacher, windows, steps=12, lr=1e-2, batch_size=4, beta=0.05)
    changed = [k for k, v in parts.state_dict().items() if not torch.equal(v, before[k])]
    assert any("mlp__down_proj" in k for k in changed) and any("mlp__gate_proj" in k for k in changed)
    assert report["loss_last"] < report["loss_first"]


def test_cli_cpet_on_a_moefied_directory(tiny64, tmp_path):
    """A MoEfied directory is a compressed base for `bricks cpet`: teacher checked by the BrickSet's fingerprint, the
    CPET directory opens as the MoE with its bricks (and as the plain dense base without them)."""
    from bricks.routing import BrickedFFN

    bs, moe, lt, out = tmp_path / "bs", tmp_path / "moe", tmp_path / "lt", tmp_path / "cpet"
    assert run("partition", tiny64, "--method", "random", "--bricks", 4, "--out", bs).exit_code == 0
    res = run("moefy", tiny64, "--bricks", bs, "--router", "centroid", "--active", "0.5", "--out", moe)
    assert res.exit_code == 0, res.output
    assert run("adapter", "train", tiny64, "--data", "code=builtin:code", "--out", lt, "--steps", "3", "--rank", "4",
               "--windows", "8", "--seq-len", "32").exit_code == 0
    args = ["--adapter", lt, "--data", "code=builtin:code", "--steps", "3", "--batch-size", "2", "--windows", "8",
            "--eval-windows", "2", "--seq-len", "32", "--recovery-rank", "4", "--out", out, "--json"]
    err = run("cpet", moe, *args)  # a MoEfied directory does not say where its dense source lives
    assert err.exit_code != 0 and "give the uncompressed model with --teacher" in one_line_error(err)
    other = tmp_path / "other"
    m, _ = bricks.load_model(tiny64)
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight.mul_(2)
    m.save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    err = run("cpet", moe, "--teacher", other, *args)
    assert err.exit_code != 0 and "is not the model" in one_line_error(err)
    res = run("cpet", moe, "--teacher", tiny64, *args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc["heldout_ppl"]) == {"uncompressed + LoRA_T", "compressed + LoRA_T", "CPET"}
    served, _ = bricks.load_model(out)
    layers = [m for m in served.modules() if isinstance(m, BrickedFFN)]
    assert layers and all(m.beside is not None and m.active == 0.5 for m in layers)
    x = torch.randint(0, 384, (1, 6))
    assert served.generate(x, max_new_tokens=3, do_sample=False).shape == (1, 9)
    with torch.no_grad():  # the held-out figure is the saved model's
        reopened, _ = bricks.load_model(out)
        torch.testing.assert_close(reopened(x).logits, served(x).logits)
    plain, _ = bricks.load_model(out, configured=False)
    assert not any(isinstance(m, BrickedFFN) for m in plain.modules())


def test_cli_teal_compression_then_cpet(tiny64, tmp_path):
    c, lt, out = tmp_path / "c", tmp_path / "lt", tmp_path / "cpet"
    res = run("compress", tiny64, "--method", "teal", "--sparsity", "0.5", "--data", "code=builtin:code",
              "--windows", "4", "--eval-windows", "2", "--seq-len", "32", "--out", c, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["compression"]["achieved"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert doc["compressed"]["bytes"]["linear"] == doc["source"]["bytes"]["linear"]  # teal reads fewer, stores all
    assert not list(c.glob("*.safetensors"))  # the weights are the source's
    model, _ = bricks.load_model(c)
    layers = [m for m in model.modules() if isinstance(m, SparseFFN)]
    assert layers and all(m.selection == "threshold" and m.thresholds for m in layers)
    ev = run("eval", c, "--data", "code=builtin:code", "--windows", "2", "--seq-len", "32", "--baseline", "--json")
    assert ev.exit_code == 0, ev.output
    ev = json.loads(ev.stdout)  # against the model it was made from, at the compute it routes
    assert ev["baseline_model"] == str(tiny64.resolve()) and 0.4 < ev["model_eval"]["compute_fraction"] <= 0.55
    assert run("adapter", "train", tiny64, "--data", "code=builtin:code", "--out", lt, "--steps", "3", "--rank", "4",
               "--windows", "8", "--seq-len", "32").exit_code == 0
    res = run("cpet", c, "--adapter", lt, "--data", "code=builtin:code", "--steps", "3", "--batch-size", "2",
              "--windows", "8", "--eval-windows", "2", "--seq-len", "32", "--recovery-rank", "4", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    served, _ = bricks.load_model(out)
    assert all(m.beside is not None for m in served.modules() if isinstance(m, SparseFFN))
    assert served.generate(torch.randint(0, 384, (1, 6)), max_new_tokens=3, do_sample=False).shape == (1, 9)
    # Corrupt thresholds, then a source that has changed since: one-line errors instead of other functions.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(c, corrupt)
    doc = json.loads((corrupt / "bricks_model.json").read_text())
    doc["compression"]["teal"]["thresholds"].pop()
    (corrupt / "bricks_model.json").write_text(json.dumps(doc))
    assert "threshold pair per layer" in str(pytest.raises(BricksError, bricks.load_model, corrupt).value)
    moved = tmp_path / "src"
    shutil.copytree(tiny64, moved)
    doc = json.loads((c / "bricks_model.json").read_text())
    doc["source"]["spec"] = str(moved)
    (c / "bricks_model.json").write_text(json.dumps(doc))
    with torch.no_grad():
        m, _ = bricks.load_model(moved)
        m.model.layers[0].mlp.up_proj.weight.mul_(2)
        m.save_pretrained(moved)
    assert "has changed since" in str(pytest.raises(BricksError, bricks.load_model, c).value)


def test_cli_pruning_then_teal(tiny64, tmp_path):
    """wanda 2:4 + teal: the pruned checkpoint is stored (every 2:4 group holds two non-zeros), teal is calibrated on
    it, and the directory reopens as the compressed run measured it."""
    c = tmp_path / "c"
    res = run("compress", tiny64, "--method", "wanda", "--pattern", "2:4", "--method", "teal", "--sparsity", "0.5",
              "--data", "code=builtin:code", "--windows", "4", "--eval-windows", "2", "--seq-len", "32", "--out", c,
              "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["compression"]["label"] == "wanda 2:4 + teal 50%"
    assert doc["compression"]["pruning"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert doc["compression"]["achieved"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    plain, _ = bricks.load_model(c, configured=False)  # the checkpoint, as transformers opens it: pruned 2:4
    layers = prunable(plain)
    assert layers and all(nm_violations(lin.weight, (2, 4)) == 0 for lin in layers.values())
    assert all((lin.weight == 0).float().mean() == 0.5 for lin in layers.values())
    model, _ = bricks.load_model(c)
    sparse = [m for m in model.modules() if isinstance(m, SparseFFN)]
    assert sparse and all(m.selection == "threshold" for m in sparse)
    x = torch.randint(0, 384, (1, 16))
    with torch.no_grad():  # the sparse FFNs run the pruned weights: at full compute, the pruned dense model
        for m in sparse:
            m.set_full()
        torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=1e-4, atol=1e-5)
    source, _ = bricks.load_model(tiny64)
    with torch.no_grad():
        assert not torch.allclose(plain(x).logits, source(x).logits, atol=1e-3)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("args,message", [
    (["--method", "wanda", "--sparsity", "1.5"], "less than 1"),
    (["--method", "wanda", "--sparsity", "0"], "greater than 0"),
    (["--method", "magnitude", "--pattern", "3:7"], "divisible by 7"),
    (["--method", "magnitude", "--pattern", "4:2"], "0 < N < M"),
    (["--method", "prune-all"], "unknown compression method 'prune-all'"),
    (["--method", "int8", "--method", "wanda", "--sparsity", "0.5"], "prune first"),
    (["--method", "teal", "--method", "wanda", "--pattern", "2:4", "--sparsity", "0.5"], "prune first"),
    (["--method", "wanda"], "either --sparsity"),
    (["--bits", "3"], "--bits must be one of"),
    (["--method", "teal", "--pattern", "2:4"], "teal needs --sparsity"),
    (["--method", "teal", "--sparsity", "0.5", "--pattern", "2:4"], "teal takes --sparsity only"),
    (["--method", "wanda", "--method", "teal", "--sparsity", "0.5"], "prune with --pattern N:M"),
    (["--method", "wanda", "--pattern", "2:4", "--method", "teal", "--sparsity", "0.5", "--bits", "8"],
     "not a quantization"),
])
def test_compress_refuses_bad_settings_in_one_line(tiny64, tmp_path, args, message):
    res = run("compress", tiny64, *args, "--data", "code=builtin:code", "--out", tmp_path / "out")
    assert message in one_line_error(res)
    assert not (tmp_path / "out").exists()


def test_cpet_refuses_bad_inputs_in_one_line(tiny64, llama_dir, tmp_path, windows):
    model, tok = bricks.load_model(tiny64)
    c = save_compressed(compress(copy.deepcopy(model), tok, CompressConfig(methods=["magnitude"], sparsity=0.5))[0], tok,
                        tmp_path / "c", {"label": "magnitude 50%"}, str(tiny64), bricks.model_fingerprint(model))
    other, _ = bricks.load_model(llama_dir)  # another base: hidden size 32
    foreign = tmp_path / "foreign"
    bricks.train_lora(other, windows, "other", rank=2, steps=1)[0].save(foreign)
    common = ["--data", "code=builtin:code", "--steps", "1", "--windows", "2", "--seq-len", "32", "--out", tmp_path / "out"]
    assert "another base" in one_line_error(run("cpet", c, "--adapter", foreign, *common))
    assert "not a compressed model" in one_line_error(run("cpet", tiny64, "--adapter", foreign, *common))
    # A compressed directory whose source has gone: the teacher cannot be found.
    moved = tmp_path / "src"
    shutil.copytree(tiny64, moved)
    c2 = tmp_path / "c2"
    shutil.copytree(c, c2)
    doc = json.loads((c2 / "bricks_model.json").read_text())
    doc["source"]["spec"] = str(moved)
    (c2 / "bricks_model.json").write_text(json.dumps(doc))
    shutil.rmtree(moved)
    assert "no longer exists" in one_line_error(run("cpet", c2, "--adapter", foreign, *common))
    # A teacher that is not the model the compressed one came from.
    assert "is not the model" in one_line_error(run("cpet", c, "--adapter", foreign, "--teacher", llama_dir, *common))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ the default model


@pytest.mark.default_model
@pytest.mark.slow
def test_wanda_beats_magnitude_at_2_4_on_the_default_model(default_model):
    """The Wanda paper's finding, on held-out text: scoring by |W|·||X|| loses far less than |W| alone at 2:4."""
    model, tok = default_model
    heldout = bricks.load_domains(["prose=builtin:prose"], tok, "heldout", 128, 8)
    calibration = bricks.load_domains(["prose=builtin:prose"], tok, "train", 128, 16)[0].windows
    ppl = {"dense": bricks.evaluate(model, heldout)["ppl"]["prose"]}
    for method in ("wanda", "magnitude"):
        pruned, _ = compress(copy.deepcopy(model), tok, CompressConfig(methods=[method], pattern="2:4"), calibration)
        # At most two non-zeros per group; fewer only where the source (de-quantized from GGUF) already held zeros.
        counts = torch.cat([groups_nonzero(lin.weight).flatten() for lin in prunable(pruned).values()])
        assert counts.max() == 2 and (counts == 2).float().mean() > 0.99
        ppl[method] = bricks.evaluate(pruned, heldout)["ppl"]["prose"]
        del pruned
    assert ppl["dense"] < ppl["wanda"] < ppl["magnitude"]
    # Wanda's own gap is the smaller one by a wide margin (the paper: 11.5 against 42.1 for LLaMA-7B at 2:4).
    assert (ppl["wanda"] / ppl["dense"]) ** 2 < ppl["magnitude"] / ppl["dense"]
