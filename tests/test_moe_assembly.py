"""MoE assembly: dense checkpoints' FFNs as the experts of a Mixtral checkpoint plain transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, MixtralForCausalLM

import bricks
from bricks.cli import main
from bricks.merge.moe import assemble_moe, load_moe_config

from .test_merge import _state


@pytest.fixture(scope="module")
def variants(tiny_dirs, tmp_path_factory):
    """Two 'fine-tuned' variants of the tiny llama with tied embeddings, and that base."""
    root = tmp_path_factory.mktemp("moe")
    dirs = []
    for i in range(3):
        model, tok = bricks.load_model(tiny_dirs["llama"])
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
        if i:
            torch.manual_seed(20 + i)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if ".mlp." in n:
                        p.add_(torch.randn_like(p) * 0.05)
        d = root / ("base" if i == 0 else f"tuned{i}")
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    return dirs


def _config(path, base, experts, **extra):
    cfg = {"base_model": str(base), "experts": [{"source_model": str(e), "positive_prompts": [p]} for e, p in experts],
           **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_copies_of_the_base_as_experts_reproduce_the_base(variants, tmp_path):
    base = variants[0]
    cfg = _config(tmp_path / "moe.yaml", base, [(base, "def f(x):"), (base, "What is 2 + 2?")], gate_mode="hidden")
    r = CliRunner().invoke(main, ["moe", str(cfg), "--out", str(tmp_path / "moe"), "--json"])
    assert r.exit_code == 0, r.output
    moe = MixtralForCausalLM.from_pretrained(tmp_path / "moe")  # plain transformers, not bricks
    dense = AutoModelForCausalLM.from_pretrained(base)
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        diff = (moe(ids).logits - dense(ids).logits).abs().max().item()
    assert diff <= 1e-5  # top-k routing weights sum to one, so equal experts give the dense FFN
    assert moe.config.tie_word_embeddings and moe.config.num_local_experts == 2


def test_variants_become_experts_and_the_checkpoint_generates(variants, tmp_path):
    base, t1, t2 = variants
    cfg = _config(tmp_path / "moe.yaml", base, [(t1, "def f(x): return x"), (t2, "What is 12 + 30? 42.")],
                  experts_per_token=1, dtype="float32")
    out = tmp_path / "moe"
    report = assemble_moe(cfg, out, max_shard_bytes=60_000)
    assert report["shards"] > 1
    state, s1, s2, sb = _state(out), _state(t1), _state(t2), _state(base)
    for layer in range(2):
        for part, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
            for k, src in enumerate((s1, s2)):
                torch.testing.assert_close(state[f"model.layers.{layer}.block_sparse_moe.experts.{k}.{w}.weight"],
                                           src[f"model.layers.{layer}.mlp.{part}.weight"], rtol=0, atol=0)
        gate = state[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert gate.shape == (2, 32) and torch.isfinite(gate).all()
        # The two experts' prompts differ, so their gate directions do too (centred: they point apart).
        assert torch.nn.functional.cosine_similarity(gate[0], gate[1], dim=0) < 0
    torch.testing.assert_close(state["model.layers.1.self_attn.q_proj.weight"], sb["model.layers.1.self_attn.q_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    gen = model.generate(torch.randint(0, 300, (1, 4)), max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)


def test_trained_gates_change_and_reload(variants, tmp_path):
    base, t1, t2 = variants
    cfg = _config(tmp_path / "moe.yaml", base, [(t1, "def"), (t2, "What")], gate_mode="random")
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(f"def f{i}(x):\n    return x + {i}\n\nWhat is {i} + 30? {i + 30}." for i in range(60)))
    r = CliRunner().invoke(main, ["moe", str(cfg), "--out", str(tmp_path / "a"), "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["moe", str(cfg), "--out", str(tmp_path / "b"), "--train-steps", "3", "--lr", "0.05",
                                  "--data", f"t={text}", "--json"])
    assert r.exit_code == 0, r.output
    assert "gate_training" in json.loads(r.stdout)
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    key = "model.layers.0.block_sparse_moe.gate.weight"
    assert not torch.equal(a[key], b[key])  # trained
    other = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    assert torch.equal(a[other], b[other])  # nothing else moved
    # The trained gates fit the text they were trained on better than the random ones did.
    ids = bricks.load_domains([f"t={text}"], bricks.load_model(base)[1], "train", 128, 8)[0].windows
    with torch.no_grad():
        loss = {k: float(MixtralForCausalLM.from_pretrained(tmp_path / k)(input_ids=ids, labels=ids).loss) for k in "ab"}
    assert loss["b"] < loss["a"] and all(v == v and v < 1e3 for v in loss.values()), loss


@pytest.mark.parametrize("extra,message", [
    ({"gate_mode": "fancy"}, "gate_mode"),
    ({"experts_per_token": 3}, "experts_per_token must be in [1, 2]"),
    ({"shared_experts": []}, "not supported"),
    ({"colour": "red"}, "unknown key"),
])
def test_bad_configs_are_refused_before_any_work(variants, tmp_path, extra, message):
    base, t1, t2 = variants
    cfg = _config(tmp_path / "moe.yaml", base, [(t1, "a"), (t2, "b")], **extra)
    r = CliRunner().invoke(main, ["moe", str(cfg), "--out", str(tmp_path / "out")])
    assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_refused(variants, tiny_dirs, tmp_path):
    base, t1, _ = variants
    with pytest.raises(bricks.BricksError, match="at least 2 experts"):
        load_moe_config(_config(tmp_path / "one.yaml", base, [(t1, "a")]))
    cfg = tmp_path / "noprompt.yaml"
    cfg.write_text(yaml.safe_dump({"base_model": str(base), "experts": [{"source_model": str(t1)}, {"source_model": str(base)}]}))
    with pytest.raises(bricks.BricksError, match="needs positive_prompts"):
        load_moe_config(cfg)
    # An expert of another architecture, and a base Mixtral cannot hold (qwen2: attention biases; gpt2).
    for b, e, message in ((base, tiny_dirs["gpt2"], "share the base's architecture"),
                          (tiny_dirs["qwen2"], tiny_dirs["qwen2"], "supports llama, mistral"),
                          (base, tiny_dirs["mistral"], "share the base's architecture")):
        cfg = _config(tmp_path / "x.yaml", b, [(e, "a"), (b, "b")], gate_mode="random")
        r = CliRunner().invoke(main, ["moe", str(cfg), "--out", str(tmp_path / "out")])
        assert r.exit_code == 1 and message in r.stderr, r.output
        assert not (tmp_path / "out").exists()
    (tmp_path / "exists").mkdir()
    cfg = _config(tmp_path / "ok.yaml", base, [(t1, "a"), (base, "b")], gate_mode="random")
    r = CliRunner().invoke(main, ["moe", str(cfg), "--out", str(tmp_path / "exists")])
    assert r.exit_code == 1 and "already exists" in r.stderr
