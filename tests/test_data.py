"""Data sources: built-in corpora, user files, fixed splits, clear errors."""

import json

import pytest

import bricks
from bricks.data import BUILTINS, DataSpec, documents, normalized, parse_data_specs, units, windows


def _units_of(source, split):
    return {normalized(u) for doc in documents(source, split) for u in units(doc)}


@pytest.mark.parametrize("source", BUILTINS)
def test_builtin_splits_are_fixed_and_share_no_unit(source, tokenizer):
    """No held-out unit (a math problem, a block of code, a paragraph) is in train or validation, no validation
    unit in train, after whitespace normalization; the splits are deterministic."""
    train, val, held = (_units_of(source, s) for s in ("train", "validation", "heldout"))
    assert len(train) > 5 * len(held) > 0 and len(val) > 0
    assert not held & (train | val) and not val & train
    assert documents(source, "heldout") == documents(source, "heldout")  # deterministic
    held_docs = documents(source, "heldout")
    assert held_docs
    w = windows(tokenizer, source, "heldout", seq_len=32, max_windows=4)
    assert w.shape == (4, 32)
    assert (windows(tokenizer, source, "heldout", seq_len=32, max_windows=4) == w).all()


def test_text_jsonl_and_datasets(tmp_path, tokenizer):
    paras = [f"Paragraph {i} talks about topic {i % 7} at some length, " * 5 for i in range(60)]
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(paras))
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps({"body": p}) for p in paras))
    import datasets

    datasets.Dataset.from_dict({"text": paras}).save_to_disk(str(tmp_path / "ds"))
    for spec in (f"t={txt}", f"j={jl}#body", f"d={tmp_path / 'ds'}"):
        s = DataSpec.parse(spec)
        tr, va, he = (_units_of(s.source, split) for split in ("train", "validation", "heldout"))
        assert tr and va and he and not he & (tr | va) and not va & tr
    doms = bricks.load_domains([f"t={txt}"], tokenizer, "train", seq_len=16, max_windows=3)
    assert doms[0].name == "t" and doms[0].windows.shape == (3, 16)


def test_bad_data(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(bricks.BricksError, match="no text"):
        documents(str(empty), "train")
    with pytest.raises(bricks.BricksError, match="does not exist"):
        DataSpec.parse("x=/nonexistent/file.txt")
    with pytest.raises(bricks.BricksError, match="unknown built-in"):
        DataSpec.parse("x=builtin:poetry")
    with pytest.raises(bricks.BricksError, match="unique"):
        parse_data_specs(["a=builtin:code", "a=builtin:math"])
    with pytest.raises(bricks.BricksError, match="no data"):
        parse_data_specs([])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(bricks.BricksError, match="bad.jsonl:2 is not valid JSON"):
        documents(str(bad), "train")
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    with pytest.raises(bricks.BricksError, match="fewer than|is empty"):
        windows(tokenizer, str(short), "train", seq_len=512)


def test_repeated_units_stay_in_one_split(tmp_path):
    """A paragraph that recurs in many documents (boilerplate, a repeated problem) is kept in train only."""
    docs = [{"text": f"Unique paragraph number {i} of the corpus.\n\nThe same boilerplate line."} for i in range(200)]
    src = tmp_path / "rep.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in docs))
    train, val, held = (_units_of(str(src), s) for s in ("train", "validation", "heldout"))
    assert "The same boilerplate line." in train
    assert "The same boilerplate line." not in val | held and held and val
