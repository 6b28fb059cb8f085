"""Embedding surgery: merging models whose vocabularies differ (`tokenizer_source` / `tokenizer.source`).

The merged model's vocabulary is one tokenizer's (`base`, or a named model's)
or the `union` of every input's: the first input's tokenizer (the base's, when
there is one), then the other inputs' tokens it lacks, in config order (plain
tokens first, then special ones). Every vocabulary-indexed tensor (input
embeddings, output head) of every input is then re-indexed to that vocabulary
before the merge, so row i means the same token in every input.

A token an input lacks gets a stand-in row in that input, chosen as mergekit
chooses it, so that the merge keeps a meaningful row:

- the one input that has the token gives its row (a token one fine-tune added
  keeps that fine-tune's embedding, since every task vector is zero there);
- else the base's row, when the base has it;
- else the mean of the rows of the inputs that have it; zeros when none has.

Rows added to reach `pad_to_multiple_of` are the mean of the real ones.
`tokenizer.tokens` overrides the stand-in of named tokens: zeros, a model's
row of the token, or a model's row of another token; with `force`, every
input takes that row, so the merged row is exactly it.

Token order inside one model's additions follows that model's ids, so a merge
is reproducible (mergekit orders them by hash, which varies between runs).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BricksError
from ..loading import split_spec
from .safetensors_io import Checkpoint

# Vocabulary-indexed tensors (rows = tokens) across the supported families; position embeddings are not.
_VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|wte|embed_in|lm_head|embed_out)\.weight$")


def is_vocabulary_tensor(name: str) -> bool:
    return bool(_VOCAB_TENSOR.search(name))


@dataclass(frozen=True)
class TokenRule:
    """A merged token's configured rows (`tokenizer.tokens`): zeros (spec None), or row `row` of input `spec`."""

    spec: str | None
    row: int | None
    force: bool


@dataclass
class VocabularyPlan:
    """The merged vocabulary and, per input spec, the row of each merged token in that input (-1: absent)."""

    tokenizer: object  # a transformers tokenizer, written beside the merged tensors
    tokens: int  # real tokens in the merged vocabulary
    size: int  # rows of every merged vocabulary tensor (tokens, padded)
    rows: dict[str, torch.Tensor]
    base: str | None
    rules: dict[int, TokenRule] = field(default_factory=dict)  # by merged token id

    @property
    def forced(self) -> torch.Tensor:
        """Bool `[tokens]`: tokens whose configured rows replace every input's own."""
        mask = torch.zeros(self.tokens, dtype=torch.bool)
        mask[[t for t, r in self.rules.items() if r.force]] = True
        return mask

    def stand_ins(self, name: str, read, specs: list[str]) -> dict[int, torch.Tensor]:
        """Rows for the merged tokens some of `specs` (the inputs of this tensor) lacks, by the rules in the module
        docstring; `read(spec, name)` gives an input's whole tensor."""
        out = {}
        for token, rule in self.rules.items():
            if rule.spec is None:
                like = read(specs[0], name)
                out[token] = like.new_zeros(like.shape[1:])
            else:
                out[token] = read(rule.spec, name)[rule.row]
        have = torch.stack([self.rows[s] >= 0 for s in specs])  # [inputs, tokens]
        have[:, list(self.rules)] = True  # configured tokens: their rows are set above
        missing = torch.nonzero(~have.all(0)).flatten()
        if missing.numel() == 0:
            return out
        count = have[:, missing].sum(0)
        sums = base_rows = None
        for spec in specs:
            ids = self.rows[spec][missing]
            x = read(spec, name)
            picked = x[ids.clamp(min=0)] * (ids >= 0).view(-1, *[1] * (x.dim() - 1)).to(x.dtype)
            sums = picked if sums is None else sums + picked
            if spec == self.base:
                base_rows = picked
        for j, token in enumerate(missing.tolist()):
            if base_rows is not None and count[j] > 1 and self.rows[self.base][token] >= 0:  # base in `specs`
                out[token] = base_rows[j]
            else:  # the single holder's row, the holders' mean, or zeros when no input has the token
                out[token] = sums[j] / max(int(count[j]), 1)
        return out

    def align(self, spec: str, x_rows, stand_ins: dict[int, torch.Tensor], rows: slice | None) -> torch.Tensor:
        """Rows `rows` (all when None) of input `spec`'s tensor in the merged vocabulary.

        `x_rows(lo, hi)` reads rows lo..hi-1 of the input's own tensor: only the span this chunk needs is read."""
        if rows is not None and rows.start is not None and rows.start >= self.tokens:
            return self._padding(spec, x_rows, stand_ins, rows)
        lo, hi = (0, self.size) if rows is None else (rows.start or 0, min(rows.stop or self.size, self.size))
        real_hi = min(hi, self.tokens)
        ids = self.rows[spec][lo:real_hi]
        present = (ids >= 0) & ~self.forced[lo:real_hi]
        first = x_rows(0, 1)
        out = first.new_empty((hi - lo, *first.shape[1:]))
        if present.any():
            a, b = int(ids[present].min()), int(ids[present].max()) + 1
            out[: real_hi - lo][present] = x_rows(a, b)[ids[present] - a]
        for j in torch.nonzero(~present).flatten().tolist():
            out[j] = stand_ins[lo + j].to(out.dtype)
        if hi > self.tokens:
            out[real_hi - lo:] = self._padding(spec, x_rows, stand_ins, slice(self.tokens, hi))
        return out

    def _padding(self, spec, x_rows, stand_ins, rows: slice) -> torch.Tensor:
        """Padding rows: the mean of this input's rows over the real merged tokens."""
        mean = self.align(spec, x_rows, stand_ins, slice(0, self.tokens)).mean(0)
        return mean.expand(rows.stop - rows.start, *mean.shape).clone()


