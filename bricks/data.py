"""Data sources for analysis and evaluation, as named domains.

A domain is `NAME=SOURCE`, where SOURCE is a text file, a JSON-lines file (a
`text` field, or `file.jsonl#field`), a local `datasets` directory
(`save_to_disk`), a chat JSON-lines file (records with `prompt` and
`response` fields, no `#field`: one example per row, only the response
tokens scored), or a built-in offline corpus:

- `builtin:code`  Python standard-library sources (one document per module)
- `builtin:prose` the Python documentation text shipped with the interpreter
                  (`pydoc_data.topics`, split into paragraphs groups)
- `builtin:math`  generated arithmetic questions with worked answers

Every source has three fixed splits: `train` (fitting, training), `validation`
(every choice tuned on data: thresholds, budgets, searches) and `heldout` (the
test split every reported figure is measured on). Documents are assigned to a
split by a hash of their id; then every *unit* that can repeat (a paragraph:
a block of text between blank lines, e.g. one math problem or one function)
is kept in one split only: a validation unit whose normalized text occurs in
train, or a held-out unit whose text occurs in train or validation, is dropped.
Built-in math problems are assigned to a split one by one, by a hash of their
text. Text is tokenised into fixed-length windows; a window is one "sample"
of its domain.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .corpora import code_documents, math_problems, prose_documents
from .errors import BricksError

SPLITS = ("train", "validation", "heldout")
HELDOUT_PERCENT = 10  # documents with hash % 100 below this are held out (the test split)
VALIDATION_PERCENT = 10  # the next ones are the validation split
CHUNK_CHARS = 3000  # long documents are cut at paragraph boundaries near this size
BUILTINS = ("builtin:code", "builtin:prose", "builtin:math")


@dataclass(frozen=True)
class DataSpec:
    """One named domain and where its text comes from."""

    name: str
    source: str

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        """Parse `NAME=SOURCE` (or a bare SOURCE, named after it)."""
        if "=" in text:
            name, source = text.split("=", 1)
        else:
            source = text
            name = source.split(":", 1)[1] if source.startswith("builtin:") else Path(source.split("#")[0]).stem
        name, source = name.strip(), source.strip()
        if not name or not source:
            raise BricksError(f"bad --data {text!r}: expected NAME=SOURCE, e.g. code=builtin:code or notes=./notes.txt")
        if source.startswith("builtin:") and source not in BUILTINS:
            raise BricksError(f"unknown built-in corpus {source!r}: choose from {', '.join(BUILTINS)}")
        if not source.startswith("builtin:") and not Path(source.split("#")[0]).exists():
            raise BricksError(f"data source {source!r} for domain {name!r} does not exist")
        return cls(name, source)


def parse_data_specs(items: Iterable[str]) -> list[DataSpec]:
    specs = [DataSpec.parse(i) for i in items]
    names = [s.name for s in specs]
    if not specs:
        raise BricksError("no data given: pass at least one --data NAME=SOURCE, e.g. --data code=builtin:code")
    if len(set(names)) != len(names):
        raise BricksError(f"domain names must be unique, got {names}")
    return specs


# --------------------------------------------------------------------------- documents


def _split_of(key: str) -> str:
    """The split of a document id (or of a math problem's text), fixed by its hash."""
    h = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100
    return "heldout" if h < HELDOUT_PERCENT else "validation" if h < HELDOUT_PERCENT + VALIDATION_PERCENT else "train"


def normalized(unit: str) -> str:
    """A unit's identity across splits: its text with runs of whitespace collapsed."""
    return " ".join(unit.split())


def units(text: str) -> list[str]:
    """The units of a text that can repeat across documents: its blocks between blank lines."""
    return [u for u in text.split("\n\n") if u.strip()]


def _chunks(text: str) -> list[str]:
    """Cut a long text at blank lines into pieces of about CHUNK_CHARS."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) > CHUNK_CHARS:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur.strip():
        out.append(cur)
    return out


MATH_PER_DOCUMENT = 8


def _math_documents() -> Iterator[tuple[str, str, str]]:
    """The built-in math problems as (split, id, text) documents of 8 problems of one split.

    Each problem goes to a split by a hash of its text: a problem generated twice (small operands repeat) is
    always in the same split, so no held-out problem is ever seen in training.
    """
    pending: dict[str, list[str]] = {split: [] for split in SPLITS}
    for i, text in enumerate(math_problems()):
        split = _split_of(normalized(text))
        pending[split].append(text)
        if len(pending[split]) == MATH_PER_DOCUMENT:
            yield split, f"math-{split}-{i}", "\n\n".join(pending[split])
            pending[split] = []


def _text_of(path: Path) -> str:
    """A user's text file, refused when it is not text (a binary file would be 'perplexity' measured on noise)."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if b"\x00" in raw[:1 << 20] or text.count("\ufffd") > 0.01 * max(len(text), 1):
        raise BricksError(f"{path} is not UTF-8 text (binary data?): give a text, JSON-lines or datasets source")
    return text


def _json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSON-lines file."""
    for n, line in enumerate(_text_of(path).splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise BricksError(f"{path}:{n} is not valid JSON ({exc.msg}); expected one JSON object per line") from exc


def _user_documents(source: str) -> Iterator[tuple[str, str]]:
    path_str, _, field = source.partition("#")
    path = Path(path_str)
    if path.is_dir():
        yield from _datasets_documents(path, field or "text")
    elif path.suffix in (".jsonl", ".json"):
        field = field or "text"
        for n, record in _json_lines(path):
            if not isinstance(record, dict) or field not in record:
                raise BricksError(f"{path}:{n} has no {field!r} field; name the text field as {path}#FIELD")
            yield f"{path}:{n}", str(record[field])
    else:
        text = _text_of(path)
        for i, chunk in enumerate(_chunks(text)):
            yield f"{path}#{i}", chunk


def _datasets_documents(path: Path, field: str) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError as exc:
        raise BricksError("reading a datasets directory needs the `datasets` package: pip install datasets") from exc
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise BricksError(f"{path} is not a dataset saved with save_to_disk: {exc}") from exc
    parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [("data", ds)]
    for split_name, part in parts:
        if field not in part.column_names:
            raise BricksError(f"dataset {path} has no column {field!r} (columns: {part.column_names}); name it as {path}#COLUMN")
        for i, text in enumerate(part[field]):
            yield f"{split_name}:{i}", str(text)


def documents(source: str, split: str) -> list[str]:
    """The documents of one split of a source, long ones cut into chunks (see the module docstring)."""
    if split not in SPLITS:
        raise BricksError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    part = _split_documents(source)[SPLITS.index(split)]
    if not part:
        raise BricksError(f"the {split} split of {source!r} is empty: give it more text (at least a few paragraphs)")
    return list(part)


@functools.lru_cache(maxsize=16)
def _split_documents(source: str) -> tuple[tuple[str, ...], ...]:
    """(train, validation, heldout) chunks of a source, every repeating unit in one split only."""
    if source == "builtin:math":
        assigned = [(split, text) for split, _, text in _math_documents()]
    else:
        if source == "builtin:code":
            docs = list(code_documents())
        elif source == "builtin:prose":
            docs = list(prose_documents())
        else:
            docs = list(_user_documents(source))
        if not any(text.strip() for _, text in docs):
            raise BricksError(f"data source {source!r} contains no text")
        if len(docs) >= 20:
            assigned = [(_split_of(doc_id), text) for doc_id, text in docs]
        else:  # too few documents for a split by hash: every 10th chunk is held out, the one before it validates
            chunks = [c for _, text in docs for c in _chunks(text)]
            n = len(chunks)
            assigned = [("heldout" if i % 10 == 9 or (n < 10 and i == n - 1 > 0) else
                         "validation" if i % 10 == 8 or (n < 10 and i == n - 2 > 0) else "train", c)
                        for i, c in enumerate(chunks)]
    parts: list[list[str]] = []
    seen: set[str] = set()  # units of the splits before this one
    for split in SPLITS:  # train first: a unit stays in the earliest split it occurs in
        chunks = [c for s, text in assigned if s == split for c in _chunks(text)]
        if split != "train":
            chunks = ["\n\n".join(u for u in units(c) if normalized(u) not in seen) for c in chunks]
        chunks = [c for c in chunks if c.strip()]
        parts.append(chunks)
        seen.update(normalized(u) for c in chunks for u in units(c))
    return tuple(tuple(p) for p in parts)


def windows(tokenizer, source: str, split: str = "train", seq_len: int = 128, max_windows: int = 64, seed: int = 0) -> torch.Tensor:
    """Token windows `[n, seq_len]` from one split of a source, documents in a fixed shuffled order."""
    docs = documents(source, split)
    random.Random(seed).shuffle(docs)
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    out: list[torch.Tensor] = []
    for text in docs:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        buffer.extend(ids + ([eos] if eos is not None else []))
        while len(buffer) >= seq_len and len(out) < max_windows:
            out.append(torch.tensor(buffer[:seq_len]))
            buffer = buffer[seq_len:]
        if len(out) >= max_windows:
            break
    if not out:
        raise BricksError(f"the {split} split of {source!r} has fewer than {seq_len} tokens: give more text or a smaller --seq-len")
    return torch.stack(out)


@dataclass
class Domain:
    """Token windows of one named domain; for chat data, which tokens are scored (the responses)."""

    name: str
    source: str
    # [n_windows, seq_len]; chat data for fused specialists with their own chat templates: [n, K, seq_len], one
    # row per specialist, the same response tokens at the same positions (see `chat_examples`)
    windows: torch.Tensor
    loss_mask: torch.Tensor | None = None  # [n_windows, seq_len], True where token t is a target; None: every token


def load_domains(specs: Iterable[DataSpec | str], tokenizer, split: str = "train", seq_len: int = 128,
                 max_windows: int = 64, templates: list | None = None) -> list[Domain]:
    """Token windows of each named source; `templates`: one tokenizer per fused specialist, whose chat templates
    frame the prompts of chat data (see `chat_examples`)."""
    specs = [s if isinstance(s, DataSpec) else DataSpec.parse(s) for s in specs]
    out = []
    for s in specs:
        if is_chat_source(s.source):
            out.append(Domain(s.name, s.source, *chat_examples(tokenizer, s.source, split, seq_len, max_windows,
                                                              templates=templates)))
        else:
            out.append(Domain(s.name, s.source, windows(tokenizer, s.source, split, seq_len, max_windows)))
    return out


# --------------------------------------------------------------------------- chat examples


def is_chat_source(source: str) -> bool:
    """A JSON-lines file (no `#field`) whose first record has `prompt` and `response` fields."""
    path = Path(source)
    if "#" in source or path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as f:  # the first record only: files can be large
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "prompt" in record and "response" in record


@functools.lru_cache(maxsize=16)
def _chat_splits(source: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """(prompt, response) pairs per split. The split follows the normalized prompt's hash, so a prompt asked
    twice (even with another response) is in one split only."""
    path = Path(source)
    parts: dict[str, list] = {s: [] for s in SPLITS}
    for n, record in _json_lines(path):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) \
                or not isinstance(record.get("response"), str) or not record["response"].strip():
            raise BricksError(f"{path}:{n}: a chat record needs text fields 'prompt' and a non-empty 'response'")
        parts[_split_of(normalized(record["prompt"]))].append((record["prompt"], record["response"]))
    return {k: tuple(v) for k, v in parts.items()}


def chat_examples(tokenizer, source: str, split: str = "train", seq_len: int = 128, max_examples: int = 64,
                  seed: int = 0, templates: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat examples as rows `[n, seq_len]` (prompt in the tokenizer's chat template, then the response and EOS,
    cut or padded with EOS) and the mask of the response tokens, the only ones a loss or perplexity counts.

    `templates` (one tokenizer per fused specialist, as UltraFuser trains): each specialist reads the prompt in
    its own chat template. Where the templates differ, the rows are `[n, K, seq_len]`: the shorter prompts are
    left-padded with EOS (attended, as between packed examples) so that every specialist's response tokens sit
    at the same positions, where the fused logits are compared with them. Identical templates give `[n, seq_len]`.
    """
    if split not in SPLITS:
        raise BricksError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    pairs = list(_chat_splits(source)[split])
    if not pairs:
        raise BricksError(f"the {split} split of {source!r} has no chat records: give more examples")
    random.Random(seed).shuffle(pairs)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    readers = templates or [tokenizer]
    rows, masks = [], []
    for prompt, response in pairs[:max_examples]:
        heads = [_prompt_ids(t, prompt) for t in readers]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        start = max(len(p) for p in heads)  # where every specialist's response begins
        scored = ([False] * start + [True] * len(r))[:seq_len]
        if not any(scored):
            continue  # the prompt alone fills the window: nothing to learn from it at this length
        pad = seq_len - len(scored)
        rows.append(torch.tensor([([eos] * (start - len(p)) + p + r)[:seq_len] + [eos] * pad for p in heads]))
        masks.append(torch.tensor(scored + [False] * pad))
    if not rows:
        raise BricksError(f"every prompt of the {split} split of {source!r} is longer than {seq_len} tokens: "
                          "give a larger --seq-len")
    rows = torch.stack(rows)  # [n, K, seq_len]
    return (rows[:, 0] if (rows == rows[:, :1]).all() else rows), torch.stack(masks)


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens in the tokenizer's chat template, ready for the response (on its own line without one)."""
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    else:
        head = prompt + "\n"
    return tokenizer(head, add_special_tokens=False)["input_ids"]
