"""Merges of models whose vocabularies differ: embeddings re-indexed by token (`tokenizer_source`, `tokenizer`)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import bricks
from bricks.cli import main

NEW = ["<tool_call>", "zzqx"]  # one special token, one plain token, both unknown to the base tokenizer


def _state(d):
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def vocabulary_variants(base, root, seed: int) -> dict:
    """Two fine-tunes of `base` saved under `root`: `extended` with the tokens NEW added (embedding and head grown),
    `plain` with the base vocabulary."""
    out = {}
    for i, name in enumerate(("extended", "plain")):
        model, tok = bricks.load_model(base)
        torch.manual_seed(seed + i)
        if name == "extended":  # one special token and one plain token: both stand-in rules apply
            tok.add_special_tokens({"additional_special_tokens": [NEW[0]]})
            tok.add_tokens([NEW[1]])
            model.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def models(llama_dir, tmp_path_factory):
    return {"base": llama_dir, **vocabulary_variants(llama_dir, tmp_path_factory.mktemp("vocab"), 30)}


def _merge(tmp_path, name, **cfg):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(main, ["merge", str(path), "--out", str(tmp_path / name)])
    return r, tmp_path / name


def _rows_by_token(d, tensor="model.embed_tokens.weight"):
    vocab = AutoTokenizer.from_pretrained(d).get_vocab()
    w = _state(d)[tensor]
    return {t: w[i] for t, i in vocab.items()}


def test_union_keeps_every_token_with_its_own_rows(models, tmp_path):
    r, out = _merge(tmp_path, "union", merge_method="linear", tokenizer_source="union",
                    models=[{"model": str(models[n]), "parameters": {"weight": w}} for n, w in (("plain", 0.3), ("extended", 0.7))])
    assert r.exit_code == 0, r.output
    base_vocab = AutoTokenizer.from_pretrained(models["base"]).get_vocab()
    tok = AutoTokenizer.from_pretrained(out)
    assert set(tok.get_vocab()) == set(base_vocab) | set(NEW)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(tok.get_vocab())
    ext, plain = _rows_by_token(models["extended"]), _rows_by_token(models["plain"])
    for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
        merged, e, p = (_rows_by_token(d, tensor) for d in (out, models["extended"], models["plain"]))
        for t in NEW:  # only `extended` has it: its row is the stand-in for `plain`, so the merge keeps it
            torch.testing.assert_close(merged[t], e[t])
        for t in list(base_vocab)[:20]:  # a shared token: the weighted mean of the two rows of that token
            torch.testing.assert_close(merged[t], 0.3 * p[t] + 0.7 * e[t])
    assert ext[NEW[0]].shape == plain["a"].shape
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers opens it, at the merged size
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    ids = tok(f"a {NEW[0]} b", return_tensors="pt").input_ids
    assert tok.convert_tokens_to_ids(NEW[0]) in ids[0].tolist()
    assert torch.isfinite(model(ids).logits).all()


def test_task_arithmetic_over_a_base_keeps_the_added_tokens(models, tmp_path):
    r, out = _merge(tmp_path, "ta", merge_method="task_arithmetic", base_model=str(models["base"]),
                    tokenizer_source="union",
                    models=[{"model": str(models[n]), "parameters": {"weight": 0.5}} for n in ("plain", "extended")])
    assert r.exit_code == 0, r.output
    merged, ext, base = (_rows_by_token(d) for d in (out, models["extended"], models["base"]))
    for t in NEW:  # every input's stand-in is extended's row: no task vector moves it
        torch.testing.assert_close(merged[t], ext[t])
    plain = _rows_by_token(models["plain"])
    t = "a"
    torch.testing.assert_close(merged[t], base[t] + 0.5 * (plain[t] - base[t]) + 0.5 * (ext[t] - base[t]))


def test_base_vocabulary_drops_what_only_one_model_added(models, tmp_path):
    r, out = _merge(tmp_path, "b", merge_method="linear", base_model=str(models["base"]), tokenizer_source="base",
                    models=[{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in ("plain", "extended")])
    assert r.exit_code == 0, r.output
    base_vocab = AutoTokenizer.from_pretrained(models["base"]).get_vocab()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == base_vocab
    assert _state(out)["model.embed_tokens.weight"].shape[0] == _state(models["base"])["model.embed_tokens.weight"].shape[0]


def test_padding_rows_are_the_mean(models, tmp_path):
    r, out = _merge(tmp_path, "pad", merge_method="linear", tokenizer={"source": "union", "pad_to_multiple_of": 64},
                    models=[{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in ("plain", "extended")])
    assert r.exit_code == 0, r.output
    n = len(AutoTokenizer.from_pretrained(out))
    w = _state(out)["model.embed_tokens.weight"]
    assert w.shape[0] == -(-n // 64) * 64 > n
    assert json.loads((out / "config.json").read_text())["vocab_size"] == w.shape[0]
    torch.testing.assert_close(w[n:], w[:n].mean(0).expand(w.shape[0] - n, -1))


def test_same_vocabularies_are_left_as_they_are(models, tmp_path):
    r, out = _merge(tmp_path, "same", merge_method="linear", tokenizer_source="union",
                    models=[{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in ("base", "plain")])
    assert r.exit_code == 0, r.output
    assert (out / "tokenizer.json").read_bytes() == (models["base"] / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("cfg, message", [
    ({}, "give tokenizer_source: union"),
    ({"tokenizer": {"source": "union", "tokens": {"zzqx": {"source": "nowhere"}}}}, "not one of the merged models"),
    ({"tokenizer": {"source": "union", "tokens": {"never-seen-token": {"source": {"kind": "zero"}}}}},
     "not in the merged vocabulary"),
    ({"tokenizer": {"source": "union", "tokens": {"zzqx": {"source": {"kind": "model_token", "model": "M",
                                                                      "token": "a", "token_id": 3}}}}}, "exactly one"),
    ({"tokenizer": {"source": "union", "tokens": {"zzqx": {"source": "P"}}}}, "is not in"),
    ({"tokenizer": {"source": "union", "tokens": {"zzqx": {"source": {"kind": "ones"}}}}}, "tokens"),
    ({"tokenizer": {"source": "union"}, "tokenizer_source": "union"}, "not both"),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "positive integer"),
])
def test_vocabulary_problems_in_one_line(models, tmp_path, cfg, message):
    cfg = json.loads(json.dumps(cfg).replace('"M"', json.dumps(str(models["extended"])))
                     .replace('"P"', json.dumps(str(models["plain"]))))
    r, out = _merge(tmp_path, "bad", merge_method="linear", **cfg,
                    models=[{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in ("plain", "extended")])
    assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()


def test_per_token_sources(models, tmp_path):
    """`tokenizer.tokens`: a token's rows from a chosen model, from another token, or zeros; `force` overrides
    the rows every input has."""
    ext, plain, m = str(models["extended"]), str(models["plain"]), str(models["extended"])
    tokens = {
        NEW[1]: {"source": {"kind": "zero"}},  # only `extended` has it: its stand-in in `plain` is now zeros
        NEW[0]: {"source": {"kind": "model_token", "model": plain, "token": "a"}, "force": True},
        "b": {"source": m, "force": True},  # both have it: forced, extended's row alone
        "c": {"source": {"kind": "zero"}},  # both have it, not forced: an ordinary merged row
    }
    r, out = _merge(tmp_path, "tok", merge_method="linear", tokenizer={"source": "union", "tokens": tokens},
                    models=[{"model": n, "parameters": {"weight": w}} for n, w in ((plain, 0.25), (ext, 0.75))])
    assert r.exit_code == 0, r.output
    e, p = _rows_by_token(models["extended"]), _rows_by_token(models["plain"])
    merged = _rows_by_token(out)
    torch.testing.assert_close(merged[NEW[1]], 0.75 * e[NEW[1]])  # extended's own row, plain's zeros
    torch.testing.assert_close(merged[NEW[0]], p["a"])
    torch.testing.assert_close(merged["b"], e["b"])
    torch.testing.assert_close(merged["c"], 0.25 * p["c"] + 0.75 * e["c"])
    # Forcing a row needs no vocabulary change: same vocabularies still take it.
    r, out = _merge(tmp_path, "forced", merge_method="linear",
                    tokenizer={"source": "union", "tokens": {"b": {"source": {"kind": "zero"}, "force": True}}},
                    models=[{"model": str(models[n]), "parameters": {"weight": 0.5}} for n in ("base", "plain")])
    assert r.exit_code == 0, r.output
    assert not _rows_by_token(out)["b"].any() and _rows_by_token(out)["a"].any()
