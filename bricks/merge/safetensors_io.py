"""Tensor-at-a-time safetensors reading and writing, so that merging never holds a whole model.

Reading uses plain seeks and reads instead of memory maps: mapped pages of every
input checkpoint would stay resident (and count in the process's memory) until
the end of a merge. Writing lays out each shard's header first (shapes and
dtypes are known before any tensor is computed) and then appends tensors as
they are produced.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from ..errors import BricksError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


class Checkpoint:
    """Index of a HF checkpoint directory's safetensors tensors: name -> (file, dtype, shape, byte range)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise BricksError(f"{self.path} holds no .safetensors files: merging reads safetensors checkpoints only")
        self.entries: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for f in files:
            for name, (dtype, shape, start, end) in _header(f).items():
                self.entries[name] = (f, dtype, shape, start, end)

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][2])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.entries[name][1]]

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor `name`, or only `rows` of its first dimension (a contiguous byte range of the file)."""
        if name not in self.entries:
            raise BricksError(f"{self.path} has no tensor {name}: the models to merge differ in architecture")
        f, dtype, shape, start, end = self.entries[name]
        if rows is not None and shape:
            r0, r1, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("rows must be a contiguous slice")
            row_bytes = (end - start) // shape[0] if shape[0] else 0
            start, end = start + r0 * row_bytes, start + max(r0, r1) * row_bytes
            shape = [max(0, r1 - r0), *shape[1:]]
        data = bytearray(end - start)  # read straight into the tensor's buffer (read() + bytearray() held two copies)
        with open(f, "rb") as fh:
            fh.seek(start)
            got = fh.readinto(data)
        if got != end - start:
            raise BricksError(f"{f} is truncated (tensor {name} incomplete): re-download or re-save the checkpoint")
        t = torch.frombuffer(data, dtype=_DTYPES[dtype]) if data else torch.empty(0, dtype=_DTYPES[dtype])
        return t.reshape(shape)


def _header(f: Path) -> dict[str, tuple[str, list[int], int, int]]:
    try:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(fh.read(n))
        size = f.stat().st_size
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise BricksError(f"{f} is not a valid safetensors file ({exc}): corrupt or truncated") from exc
    out = {}
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise BricksError(f"{f}: tensor {name} has dtype {info['dtype']}, which merging does not handle")
        start, end = info["data_offsets"]
        if base + end > size:
            raise BricksError(f"{f} is truncated (tensor {name} ends past the end of the file)")
        out[name] = (info["dtype"], info["shape"], base + start, base + end)
    return out


class ShardedWriter:
    """Write tensors, in a planned order, into safetensors shards of at most `max_shard_bytes` each."""

    def __init__(self, out: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.out = out
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for item in plan:
            nbytes = _nbytes(item[1], item[2])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        self.shards = shards
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.where = {name: i for i, shard in enumerate(shards) for name, _, _ in shard}
        self.expected = {name: (shape, dtype) for name, shape, dtype in plan}
        self._shard = -1
        self._fh = None
        self._pending: list[str] = []

    def _open(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in self.shards[i]:
            nbytes = _nbytes(shape, dtype)
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
        self._fh = open(self.out / self.files[i], "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = i
        self._pending = [name for name, _, _ in self.shards[i]]

    def write(self, name: str, t: torch.Tensor) -> None:
        """Tensors must come in plan order (each shard is one sequential write)."""
        shape, dtype = self.expected[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise BricksError(f"internal: {name} is {tuple(t.shape)} {t.dtype}, planned {tuple(shape)} {dtype}")
        if self._shard != self.where[name]:
            self._open(self.where[name])
        if not self._pending or self._pending[0] != name:
            raise BricksError(f"internal: {name} written out of plan order")
        self._pending.pop(0)
        data = t.detach().contiguous().cpu()
        if data.numel():  # the tensor's own bytes, without a copy
            self._fh.write((data if data.dtype != torch.bool else data.to(torch.uint8)).reshape(-1).view(torch.uint8).numpy())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if len(self.files) > 1:
            weight_map = {name: self.files[i] for name, i in self.where.items()}
            total = sum(_nbytes(s, d) for s, d in self.expected.values())
            (self.out / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty(0, dtype=dtype).element_size()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                    "merges.txt", "chat_template.jinja", "added_tokens.json")


def copy_side_files(tokenizer_dir: Path | None, config_dir: Path, out: Path, out_dtype) -> None:
    """Copy config and tokenizer files (none when `tokenizer_dir` is None) beside written tensors; `out_dtype` (when
    given) goes into config.json."""
    for name in ("config.json", "generation_config.json"):
        if (config_dir / name).is_file():
            shutil.copy2(config_dir / name, out / name)
    if out_dtype is not None and (out / "config.json").is_file():
        cfg = json.loads((out / "config.json").read_text())
        cfg["torch_dtype"] = cfg["dtype"] = str(out_dtype).removeprefix("torch.")
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in _TOKENIZER_FILES if tokenizer_dir is not None else ():
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