def plan_vocabulary(source: str, base: str | None, specs: list[str], pad_to_multiple_of: int | None = None,
                    token_sources: dict | None = None) -> VocabularyPlan | None:
    """The merged vocabulary for `source` ("union", "base" or a model), with the per-token sources
    `token_sources` (`TokenEmbedding` by token text); None when no input needs re-indexing and no row is forced."""
    from transformers import AutoTokenizer

    def load(spec):
        path = split_spec(spec)[0]
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - any failure to read a tokenizer is the same problem for the user
            raise BricksError(f"cannot read the tokenizer of {path} ({type(exc).__name__}): tokenizer surgery needs "
                              "each model's tokenizer files") from None

    order = ([base] if base in specs else []) + [s for s in specs if s != base]
    tokenizers = {s: load(s) for s in order}
    n_rows = {s: _vocabulary_rows(Checkpoint(split_spec(s)[0])) for s in order}
    if source == "union":
        merged = _union([(tokenizers[s], n_rows[s]) for s in order])
    else:  # one model's vocabulary: the base's, or a named model's (an input or not)
        if source == "base" and base is None:
            raise BricksError("tokenizer_source: base needs a base_model")
        chosen = base if source == "base" else source
        merged = tokenizers[chosen] if chosen in tokenizers else load(chosen)
    vocab = merged.get_vocab()
    tokens = max(vocab.values()) + 1 if vocab else 0
    size = tokens if not pad_to_multiple_of else -(-tokens // pad_to_multiple_of) * pad_to_multiple_of
    rows = {}
    for s in order:
        own = tokenizers[s].get_vocab()
        r = torch.full((tokens,), -1, dtype=torch.long)
        for tok, i in vocab.items():
            j = own.get(tok)
            if j is not None and j < n_rows[s]:
                r[i] = j
        rows[s] = r
    rules = {vocab_id(vocab, text): _rule(text, cfg, vocab, rows, tokenizers, n_rows) for text, cfg in (token_sources or {}).items()}
    # Inputs that already share the merged vocabulary keep their tensors whole, padding rows included (mergekit
    # would cut a padded embedding, e.g. Qwen2's, down to the tokenizer's length).
    same_rows = len(set(n_rows.values())) == 1 and tokens <= n_rows[order[0]]
    if same_rows and (not pad_to_multiple_of or n_rows[order[0]] % pad_to_multiple_of == 0) \
            and all(torch.equal(r, torch.arange(tokens)) for r in rows.values()) and not any(r.force for r in rules.values()):
        return None
    return VocabularyPlan(merged, tokens, size, rows, base if base in specs else None, rules)


def vocab_id(vocab: dict, text: str) -> int:
    if text not in vocab:
        raise BricksError(f"tokenizer.tokens: {text!r} is not in the merged vocabulary: name a token it has")
    return vocab[text]


def _rule(text: str, cfg, vocab: dict, rows: dict, tokenizers: dict, n_rows: dict) -> TokenRule:
    """The rows `cfg` (a `TokenEmbedding`) gives merged token `text`, checked against the inputs."""
    model = cfg.model
    if model is None:  # {kind: zero}
        return TokenRule(None, None, cfg.force)
    if model not in rows:
        raise BricksError(f"tokenizer.tokens: {text!r} takes its rows from {model}, which is not one of the merged "
                          "models: name one of them")
    if isinstance(cfg.source, str):  # the model's own row of this token
        row = int(rows[model][vocab[text]])
        if row < 0:
            raise BricksError(f"tokenizer.tokens: {text!r} is not in {model}'s vocabulary: take it from a model "
                              "that has it, or from {kind: model_token, ...}")
    elif cfg.source.token is not None:
        row = tokenizers[model].get_vocab().get(cfg.source.token, -1)
        if row < 0:
            raise BricksError(f"tokenizer.tokens: {cfg.source.token!r} is not in {model}'s vocabulary")
    else:
        row = cfg.source.token_id
    if row >= n_rows[model]:
        raise BricksError(f"tokenizer.tokens: row {row} is past the end of {model}'s embeddings ({n_rows[model]} rows)")
    return TokenRule(model, row, cfg.force)


def _union(tokenizers: list[tuple[object, int]]):
    """The first tokenizer, then the tokens the others add (plain ones, then special ones), in input order."""
    first, _ = tokenizers[0]
    with tempfile.TemporaryDirectory() as tmp:  # a copy: the first input's tokenizer object is left as it was
        first.save_pretrained(tmp)
        from transformers import AutoTokenizer

        merged = AutoTokenizer.from_pretrained(tmp)
    known = set(merged.get_vocab())
    plain, special = [], {}
    for tok, n_rows in tokenizers:
        specials = {i: t for i, t in tok.added_tokens_decoder.items() if i < n_rows}
        for content, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < n_rows and i not in specials and content not in known:
                plain.append(content)
                known.add(content)
        for t in specials.values():
            special.setdefault(t.content, t)
    merged.add_tokens(plain)
    merged.add_tokens([t for c, t in special.items() if c not in known])
    return merged


def _vocabulary_rows(ckpt: Checkpoint) -> int:
    names = [n for n in ckpt.names() if is_vocabulary_tensor(n)]
    if not names:
        raise BricksError(f"{ckpt.path} has no token embedding tensor: tokenizer surgery cannot re-index it")
    return ckpt.shape(names[0])[0]


def write_vocabulary(plan: VocabularyPlan, out: Path) -> None:
    """The merged tokenizer and the vocabulary size beside the merged tensors."""
    plan.tokenizer.save_pretrained(out)
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg["vocab_size"] = plan.size
        cfg_path.write_text(json.dumps(cfg, indent=2))
