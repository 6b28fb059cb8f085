"""Model loading: local directories only, clear errors for bad input."""


import pytest
import torch
from safetensors.torch import load_file, save_file

import bricks
from bricks.loading import parse_dtype


def test_loads_local_dir_with_dtype(llama_dir):
    model, tok = bricks.load_model(llama_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.pad_token_id is not None and not model.training


def test_never_downloads():
    with pytest.raises(bricks.BricksError, match="never downloads"):
        bricks.load_model("HuggingFaceTB/SmolLM2-135M")


def test_dir_without_config(tmp_path):
    with pytest.raises(bricks.BricksError, match="no config.json"):
        bricks.load_model(tmp_path)


def test_unknown_dtype():
    with pytest.raises(bricks.BricksError, match="unknown dtype"):
        parse_dtype("float8")


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_weights(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "m")
    w = d / "model.safetensors"
    before = w.read_bytes()
    w.write_bytes(before[: len(before) // 2])
    with pytest.raises(bricks.BricksError, match="cannot load the weights"):
        bricks.load_model(d)
    assert w.read_bytes() == before[: len(before) // 2]  # input untouched


def test_nan_weights(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    key = next(k for k in tensors if "down_proj" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(bricks.BricksError, match="NaN"):
        bricks.load_model(d)


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(bricks.BricksError, match="cannot read GGUF"):
        bricks.load_model(f)
