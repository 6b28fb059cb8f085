"""One projection, batch-1 decode: dense against its compressed forms, in the same run.

For each shape (out x in) and each form, the median time of `--reps` calls on one input row:

- dense float32 and bfloat16 (`nn.Linear`);
- 2:4-pruned weights stored dense (what `bricks compress --pattern 2:4` writes: zeros cost the same as values
  on a CPU without a sparse kernel);
- int8 weight-only (torchao `Int8WeightOnlyConfig`), float32 and bfloat16 activations;
- int4 NF4 (bitsandbytes) on its differentiable dequantize-then-matmul path (the one training needs),
  and on its repacked CPU inference kernel (what inference runs, in bricks and in plain transformers).

Prints each time and its ratio to dense float32 and to dense bfloat16 (> 1 = faster).

With `--decode`, greedy batch-1 decode of the default model in float32, int8 and int4 (both paths), ms per token.

    python bench/bench_compressed_linear.py [--shape 1536x576 --shape 11008x4096] [--decode] [--json OUT.json]
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
        label = "int4 NF4, repacked inference kernel" if repack else "int4 NF4, differentiable path"
        yield label, q.eval(), torch.float32


def decode_rows(new: int = 32, reps: int = 3) -> list[dict]:
    """Greedy batch-1 decode of the default model, ms per token: source float32, int8, int4 on both of
    bitsandbytes' paths (prompt: 16 held-out code tokens)."""
    import bricks
    from bricks.compress import CompressConfig, compress, differentiable_4bit

    source, tok = bricks.load_model("default")
    prompt = bricks.load_domains(["code=builtin:code"], tok, "heldout", 16, 1)[0].windows
    models = {"source float32": source}
    with _quiet():
        models["int8 torchao"] = compress(copy.deepcopy(source), tok, CompressConfig(methods=["int8"]))[0]
        models["int4 NF4, repacked inference kernel"] = compress(copy.deepcopy(source), tok, CompressConfig(methods=["int4"]))[0]
        slow = compress(copy.deepcopy(source), tok, CompressConfig(methods=["int4"]))[0]
        differentiable_4bit(slow)
        models["int4 NF4, differentiable path"] = slow
    rows = []
    for name, m in models.items():
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            with torch.no_grad(), _quiet():
                m.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            best = min(best, time.perf_counter() - t)
        rows.append({"model": name, "ms_per_token": round(best / new * 1e3, 3)})
        print(f"decode, default model, {name:>36}: {rows[-1]['ms_per_token']:8.3f} ms per token "
              f"(x{rows[0]['ms_per_token'] / rows[-1]['ms_per_token']:.2f} vs source)", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", action="append", default=None, help="OUTxIN, repeatable (default 1536x576 and 11008x4096)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--decode", action="store_true", help="also greedy decode of the default model, each form")
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
    decode = decode_rows() if args.decode else None
    save(args.json, {"args": vars(args), "rows": rows, "decode": decode})


if __name__ == "__main__":
    main()
