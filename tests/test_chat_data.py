"""Chat JSON-lines data (`prompt` / `response`): splits by prompt, response-only loss and perplexity, in training
(LoRA, fusion) and evaluation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import bricks
from bricks.data import chat_examples, is_chat_source
from bricks.training import lm_loss

from .conftest import one_line_error, run


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "qa.jsonl"
    records = [{"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}."} for a in range(12) for b in range(12)]
    records += [{"prompt": "What is 3 + 4?", "response": "Seven."}]  # the same prompt again, another answer
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _split_prompts(source, split):
    from bricks.data import _chat_splits

    return {p for p, _ in _chat_splits(str(source))[split]}


def test_splits_never_share_a_prompt(chat_file):
    train, val, test = (_split_prompts(chat_file, s) for s in ("train", "validation", "heldout"))
    assert train and val and test
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == 144  # every prompt kept, the repeated one once


def test_only_response_tokens_are_scored(chat_file, tokenizer):
    assert is_chat_source(str(chat_file)) and not is_chat_source(f"{chat_file}#prompt")
    (dom,) = bricks.load_domains([f"qa={chat_file}"], tokenizer, "train", 32, 8)
    assert dom.windows.shape == dom.loss_mask.shape == (8, 32)
    for row, mask in zip(dom.windows, dom.loss_mask):
        text = tokenizer.decode(row[mask])
        prompt = tokenizer.decode(row[: int(mask.float().argmax())])
        assert prompt.startswith("What is ") and prompt.endswith("?\n")  # no template: the prompt on its line
        assert " = " in text and "What" not in text
        assert not mask[int(mask.float().argmax()) + int(mask.sum()):].any()  # padding is never scored


def test_the_tokenizers_chat_template_frames_the_prompt(chat_file, tokenizer):
    tok = type(tokenizer).from_pretrained  # a copy, so the session's tokenizer keeps no template
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        tok = tok(d)
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
    ids, mask = chat_examples(tok, str(chat_file), "train", 48, 4)
    head = tok.decode(ids[0][: int(mask[0].float().argmax())])
    assert head.startswith("<|user|>What is") and head.endswith("<|assistant|>")


def test_masked_loss_and_perplexity_count_the_responses_only(chat_file, llama):
    model, tok = llama
    (dom,) = bricks.load_domains([f"qa={chat_file}"], tok, "heldout", 32, 4)
    x, mask = dom.windows, dom.loss_mask
    with torch.no_grad():
        logits = model(x).logits[:, :-1]
        per_token = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        want = per_token[mask[:, 1:].flatten()].mean()
        assert torch.allclose(lm_loss(model, x, mask=mask), want, atol=1e-5)
        assert not torch.allclose(lm_loss(model, x), want, atol=1e-3)  # the unmasked loss is another number
        assert bricks.evaluate(model, [dom])["ppl"]["qa"] == pytest.approx(float(want.exp()), rel=1e-5)


def test_lora_and_fusion_train_on_chat_data(chat_file, llama_dir, tmp_path):
    out = tmp_path / "qa-lora"
    r = run("adapter", "train", llama_dir, "--data", f"qa={chat_file}", "--out", out, "--steps", 2, "--rank", 2,
            "--seq-len", 32, "--windows", 8, "--json")
    assert r.exit_code == 0, r.output
    fused, tok = bricks.fusion.fuse([str(out)], base=str(llama_dir))
    domains = bricks.load_domains([f"qa={chat_file}", "code=builtin:code"], tok, "train", 32, 4)
    x, mask = domains[0].windows, domains[0].loss_mask
    with torch.no_grad():
        logits = fused(x).logits[:, :-1].float()
        target = x[:, 1:].masked_fill(~mask[:, 1:], -100)
        want = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        assert torch.allclose(bricks.fusion.fused_loss(fused, x, mask=mask), want, atol=1e-5)
    report = bricks.fusion.train_fusion(fused, domains, stage1_steps=2, batch_size=2)  # a chat and a text domain
    assert report["stage1"]["steps"] == 2
    ppl = bricks.fusion.compare_fusion(fused, bricks.load_domains([f"qa={chat_file}"], tok, "heldout", 32, 4))
    assert ppl["fused"]["qa"] == pytest.approx(ppl[fused.names[0]]["qa"], rel=1e-5)  # K = 1: the specialist


def test_bad_chat_records_in_one_line(tmp_path, llama_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "response": "yo"}) + "\n" + json.dumps({"prompt": "x", "response": ""}) + "\n")
    r = run("eval", llama_dir, "--data", f"bad={bad}")
    assert "needs text fields 'prompt' and a non-empty 'response'" in one_line_error(r)


def test_fused_specialists_read_prompts_in_their_own_templates(chat_file, llama_dir, tmp_path):
    """UltraFuser's recipe: each specialist sees the prompt in its own chat template; the responses sit at the same
    positions in every row, so the fused logits are scored on the same tokens."""
    from bricks.fusion import fuse, fused_loss, save_fused, train_fusion

    templates = {"a": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>",
                 "b": "{% for m in messages %}### {{ m['content'] }}{% endfor %}\n### Answer:"}
    dirs = []
    for name, template in templates.items():
        model, tok = bricks.load_model(llama_dir)
        tok.chat_template = template
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        dirs.append(str(tmp_path / name))
    fused, tok = fuse(dirs, names=list(templates))
    assert fused.chat_templates is not None and len(fused.chat_templates) == 2
    (dom,) = bricks.load_domains([f"qa={chat_file}"], tok, "train", 48, 4, templates=fused.chat_templates)
    x, mask = dom.windows, dom.loss_mask
    assert x.shape == (4, 2, 48) and mask.shape == (4, 48)
    start = int(mask[0].float().argmax())
    heads = [fused.chat_templates[j].decode(x[0, j, :start]) for j in range(2)]
    assert "<|user|>What is" in heads[0] and heads[0].endswith("<|assistant|>") and heads[1].endswith("### Answer:")
    assert torch.equal(x[:, 0][mask], x[:, 1][mask])  # the same response tokens at the same positions
    with torch.no_grad():  # each specialist runs on its own row
        out = fused.specialists(x)
        for j, model in enumerate(fused.specialists.models):
            torch.testing.assert_close(out.logits[:, j], model(x[:, j]).logits)
        logits = fused(x).logits[:, :-1].float()
        want = F.cross_entropy(logits.flatten(0, 1), x[:, 0, 1:].masked_fill(~mask[:, 1:], -100).flatten())
        torch.testing.assert_close(fused_loss(fused, x, mask=mask), want)
        assert torch.equal(fused.generate(x[:1, :, :start], 4, use_cache=True),
                           fused.generate(x[:1, :, :start], 4, use_cache=False))
    text = bricks.load_domains(["code=builtin:code"], tok, "train", 48, 4)
    assert train_fusion(fused, [dom, *text], stage1_steps=2, batch_size=2)["stage1"]["steps"] == 2
    out = save_fused(fused, tok, tmp_path / "fused", sources=dirs)
    assert len(bricks.load_model(out)[0].chat_templates) == 2  # reopened with each specialist's template
    r = run("eval", out, "--data", f"qa={chat_file}", "--seq-len", 48, "--windows", 2, "--json")
    assert r.exit_code == 0, r.output
    # One template for all (adapters on one base, or full models alike): plain [n, seq_len] rows, as before.
    same, _ = fuse([dirs[0], dirs[0]], names=["x", "y"])
    assert same.chat_templates is None
