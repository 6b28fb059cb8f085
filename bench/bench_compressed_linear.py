"""One projection, batch-1 decode: dense against its compressed forms, in the same run.

For each shape (out x in) and each form, the median time of `--reps` calls on one input row:

- dense float32 and bfloat16 (`nn.Linear`);
- 2:4-pruned weights stored dense (what `bricks compress --pattern 2:4` writes: zeros cost the same as values
  on a CPU without a sparse kernel);
- int8 weight-only (torchao `Int8WeightOnlyConfig`), float32 and bfloat16 activations;
- int4 NF4 (bitsandbytes) as bricks runs it (the dequantize-then-matmul path, the one with correct gradients),
  and with bitsandbytes' repacked CPU inference kernel (what plain transformers runs in eval mode).

Prints each time and its ratio to dense float32 and to dense bfloat16 (> 1 = faster).

    python bench/bench_compressed_linear.py [--shape 576x1536 --shape 4096x11008] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from bricks.compress.quantization import _quiet
from record import save


def median_ms(fn, x, reps: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def forms(out_f: int, in_f: int):
    with _quiet():
        import bitsandbytes as bnb
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=False).eval()
    yield "dense float32", dense, torch.float32
    yield "dense bfloat16", copy.deepcopy(dense).to(torch.bfloat16), torch.bfloat16
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        w = pruned.weight.view(out_f, -1, 4)
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(2, w.abs().topk(2, dim=2).indices, True)
        w.mul_(keep)
    yield "2:4 stored dense, float32", pruned, torch.float32
    for dtype in (torch.float32, torch.bfloat16):
        q = copy.deepcopy(dense).to(dtype)
        with _quiet():
            quantize_(q, Int8WeightOnlyConfig())
        yield f"int8 torchao, {str(dtype)[6:]}", q, dtype
    for repack in (False, True):
        q = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")._quantize("cpu")
        q.support_avx512bf16_for_cpu = repack and q.support_avx512bf16_for_cpu
        label = "int4 NF4, repacked inference kernel" if repack else "int4 NF4, as bricks runs it"
        yield label, q.eval(), torch.float32


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", action="append", default=None, help="OUTxIN, repeatable (default 1536x576 and 11008x4096)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shapes = args.shape or ["1536x576", "11008x4096"]
    rows = []
    for shape in shapes:
        out_f, in_f = (int(v) for v in shape.split("x"))
        base = {}
        for name, module, dtype in forms(out_f, in_f):
            x = torch.randn(1, in_f).to(dtype)
            ms = median_ms(module, x, args.reps)
            base.setdefault(name, ms)
            row = {"shape": shape, "form": name, "ms": round(ms, 4),
                   "vs_fp32": round(base["dense float32"] / ms, 3),
                   "vs_bf16": round(base["dense bfloat16"] / ms, 3) if "dense bfloat16" in base else None}
            rows.append(row)
            print(f"{shape:>11} {name:>38}: {ms:8.4f} ms  x{row['vs_fp32']:.2f} vs fp32"
                  + (f"  x{row['vs_bf16']:.2f} vs bf16" if row["vs_bf16"] else ""), flush=True)
    save(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
