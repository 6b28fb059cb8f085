"""Weight-only quantization through well-kept libraries, in the formats transformers saves and reopens.

- `int8`: torchao's `Int8WeightOnlyConfig` (per output channel, symmetric).
  Chosen over bitsandbytes' LLM.int8() because on CPU the latter casts inputs
  to float16 and loses more; torchao's checkpoints round-trip through
  transformers in safetensors. Its CPU path is slower than float (it saves
  memory, not time, there: `bench/bench_compressed_linear.py`).
- `int4`: bitsandbytes NF4 (4-bit NormalFloat, blocks of 64, as QLoRA and CPET
  used for Llama-2-13B). torchao 0.18's int4 weight-only formats need CUDA or
  the `mslk` package, and its CPU int4 stores each value in a byte (no memory
  saved), so int4 comes from bitsandbytes, which runs on CPU.

Both quantize the linear layers of the decoder blocks; transformers keeps the
embeddings and the LM head in floating point (for a small model with a large
vocabulary that is a large share of its bytes: reports give both figures).
The quantized model is made the way transformers makes one, by loading a
checkpoint with a `quantization_config`, so that the directory written
afterwards opens with plain `transformers.AutoModelForCausalLM` too (with the
library installed).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings

import torch

from ..errors import BricksError

BITS = {8: "int8", 4: "int4"}


@contextlib.contextmanager
def _quiet():
    """torchao logs failed loads of its CUDA-only extensions on a CPU build, and bitsandbytes warns about
    casts it does on purpose: neither is something the user can act on."""
    loggers = [logging.getLogger(n) for n in ("torchao", "bitsandbytes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quantization_config(method: str):
    """The transformers quantization config of `int8` or `int4`, or a one-line error naming what to install."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if method == "int8":
        try:
            with _quiet():
                from torchao.quantization import Int8WeightOnlyConfig
        except ImportError as exc:
            raise BricksError(f"int8 quantization needs torchao ({exc}): pip install 'torchao>=0.18'") from exc
        return TorchAoConfig(Int8WeightOnlyConfig())
    if method == "int4":
        try:
            with _quiet():
                import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise BricksError(f"int4 quantization needs bitsandbytes ({exc}): pip install 'bitsandbytes>=0.50'") from exc
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                  bnb_4bit_use_double_quant=False)
    raise BricksError(f"unknown quantization {method!r}: choose from {', '.join(BITS.values())}")


def quantize(model, tokenizer, method: str, dtype: torch.dtype = torch.float32):
    """A quantized copy of `model` (int8 or int4 weight-only), loaded as transformers loads quantized checkpoints.

    The model's current weights (pruned ones included) are written to a temporary checkpoint and reloaded with
    the quantization config; `model` itself is not changed.
    """
    from transformers import AutoModelForCausalLM

    config = quantization_config(method)
    if method == "int4":  # bitsandbytes computes in this dtype; float16 would overflow on CPU
        config.bnb_4bit_compute_dtype = dtype
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        model.save_pretrained(tmp, safe_serialization=True)
        try:
            quantized = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=config, dtype=dtype, device_map="cpu")
        except Exception as exc:
            raise BricksError(f"{method} quantization failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    return quantized.eval()


def differentiable_4bit(model) -> None:
    """Keep bitsandbytes' 4-bit layers on their dequantize-then-matmul path on CPU: call it before training.

    At its first forward in eval mode, a CPU `Linear4bit` repacks its weight for a bf16 AVX-512 kernel, which is
    fast (`bench/bench_compressed_linear.py`) but has no autograd: gradients through it are wrong (far from those
    of the same weights in float; the unit test compares them), and bitsandbytes' inverse of the repacking is
    only "best effort". Inference keeps the kernel; training (`train_cpet`) needs this path, from before any
    inference pass, so a model already repacked is refused.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            state = getattr(m.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                raise BricksError("this 4-bit model ran an inference pass, and bitsandbytes repacked its weights for a "
                                  "kernel that cannot train: load it again and call differentiable_4bit(model) first")
            m.support_avx512bf16_for_cpu = False


def is_quantized(model) -> bool:
    return getattr(model.config, "quantization_config", None) is not None


def weight_bytes(model) -> dict:
    """Bytes of the model's tensors as stored: all of them (tied tensors once), and the decoder projections alone
    (the weights of sparse FFNs count as the projections they replace)."""
    from ..routing.base import RoutedFFN
    from .pruning import prunable

    def size(t) -> int:
        inner = getattr(t, "qdata", None)  # torchao's tensor subclasses keep their storage in attributes
        if inner is not None:
            return sum(getattr(t, a).numel() * getattr(t, a).element_size() for a in ("qdata", "scale") if hasattr(t, a))
        return t.numel() * t.element_size()

    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = id(t)
        if key not in seen:
            seen.add(key)
            total += size(t) + _quant_state_bytes(t)
    linears = sum(size(m.weight) + _quant_state_bytes(m.weight) for m in prunable(model).values())
    linears += sum(size(p) for m in model.modules() if isinstance(m, RoutedFFN) for p in m.parameters(recurse=False))
    return {"total": total, "linear": linears}


def _quant_state_bytes(t) -> int:
    state = getattr(t, "quant_state", None)  # bitsandbytes keeps the block scales beside the packed weight
    if state is None:
        return 0
    return sum(x.numel() * x.element_size() for x in (state.absmax, state.code) if isinstance(x, torch.Tensor))


def bf16_bytes(model) -> dict:
    """What the same model takes in bfloat16: 2 bytes per parameter, tied tensors once."""
    from .pruning import prunable

    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * 2
    return {"total": total, "linear": sum(m.weight.numel() * 2 for m in prunable(model).values())}
