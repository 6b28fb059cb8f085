"""CPET on the default model: compressed bases, LoRA_T as it is, a fresh LoRA, CPET and its ablations; bytes; speed.

For one domain (held-out split for every perplexity, train split for all training and calibration):

1. LoRA_T: a LoRA trained on the uncompressed model (`train_lora`, as `bricks adapter train` does).
2. For each trained compression (Wanda 2:4 and int4 NF4 by default), the rows
   (i) uncompressed + LoRA_T, (ii) compressed + LoRA_T as it is,
   (iii) compressed + a fresh LoRA trained on it, (iv) CPET, and the ablations
   of CPET without inheritance, without recovery bricks, without distillation.
   `teal-50%` (activation sparsity) and `moe-50%` (MoEfication: 64 co-activation
   bricks with a shared one, hybrid routers trained on the calibration windows,
   half the FFN compute), the toolkit's own routed FFNs as CA-LoRA used
   MoEfication, are more compressions for these rows.
   Every trained row gets the same budget (steps, batch, learning rate, data).
   `recovered` = the share of the log-perplexity gap between (ii) and (i) that (iv) closes.
   int8 gets rows (i)-(ii) only (it loses little).
3. Pruning at 50%: Wanda beside magnitude (unstructured and 2:4), no adapter.
4. Weight bytes of each compressed model against the bf16 model, and batch-1
   greedy decode time against the source model (fp32), in the same run.

Results are written as they come (a rerun with the same --json skips rows already measured).

    python bench/cpet.py --domain code --json bench/results/cpet_code_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

import bricks
from bricks.adapters import AdapterBrick
from bricks.compress import (CompressConfig, attach_cpet, bf16_bytes, compress, differentiable_4bit, measured_sparsity,
                             train_cpet, weight_bytes)
from bricks.data import Domain
from bricks.evaluate import evaluate
from bricks.routing import compute_fraction
from record import environment, save

COMPRESSIONS = {"wanda-2:4": dict(methods=["wanda"], pattern="2:4"), "int4": dict(methods=["int4"]),
                "int8": dict(methods=["int8"]), "wanda-50%": dict(methods=["wanda"], sparsity=0.5),
                "magnitude-50%": dict(methods=["magnitude"], sparsity=0.5),
                "magnitude-2:4": dict(methods=["magnitude"], pattern="2:4"),
                "teal-50%": dict(methods=["teal"], sparsity=0.5), "teal-25%": dict(methods=["teal"], sparsity=0.25),
                "wanda-2:4+teal-50%": dict(methods=["wanda", "teal"], pattern="2:4", sparsity=0.5)}
# MoEfied compressions: the FFN compute fraction each keeps (see `moefied`).
MOEFIED = {"moe-50%": 0.5, "moe-25%": 0.25}
# Trained rows: (inherit, recovery, distill)
ROWS = {"(iii) fresh LoRA": (False, False, False), "(iv) CPET": (True, True, True),
        "CPET without inheritance": (False, True, True), "CPET without recovery bricks": (True, False, True),
        "CPET without distillation": (True, True, False)}


def ppl(model, heldout) -> float:
    return evaluate(model, heldout)["ppl"][heldout[0].name]


def decode_ms(model, ids: torch.Tensor, new: int = 32, reps: int = 3) -> float:
    """Best time per generated token of greedy batch-1 decode."""
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        best = min(best, time.perf_counter() - t)
    return best / new * 1e3


def moefied(source, calibration: torch.Tensor, compute: float, domain: str):
    """The source MoEfied as the README's routed-bricks recipe does it, on the calibration windows (train split)."""
    model = copy.deepcopy(source)
    train = [Domain(domain, f"builtin:{domain}", calibration)]
    bs = bricks.partition(model, "coactivation", 64, bricks.capture_stats(model, train), shared_fraction=0.0625)
    bricks.moefy(model, bs, router="hybrid", compute=compute, train_domains=train)
    return model, {"achieved": {"sparsity": 1 - compute_fraction(model)}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", default="code", help="a built-in domain: code, prose, math")
    ap.add_argument("--compressions", default="wanda-2:4,int4", help="trained rows for these (comma-separated)")
    ap.add_argument("--untrained", default="int8", help="compressed and (ii) rows, bytes and speed only, for these")
    ap.add_argument("--pruning-only", default="wanda-50%,magnitude-50%,magnitude-2:4", help="perplexity only, no adapter")
    ap.add_argument("--lora-steps", type=int, default=100, help="training steps of LoRA_T")
    ap.add_argument("--lora-batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50, help="training steps of every trained row")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--beta", type=float, default=0.01)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--windows", type=int, default=256, help="train windows")
    ap.add_argument("--calibration", type=int, default=64, help="calibration windows (train split): Wanda, teal thresholds, MoEfication bricks and routers")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rows", default=",".join(ROWS), help="trained rows to run (comma-separated names)")
    ap.add_argument("--lora-dir", default=None, help="where LoRA_T is kept (default runs/cpet-lora_t-DOMAIN)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    done = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else {}
    if done.get("args", vars(args)) != vars(args):
        raise SystemExit(f"{args.json} holds a run with other settings: give another --json path")
    results = done.get("results", {})

    def record(key, value):
        results[key] = value
        print(key, json.dumps(value), flush=True)
        save(args.json, {"args": vars(args), "results": results, "env": environment()})

    source, tok = bricks.load_model("default")
    spec = f"{args.domain}=builtin:{args.domain}"
    heldout = bricks.load_domains([spec], tok, "heldout", args.seq_len, args.eval_windows)
    train = bricks.load_domains([spec], tok, "train", args.seq_len, args.windows)[0].windows
    calibration = train[:args.calibration]
    if "dense" not in results:
        record("dense", {"ppl": ppl(source, heldout), "bytes": weight_bytes(source), "bf16_bytes": bf16_bytes(source)})

    lora_dir = Path(args.lora_dir or f"runs/cpet-lora_t-{args.domain}")  # kept between runs, not a results file
    if not lora_dir.is_dir():
        lora_t, report = bricks.train_lora(source, train, f"{args.domain}-lora_t", rank=args.rank, steps=args.lora_steps,
                                          lr=args.lr, batch_size=args.lora_batch_size)
        lora_t.save(lora_dir)
    lora_t = AdapterBrick.load(lora_dir)
    teacher = copy.deepcopy(source)
    lora_t.merge_into(teacher)
    if "(i) uncompressed + LoRA_T" not in results:
        record("(i) uncompressed + LoRA_T", {"ppl": ppl(teacher, heldout)})

    prompt = heldout[0].windows[:1, :16]
    if "decode source" not in results:
        record("decode source", {"ms_per_token": decode_ms(source, prompt)})

    for name in [c for c in args.pruning_only.split(",") if c]:
        if name not in results:
            small, rep = compress(copy.deepcopy(source), tok, CompressConfig(**COMPRESSIONS[name]), calibration)
            record(name, {"ppl": ppl(small, heldout), "sparsity": rep["achieved"]["sparsity"]})

    trained = [c for c in args.compressions.split(",") if c]
    for name in trained + [c for c in args.untrained.split(",") if c]:
        cfg = None if name in MOEFIED else CompressConfig(**COMPRESSIONS[name])
        small, rep = (moefied(source, calibration, MOEFIED[name], args.domain) if cfg is None
                      else compress(copy.deepcopy(source), tok, cfg, calibration))
        key = f"{name} / compressed"
        if key not in results:
            b = weight_bytes(small)
            b16 = results["dense"]["bf16_bytes"]
            pruned_as_stored = cfg and cfg.pruning and not cfg.quantization  # zeros countable in the weights as they are
            record(key, {"ppl": ppl(small, heldout), "sparsity": (measured_sparsity(small)["sparsity"] if pruned_as_stored
                                                                  else rep["achieved"]["sparsity"]),
                         "bytes": b, "bytes_vs_bf16": {k: round(b[k] / b16[k], 4) for k in b},
                         "decode_ms_per_token": decode_ms(small, prompt)})
        if cfg is not None and cfg.quantization == "int4":
            # Inference above ran bitsandbytes' repacked kernel, which cannot train: the rows below use a fresh copy
            # on the differentiable path (for (ii) too, so that every row with an adapter computes the same way).
            small, _ = compress(copy.deepcopy(source), tok, cfg, calibration)
            differentiable_4bit(small)
        key = f"{name} / (ii) compressed + LoRA_T"
        if key not in results:
            as_is = attach_cpet(small, lora_t, recovery_rank=None)
            record(key, {"ppl": ppl(small, heldout)})
            as_is.detach()
        if name not in trained:
            continue
        for row, (inherit, recovery, distill) in ROWS.items():
            key = f"{name} / {row}"
            if key in results or row not in args.rows.split(","):
                continue
            student = small  # the bricks are detached again after each row
            bricks_ = attach_cpet(student, lora_t, recovery_rank=32 if recovery else None, inherit=inherit)
            t = time.perf_counter()
            report = train_cpet(bricks_, teacher if distill else None, train, args.steps, args.lr, args.batch_size,
                                args.beta)
            record(key, {"ppl": ppl(student, heldout), "train_s": round(time.perf_counter() - t, 1),
                         "loss_first": report["loss_first"], "loss_last": report["loss_last"], "start": report["start"]})
            bricks_.detach()
        if f"{name} / (iv) CPET" not in results or f"{name} / (iii) fresh LoRA" not in results:
            continue
        full, as_is = results["(i) uncompressed + LoRA_T"]["ppl"], results[f"{name} / (ii) compressed + LoRA_T"]["ppl"]
        cpet, fresh = results[f"{name} / (iv) CPET"]["ppl"], results[f"{name} / (iii) fresh LoRA"]["ppl"]
        gap = math.log(as_is) - math.log(full)
        record(f"{name} / summary", {"recovered": round((math.log(as_is) - math.log(cpet)) / gap, 4) if gap > 0 else None,
                                     "cpet_beats_fresh_lora": cpet < fresh})


if __name__ == "__main__":
    main()
