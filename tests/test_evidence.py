"""Every figure a reader is shown has its evidence: a results file under bench/results/ that holds it.

The README's headline figures are listed here with the file and the computation that gives each from the
file's raw numbers; a figure changed in one place and not the other fails. Results files name their settings
and their environment, and no measured figure lives in a code docstring, where it would go stale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def ratios(r: dict, key: str, digits: int = 3) -> str:
    """`code / math / prose` ratios of run `key` to the dense model, as the docs write them."""
    dense = r["dense"]["ppl"]
    return " / ".join(f"{r[key]['ppl'][d] / dense[d]:.{digits}f}" for d in dense)


def cell(r: dict, d_ff: int, dtype: str, batch: int, active: float, busy: int = 0) -> dict:
    """One row of an FFN results file, by its shape, dtype, batch, compute and load."""
    return next(x for x in r["rows"] if (x["d_ff"], x["dtype"], x["batch"], x["active"], x["busy_processes"])
                == (d_ff, dtype, batch, active, busy))


def ffn_speedup(r: dict, d_ff: int, dtype: str, batch: int, active: float, busy: int = 0) -> str:
    return f"{cell(r, d_ff, dtype, batch, active, busy)['speedup']:.2f}x"


def ffn_rows(r: dict, d_ff: int, busy: int) -> list[dict]:
    return [x for x in r["rows"] if x["d_ff"] == d_ff and x["busy_processes"] == busy]


def grid(r: dict, busy: int) -> list[dict]:
    """The rows of an FFN grid measured with `busy` competing processes."""
    return [x for x in r["rows"] if x["busy_processes"] == busy]


def below(rows: list[dict], key: str) -> int:
    """How many of `rows` are below 0.9x dense by `key` (`speedup`, the median; `speedup_mean`, the mean)."""
    return sum(x[key] < 0.9 for x in rows)


def lowest(rows: list[dict], key: str) -> str:
    return f"{min(x[key] for x in rows):.2f}x"


def path_speedup(r: dict, d_ff: int, dtype: str, path: str, busy: int = 0) -> str:
    """The speedup of the one row of a results file with that shape, dtype, fixed path and load."""
    row = next(x for x in r["rows"] if (x["d_ff"], x["dtype"], x["path"], x["busy_processes"]) == (d_ff, dtype, path, busy))
    return f"{row['speedup']:.2f}x"


def prefetch_row(shape: str, d_ff: int, dt: str, batch: int) -> str:
    """A row of bench/README.md's "teal's batches" table: speedups and kernel ms, before and after, two rounds."""
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[dt]
    runs = [[next(x for x in load(name)["rows"] if (x["d_ff"], x["dtype"], x["batch"]) == (d_ff, dtype, batch))
             for name in (f"ffn_teal_prefetch_before{n}_cpu.json", f"ffn_teal_prefetch{n}_cpu.json")] for n in ("", "2")]
    cells = [", ".join(f"{run[i]['speedup']:.2f}x" for run in runs) for i in (0, 1)]
    cells += [", ".join(f"{run[i]['bricked_ms']:.3f}" for run in runs) for i in (0, 1)]
    return f"| {shape} | {dt} | {batch} | " + " | ".join(cells) + " |"


def run_range(runs: list[float]) -> str:
    """The slowest and fastest of a decode's timed runs, tokens/s."""
    return f"{min(runs):.2f}-{max(runs):.2f}"


def decode_row(r: dict) -> str:
    """A decode table's `dense | routed | **speedup** | executed` cells."""
    return (f"{r['dense_tokens_per_s']:.2f} | {r['bricked_tokens_per_s']:.2f} | **{r['speedup']:.2f}x** | "
            f"{r['ffn_executed_fraction']:.2f}")


# (document, text as written there, results file, the text computed from the file)
HEADLINES = [
    ("README.md", "**{}**", "routing_recovery_teal_0.5_cpu_400.json", lambda r: ratios(r, "recovered")),
    ("README.md", "before training {}", "routing_recovery_teal_0.5_cpu_400.json", lambda r: ratios(r, "routed", 2)),
    ("README.md", "on this CPU {}; longer", "routing_recovery_distill_0.5_cpu_150.json", lambda r: ratios(r, "recovered")),
    ("README.md", "compute 0.5: before training {}, after", "routing_recovery_distill_0.5_cpu_150.json",
     lambda r: ratios(r, "routed", 2)),
    ("bench/README.md", "| 0.500 | 150 x 4 | CPU | {} |", "routing_recovery_distill_0.5_cpu_150.json",
     lambda r: f"{ratios(r, 'routed')} | {ratios(r, 'recovered')}"),
    ("README.md", "fp32) is {} dense at 0.5", "ffn_teal_cpu.json", lambda r: ffn_speedup(r, 11008, "float32", 1, 0.5)),
    ("README.md", "dense at 0.5 and {} at 0.25", "ffn_teal_cpu.json", lambda r: ffn_speedup(r, 11008, "float32", 1, 0.25)),
    ("README.md", "and {} at\n  0.5 with another process", "ffn_teal_cpu.json",
     lambda r: ffn_speedup(r, 11008, "float32", 1, 0.5, busy=1)),
    ("README.md", "small FFN is {} at 0.5", "ffn_teal_cpu.json", lambda r: ffn_speedup(r, 1536, "float32", 1, 0.5)),
    ("bench/README.md", "| 4096x11008 | fp32 | kernel@1 | {} | 2.47x |", "ffn_teal_token_before_cpu.json",
     lambda r: path_speedup(r, 11008, "float32", "kernel@1")),
    ("bench/README.md", "| 4096x11008 | fp32 | kernel@1 | 1.39x | {} |", "ffn_teal_token_cpu.json",
     lambda r: path_speedup(r, 11008, "float32", "kernel@1")),
    ("README.md", "at compute 0.99 it is already {} dense", "ffn_teal_full_compute_cpu.json",
     lambda r: path_speedup(r, 11008, "float32", "kernel")),
    ("bench/README.md", "0.99 the kernel is already {} the dense FFN on the large fp32 shape", "ffn_teal_full_compute_cpu.json",
     lambda r: path_speedup(r, 11008, "float32", "kernel")),
    ("README.md", "token's FFN is {}\n  dense at 0.5 on the large fp32", "ffn_centroid_cpu.json",
     lambda r: ffn_speedup(r, 11008, "float32", 1, 0.5)),
    ("README.md", "shape and {} on the small one, and\n  its batches", "ffn_centroid_cpu.json",
     lambda r: ffn_speedup(r, 1536, "float32", 1, 0.5)),
    ("README.md", "its batches of 8 and 32 are at least {} idle", "ffn_centroid_cpu.json",
     lambda r: lowest([x for x in grid(r, busy=0) if x["batch"] > 1], "speedup")),
    ("README.md", "bf16 batch of 32 at 0.5 ({} by the median, 1.04x by the mean), whose", "ffn_teal_cpu.json",
     lambda r: ffn_speedup(r, 11008, "bfloat16", 32, 0.5)),
    ("README.md", "bf16 batch of 32 at 0.5 (1.03x by the median, {} by the mean), whose", "ffn_teal_cpu.json",
     lambda r: f"{next(x for x in ffn_rows(r, 11008, 0) if (x['dtype'], x['batch'], x['active']) == ('bfloat16', 32, 0.5))['speedup_mean']:.2f}x"),
    ("README.md", "`--dense-fallback` was {} in one run and", "ffn_teal_fallback_cpu.json",
     lambda r: ffn_speedup(r, 11008, "bfloat16", 32, 0.5)),
    ("README.md", "in one run and\n  {} in the next", "ffn_teal_fallback_recheck_cpu.json",
     lambda r: ffn_speedup(r, 11008, "bfloat16", 32, 0.5)),
    ("README.md", "Idle, every cell of both grids is\n  faster than dense by the median and the mean", "ffn_teal_cpu.json",
     lambda r: "faster" if min(min(x["speedup"], x["speedup_mean"]) for x in r["rows"] if x["busy_processes"] == 0) > 1
     else "slower"),
    ("README.md", "Idle, every cell of both grids is\n  faster than dense by the median and the mean", "ffn_centroid_cpu.json",
     lambda r: "faster" if min(min(x["speedup"], x["speedup_mean"]) for x in r["rows"] if x["busy_processes"] == 0) > 1
     else "slower"),
    ("README.md", "1 of teal's and {} of the brick router's 24", "ffn_centroid_cpu.json",
     lambda r: str(below(ffn_rows(r, 1536, 1), "speedup"))),
    ("README.md", "{} of teal's and 1 of the brick router's 24", "ffn_teal_cpu.json",
     lambda r: str(below(ffn_rows(r, 1536, 1), "speedup"))),
    ("README.md", "busy cells are below 0.9x ({}, teal's bf16 batch", "ffn_teal_cpu.json",
     lambda r: lowest(ffn_rows(r, 1536, 1), "speedup")),
    ("README.md", "`kernel@1`, and {}, the brick router's bf16 decode token at 0.25", "ffn_centroid_cpu.json",
     lambda r: lowest(ffn_rows(r, 1536, 1), "speedup")),
    ("README.md", "By the mean every busy cell is at least {}\n  (the brick router's", "ffn_centroid_cpu.json",
     lambda r: lowest(grid(r, busy=1), "speedup_mean")),
    ("README.md", "large bf16 batch of 32 at 0.5, {}); by the median", "ffn_teal_cpu.json",
     lambda r: lowest(grid(r, busy=1), "speedup_mean")),
    ("README.md", "Greedy decoding is {} on a\n  22-layer", "decode_teal_cpu.json", lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "{} on the default model (best", "decode_teal_default_cpu.json", lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "dense run), and {} on the Llama\n  with another process busy", "decode_teal_busy_cpu.json",
     lambda r: f"{r['speedup']:.2f}x"),
    ("bench/README.md", "| idle | {} |", "decode_teal_cpu.json", lambda r: decode_row(r)),
    ("bench/README.md", "| 1 busy process | {} |", "decode_teal_busy_cpu.json", lambda r: decode_row(r)),
    ("bench/README.md", "| default model, fp32, 64 tokens | idle | {} |", "decode_teal_default_cpu.json", lambda r: decode_row(r)),
    ("bench/README.md", "| 22-layer Llama as above, AVX2-only CPU | idle | {} |", "decode_teal_avx2_cpu.json", decode_row),
    ("bench/README.md", "| 22-layer Llama, AVX2-only CPU | 1 busy process | {} |", "decode_teal_busy_avx2_cpu.json", decode_row),
    ("bench/README.md", "| default model, 64 tokens, AVX2-only CPU | idle | {} |", "decode_teal_default_avx2_cpu.json", decode_row),
    ("bench/README.md", "the Llama\nidle {} tokens/s against", "decode_teal_avx2_cpu.json", lambda r: run_range(r["bricked_runs"])),
    ("bench/README.md", "tokens/s against {}, with one busy", "decode_teal_avx2_cpu.json", lambda r: run_range(r["dense_runs"])),
    ("bench/README.md", "busy process {}\nagainst", "decode_teal_busy_avx2_cpu.json", lambda r: run_range(r["bricked_runs"])),
    ("bench/README.md", "against {}, the default model", "decode_teal_busy_avx2_cpu.json", lambda r: run_range(r["dense_runs"])),
    ("bench/README.md", "the default model {} against", "decode_teal_default_avx2_cpu.json", lambda r: run_range(r["bricked_runs"])),
    ("bench/README.md", "against {}.\n", "decode_teal_default_avx2_cpu.json", lambda r: run_range(r["dense_runs"])),
    ("README.md", "greedy decoding there is {} on the", "decode_teal_avx2_cpu.json", lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "Llama ({} with another\n  process busy)", "decode_teal_busy_avx2_cpu.json", lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "busy) and {} on the default model", "decode_teal_default_avx2_cpu.json", lambda r: f"{r['speedup']:.2f}x"),
    ("bench/README.md", "| idle | {} |", "decode_centroid_cpu.json", lambda r: decode_row(r)),
    ("bench/README.md", "| default model, fp32, 64 tokens | idle | {} |", "decode_centroid_default_cpu.json",
     lambda r: decode_row(r)),
    ("bench/README.md", "| 1 busy process | {} |", "decode_centroid_busy_cpu.json", lambda r: decode_row(r)),
    ("README.md", "model and {} on the 22-layer Llama with another process busy", "decode_centroid_busy_cpu.json",
     lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "centroid router at 0.5 is {} on the default", "decode_centroid_default_cpu.json",
     lambda r: f"{r['speedup']:.2f}x"),
    ("bench/README.md", "shape's are {} / 7.14x at 0.5 / 0.25", "ffn_teal_cpu.json", lambda r: ffn_speedup(r, 11008, "float32", 1, 0.5)),
    ("bench/README.md", "shape's are 3.79x / {} at 0.5 / 0.25", "ffn_teal_cpu.json", lambda r: ffn_speedup(r, 11008, "float32", 1, 0.25)),
    ("bench/README.md", "token is {} at 0.5 by the\nmedian", "ffn_teal_cpu.json",
     lambda r: ffn_speedup(r, 11008, "float32", 1, 0.5, busy=1)),
    ("bench/README.md", "the small shape's {} / 5.55x in fp32", "ffn_teal_cpu.json", lambda r: ffn_speedup(r, 1536, "float32", 1, 0.5)),
    ("bench/README.md", "the large bf16 batch of 32 at 0.5 is\n{} / 1.04x, about", "ffn_teal_cpu.json",
     lambda r: ffn_speedup(r, 11008, "bfloat16", 32, 0.5)),
    ("bench/README.md", "the large bf16 batch of 32 at 0.5 is\n1.03x / {}, about", "ffn_teal_cpu.json",
     lambda r: f"{next(x for x in ffn_rows(r, 11008, 0) if (x['dtype'], x['batch'], x['active']) == ('bfloat16', 32, 0.5))['speedup_mean']:.2f}x"),
    ("bench/README.md", "the busy process, the small bf16 batch of 32 at 0.5 ({},\nwhose mean", "ffn_teal_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.5, busy=1)),
    ("bench/README.md", "token is 2.33x at 0.5 by the\nmedian and {} by the mean", "ffn_teal_cpu.json",
     lambda r: f"{next(x for x in ffn_rows(r, 11008, 1) if (x['dtype'], x['batch'], x['active']) == ('float32', 1, 0.5))['speedup_mean']:.2f}x"),
    ("bench/README.md", "cell's mean is at least {} (the large bf16 batch of 32 at\n0.5)", "ffn_teal_cpu.json",
     lambda r: lowest(grid(r, busy=1), "speedup_mean")),
    ("bench/README.md", "busy process every cell's mean is at least {} (the large\nbf16 batch of 32 at 0.25", "ffn_centroid_cpu.json",
     lambda r: lowest(grid(r, busy=1), "speedup_mean")),
    ("bench/README.md", "by the median, 1 of the 48 cells is below 0.9x dense, by the\nmean {}: with the busy process, the small bf16 batch",
     "ffn_teal_cpu.json",
     lambda r: str(below(r["rows"], "speedup_mean") or "none")),
    ("bench/README.md", "by the median, {} of the 48 cells is below 0.9x dense, by the\nmean none: with the busy process, the small bf16 batch",
     "ffn_teal_cpu.json",
     lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "Idle, every cell is at least {}\nby the median and 1.02x by the mean;", "ffn_teal_cpu.json",
     lambda r: lowest(grid(r, busy=0), "speedup")),
    ("bench/README.md", "Idle, every cell is at least 1.03x\nby the median and {} by the mean;", "ffn_teal_cpu.json",
     lambda r: lowest(grid(r, busy=0), "speedup_mean")),
    ("bench/README.md", "by the median, {} of the 48 cells is below 0.9x dense, by the\nmean none", "ffn_centroid_cpu.json",
     lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "by the median, 1 of the 48 cells is below 0.9x dense, by the\nmean {}", "ffn_centroid_cpu.json",
     lambda r: str(below(r["rows"], "speedup_mean") or "none")),
    ("bench/README.md", "(the small fp32\ndecode token at 0.5: {} by the median, 2.51x by the mean)", "ffn_centroid_cpu.json",
     lambda r: ffn_speedup(r, 1536, "float32", 1, 0.5)),
    ("bench/README.md", "(the small fp32\ndecode token at 0.5: 2.87x by the median, {} by the mean)", "ffn_centroid_cpu.json",
     lambda r: f"{next(x for x in ffn_rows(r, 1536, 0) if (x['dtype'], x['batch'], x['active']) == ('float32', 1, 0.5))['speedup_mean']:.2f}x"),
    ("bench/README.md", "Idle, every cell is at least\n1.18x by the median and {} by the mean (the small bf16", "ffn_centroid_cpu.json",
     lambda r: lowest(grid(r, busy=0), "speedup_mean")),
    ("bench/README.md", "whose median leaves out its stalled calls. Idle, every cell is at least\n{} by the median", "ffn_centroid_cpu.json",
     lambda r: lowest(grid(r, busy=0), "speedup")),
    *[("bench/README.md", f"| {shape} | bf16 | {batch} | {{}} |", "ffn_centroid_pieces_before_cpu.json",
       lambda r, d=d, batch=batch: ffn_speedup(r, d, "bfloat16", batch, 0.5))
      for shape, d in (("576x1536", 1536), ("4096x11008", 11008)) for batch in (1, 8, 32)],
    *[("bench/README.md", f"| {shape} | bf16 | {batch} | {ffn_speedup(load('ffn_centroid_pieces_before_cpu.json'), d, 'bfloat16', batch, 0.5)} | {{}} |",
       "ffn_centroid_pieces_cpu.json", lambda r, d=d, batch=batch: ffn_speedup(r, d, "bfloat16", batch, 0.5))
      for shape, d in (("576x1536", 1536), ("4096x11008", 11008)) for batch in (1, 8, 32)],
    # bench/README.md's "teal's batches" table: two rounds before and after, each row whole.
    *[("bench/README.md", "{}", "ffn_teal_prefetch_cpu.json",
       lambda r, shape=shape, d=d, dt=dt, batch=batch: prefetch_row(shape, d, dt, batch))
      for shape, d in (("4096x11008", 11008), ("576x1536", 1536)) for dt in ("fp32", "bf16") for batch in (8, 32)],
    ("bench/README.md", "gives `dense` {} / 0.97x\nof the dense FFN at 8 / 32 tokens", "ffn_centroid_dense_masked_cpu.json",
     lambda r: f"{next(x for x in r['rows'] if x['path'] == 'dense' and x['batch'] == 8)['speedup']:.2f}x"),
    ("bench/README.md", "gives `dense` 0.94x / {}\nof the dense FFN", "ffn_centroid_dense_masked_cpu.json",
     lambda r: f"{next(x for x in r['rows'] if x['path'] == 'dense' and x['batch'] == 32)['speedup']:.2f}x"),
    ("bench/README.md", "`masked` {} (both were", "ffn_centroid_dense_masked_cpu.json",
     lambda r: " / ".join(f"{x['speedup']:.2f}x" for x in r["rows"] if x["path"] == "masked")),
    ("bench/README.md", "By the median {} of the 48 cells is below 0.9x, by the mean none: with the\nbusy process, the small fp32",
     "ffn_centroid_fallback_cpu.json",
     lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "By the median 1 of the 48 cells is below 0.9x, by the mean {}: with the\nbusy process, the small fp32",
     "ffn_centroid_fallback_cpu.json",
     lambda r: str(below(r["rows"], "speedup_mean") or "none")),
    ("bench/README.md", "Idle, every cell is at least {} by the median and 0.92x by the\nmean: the small bf16", "ffn_centroid_fallback_cpu.json",
     lambda r: lowest(grid(r, busy=0), "speedup")),
    ("bench/README.md", "Idle, every cell is at least 0.91x by the median and {} by the\nmean: the small bf16", "ffn_centroid_fallback_cpu.json",
     lambda r: lowest(grid(r, busy=0), "speedup_mean")),
    ("bench/README.md", "With the busy process every cell's mean is\nat least {}. The previous run", "ffn_centroid_fallback_cpu.json",
     lambda r: lowest(grid(r, busy=1), "speedup_mean")),
    ("bench/README.md", "at 32 tokens 1.247 and {} ms)", "ffn_teal_cpu.json",
     lambda r: f"{next(x for x in ffn_rows(r, 1536, 1) if x['dtype'] == 'bfloat16' and x['batch'] == 32 and x['active'] == 0.5)['dense_mean_ms']:.3f}"),
    ("bench/README.md", "a median of 0.852 ms, the calls that\ndid not wait, and a mean of {} ms", "ffn_teal_cpu.json",
     lambda r: f"{next(x for x in ffn_rows(r, 1536, 1) if x['dtype'] == 'bfloat16' and x['batch'] == 1 and x['active'] == 0.5)['dense_mean_ms']:.3f}"),
    ("bench/README.md", "By the median {} of the 48 cells are below 0.9x, by the mean 2. Idle, the", "ffn_teal_fallback_cpu.json",
     lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "By the median 3 of the 48 cells are below 0.9x, by the mean {}. Idle, the", "ffn_teal_fallback_cpu.json",
     lambda r: str(below(r["rows"], "speedup_mean") or "none")),
    ("bench/README.md", "large bf16 batch of 32 at 0.5 on the kernel, {} / 0.85x", "ffn_teal_fallback_cpu.json",
     lambda r: ffn_speedup(r, 11008, "bfloat16", 32, 0.5)),
    ("bench/README.md", "(3.51x by the median,\n{} by the mean, on `kernel`", "ffn_teal_fallback_cpu.json",
     lambda r: lowest(grid(r, busy=1), "speedup_mean")),
    ("bench/README.md", "one large token {};", "ffn_centroid_eager_bf16_cpu.json",
     lambda r: "{:.2f}\nand {:.2f} ms before, {:.2f} and {:.2f} after".format(*(
         load(name)["rows"][0]["bricked_ms"] for name in ("ffn_centroid_eager_bf16_before_cpu.json",
                                                          "ffn_centroid_eager_bf16_before2_cpu.json",
                                                          "ffn_centroid_eager_bf16_cpu.json",
                                                          "ffn_centroid_eager_bf16_2_cpu.json")))),
    ("bench/README.md", "chose `kernel@1`\n({}):", "chooser_trace_teal_fallback_busy_cpu.json",
     lambda r: f"{r['row']['speedup']:.2f}x / {r['row']['speedup_mean']:.2f}x"),
    ("bench/README.md", "stay in its expected time ({}", "chooser_trace_teal_fallback_busy_cpu.json",
     lambda r: f"{r['paths']['kernel']['expected_ms']:.2f} ms; its mean {r['paths']['kernel']['mean_ms']:.2f} ms"),
    ("bench/README.md", "the large bf16 batch {}\n/ 1.05x idle on the kernel", "ffn_teal_fallback_recheck_cpu.json",
     lambda r: ffn_speedup(r, 11008, "bfloat16", 32, 0.5)),
    ("bench/README.md", "and the small bf16 batch {} / 0.89x idle", "ffn_teal_fallback_recheck_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.5)),
    ("bench/README.md", "| teal | 576x1536 | bf16 | 32 | {} | 0.98x |", "ffn_teal_batch_before_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.5)),
    ("bench/README.md", "| teal | 576x1536 | bf16 | 32 | 0.83x | {} |", "ffn_teal_batch_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.5)),
    ("bench/README.md", "batches of 32 (bf16 {} to 0.979 ms", "ffn_teal_batch_before_cpu.json",
     lambda r: f"{next(x for x in ffn_rows(r, 1536, 0) if (x['dtype'], x['batch']) == ('bfloat16', 32))['bricked_ms']:.3f}"),
    ("bench/README.md", "batches of 32 (bf16 1.099 to {} ms", "ffn_teal_batch_cpu.json",
     lambda r: f"{next(x for x in ffn_rows(r, 1536, 0) if (x['dtype'], x['batch']) == ('bfloat16', 32))['bricked_ms']:.3f}"),
    ("README.md", "bf16 FFN {} dense at 0.5", "ffn_teal_threshold_h200.json",
     lambda r: ffn_speedup(r, 11008, "bfloat16", 1, 0.5)),
    ("README.md", "and {} at 0.25, and greedy", "ffn_teal_threshold_h200.json",
     lambda r: ffn_speedup(r, 11008, "bfloat16", 1, 0.25)),
    ("README.md", "Llama-2-7B-shaped model {} (", "decode_teal_threshold_7b_h200.json", lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "top-k selection ({})", "ffn_teal_topk_h200.json", lambda r: ffn_speedup(r, 11008, "bfloat16", 1, 0.5)),
    ("bench/README.md", "| 146.4 | 149.7 | {} |", "decode_teal_threshold_7b_h200.json", lambda r: f"{r['speedup']:.2f}x"),
    ("bench/README.md", "| 146.8 | 103.8 | {} |", "decode_centroid_7b_h200.json", lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "rows take {}x", "fusion_decode_cpu.json", lambda r: f"{r['adapter_rows_over_base']:.2f}"),
    ("README.md", "three full models {}x", "fusion_decode_cpu.json", lambda r: f"{r['full_models_over_base']:.2f}"),
    ("README.md", "gave {} on Wanda 2:4 (CPET", "cpet_code_2048_cpu.json",
     lambda r: f"{100 * r['results']['wanda-2:4 / summary']['recovered']:.1f}%"),
    ("README.md", "(CPET {} against", "cpet_code_2048_cpu.json",
     lambda r: f"{r['results']['wanda-2:4 / (iv) CPET']['ppl']:.1f}"),
    *[("README.md", f"{label}: CPET {{}}, against", "cpet_code_200steps_cpu.json" if c != "teal-50%" else "cpet_code_teal_cpu.json",
       lambda r, c=c, d=d: f"{r['results'][f'{c} / (iv) CPET']['ppl']:.{d}f}")
      for label, c, d in (("Wanda 2:4", "wanda-2:4", 1), ("int4", "int4", 2), ("teal at 50% FFN compute", "teal-50%", 2))],
    ("README.md", "it recovers **{}** of the log", "cpet_code_200steps_cpu.json",
     lambda r: f"{100 * r['results']['wanda-2:4 / summary']['recovered']:.1f}%"),
    ("README.md", "half the FFN compute): CPET {}, against", "cpet_code_moe_cpu.json",
     lambda r: f"{r['results']['moe-50% / (iv) CPET']['ppl']:.2f}"),
    ("README.md", "fresh LoRA; it recovers **{}**.", "cpet_code_moe_cpu.json",
     lambda r: f"{100 * r['results']['moe-50% / summary']['recovered']:.1f}%"),
    ("bench/README.md", "| (iv) CPET | **{}** |\n| share of the (ii)→(i) log-perplexity gap CPET recovers | 54.9% |",
     "cpet_code_moe_cpu.json", lambda r: f"{r['results']['moe-50% / (iv) CPET']['ppl']:.2f}"),
    ("README.md", "At 400 steps (both rows) CPET gives {} against", "cpet_code_400steps_cpu.json",
     lambda r: f"{r['results']['wanda-2:4 / (iv) CPET']['ppl']:.2f}"),
    ("README.md", "fresh LoRA and recovers\n  **{}**", "cpet_code_400steps_cpu.json",
     lambda r: f"{100 * r['results']['wanda-2:4 / summary']['recovered']:.1f}%"),
    ("bench/README.md", "CPET\n**{}**, which recovers", "cpet_code_400steps_cpu.json",
     lambda r: f"{r['results']['wanda-2:4 / (iv) CPET']['ppl']:.2f}"),
    ("README.md", "17.24 for a fresh LoRA; it recovers **{}**", "cpet_code_200steps_cpu.json",
     lambda r: f"{100 * r['results']['int4 / summary']['recovered']:.1f}%"),
    ("README.md", "21.22 for a fresh LoRA; it recovers **{}**", "cpet_code_teal_cpu.json",
     lambda r: f"{100 * r['results']['teal-50% / summary']['recovered']:.1f}%"),
    ("README.md", "CPET recovers **{}** of the\nWanda 2:4 gap", "cpet_math_200steps_cpu.json",
     lambda r: f"{100 * r['results']['wanda-2:4 / summary']['recovered']:.1f}%"),
    ("README.md", "on int4 ({} against 1.573", "cpet_math_200steps_cpu.json",
     lambda r: f"{r['results']['int4 / (iv) CPET']['ppl']:.3f}"),
    ("bench/README.md", "| **98.4%** | {} |", "cpet_math_200steps_cpu.json",
     lambda r: f"{100 * r['results']['int4 / summary']['recovered']:.1f}%"),
    ("bench/README.md", "| (iv) CPET | **{}** |", "cpet_code_200steps_cpu.json",
     lambda r: f"{r['results']['wanda-2:4 / (iv) CPET']['ppl']:.2f}"),
    ("README.md", "projections in {}x their bfloat16", "cpet_code_cpu.json",
     lambda r: f"{r['results']['int4 / compressed']['bytes_vs_bf16']['linear']:.2f}"),
    ("README.md", "batch 1 runs {}x faster than float32 in int4", "compressed_linear_cpu.json",
     lambda r: f"{next(x for x in r['rows'] if x['shape'] == '11008x4096' and 'repacked' in x['form'])['vs_fp32']:.2f}"),
    ("README.md", "({} s top to bottom", "durations_cpu.json", lambda r: f"{r['seconds']['notebook:compressed_bricks']:.0f}"),
    ("README.md", "results files ({} s top to bottom", "durations_cpu.json",
     lambda r: f"{r['seconds']['notebook:routing_tradeoffs']:.0f}"),
    ("README.md", "of each ({} s top to bottom", "durations_cpu.json",
     lambda r: f"{r['seconds']['notebook:merging_adapters']:.0f}"),
    ("README.md", "domains; {} s on 2 CPU cores", "durations_cpu.json", lambda r: f"{r['seconds']['analyze']:.0f}"),
    ("README.md", "GGUF once ({} s here", "durations_cpu.json", lambda r: f"{r['seconds']['gguf']:.0f}"),
    ("README.md", "where magnitude pruning gives {}", "cpet_code_cpu.json", lambda r: f"{r['results']['magnitude-50%']['ppl']:.0f}"),
    ("bench/README.md", "**{}x** one 513 MB", "merge_ties_cpu.json", lambda r: f"{r['rows']['bricks']['over_checkpoint']:.2f}"),
    ("bench/README.md", "against **{}x** for mergekit", "merge_ties_cpu.json",
     lambda r: f"{r['rows']['mergekit']['over_checkpoint']:.2f}"),
    ("bench/README.md", "all **{}** configs bit-equal", "mergekit_parity_default_cpu.json",
     lambda r: str(sum(row.get("max_abs_diff") == 0 for row in r["rows"].values()))),
    ("bench/README.md", "the mixed batch took\n**{}x**", "multi_adapter_cpu.json", lambda r: f"{r['mixed_s'] / r['base_s']:.2f}"),
    ("bench/README.md", "path {}x; every", "multi_adapter_cpu.json", lambda r: f"{r['peft_s'] / r['base_s']:.2f}"),
    ("bench/README.md", "**{}**", "routing_quality_probe_cpu.json",
     lambda r: " / ".join(f"{v:.3f}" for v in r["chosen_on_validation"]["ppl_ratio_heldout"].values())),
    ("bench/README.md", "{}", "teal_layer_budget_cpu.json",
     lambda r: " / ".join(f"{v:.2f}" for v in next(x for x in r["rows"] if x["target"] == 0.3 and x["rule"].startswith("sens"))["ratio"])),
]

def fusion_row(setting: str, r: dict) -> str:
    return " | ".join(f"{r['ppl'][setting][c]:.3f}" for c in ("code", "math", "prose"))


FUSION_ROWS = ("code", "math", "prose", "uniform", "linear merge", "TIES merge", "two-stage balanced",
               "direct joint balanced", "two-stage proportional")
HEADLINES += [
    ("README.md", "(mixed perplexity {} against", "fusion_ablation_150_cpu.json",
     lambda r: f"{r['ppl'][r['selected']]['mixed']:.3f}"),
    ("README.md", "against {} for the average", "fusion_ablation_150_cpu.json", lambda r: f"{r['ppl']['uniform']['mixed']:.3f}"),
    ("README.md", "and {} for the `route` gate", "fusion_ablation_150_cpu.json",
     lambda r: f"{r['ppl']['route --router gate']['mixed']:.3f}"),
    ("bench/README.md", "| {} |", "fusion_ablation_150_cpu.json", lambda r: fusion_row("route --router gate", r)),
    ("bench/README.md", "| {} | **", "fusion_ablation_150_cpu.json", lambda r: fusion_row(r["selected"], r)),
    *[("bench/README.md", "| {} |", f, lambda r, k=k: fusion_row(k, r))
      for k in FUSION_ROWS for f in ("fusion_ablation_default_cpu.json", "fusion_ablation_150_cpu.json")],
]

def selection_ratios(r: dict, key: str) -> str:
    return " / ".join(f"{v:.3f}" for v in r["rows"][key]["ratio"].values())


HEADLINES += [
    ("README.md", "held-out ratios {} against", "teal_selection_cpu.json", lambda r: selection_ratios(r, "threshold @ 0.5")),
    ("README.md", "against {} for\ntop-k", "teal_selection_cpu.json", lambda r: selection_ratios(r, "topk @ 0.5")),
    ("bench/README.md", "| top-k per token | {} |", "teal_selection_cpu.json", lambda r: selection_ratios(r, "topk @ 0.5")),
    ("bench/README.md", "| top-k, input embeddings x(1+1e-6) | {} |", "teal_selection_cpu.json",
     lambda r: selection_ratios(r, "topk @ 0.5, embeddings x(1+1e-6)")),
    ("bench/README.md", "| **{}** |", "teal_selection_cpu.json", lambda r: selection_ratios(r, "threshold @ 0.5")),
    ("README.md", "2048-token FFN call at {} dense", "ffn_teal_prefill_threshold_cpu.json",
     lambda r: ffn_speedup(r, 1536, "float32", 2048, 0.5)),
    ("README.md", "against {}\n(`bench/README.md`)", "ffn_teal_prefill_topk_cpu.json",
     lambda r: ffn_speedup(r, 1536, "float32", 2048, 0.5)),
]

def avx2_row(router: str, shape: str, d_ff: int, dt: str, batch: int) -> str:
    """A row of bench/README.md's "On an AVX2-only CPU" tables: the kernel before and after, the dense FFN of both."""
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[dt]
    before, after = (next(x for x in load(f"ffn_{router}_avx2{run}_cpu.json")["rows"] if (x["d_ff"], x["dtype"], x["batch"])
                          == (d_ff, dtype, batch)) for run in ("_before", ""))
    return (f"| {shape} | {dt} | {batch} | {before['speedup']:.2f}x | {after['speedup']:.2f}x | {before['bricked_ms']:.3f} | "
            f"{after['bricked_ms']:.3f} | {before['dense_ms']:.3f} / {after['dense_ms']:.3f} |")


def span(rows: list[dict], key: str, form: str = "{:.2f}x") -> str:
    """The lowest and highest of `rows` by `key`, as "a-b" (speedups unless `form` says otherwise)."""
    values = [x[key] for x in rows]
    return f"{form.format(min(values))}-{form.format(max(values))}"


def speedup_range(r: dict) -> str:
    return span(r["rows"], "speedup")


HEADLINES += [
    *[("bench/README.md", "{}", f"ffn_{router}_avx2_cpu.json",
       lambda r, router=router, shape=shape, d=d, dt=dt, batch=batch: avx2_row(router, shape, d, dt, batch))
      for router in ("teal", "centroid") for shape, d in (("4096x11008", 11008), ("576x1536", 1536))
      for dt in ("fp32", "bf16") for batch in (1, 8, 32)],
    ("bench/README.md", "dense FFN ({} for teal,", "ffn_teal_avx2_cpu.json", speedup_range),
    ("README.md", "is {} dense for teal", "ffn_teal_avx2_cpu.json", speedup_range),
    ("README.md", "and\n  {} for the bricks there", "ffn_centroid_avx2_cpu.json", speedup_range),
    ("README.md", "batches of 32 at 0.5: {}), GCC's", "ffn_teal_avx2_before_cpu.json",
     lambda r: speedup_range({"rows": [x for x in r["rows"] if x["batch"] == 32]})),
    ("bench/README.md", "for teal,\n{} for the bricks)", "ffn_centroid_avx2_cpu.json", speedup_range),
    ("bench/README.md", "batch of\n32: {} ms against", "ffn_teal_avx2_cpu.json",
     lambda r: f"{next(x for x in grid(r, 0) if (x['d_ff'], x['dtype'], x['batch']) == (11008, 'bfloat16', 32))['dense_ms']:.0f}"),
    ("bench/README.md", "ms against {} ms for the kernel)", "ffn_teal_avx2_cpu.json",
     lambda r: f"{next(x for x in grid(r, 0) if (x['d_ff'], x['dtype'], x['batch']) == (11008, 'bfloat16', 32))['bricked_ms']:.0f}"),
]

def grid_row(r: dict, shape: str, d_ff: int, dt: str, batch: int) -> str:
    """A row of an FFN grid's table: idle 0.5 and 0.25, then busy 0.5 and 0.25 (median / mean), each with its path."""
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[dt]
    cells = []
    for busy in (0, 1):
        for active in (0.5, 0.25):
            x = next(x for x in grid(r, busy) if (x["d_ff"], x["dtype"], x["batch"], x["active"]) == (d_ff, dtype, batch, active))
            mean = f" / {x['speedup_mean']:.2f}x" if busy else ""
            cells.append(f"{x['speedup']:.2f}x{mean} {x['path']}")
    return f"| {shape} | {dt} | {batch} | " + " | ".join(cells) + " |"



def grid_table(name: str) -> list[tuple]:
    """HEADLINES for every row of a whole FFN grid's table (both shapes, fp32 and bf16, batches of 1, 8 and 32)."""
    return [("bench/README.md", "{}", name, lambda r, shape=shape, d=d, dt=dt, batch=batch: grid_row(r, shape, d, dt, batch))
            for shape, d in (("4096x11008", 11008), ("576x1536", 1536)) for dt in ("fp32", "bf16") for batch in (1, 8, 32)]


HEADLINES += [
    *grid_table("ffn_teal_grid_avx2_cpu.json"),
    ("bench/README.md", "{} cell is below 0.9x dense, by the median or the mean. Idle", "ffn_teal_grid_avx2_cpu.json",
     lambda r: str(below(r["rows"], "speedup") + below(r["rows"], "speedup_mean") or "No")),
    ("bench/README.md", "fp32 batch of 32 at 0.5 ({} / 1.03x); with", "ffn_teal_grid_avx2_cpu.json", lambda r: lowest(grid(r, 0), "speedup")),
    ("bench/README.md", "at 0.5 (1.03x / {}); with", "ffn_teal_grid_avx2_cpu.json", lambda r: lowest(grid(r, 0), "speedup_mean")),
    ("bench/README.md", "busy, {} by the median (the same cell)", "ffn_teal_grid_avx2_cpu.json", lambda r: lowest(grid(r, 1), "speedup")),
    ("bench/README.md", "and {} by the mean (the small\nfp32 decode token", "ffn_teal_grid_avx2_cpu.json",
     lambda r: lowest(grid(r, 1), "speedup_mean")),
    *grid_table("ffn_centroid_grid_avx2_cpu.json"),
    ("README.md", "The brick router's grid\n  there has {} cell below 0.9x either", "ffn_centroid_grid_avx2_cpu.json",
     lambda r: str(below(r["rows"], "speedup") + below(r["rows"], "speedup_mean") or "no")),
    ("bench/README.md", "{} cell is below 0.9x dense here either.", "ffn_centroid_grid_avx2_cpu.json",
     lambda r: str(below(r["rows"], "speedup") + below(r["rows"], "speedup_mean") or "No")),
    ("bench/README.md", "decode token at 0.5 ({} by the median, 1.02x", "ffn_centroid_grid_avx2_cpu.json",
     lambda r: lowest(grid(r, 0), "speedup")),
    ("bench/README.md", "by the median, {} by the mean);", "ffn_centroid_grid_avx2_cpu.json", lambda r: lowest(grid(r, 0), "speedup_mean")),
    ("bench/README.md", "the same cell by the median ({}) and", "ffn_centroid_grid_avx2_cpu.json", lambda r: lowest(grid(r, 1), "speedup")),
    ("bench/README.md", "at 0.25 by the mean ({}). The grids", "ffn_centroid_grid_avx2_cpu.json",
     lambda r: lowest(grid(r, 1), "speedup_mean")),
    ("README.md", "the mean ({} at the lowest, idle;", "ffn_teal_grid_avx2_cpu.json", lambda r: lowest(r["rows"], "speedup")),
    ("README.md", "busy {} by the median and 1.77x", "ffn_teal_grid_avx2_cpu.json", lambda r: lowest(grid(r, 1), "speedup")),
    ("README.md", "by the median and {} by the mean), and", "ffn_teal_grid_avx2_cpu.json", lambda r: lowest(grid(r, 1), "speedup_mean")),
]

def below_both(r: dict) -> str:
    """How many cells of a grid are below 0.9x by the median, and by the mean: "N of the 48 ... by the mean M"."""
    return f"{below(r['rows'], 'speedup')} of the 48 cells are below 0.9x dense, by the mean {below(r['rows'], 'speedup_mean')}"


HEADLINES += [
    *grid_table("ffn_teal_grid_zen5_cpu.json"),
    *grid_table("ffn_centroid_grid_zen5_cpu.json"),
    ("bench/README.md", "at 32 tokens in {} ms (1.248", "ffn_teal_grid_zen5_cpu.json",
     lambda r: f"{cell(r, 1536, 'bfloat16', 32, 0.5, 0)['dense_ms']:.3f}"),
    ("bench/README.md", "ms ({}\nms in `results/ffn_teal_cpu.json`)", "ffn_teal_cpu.json",
     lambda r: f"{cell(r, 1536, 'bfloat16', 32, 0.5, 0)['dense_ms']:.3f}"),
    ("bench/README.md", "of weights in {} ms (26 GB/s", "ffn_teal_grid_zen5_cpu.json",
     lambda r: f"{cell(r, 11008, 'float32', 1, 0.5, 0)['dense_ms']:.2f}"),
    ("bench/README.md", "large fp32 one is {}\n/ ", "ffn_teal_grid_zen5_cpu.json", lambda r: ffn_speedup(r, 11008, "float32", 1, 0.5)),
    ("bench/README.md", "\n/ {} dense at 0.5 / 0.25 idle", "ffn_teal_grid_zen5_cpu.json",
     lambda r: ffn_speedup(r, 11008, "float32", 1, 0.25)),
    ("bench/README.md", "kept rows\nin {} ms, 43 GB/s", "ffn_teal_grid_zen5_cpu.json",
     lambda r: f"{cell(r, 11008, 'float32', 1, 0.5, 0)['bricked_ms']:.2f}"),
    ("bench/README.md", "and {} at 0.5 busy, the small", "ffn_teal_grid_zen5_cpu.json",
     lambda r: ffn_speedup(r, 11008, "float32", 1, 0.5, busy=1)),
    ("bench/README.md", "the small fp32 one {} at\n0.5.", "ffn_teal_grid_zen5_cpu.json", lambda r: ffn_speedup(r, 1536, "float32", 1, 0.5)),
    ("bench/README.md", "The fp32 batches are {} by the median.", "ffn_teal_grid_zen5_cpu.json",
     lambda r: speedup_range({"rows": [x for x in r["rows"] if x["dtype"] == "float32" and x["batch"] > 1]})),
    ("bench/README.md", "by the median {},\nall of them bf16 batches", "ffn_teal_grid_zen5_cpu.json", below_both),
    ("bench/README.md", "the batches of 32 at 0.5 ({} small,", "ffn_teal_grid_zen5_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.5)),
    ("bench/README.md", "small,\n{} large, on the kernel", "ffn_teal_grid_zen5_cpu.json",
     lambda r: ffn_speedup(r, 11008, "bfloat16", 32, 0.5)),
    ("bench/README.md", "at 0.5 and at 0.25 ({} and", "ffn_teal_grid_zen5_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.5, busy=1)),
    ("bench/README.md", "at compute 0.99 the\nsmall shape is {} dense", "ffn_teal_bf16_compute_zen5_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.99)),
    ("bench/README.md", "dense and the large one {}; at 0.5", "ffn_teal_bf16_compute_zen5_cpu.json",
     lambda r: ffn_speedup(r, 11008, "bfloat16", 32, 0.99)),
    ("README.md", "kernel's bf16 batch of 32 is {} / ", "ffn_teal_bf16_compute_zen5_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.99)),
    ("bench/README.md", "By the mean no cell is below 0.9x (the lowest {} idle", "ffn_centroid_grid_zen5_cpu.json",
     lambda r: lowest(grid(r, 0), "speedup_mean")),
    ("bench/README.md", "32 at 0.5; {} busy, the same cell)", "ffn_centroid_grid_zen5_cpu.json",
     lambda r: lowest(grid(r, 1), "speedup_mean")),
    ("bench/README.md", "cell); by the median {} are, all", "ffn_centroid_grid_zen5_cpu.json", lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "\nat 0.5, and it was slower than the dense FFN too: {} for teal", "ffn_teal_fallback_zen5_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.5)),
    ("bench/README.md", "unit-major weights) and {} for the bricks", "ffn_centroid_fallback_zen5_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.5)),
    *[("bench/README.md", "{}", f"decode_{router}{load_}_zen5_cpu.json", decode_row)
      for router in ("teal", "centroid") for load_ in ("", "_busy", "_default")],
    ("bench/README.md", "teal at compute 0.5 is\n{} on the 22-layer", "decode_teal_zen5_cpu.json", lambda r: f"{r['speedup']:.2f}x"),
    ("bench/README.md", "the centroid router {}, 1.32x and 1.35x", "decode_centroid_zen5_cpu.json", lambda r: f"{r['speedup']:.2f}x"),
    ("bench/README.md", "whose runs overlap ({} tokens/s", "decode_centroid_default_zen5_cpu.json", lambda r: run_range(r["bricked_runs"])),
    ("bench/README.md", "tokens/s\nagainst {}). The rows", "decode_centroid_default_zen5_cpu.json", lambda r: run_range(r["dense_runs"])),
    ("README.md", "decoding is {} on the 22-layer Llama and", "decode_teal_zen5_cpu.json", lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "Llama and {} on the default model.\n  The bf16", "decode_teal_default_zen5_cpu.json", lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "batches of 32 at 0.5 are {} and", "ffn_teal_grid_zen5_cpu.json", lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.5)),
    ("README.md", "are 0.84x and {}\n  dense idle", "ffn_teal_grid_zen5_cpu.json", lambda r: ffn_speedup(r, 11008, "bfloat16", 32, 0.5)),
    ("README.md", "(the large fp32 one {} / ", "ffn_teal_grid_zen5_cpu.json", lambda r: ffn_speedup(r, 11008, "float32", 1, 0.5)),
    ("README.md", " / {}\n  at 0.5 / 0.25 idle", "ffn_teal_grid_zen5_cpu.json", lambda r: ffn_speedup(r, 11008, "float32", 1, 0.25)),
    ("README.md", "idle, {} at 0.5 busy; the small one", "ffn_teal_grid_zen5_cpu.json",
     lambda r: ffn_speedup(r, 11008, "float32", 1, 0.5, busy=1)),
    ("README.md", "busy; the small one {}) and", "ffn_teal_grid_zen5_cpu.json", lambda r: ffn_speedup(r, 1536, "float32", 1, 0.5)),
    ("README.md", "bf16 (by the mean {} and", "ffn_teal_grid_zen5_cpu.json", lambda r: str(below(r["rows"], "speedup_mean"))),
    ("README.md", "by the mean 2 and {}).", "ffn_centroid_grid_zen5_cpu.json",
     lambda r: str(below(r["rows"], "speedup_mean") or "none")),
    ("README.md", " / {} dense\n  there: torch's", "ffn_teal_bf16_compute_zen5_cpu.json",
     lambda r: ffn_speedup(r, 11008, "bfloat16", 32, 0.99)),
    ("README.md", "by the median {} of teal's 48 cells", "ffn_teal_grid_zen5_cpu.json", lambda r: str(below(r["rows"], "speedup"))),
    ("README.md", "and {} of the brick\n  router's are below", "ffn_centroid_grid_zen5_cpu.json", lambda r: str(below(r["rows"], "speedup"))),
]

HEADLINES.append(("bench/README.md", "capture takes **{}x**", "capture_cpu.json",
                  lambda r: f"{r['capture_s'] / r['plain_s']:.2f}"))

# Zen 5, the kernel's dense blocks of bf16 pairs: two runs before and two after, alternating.
BLOCKS_BEFORE = ("ffn_teal_bf16_batches_before1_zen5_cpu.json", "ffn_teal_bf16_batches_before2_zen5_cpu.json")
BLOCKS_AFTER = ("ffn_teal_bf16_batches1_zen5_cpu.json", "ffn_teal_bf16_batches2_zen5_cpu.json")


def before_after_row(shape: str, d_ff: int, batch: int, active: float, busy: int) -> str:
    """A row of the before / after table: each run's cell by the median / the mean, then the path of the last."""
    cells = [cell(load(name), d_ff, "bfloat16", batch, active, busy) for name in BLOCKS_BEFORE + BLOCKS_AFTER]
    runs = " | ".join(f"{x['speedup']:.2f}x / {x['speedup_mean']:.2f}x" for x in cells)
    return f"| {shape} | {batch} | {active} | {'busy' if busy else 'idle'} | {runs} | {cells[-1]['path']} |"




def runs_speedup(names: tuple[str, ...], d_ff: int, batch: int, active: float, busy: int = 0) -> str:
    """The speedups by the median of one cell in each of the runs, as "a and b"."""
    return " and ".join(ffn_speedup(load(name), d_ff, "bfloat16", batch, active, busy) for name in names)


HEADLINES += [
    *[("bench/README.md", "{}", BLOCKS_AFTER[1],
       lambda r, shape=shape, d=d, batch=batch, active=active, busy=busy: before_after_row(shape, d, batch, active, busy))
      for shape, d in (("4096x11008", 11008), ("576x1536", 1536)) for batch in (8, 32) for busy in (0, 1)
      for active in (0.5, 0.25)],
    ("bench/README.md", "idle, went from {} to 0.94x", BLOCKS_AFTER[1], lambda r: runs_speedup(BLOCKS_BEFORE, 11008, 32, 0.5)),
    ("bench/README.md", "0.82x to {}; the other cells", BLOCKS_AFTER[1],
     lambda r: runs_speedup(BLOCKS_AFTER, 11008, 32, 0.5).replace(" and ", "\nand ")),
    ("bench/README.md", "small batch of 32 at 0.5: {} before", BLOCKS_AFTER[1], lambda r: runs_speedup(BLOCKS_BEFORE, 1536, 32, 0.5)),
    ("bench/README.md", "before, {} after).", BLOCKS_AFTER[1], lambda r: runs_speedup(BLOCKS_AFTER, 1536, 32, 0.5)),
    ("bench/README.md", "Below 0.9x by the median: {} of the 16 cells before", BLOCKS_AFTER[1],
     lambda r: " and ".join(str(below(load(n)["rows"], "speedup")) for n in BLOCKS_BEFORE)),
    ("bench/README.md", "cells before, {} after;\nby the mean", BLOCKS_AFTER[1],
     lambda r: " and ".join(str(below(load(n)["rows"], "speedup")) for n in BLOCKS_AFTER)),
    ("bench/README.md", "by the mean {} before, 1 and 1", BLOCKS_AFTER[1],
     lambda r: " and ".join(str(below(load(n)["rows"], "speedup_mean")) for n in BLOCKS_BEFORE)),
    ("bench/README.md", "2 and 2 before, {} after (a batch", BLOCKS_AFTER[1],
     lambda r: " and ".join(str(below(load(n)["rows"], "speedup_mean")) for n in BLOCKS_AFTER)),
    ("bench/README.md", "these cells {}\nby the median", BLOCKS_AFTER[1],
     lambda r: span([x for n in BLOCKS_AFTER for x in ffn_rows(load(n), 1536, 1)], "speedup")),
    ("bench/README.md", "by the median, {} by the mean: one thread", BLOCKS_AFTER[1],
     lambda r: span([x for n in BLOCKS_AFTER for x in ffn_rows(load(n), 1536, 1)], "speedup_mean")),
    ("bench/README.md", "the kernel is {} dense on the small shape", "ffn_teal_bf16_compute_blocks_zen5_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.99)),
    ("bench/README.md", "shape and\n{} on the large one", "ffn_teal_bf16_compute_blocks_zen5_cpu.json",
     lambda r: ffn_speedup(r, 11008, "bfloat16", 32, 0.99)),
    ("bench/README.md", "at 0.5 {}.\nAt 32 tokens", "ffn_teal_bf16_compute_blocks_zen5_cpu.json",
     lambda r: f"{ffn_speedup(r, 1536, 'bfloat16', 32, 0.5)} and {ffn_speedup(r, 11008, 'bfloat16', 32, 0.5)}"),
    ("README.md", "at 0.5\n  went to {} dense in two runs", BLOCKS_AFTER[1], lambda r: runs_speedup(BLOCKS_AFTER, 11008, 32, 0.5)),
    ("README.md", "in two runs ({} before)", BLOCKS_AFTER[1], lambda r: runs_speedup(BLOCKS_BEFORE, 11008, 32, 0.5)),
    ("README.md", "with every row kept to {}; the small", "ffn_teal_bf16_compute_blocks_zen5_cpu.json",
     lambda r: ffn_speedup(r, 11008, "bfloat16", 32, 0.99)),
    ("README.md", "(at least {} by the mean)", BLOCKS_AFTER[1],
     lambda r: lowest([x for n in BLOCKS_AFTER for x in ffn_rows(load(n), 1536, 1)], "speedup_mean")),
]

# Zen 5, the top-k's bisection stopping early: two runs before and two after, alternating, the kernel path fixed.
SELECTION_RUNS = ("ffn_teal_selection_before1_zen5_cpu.json", "ffn_teal_selection_before2_zen5_cpu.json",
                  "ffn_teal_selection1_zen5_cpu.json", "ffn_teal_selection2_zen5_cpu.json")


def selection_row(dt: str, batch: int, active: float) -> str:
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[dt]
    cells = [cell(load(name), 1536, dtype, batch, active) for name in SELECTION_RUNS]
    return f"| {dt} | {batch} | {active} | " + " | ".join(f"{x['speedup']:.2f}x ({x['bricked_ms']:.3f} ms)" for x in cells) + " |"


HEADLINES += [
    *[("bench/README.md", "{}", SELECTION_RUNS[3], lambda r, dt=dt, batch=batch, active=active: selection_row(dt, batch, active))
      for dt in ("fp32", "bf16") for batch in (1, 32) for active in (0.5, 0.25)],
    ("bench/README.md", "The bf16 batch of 32 at 0.5 went from {} to 0.97x", SELECTION_RUNS[3],
     lambda r: " and ".join(ffn_speedup(load(n), 1536, "bfloat16", 32, 0.5) for n in SELECTION_RUNS[:2])),
    ("bench/README.md", "0.89x to {} dense (in the second", SELECTION_RUNS[3],
     lambda r: " and\n".join(ffn_speedup(load(n), 1536, "bfloat16", 32, 0.5) for n in SELECTION_RUNS[2:])),
    ("bench/README.md", "dense calls were slower too:\n{} ms against", SELECTION_RUNS[3],
     lambda r: f"{cell(r, 1536, 'bfloat16', 32, 0.5)['dense_ms']:.3f}"),
    ("bench/README.md", "ms against {} ms in the other three", SELECTION_RUNS[3],
     lambda r: span([cell(load(n), 1536, "bfloat16", 32, 0.5) for n in SELECTION_RUNS[:3]], "dense_ms", "{:.3f}")),
]

HELPERS_BEFORE = ("ffn_teal_helpers_before1_zen5_cpu.json", "ffn_teal_helpers_before2_zen5_cpu.json")
HELPERS_AFTER = ("ffn_teal_helpers1_zen5_cpu.json", "ffn_teal_helpers2_zen5_cpu.json")

HEADLINES += [
    ("bench/README.md", "dense batch of 32 at {} ms (", "ffn_teal_passive_zen5_cpu.json",
     lambda r: f"{cell(r, 1536, 'bfloat16', 32, 0.5)['dense_ms']:.3f}"),
    ("bench/README.md", "ms ({} in the two runs", HELPERS_BEFORE[0],
     lambda r: " ms and ".join(f"{cell(load(n), 1536, 'bfloat16', 32, 0.5)['dense_ms']:.3f}" for n in HELPERS_BEFORE) + " ms"),
    ("bench/README.md", "the routed cells at\n{} by the median", "ffn_teal_passive_zen5_cpu.json",
     lambda r: span(grid(r, 1), "speedup")),
]

PATHS_BUSY = ("ffn_teal_paths_busy1_zen5_cpu.json", "ffn_teal_paths_busy2_zen5_cpu.json")


def busy_paths(path: str, key: str) -> str:
    """The range of `key` over the cells of the fixed-path busy runs on `path`."""
    return span([x for n in PATHS_BUSY for x in load(n)["rows"] if x["path"] == path], key)


HEADLINES += [
    ("bench/README.md", "`kernel` was\n{} dense by the median", PATHS_BUSY[1], lambda r: busy_paths("kernel", "speedup")),
    ("bench/README.md", "but {} by the\nmean (its stalls)", PATHS_BUSY[1], lambda r: busy_paths("kernel", "speedup_mean")),
    ("bench/README.md", "`kernel@1` {} by the median", PATHS_BUSY[1], lambda r: busy_paths("kernel@1", "speedup")),
    ("bench/README.md", "and {}\nby the mean; `masked`", PATHS_BUSY[1], lambda r: busy_paths("kernel@1", "speedup_mean")),
    ("bench/README.md", "`masked` {} by the median", PATHS_BUSY[1], lambda r: busy_paths("masked", "speedup")),
    ("README.md", "both threads is {} dense by", PATHS_BUSY[1], lambda r: busy_paths("kernel", "speedup")),
    ("README.md", "the median but {} by the mean (its stalls)", PATHS_BUSY[1], lambda r: busy_paths("kernel", "speedup_mean")),
]


def masked_ops(d_ff: int, *ops: str) -> str:
    """The summed time of `ops` in bench/masked_parts.py's bf16 run of one shape, as the docs write it."""
    rows = load("masked_parts_zen5_cpu.json")["rows"]
    return f"{sum(x['ms'] for x in rows if x['d_ff'] == d_ff and x['dtype'] == 'bfloat16' and x['op'] in ops):.2f} ms"


TORCH_TOPK = ("topk inputs (torch)", "topk activations (torch)")
MATMULS = ("gate|up matmul (unit-major)", "down matmul (unit-major)")
COMPILED_TOPK = ("top_magnitudes inputs, zeroed", "top_magnitudes activations, zeroed")

HEADLINES += [
    ("bench/README.md", "activations took\n{} against", "masked_parts_zen5_cpu.json", lambda r: masked_ops(1536, *TORCH_TOPK)),
    ("bench/README.md", "against {} for the two matmuls", "masked_parts_zen5_cpu.json", lambda r: masked_ops(1536, *MATMULS)),
    ("bench/README.md", "for the large one {}\nagainst", "masked_parts_zen5_cpu.json", lambda r: masked_ops(11008, *TORCH_TOPK)),
    ("bench/README.md", "against {}. Since `bb869f1`", "masked_parts_zen5_cpu.json", lambda r: masked_ops(11008, *MATMULS)),
    ("bench/README.md", "pass:\n{} and", "masked_parts_zen5_cpu.json", lambda r: masked_ops(1536, *COMPILED_TOPK)),
    ("bench/README.md", "and {} for those two, zeroing", "masked_parts_zen5_cpu.json", lambda r: masked_ops(11008, *COMPILED_TOPK)),
]


PREFILL_RUNS = ("ffn_teal_prefill_before1_zen5_cpu.json", "ffn_teal_prefill_before2_zen5_cpu.json",
                "ffn_teal_prefill1_zen5_cpu.json", "ffn_teal_prefill2_zen5_cpu.json")


def prefill_row(shape: str, d_ff: int, dtype: str) -> str:
    cells = [cell(load(n), d_ff, dtype, 2048, 0.5) for n in PREFILL_RUNS]
    label = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    return f"| {shape} | {label} | " + " | ".join(f"{c['speedup']:.2f}x ({c['bricked_ms']:.1f} ms)" for c in cells) + " |"


HEADLINES += [
    *[("bench/README.md", "{}", PREFILL_RUNS[3], lambda r, shape=shape, d=d, dt=dt: prefill_row(shape, d, dt))
      for shape, d in (("576x1536", 1536), ("4096x11008", 11008)) for dt in ("float32", "bfloat16")],
    ("bench/README.md", "dense calls took {}\nacross the four runs", PREFILL_RUNS[3],
     lambda r: span([cell(load(n), 1536, "float32", 2048, 0.5) for n in PREFILL_RUNS], "dense_ms", "{:.1f}") + " ms"),
    ("README.md", "on `masked`) went from {} dense", PREFILL_RUNS[3],
     lambda r: span([x for n in PREFILL_RUNS[:2] for x in load(n)["rows"]], "speedup")),
    ("README.md", "dense to\n  {} in two runs each way", PREFILL_RUNS[3],
     lambda r: span([x for n in PREFILL_RUNS[2:] for x in load(n)["rows"]], "speedup")),
    ("bench/README.md", "2048 tokens at {} dense in fp32 there", PREFILL_RUNS[3],
     lambda r: span([cell(load(n), d, "float32", 2048, 0.5) for n in PREFILL_RUNS[2:] for d in (1536, 11008)], "speedup")),
]


HEADLINES += [
    ("bench/README.md", "batch of 32 at 0.5: {} before", HELPERS_AFTER[1], lambda r: runs_speedup(HELPERS_BEFORE, 1536, 32, 0.5)),
    ("bench/README.md", "before, {}\nwith the patch)", HELPERS_AFTER[1],
     lambda r: runs_speedup(HELPERS_AFTER, 1536, 32, 0.5)),
    ("bench/README.md", "(that cell {} before, 0.54x", HELPERS_AFTER[1], lambda r: runs_speedup(HELPERS_BEFORE, 1536, 32, 0.5, 1)),
    ("bench/README.md", "before, {} with it)", HELPERS_AFTER[1], lambda r: runs_speedup(HELPERS_AFTER, 1536, 32, 0.5, 1)),
]


# The Intel Xeon with AMX: the teal grid before and after, and AMX off and on, alternating, two runs each.
AMX_RUNS = tuple(f"ffn_teal_amx2_{state}{run}_xeon_cpu.json" for run in (1, 2) for state in ("off", "on"))
AMX1_RUNS = tuple(f"ffn_teal_amx1_{state}{run}_xeon_cpu.json" for state in ("off", "on") for run in (1, 2, 3))


def amx_row(shape: str, d_ff: int, batch: int, active: float, busy: int) -> str:
    """A row of the AMX off / on table: each run's cell by the median / the mean, with its path."""
    cells = [cell(load(name), d_ff, "bfloat16", batch, active, busy) for name in AMX_RUNS]
    runs = " | ".join(f"{x['speedup']:.2f}x / {x['speedup_mean']:.2f}x {x['path']}" for x in cells)
    return f"| {shape} | {batch} | {active} | {'busy' if busy else 'idle'} | {runs} |"


def amx_span(names, d_ffs, batch: int, actives=(0.5, 0.25)) -> str:
    """The lowest and highest idle speedup by the median of one batch over the runs `names`, as "a-b"."""
    return span([cell(load(n), d, "bfloat16", batch, a) for n in names for d in d_ffs for a in actives], "speedup")


HEADLINES += [
    *grid_table("ffn_teal_grid_before_xeon_cpu.json"),
    *grid_table("ffn_teal_grid_xeon_cpu.json"),
    *[("bench/README.md", "{}", AMX_RUNS[-1], lambda r, shape=shape, d=d, batch=batch, active=active, busy=busy:
       amx_row(shape, d, batch, active, busy))
      for shape, d in (("4096x11008", 11008), ("576x1536", 1536)) for batch in (8, 32) for busy in (0, 1)
      for active in (0.5, 0.25)],
    ("bench/README.md", "at 0.5 is 0.46x on `masked`, and {} by the median", "ffn_teal_grid_before_xeon_cpu.json",
     lambda r: f"{below(r['rows'], 'speedup')} cells"),
    ("bench/README.md", "by the median, {} by the mean,\nare below", "ffn_teal_grid_before_xeon_cpu.json",
     lambda r: str(below(r["rows"], "speedup_mean"))),
    ("bench/README.md", "FFN took {} ms in the first grid", "ffn_teal_grid_before_xeon_cpu.json",
     lambda r: f"{cell(r, 11008, 'float32', 1, 0.5)['dense_ms']:.2f}"),
    ("bench/README.md", "below and {} ms in the second", "ffn_teal_grid_xeon_cpu.json",
     lambda r: f"{cell(r, 11008, 'float32', 1, 0.5)['dense_ms']:.2f}"),
    ("bench/README.md", "the large batch of 8, idle, from {} (on", AMX_RUNS[-1], lambda r: amx_span(AMX_RUNS[0::2], (11008,), 8)),
    ("bench/README.md", "`masked`) to {} (on the kernel)", AMX_RUNS[-1], lambda r: amx_span(AMX_RUNS[1::2], (11008,), 8)),
    ("bench/README.md", "from {} to 0.90x and 0.93x", AMX_RUNS[-1], lambda r: runs_speedup(AMX_RUNS[0::2], 1536, 8, 0.5)),
    ("bench/README.md", "0.84x to {}. The batches", AMX_RUNS[-1], lambda r: runs_speedup(AMX_RUNS[1::2], 1536, 8, 0.5)),
    ("bench/README.md", "batch of 8 at 0.5 moved ({} to", AMX1_RUNS[-1], lambda r: amx_span(AMX1_RUNS[:3], (1536,), 8, (0.5,))),
    ("bench/README.md", "to {}).\n\nThe grid with AMX", AMX1_RUNS[-1], lambda r: amx_span(AMX1_RUNS[3:], (1536,), 8, (0.5,))),
    ("bench/README.md", "{} cells by the median and 6 by the mean are below", "ffn_teal_grid_xeon_cpu.json",
     lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "11 cells by the median and {} by the mean are below", "ffn_teal_grid_xeon_cpu.json",
     lambda r: str(below(r["rows"], "speedup_mean"))),
    ("README.md", "large batch of\n  8 went from {} dense", AMX_RUNS[-1], lambda r: amx_span(AMX_RUNS[0::2], (11008,), 8)),
    ("README.md", "dense to {} and the small one", AMX_RUNS[-1], lambda r: amx_span(AMX_RUNS[1::2], (11008,), 8)),
    ("README.md", "from 0.83x-0.84x to {}; the batches", AMX_RUNS[-1],
     lambda r: runs_speedup(AMX_RUNS[1::2], 1536, 8, 0.5).replace(" and ", "-")),
    ("README.md", "the batches of 32 stayed at\n  {} idle", AMX_RUNS[-1],
     lambda r: amx_span(AMX_RUNS[1::2], (1536, 11008), 32)),
    ("README.md", "(the large bf16 one {} / 6.37x", "ffn_teal_grid_xeon_cpu.json", lambda r: ffn_speedup(r, 11008, "bfloat16", 1, 0.5)),
    *grid_table("ffn_centroid_grid_xeon_cpu.json"),
    ("bench/README.md", "{} cells by the median and 6 by the mean are below 0.9x dense, 7", "ffn_centroid_grid_xeon_cpu.json",
     lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "10 cells by the median and {} by the mean are below 0.9x dense, 7", "ffn_centroid_grid_xeon_cpu.json",
     lambda r: str(below(r["rows"], "speedup_mean"))),
    ("bench/README.md", "the small bf16 batches (idle {}): the brick", "ffn_centroid_grid_xeon_cpu.json",
     lambda r: span([x for x in grid(r, 0) if (x["d_ff"], x["dtype"]) == (1536, "bfloat16") and x["batch"] > 1], "speedup")),
    ("bench/README.md", "| default model, 64 tokens, Intel Xeon with AMX | idle | {} |", "decode_teal_default_xeon_cpu.json", decode_row),
    ("bench/README.md", "| 22-layer Llama, Zen 4 CPU | 1 busy process | {} |", "decode_teal_busy_zen4_cpu.json", decode_row),
    ("bench/README.md", "| default model, 64 tokens, Zen 4 CPU | idle | {} |", "decode_teal_default_zen4_cpu.json", decode_row),
    ("bench/README.md", "| 22-layer Llama as above, Zen 4 CPU | idle | {} |", "decode_teal_zen4_cpu.json", decode_row),
    ("bench/README.md", "the Llama idle (at `3bbf68a`, no change to `bricks/` since)\n{} against", "decode_teal_zen4_cpu.json",
     lambda r: run_range(r["bricked_runs"])),
    ("bench/README.md", "since)\n6.40-6.59 against {}.", "decode_teal_zen4_cpu.json", lambda r: run_range(r["dense_runs"])),
    ("bench/README.md", "| 22-layer Llama as above, Zen 4 CPU | idle | {} |", "decode_centroid_zen4_cpu.json", decode_row),
    ("bench/README.md", "| 22-layer Llama, Zen 4 CPU | 1 busy process | {} |", "decode_centroid_busy_zen4_cpu.json", decode_row),
    ("bench/README.md", "| default model, 64 tokens, Zen 4 CPU | idle | {} |", "decode_centroid_default_zen4_cpu.json", decode_row),
    ("bench/README.md", "(at `3bbf68a`: 22-layer {} against", "decode_centroid_zen4_cpu.json", lambda r: run_range(r["bricked_runs"])),
    ("bench/README.md", "22-layer 6.03-6.37 against {} idle", "decode_centroid_zen4_cpu.json", lambda r: run_range(r["dense_runs"])),
    ("bench/README.md", "idle, {}\nagainst 1.98-2.17 busy", "decode_centroid_busy_zen4_cpu.json", lambda r: run_range(r["bricked_runs"])),
    ("bench/README.md", "against {} busy; default", "decode_centroid_busy_zen4_cpu.json", lambda r: run_range(r["dense_runs"])),
    ("bench/README.md", "busy; default model {} against", "decode_centroid_default_zen4_cpu.json", lambda r: run_range(r["bricked_runs"])),
    ("bench/README.md", "15.57-21.83 against {}). Re-measured", "decode_centroid_default_zen4_cpu.json",
     lambda r: run_range(r["dense_runs"])),
    ("bench/README.md", "the Llama with one busy process {}\ntokens/s", "decode_teal_busy_zen4_cpu.json", lambda r: run_range(r["bricked_runs"])),
    ("bench/README.md", "tokens/s against {}, the default", "decode_teal_busy_zen4_cpu.json", lambda r: run_range(r["dense_runs"])),
    ("bench/README.md", "the default model {} against", "decode_teal_default_zen4_cpu.json", lambda r: run_range(r["bricked_runs"])),
    ("bench/README.md", "against\n{}; the Llama idle", "decode_teal_default_zen4_cpu.json", lambda r: run_range(r["dense_runs"])),
    ("bench/README.md", "the runs overlap on this machine: teal {} tokens/s", "decode_teal_default_xeon_cpu.json",
     lambda r: f"{min(r['bricked_runs']):.2f}-{max(r['bricked_runs']):.2f}"),
    ("bench/README.md", "tokens/s, dense\n{}.", "decode_teal_default_xeon_cpu.json",
     lambda r: f"{min(r['dense_runs']):.2f}-{max(r['dense_runs']):.2f}"),
    ("README.md", "greedy decoding of the default model is {} dense by the", "decode_teal_default_xeon_cpu.json",
     lambda r: f"{r['speedup']:.2f}x"),
    ("bench/README.md", "at 0.5 took {}\nand", "ffn_teal_amx_copy_chunk_xeon_cpu.json",
     lambda r: f"{cell(r, 11008, 'bfloat16', 8, 0.5)['bricked_ms']:.3f}"),
    ("bench/README.md", "\nand {} ms at `8b3cda4`", "ffn_teal_amx_copy_chunk_xeon_cpu.json",
     lambda r: f"{cell(r, 11008, 'bfloat16', 32, 0.5)['bricked_ms']:.3f}"),
    ("bench/README.md", "`8b3cda4`, {} and", "ffn_teal_amx_copy_tile_xeon_cpu.json",
     lambda r: f"{cell(r, 11008, 'bfloat16', 8, 0.5)['bricked_ms']:.3f}"),
    ("bench/README.md", " and {} ms at `5e2d124`", "ffn_teal_amx_copy_tile_xeon_cpu.json",
     lambda r: f"{cell(r, 11008, 'bfloat16', 32, 0.5)['bricked_ms']:.3f}"),
    ("README.md", "teal's bf16 batches were\n  {} dense idle", "ffn_teal_grid_before_xeon_cpu.json",
     lambda r: span([x for x in grid(r, 0) if x["dtype"] == "bfloat16" and x["batch"] > 1], "speedup")),
]

# The brick kernel's gate|up on AMX (kernel path fixed, three runs each way) and the centroid router's compiled
# scores (the small shape, the chooser's paths, two runs each way), alternating, on the Xeon with AMX.
BRICK_AMX = {state: tuple(f"ffn_centroid_amx_{state}{run}_xeon_cpu.json" for run in (1, 2, 3)) for state in ("before", "after")}
ROUTER_SELECT = {state: tuple(f"ffn_centroid_select_{state}{run}_xeon_cpu.json" for run in (1, 2))
                 for state in ("before", "after")}


def runs_cells(names, d_ff: int, dtype: str, batch: int, active: float) -> str:
    """One idle cell's speedup by the median in each run, as "a / b / c"."""
    return " / ".join(f"{cell(load(n), d_ff, dtype, batch, active)['speedup']:.2f}x" for n in names)


def before_with_row(runs: dict, shape: str, d_ff: int, dtype: str, batch: int, active: float) -> str:
    return (f"| {shape} | {batch} | {active} | {runs_cells(runs['before'], d_ff, dtype, batch, active)} | "
            f"{runs_cells(runs['after'], d_ff, dtype, batch, active)} |")


HEADLINES += [
    *[("bench/README.md", "{}", BRICK_AMX["after"][2],
       lambda r, shape=shape, d=d, batch=batch, active=active: before_with_row(BRICK_AMX, shape, d, "bfloat16", batch, active))
      for shape, d in (("4096x11008", 11008), ("576x1536", 1536)) for batch in (8, 32) for active in (0.5, 0.25)],
    *[("bench/README.md", "{}", ROUTER_SELECT["after"][1],
       lambda r, batch=batch, active=active: before_with_row(ROUTER_SELECT, "576x1536", 1536, "bfloat16", batch, active))
      for batch in (1, 8, 32) for active in (0.5, 0.25)],
    ("bench/README.md", "the dense large batch of 32 took {} ms", BRICK_AMX["after"][2],
     lambda r: span([cell(load(n), 11008, "bfloat16", 32, a) for n in BRICK_AMX["before"] + BRICK_AMX["after"]
                     for a in (0.5, 0.25)], "dense_ms", "{:.1f}")),
    ("README.md", "FFN's batches of 32 at 0.5 went from {} dense", BRICK_AMX["after"][2],
     lambda r: span([cell(load(n), 1536, "bfloat16", 32, 0.5) for n in BRICK_AMX["before"]], "speedup")),
    ("README.md", "dense to {}\n  (kernel path, three", BRICK_AMX["after"][2],
     lambda r: span([cell(load(n), 1536, "bfloat16", 32, 0.5) for n in BRICK_AMX["after"]], "speedup")),
    ("README.md", "its decode tokens at 0.5 from\n  {} to", ROUTER_SELECT["after"][1],
     lambda r: span([cell(load(n), 1536, "bfloat16", 1, 0.5) for n in ROUTER_SELECT["before"]], "speedup")),
    ("README.md", "to {} (two runs each way)", ROUTER_SELECT["after"][1],
     lambda r: span([cell(load(n), 1536, "bfloat16", 1, 0.5) for n in ROUTER_SELECT["after"]], "speedup")),
    ("bench/README.md", "fp32 rows of those runs ran it too, with no gain ({} at batch 1", ROUTER_SELECT["after"][1],
     lambda r: span([cell(load(n), 1536, "float32", 1, 0.25) for n in ROUTER_SELECT["after"]], "speedup")),
    ("bench/README.md", "at 0.25, against {} before)", ROUTER_SELECT["after"][1],
     lambda r: span([cell(load(n), 1536, "float32", 1, 0.25) for n in ROUTER_SELECT["before"]], "speedup")),
]


# The brick kernel's tiles in flight on AMX (four, then two where rows are long), alternating, three runs each; the
# grid after it, and the bf16 decode of the default model with bricks before and after this session's changes.
BRICK_TILES = {state: tuple(f"ffn_centroid_tiles_{state}{run}_xeon_cpu.json" for run in (1, 2, 3))
               for state in ("before", "after")}

HEADLINES += [
    *[("bench/README.md", "{}", BRICK_TILES["after"][2],
       lambda r, shape=shape, d=d, batch=batch, active=active: before_with_row(BRICK_TILES, shape, d, "bfloat16", batch, active))
      for shape, d in (("4096x11008", 11008), ("576x1536", 1536)) for batch in (8, 32) for active in (0.5, 0.25)],
    *grid_table("ffn_centroid_grid_amx_xeon_cpu.json"),
    ("bench/README.md", "{} cells by the median and 2 by the mean are below 0.9x dense in this grid", "ffn_centroid_grid_amx_xeon_cpu.json",
     lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "6 cells by the median and {} by the mean are below 0.9x dense in this grid",
     "ffn_centroid_grid_amx_xeon_cpu.json", lambda r: str(below(r["rows"], "speedup_mean"))),
    ("bench/README.md", "at or near dense idle ({}, from", "ffn_centroid_grid_amx_xeon_cpu.json",
     lambda r: span([x for x in grid(r, 0) if (x["d_ff"], x["dtype"]) == (11008, "bfloat16") and x["batch"] > 1], "speedup")),
    ("bench/README.md", "from\n{}) and above it busy", "ffn_centroid_grid_xeon_cpu.json",
     lambda r: span([x for x in grid(r, 0) if (x["d_ff"], x["dtype"]) == (11008, "bfloat16") and x["batch"] > 1], "speedup")),
    ("bench/README.md", "below by the median ({}), as before", "ffn_centroid_grid_amx_xeon_cpu.json",
     lambda r: span([x for x in grid(r, 1) if x["d_ff"] == 1536 and x["speedup"] < 0.9], "speedup")),
    ("bench/README.md", "fell the same way ({}) while", "ffn_centroid_grid_5789331_xeon_cpu.json",
     lambda r: ", ".join(ffn_speedup(r, d, dt, b, a) for d, dt, b, a in ((1536, "float32", 8, 0.5), (1536, "bfloat16", 8, 0.25)))),
    ("bench/README.md", "while these two were at {}.", "ffn_centroid_grid_5789331_xeon_cpu.json",
     lambda r: " and ".join(ffn_speedup(r, 1536, dt, b, 0.5) for dt, b in (("bfloat16", 8), ("float32", 1)))),
    ("bench/README.md", "| default model, bf16, 64 tokens, Intel Xeon with AMX, before | idle | {} |",
     "decode_centroid_default_bf16_before_xeon_cpu.json", decode_row),
    ("bench/README.md", "| default model, bf16, 64 tokens, Intel Xeon with AMX | idle | {} |",
     "decode_centroid_default_bf16_xeon_cpu.json", decode_row),
    ("bench/README.md", "bricked {} tokens/s against dense", "decode_centroid_default_bf16_before_xeon_cpu.json",
     lambda r: run_range(r["bricked_runs"])),
    ("bench/README.md", "tokens/s against dense {} before", "decode_centroid_default_bf16_before_xeon_cpu.json",
     lambda r: run_range(r["dense_runs"])),
    ("README.md", "bf16 batches on the kernel went from\n  {} to", BRICK_TILES["after"][2],
     lambda r: span([cell(load(n), 11008, "bfloat16", b, a) for n in BRICK_TILES["before"] for b in (8, 32)
                     for a in (0.5, 0.25)], "speedup")),
    ("README.md", "to {} (three runs each way), and with the down", BRICK_TILES["after"][2],
     lambda r: span([cell(load(n), 11008, "bfloat16", b, a) for n in BRICK_TILES["after"] for b in (8, 32)
                     for a in (0.5, 0.25)], "speedup")),
    ("bench/README.md", "after, bricked {} against", "decode_centroid_default_bf16_xeon_cpu.json",
     lambda r: run_range(r["bricked_runs"])),
    ("bench/README.md", "against {} after", "decode_centroid_default_bf16_xeon_cpu.json", lambda r: run_range(r["dense_runs"])),
]


# The brick kernel's down projection on AMX from the activations (no kept-row lists), alternating, three runs each.
BRICK_DOWN = {state: tuple(f"ffn_centroid_down_{state}{run}_xeon_cpu.json" for run in (1, 2, 3)) for state in ("before", "after")}

HEADLINES += [
    ("README.md", "32 went from {} to", BRICK_DOWN["after"][2],
     lambda r: span([cell(load(n), 1536, "bfloat16", 32, a) for n in BRICK_DOWN["before"] for a in (0.5, 0.25)], "speedup")),
    ("README.md", "to {} (three runs each way);", BRICK_DOWN["after"][2],
     lambda r: span([cell(load(n), 1536, "bfloat16", 32, a) for n in BRICK_DOWN["after"] for a in (0.5, 0.25)], "speedup")),
    *[("bench/README.md", "{}", BRICK_DOWN["after"][2],
       lambda r, batch=batch, active=active: before_with_row(BRICK_DOWN, "576x1536", 1536, "bfloat16", batch, active))
      for batch in (8, 32) for active in (0.5, 0.25)],
]



def recovery_row(router: str, run: int) -> str:
    """A row of bench/README.md's table of the chooser after a load (bench/chooser_recovery.py), before and after."""
    cells = []
    for side in ("before", "after"):
        r = load(f"chooser_recovery_{router}_{side}{run}_zen4_cpu.json")
        idle, busy = r["idle"], r["busy"]
        on_one = sum(p.endswith("@1") for p in r["paths_taken_idle"]) / len(r["paths_taken_idle"])
        cells += [f"`{idle['best_at_end']}`, {idle['routed_mean_last_half_ms']:.3f} / {idle['dense_mean_ms']:.3f} ms",
                  f"{on_one:.2f}", f"{busy['routed_mean_ms']:.3f} / {busy['dense_mean_ms']:.3f} ms"]
    return f"| {router} | {run} | " + " | ".join(cells) + " |"


def recovery_span(side: str, phase: str, key: str, serial: bool | None = None, path: str | None = None,
                  digits: int = 3) -> str:
    """The range of one figure over the six runs of one side (`serial`: only runs that ended on a one-thread path
    (True) or on a multi-thread one (False); `path`: the chooser's expected time of that path)."""
    values = []
    for router in ("teal", "centroid"):
        for run in (1, 2, 3):
            r = load(f"chooser_recovery_{router}_{side}{run}_zen4_cpu.json")
            if serial is None or r["idle"]["best_at_end"].endswith("@1") == serial:
                values.append(r[phase][key] if path is None else r[phase][key][path])
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def large_recovery(side: str, run: int) -> dict:
    return load(f"chooser_recovery_teal_large_{side}{run}_zen4_cpu.json")


def large_recovery_row(run: int) -> str:
    """A row of bench/README.md's table of the chooser after a load on the large fp32 FFN at one token."""
    cells = []
    for side in ("before", "after"):
        r = large_recovery(side, run)
        idle, busy = r["idle"], r["busy"]
        on_one = sum(p.endswith("@1") for p in r["paths_taken_idle"]) / len(r["paths_taken_idle"])
        cells += [f"`{idle['best_at_end']}`, {idle['routed_mean_last_half_ms']:.3f} / {idle['dense_mean_ms']:.3f} ms",
                  f"{on_one:.2f}", f"{busy['routed_mean_ms']:.3f} / {busy['dense_mean_ms']:.3f} ms",
                  str(idle["routed_calls_until_all_threads"])]
    return f"| {run} | " + " | ".join(cells) + " |"


def large_recovery_span(sides: tuple[str, ...], get, runs=(1, 2, 3), digits: int = 3) -> str:
    values = [get(large_recovery(side, run)) for side in sides for run in runs]
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def decode_recovery_row(run: int, kind: str = "") -> str:
    """A row of bench/README.md's table of a decode after a load (bench/decode_recovery.py), before and after
    (`kind`: "bf16_" for the bf16 runs, "llama_" for the 22-layer Llama's)."""
    cells = []
    for side in ("before", "after"):
        r = load(f"decode_recovery_{kind}{side}{run}_zen4_cpu.json")
        idle, busy = r["idle_last_half"], r["busy"]
        cells += [f"`{r['best_at_end']}`", str(r["idle_rounds_until_all_threads"]),
                  f"{idle['routed_tokens_per_s']:.2f} / {idle['dense_tokens_per_s']:.2f}", f"{idle['on_one_thread']:.3f}",
                  f"{busy['routed_tokens_per_s']:.2f} / {busy['dense_tokens_per_s']:.2f}", f"{busy['on_one_thread']:.3f}"]
    return f"| {run} | " + " | ".join(cells) + " |"


def decode_recovery_span(get, fmt: str, sides=("before", "after"), kind: str = "", runs=(1, 2, 3)) -> str:
    """The lowest and highest of `get(run)` over decode_recovery.py's runs of `sides` (`kind`: "bf16_")."""
    values = [get(load(f"decode_recovery_{kind}{side}{run}_zen4_cpu.json")) for side in sides for run in runs]
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def speed_ratio(phase: str):
    return lambda r: r[phase]["routed_tokens_per_s"] / r[phase]["dense_tokens_per_s"]


HEADLINES += [
    *[("bench/README.md", "{}", f"decode_recovery_after{run}_zen4_cpu.json", lambda r, run=run: decode_recovery_row(run))
      for run in (1, 2, 3)],
    ("bench/README.md", "the dense one before and\n{} after", "decode_recovery_after1_zen4_cpu.json",
     lambda r: decode_recovery_span(speed_ratio("idle_last_half"), "{:.3f}x", ("after",))),
    ("bench/README.md", "ran at {} the dense one before", "decode_recovery_before1_zen4_cpu.json",
     lambda r: decode_recovery_span(speed_ratio("idle_last_half"), "{:.3f}x", ("before",))),
    ("bench/README.md", "decoded {} faster than dense", "decode_recovery_after1_zen4_cpu.json",
     lambda r: decode_recovery_span(speed_ratio("busy"), "{:.2f}x")),
    ("bench/README.md", "both moved {} of the FFN calls", "decode_recovery_after1_zen4_cpu.json",
     lambda r: decode_recovery_span(lambda x: 100 * x["busy"]["on_one_thread"], "{:.0f}") + "%"),
    ("bench/README.md", "ahead again, {} of the calls on it", "decode_recovery_before1_zen4_cpu.json",
     lambda r: f"{r['idle_last_half']['on_one_thread']:.3f}" if r["best_at_end"].endswith("@1") else "?"),
    *[("bench/README.md", "{}", f"decode_recovery_bf16_after{run}_zen4_cpu.json",
       lambda r, run=run: decode_recovery_row(run, "bf16_")) for run in (1, 2)],
    ("bench/README.md", "(0.133 of the last\nhalf's calls on it", "decode_recovery_bf16_before1_zen4_cpu.json",
     lambda r: f"{r['idle_last_half']['on_one_thread']:.3f}" if r["best_at_end"].endswith("@1") else "?"),
    ("bench/README.md", "at the end), after, {}.", "decode_recovery_bf16_after1_zen4_cpu.json",
     lambda r: decode_recovery_span(lambda x: x["idle_last_half"]["on_one_thread"], "{:.3f}", ("after",), "bf16_", (1, 2))),
    ("bench/README.md", "routed over dense was {} before", "decode_recovery_bf16_before1_zen4_cpu.json",
     lambda r: decode_recovery_span(speed_ratio("idle_last_half"), "{:.3f}x", ("before",), "bf16_", (1, 2))),
    ("bench/README.md", "before and {} after:\ntwo runs", "decode_recovery_bf16_after1_zen4_cpu.json",
     lambda r: decode_recovery_span(speed_ratio("idle_last_half"), "{:.3f}x", ("after",), "bf16_", (1, 2))),
    *[("bench/README.md", "{}", f"decode_recovery_llama_after{run}_zen4_cpu.json",
       lambda r, run=run: decode_recovery_row(run, "llama_")) for run in (1, 2)],
    ("bench/README.md", "Idle,\nrouted over dense was {} before", "decode_recovery_llama_before1_zen4_cpu.json",
     lambda r: decode_recovery_span(speed_ratio("idle_last_half"), "{:.3f}x", ("before",), "llama_", (1, 2))),
    ("bench/README.md", "before and {} after (the\nfirst run after", "decode_recovery_llama_after1_zen4_cpu.json",
     lambda r: decode_recovery_span(speed_ratio("idle_last_half"), "{:.3f}x", ("after",), "llama_", (1, 2))),
    ("bench/README.md", "dense at {}\ntokens/s, and", "decode_recovery_llama_after1_zen4_cpu.json",
     lambda r: f"{r['idle_last_half']['dense_tokens_per_s']:.2f}"
     if r["idle_last_half"]["dense_tokens_per_s"] == min(load(f"decode_recovery_llama_{s}{n}_zen4_cpu.json")["idle_last_half"]
                                                        ["dense_tokens_per_s"] for s in ("before", "after") for n in (1, 2))
     else "?"),
    ("bench/README.md", "tokens/s, and {} of its last half's", "decode_recovery_llama_after1_zen4_cpu.json",
     lambda r: f"{r['idle_last_half']['on_one_thread']:.3f}"),
]

HEADLINES += [
    *[("bench/README.md", "{}", f"chooser_recovery_teal_large_after{run}_zen4_cpu.json",
       lambda r, run=run: large_recovery_row(run)) for run in (1, 2, 3)],
    ("bench/README.md", "busy phase {} ms\nagainst", "chooser_recovery_teal_large_before1_zen4_cpu.json",
     lambda r: large_recovery_span(("before", "after"), lambda x: x["busy"]["expected_ms"]["kernel"], digits=1)),
    ("bench/README.md", "against `kernel@1`'s {})", "chooser_recovery_teal_large_before1_zen4_cpu.json",
     lambda r: large_recovery_span(("before", "after"), lambda x: x["busy"]["expected_ms"]["kernel@1"], digits=1)),
    ("bench/README.md", "the last half at {}\nms a call against", "chooser_recovery_teal_large_before1_zen4_cpu.json",
     lambda r: f"{r['idle']['routed_mean_last_half_ms']:.3f}" if r["idle"]["best_at_end"] == "kernel@1" else "?"),
    ("bench/README.md", "ms a call against {}); whether", "chooser_recovery_teal_large_before2_zen4_cpu.json",
     lambda r: large_recovery_span(("before",), lambda x: x["idle"]["routed_mean_last_half_ms"], runs=(2, 3))),
    ("bench/README.md", "(its dense mean, {} ms, is the highest)", "chooser_recovery_teal_large_before1_zen4_cpu.json",
     lambda r: f"{r['idle']['dense_mean_ms']:.3f}"
     if r["idle"]["dense_mean_ms"] == max(large_recovery(s, n)["idle"]["dense_mean_ms"] for s in ("before", "after")
                                          for n in (1, 2, 3)) else "?"),
    ("bench/README.md", "all three went back within {} calls", "chooser_recovery_teal_large_after1_zen4_cpu.json",
     lambda r: large_recovery_span(("after",), lambda x: x["idle"]["routed_calls_until_all_threads"], digits=0)),
    ("bench/README.md", "the last half at {} ms), and", "chooser_recovery_teal_large_after1_zen4_cpu.json",
     lambda r: large_recovery_span(("after",), lambda x: x["idle"]["routed_mean_last_half_ms"])),
    ("bench/README.md", "routed mean was {} ms against", "chooser_recovery_teal_large_after1_zen4_cpu.json",
     lambda r: large_recovery_span(("after",), lambda x: x["busy"]["routed_mean_ms"])),
    ("bench/README.md", "ms against {}\nbefore: the rule", "chooser_recovery_teal_large_before1_zen4_cpu.json",
     lambda r: large_recovery_span(("before",), lambda x: x["busy"]["routed_mean_ms"])),
]

HEADLINES += [
    *grid_table("ffn_teal_grid_zen4_cpu.json"),
    *grid_table("ffn_centroid_grid_zen4_cpu.json"),
    ("bench/README.md", "By the median {} of the 48 cells are below 0.9x\ndense, by the mean 2, all bf16", "ffn_teal_grid_zen4_cpu.json",
     lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "dense, by the mean {}, all bf16 batches of 32, as on", "ffn_teal_grid_zen4_cpu.json",
     lambda r: str(below(r["rows"], "speedup_mean"))),
    ("bench/README.md", "batches of 32 at 0.5 ({}x small, 0.895x", "ffn_teal_grid_zen4_cpu.json",
     lambda r: f"{cell(r, 1536, 'bfloat16', 32, 0.5)['speedup']:.3f}"),
    ("bench/README.md", "small, {}x large; by the mean 0.834x", "ffn_teal_grid_zen4_cpu.json",
     lambda r: f"{cell(r, 11008, 'bfloat16', 32, 0.5)['speedup']:.3f}"),
    ("bench/README.md", "by the mean {}x and\n0.892x", "ffn_teal_grid_zen4_cpu.json",
     lambda r: f"{cell(r, 1536, 'bfloat16', 32, 0.5)['speedup_mean']:.3f}"),
    ("bench/README.md", "and\n{}x), with the busy", "ffn_teal_grid_zen4_cpu.json",
     lambda r: f"{cell(r, 11008, 'bfloat16', 32, 0.5)['speedup_mean']:.3f}"),
    ("bench/README.md", "the large fp32 one is\n{} / 6.06x dense", "ffn_teal_grid_zen4_cpu.json",
     lambda r: ffn_speedup(r, 11008, "float32", 1, 0.5)),
    ("bench/README.md", "2.81x / {} dense at 0.5 / 0.25 idle and 2.33x", "ffn_teal_grid_zen4_cpu.json",
     lambda r: ffn_speedup(r, 11008, "float32", 1, 0.25)),
    ("bench/README.md", "idle and {} at 0.5 busy, the small\nfp32 one 3.06x", "ffn_teal_grid_zen4_cpu.json",
     lambda r: ffn_speedup(r, 11008, "float32", 1, 0.5, 1)),
    ("bench/README.md", "busy, the small\nfp32 one {} at 0.5. By", "ffn_teal_grid_zen4_cpu.json",
     lambda r: ffn_speedup(r, 1536, "float32", 1, 0.5)),
    ("bench/README.md", "(0.63x and {} by the median, on `kernel@1`; 2.15x", "ffn_teal_grid_zen4_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.25, 1)),
    ("bench/README.md", "(0.63x and 0.82x by the median, on `kernel@1`; {} and 2.14x", "ffn_teal_grid_zen4_cpu.json",
     lambda r: f"{cell(r, 1536, 'bfloat16', 32, 0.5, 1)['speedup_mean']:.2f}x"),
    ("bench/README.md", "(then `..._rerun2_...`): {} small, 0.98x and 1.00x large.", "ffn_teal_b32_rerun1_zen4_cpu.json",
     lambda r: " and ".join(ffn_speedup(load(f"ffn_teal_b32_rerun{n}_zen4_cpu.json"), 1536, "bfloat16", 32, 0.5) for n in (1, 2))),
    ("bench/README.md", "0.95x small, {} large.", "ffn_teal_b32_rerun1_zen4_cpu.json",
     lambda r: " and ".join(ffn_speedup(load(f"ffn_teal_b32_rerun{n}_zen4_cpu.json"), 11008, "bfloat16", 32, 0.5) for n in (1, 2))),
    ("bench/README.md", "By the median {} of the 48 cells is below 0.9x dense, by the mean none", "ffn_centroid_grid_zen4_cpu.json",
     lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "of 32 at 0.5 ({}, on `kernel@1`; 4.71x by the mean)", "ffn_centroid_grid_zen4_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.5, 1)),
    ("bench/README.md", "Idle, the lowest\ncell is {} by the mean", "ffn_centroid_grid_zen4_cpu.json",
     lambda r: lowest(grid(r, 0), "speedup_mean")),
    ("bench/README.md", "teal's has {} cells below\n0.9x by the median and 1 by the mean", "ffn_teal_grid_stale_zen4_cpu.json",
     lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "0.9x by the median and {} by the mean, the bricks'", "ffn_teal_grid_stale_zen4_cpu.json",
     lambda r: str(below(r["rows"], "speedup_mean"))),
    ("bench/README.md", "the bricks' {} and none; the same", "ffn_centroid_grid_stale_zen4_cpu.json", lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "now on `masked`:\n{}; 0.84x on the kernel before", "ffn_teal_grid_stale_zen4_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.5) if cell(r, 1536, "bfloat16", 32, 0.5)["path"] == "masked" else "?"),
    *[("bench/README.md", "{}", f"chooser_recovery_{router}_after{run}_zen4_cpu.json",
       lambda r, router=router, run=run: recovery_row(router, run)) for router in ("teal", "centroid") for run in (1, 2, 3)],
    ("bench/README.md", "expected time had risen to {} ms a call", "chooser_recovery_teal_before1_zen4_cpu.json",
     lambda r: recovery_span("before", "busy", "expected_ms", path="kernel", digits=1)),
    ("bench/README.md", "`kernel@1` ran at {} ms a call where", "chooser_recovery_teal_before1_zen4_cpu.json",
     lambda r: recovery_span("before", "idle", "expected_ms", path="kernel@1", digits=2)),
    ("bench/README.md", "the two-thread kernel takes\n{} (their expected", "chooser_recovery_teal_after1_zen4_cpu.json",
     lambda r: recovery_span("after", "idle", "expected_ms", path="kernel", digits=2)),
    ("bench/README.md", "ended on `kernel@1` at {} ms a call", "chooser_recovery_teal_before1_zen4_cpu.json",
     lambda r: recovery_span("before", "idle", "routed_mean_last_half_ms", serial=True)),
    ("README.md", "one-thread path\n  ({} ms a call); after", "chooser_recovery_teal_before1_zen4_cpu.json",
     lambda r: recovery_span("before", "idle", "routed_mean_last_half_ms", serial=True)),
    ("README.md", "all six went back to it ({} ms;", "chooser_recovery_teal_after1_zen4_cpu.json",
     lambda r: recovery_span("after", "idle", "routed_mean_last_half_ms")),
    ("README.md", "greedy decoding\n  {} on the default model, 1.50x", "decode_teal_default_zen4_cpu.json", lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "process busy, {} idle; with the centroid", "decode_teal_zen4_cpu.json", lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "with the centroid router {}, 1.47x and", "decode_centroid_default_zen4_cpu.json", lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "router 1.45x, {} and", "decode_centroid_busy_zen4_cpu.json", lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "1.47x and\n  {}), and by the", "decode_centroid_zen4_cpu.json", lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "on the default model, {} on the 22-layer Llama with another", "decode_teal_busy_zen4_cpu.json",
     lambda r: f"{r['speedup']:.2f}x"),
    ("README.md", "one {} / 6.06x at 0.5 / 0.25 idle, 2.33x", "ffn_teal_grid_zen4_cpu.json",
     lambda r: ffn_speedup(r, 11008, "float32", 1, 0.5)),
    ("README.md", "median {} of teal's 48 cells and 1 of the brick router's are below 0.9x,\n  all bf16",
     "ffn_teal_grid_zen4_cpu.json", lambda r: str(below(r["rows"], "speedup"))),
    ("README.md", "48 cells and {} of the brick router's are below 0.9x", "ffn_centroid_grid_zen4_cpu.json",
     lambda r: str(below(r["rows"], "speedup"))),
    ("README.md", "all bf16 batches of 32 (by the mean {} and none)", "ffn_teal_grid_zen4_cpu.json", lambda r: str(below(r["rows"], "speedup_mean"))),
    ("bench/README.md", "0.82x; {} on the kernel before).", "ffn_teal_grid_zen4_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.5)),
    ("README.md", "was {} in the grid and 0.95x-1.02x", "ffn_teal_grid_zen4_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.5)),
    ("README.md", "in the grid and {} in two runs after it", "ffn_teal_b32_rerun1_zen4_cpu.json",
     lambda r: span([cell(load(f"ffn_teal_b32_rerun{n}_zen4_cpu.json"), 1536, "bfloat16", 32, 0.5) for n in (1, 2)],
                    "speedup")),
    ("bench/README.md", "ended on the kernel, at {} ms.", "chooser_recovery_teal_after1_zen4_cpu.json",
     lambda r: recovery_span("after", "idle", "routed_mean_last_half_ms")),
    ("bench/README.md", "the\nrouted mean went from {} ms to", "chooser_recovery_teal_before1_zen4_cpu.json",
     lambda r: recovery_span("before", "busy", "routed_mean_ms")),
    ("bench/README.md", "ms to {} ms (the dense FFN's", "chooser_recovery_teal_after1_zen4_cpu.json",
     lambda r: recovery_span("after", "busy", "routed_mean_ms")),
    ("bench/README.md", "(the dense FFN's\n{} ms before", "chooser_recovery_teal_before1_zen4_cpu.json",
     lambda r: recovery_span("before", "busy", "dense_mean_ms")),
    ("bench/README.md", "ms before and {} ms after)", "chooser_recovery_teal_after1_zen4_cpu.json",
     lambda r: recovery_span("after", "busy", "dense_mean_ms")),
]

def layout_runs(router: str, side: str, d_ff: int, dtype: str, batch: int, busy: int = 0) -> list[dict]:
    """One cell of bench_ffn.py's --dense-fallback runs before/after the dense path's copy in the model's layout, in
    its three runs (`busy`: the runs with one busy process)."""
    kind = "busy_" if busy else ""
    return [cell(load(f"ffn_{router}_fallback_layout_{kind}{side}{run}_zen4_cpu.json"), d_ff, dtype, batch, 0.5, busy)
            for run in (1, 2, 3)]


def layout_row(router: str, shape: str, d_ff: int, batch: int) -> str:
    """A row of bench/README.md's table of those runs (bf16): speedup and path of each run, before and after."""
    sides = [", ".join(f"{x['speedup']:.2f}x {x['path']}" for x in layout_runs(router, side, d_ff, "bfloat16", batch))
             for side in ("before", "after")]
    return f"| {router} | {shape} | bf16 | {batch} | " + " | ".join(sides) + " |"


def layout_fp32_span(router: str) -> str:
    rows = [x for side in ("before", "after") for d in (1536, 11008) for b in (8, 32)
            for x in layout_runs(router, side, d, "float32", b)]
    assert sorted(x["path"] for x in rows if x["path"] != "kernel") == (["kernel@1"] if router == "centroid" else [])
    return span(rows, "speedup")


HEADLINES += [
    *[("bench/README.md", "{}", "ffn_teal_fallback_layout_after1_zen4_cpu.json",
       lambda r, router=router, shape=shape, d=d, batch=batch: layout_row(router, shape, d, batch))
      for router in ("teal", "centroid") for shape, d in (("576x1536", 1536), ("4096x11008", 11008)) for batch in (8, 32)],
    ("bench/README.md", "now takes `dense` in every run at {} (it", "ffn_teal_fallback_layout_after1_zen4_cpu.json",
     lambda r: "/".join(sorted({f"{x['speedup']:.2f}x" for x in layout_runs("teal", "after", 11008, "bfloat16", 32)
                                if x["path"] == "dense"}))),
    ("bench/README.md", "kernel gave {}. The small", "ffn_teal_fallback_layout_before1_zen4_cpu.json",
     lambda r: span(layout_runs("teal", "before", 11008, "bfloat16", 32), "speedup")),
    ("bench/README.md", "so its batch of 32 is where it was ({}, kernel or", "ffn_teal_fallback_layout_before1_zen4_cpu.json",
     lambda r: span(layout_runs("teal", "before", 1536, "bfloat16", 32) + layout_runs("teal", "after", 1536, "bfloat16", 32),
                    "speedup")),
    ("bench/README.md", "(once on one thread), {} (teal)", "ffn_teal_fallback_layout_after1_zen4_cpu.json",
     lambda r: layout_fp32_span("teal")),
    ("bench/README.md", "(teal) and {} (bricks) both\nways", "ffn_centroid_fallback_layout_after1_zen4_cpu.json",
     lambda r: layout_fp32_span("centroid")),
    ("README.md", "large bf16 batch of 32 at 0.5 went from {} (the kernel)", "ffn_teal_fallback_layout_before1_zen4_cpu.json",
     lambda r: span(layout_runs("teal", "before", 11008, "bfloat16", 32), "speedup")),
    ("README.md", "(the kernel) to\n  {} in three runs of three", "ffn_teal_fallback_layout_after1_zen4_cpu.json",
     lambda r: "/".join(sorted({f"{x['speedup']:.2f}x" for x in layout_runs("teal", "after", 11008, "bfloat16", 32)}))),
]

HEADLINES += [
    *grid_table("ffn_teal_fallback_zen4_cpu.json"),
    ("bench/README.md", "By the median {} of the 48 cells are below 0.9x, by the mean 1, all on the",
     "ffn_teal_fallback_zen4_cpu.json", lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "are below 0.9x, by the mean {}, all on the\nsmall", "ffn_teal_fallback_zen4_cpu.json",
     lambda r: str(below(r["rows"], "speedup_mean"))),
    ("bench/README.md", "small bf16 shape: idle its batch of 32 at 0.5 ({}, on the", "ffn_teal_fallback_zen4_cpu.json",
     lambda r: f"{cell(r, 1536, 'bfloat16', 32, 0.5)['speedup']:.2f}x / {cell(r, 1536, 'bfloat16', 32, 0.5)['speedup_mean']:.2f}x"),
    ("bench/README.md", "kernel: {} ms against 1.148 ms for dense", "ffn_teal_fallback_zen4_cpu.json",
     lambda r: f"{cell(r, 1536, 'bfloat16', 32, 0.5)['bricked_ms']:.3f}"),
    ("bench/README.md", "ms against {} ms for dense, where the six", "ffn_teal_fallback_zen4_cpu.json",
     lambda r: f"{cell(r, 1536, 'bfloat16', 32, 0.5)['dense_ms']:.3f}"),
    ("bench/README.md", "median ({}; by the mean 2.60x-4.29x", "ffn_teal_fallback_zen4_cpu.json",
     lambda r: span([x for x in grid(r, 1) if x["d_ff"] == 1536 and x["dtype"] == "bfloat16" and x["batch"] > 1
                     and x["speedup"] < 0.9], "speedup")),
    ("bench/README.md", "by the mean {}, the dense FFN's stalled", "ffn_teal_fallback_zen4_cpu.json",
     lambda r: span([x for x in grid(r, 1) if x["d_ff"] == 1536 and x["dtype"] == "bfloat16" and x["batch"] > 1
                     and x["speedup"] < 0.9], "speedup_mean")),
    ("bench/README.md", "kernel at {} ms a call by the median", "chooser_trace_teal_fallback_small_bf16_zen4_cpu.json",
     lambda r: f"{r['paths']['kernel']['median_ms']:.3f}"),
    ("bench/README.md", "and `dense` at {} ms, against", "chooser_trace_teal_fallback_small_bf16_zen4_cpu.json",
     lambda r: f"{r['paths']['dense']['median_ms']:.3f}"),
    ("bench/README.md", "against\n{} ms for the dense FFN timed apart", "chooser_trace_teal_fallback_small_bf16_zen4_cpu.json",
     lambda r: f"{r['row']['dense_ms']:.3f}"),
]

HEADLINES += [
    *grid_table("ffn_centroid_fallback_zen4_cpu.json"),
    ("bench/README.md", "By the median {} of the 48 cells are below 0.9x, by the mean none; idle",
     "ffn_centroid_fallback_zen4_cpu.json", lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "are below 0.9x, by the mean {}; idle", "ffn_centroid_fallback_zen4_cpu.json",
     lambda r: "none" if below(r["rows"], "speedup_mean") == 0 else "?"),
    ("bench/README.md", "the lowest is {} (the small bf16 batch", "ffn_centroid_fallback_zen4_cpu.json",
     lambda r: f"{lowest(grid(r, 0), 'speedup')} / {lowest(grid(r, 0), 'speedup_mean')}"),
]

def busy_layout_runs(sides, d_ff: int, batch: int) -> list[dict]:
    """teal's bf16 cell in the busy --dense-fallback runs of `sides` (before, after)."""
    return [x for side in sides for x in layout_runs("teal", side, d_ff, "bfloat16", batch, busy=1)]


def busy_layout_row(shape: str, d_ff: int, batch: int) -> str:
    """A row of bench/README.md's table of those runs: median / mean and path of each run, before and after."""
    sides = [", ".join(f"{x['speedup']:.2f}x / {x['speedup_mean']:.2f}x {x['path']}" for x in busy_layout_runs((side,), d_ff, batch))
             for side in ("before", "after")]
    return f"| {shape} | {batch} | " + " | ".join(sides) + " |"


HEADLINES += [
    *[("bench/README.md", "{}", "ffn_teal_fallback_layout_busy_after1_zen4_cpu.json",
       lambda r, shape=shape, d=d, batch=batch: busy_layout_row(shape, d, batch))
      for shape, d in (("576x1536", 1536), ("4096x11008", 11008)) for batch in (8, 32)],
    ("bench/README.md", "The large batch of 32 went from `kernel@1` ({} by the median)",
     "ffn_teal_fallback_layout_busy_before1_zen4_cpu.json", lambda r: span(busy_layout_runs(("before",), 11008, 32), "speedup")),
    ("bench/README.md", "to the copy's `dense@1` ({}); the large batch of 8", "ffn_teal_fallback_layout_busy_after1_zen4_cpu.json",
     lambda r: span(busy_layout_runs(("after",), 11008, 32), "speedup")),
    ("bench/README.md", "({} by the median, both ways)", "ffn_teal_fallback_layout_busy_after1_zen4_cpu.json",
     lambda r: span(busy_layout_runs(("before", "after"), 1536, 8) + busy_layout_runs(("before", "after"), 1536, 32),
                    "speedup")),
    ("bench/README.md", "32 was {} by the mean, where the before", "ffn_teal_fallback_layout_busy_after1_zen4_cpu.json",
     lambda r: lowest(busy_layout_runs(("after",), 1536, 32), "speedup_mean")),
    ("bench/README.md", "the before runs' lowest mean was {}.", "ffn_teal_fallback_layout_busy_before1_zen4_cpu.json",
     lambda r: lowest(busy_layout_runs(("before",), 1536, 32), "speedup_mean")),
]

def fp16_row(shape: str, d_ff: int, batch: int) -> str:
    """A row of bench/README.md's fp16 table (Zen 4): the dense FFN's ms (teal's run, 0.5), then teal's and the
    bricks' speedups at 0.5 and 0.25 with their paths."""
    teal, bricks = load("ffn_teal_fp16_zen4_cpu.json"), load("ffn_centroid_fp16_zen4_cpu.json")
    cells = [cell(r, d_ff, "float16", batch, active) for r in (teal, bricks) for active in (0.5, 0.25)]
    return (f"| {shape} | {batch} | {cells[0]['dense_ms']:.3f} | "
            + " | ".join(f"{x['speedup']:.2f}x {x['path']}" for x in cells) + " |")


def fp16_batches_span() -> str:
    rows = [x for name in ("ffn_teal_fp16_zen4_cpu.json", "ffn_centroid_fp16_zen4_cpu.json") for x in load(name)["rows"]
            if x["batch"] > 1]
    return span(rows, "speedup")


HEADLINES += [
    *[("bench/README.md", "{}", "ffn_teal_fp16_zen4_cpu.json", lambda r, shape=shape, d=d, batch=batch: fp16_row(shape, d, batch))
      for shape, d in (("4096x11008", 11008), ("576x1536", 1536)) for batch in (1, 8, 32)],
    ("README.md", "is what the bytes skipped allow: {} (teal at 0.5 / 0.25)", "ffn_teal_fp16_zen4_cpu.json",
     lambda r: f"{cell(r, 11008, 'float16', 1, 0.5)['speedup']:.2f}x / {cell(r, 11008, 'float16', 1, 0.25)['speedup']:.2f}x"),
    ("bench/README.md", "FFN's 270 MB in {} ms (about 24 GB/s)", "ffn_teal_fp16_zen4_cpu.json",
     lambda r: f"{cell(r, 11008, 'float16', 1, 0.5)['dense_ms']:.3f}"),
    ("bench/README.md", "where its bf16 one took\n{} ms in the grid above", "ffn_teal_grid_zen4_cpu.json",
     lambda r: span([x for x in grid(r, 0) if (x["d_ff"], x["dtype"], x["batch"]) == (11008, "bfloat16", 1)],
                    "dense_ms", "{:.3f}")),
    ("bench/README.md", "0.5 / 0.25; its kernel at 0.5 took {} ms", "ffn_teal_fp16_zen4_cpu.json",
     lambda r: f"{cell(r, 11008, 'float16', 1, 0.5)['bricked_ms']:.3f}"),
    ("bench/README.md", "bf16's {} ms in the grid\nabove", "ffn_teal_grid_zen4_cpu.json",
     lambda r: f"{cell(r, 11008, 'bfloat16', 1, 0.5)['bricked_ms']:.3f}"),
    ("bench/README.md", "11.404 at one, and the kernels' fp32 sums beat them {}; a user", "ffn_teal_fp16_zen4_cpu.json",
     lambda r: fp16_batches_span()),
]

def fp16_busy(name: str, batch: int = 1, active: float = 0.5) -> dict:
    return cell(load(name), 1536, "float16", batch, active, 1)


HEADLINES += [
    ("bench/README.md", "teal's cells are\n{} by the median", "ffn_teal_fp16_busy_small_zen4_cpu.json",
     lambda r: span(grid(r, 1), "speedup")),
    ("bench/README.md", "its decode token at 0.5; {} by\nthe mean", "ffn_teal_fp16_busy_small_zen4_cpu.json",
     lambda r: f"{fp16_busy('ffn_teal_fp16_busy_small_zen4_cpu.json')['speedup_mean']:.2f}x"
     if fp16_busy("ffn_teal_fp16_busy_small_zen4_cpu.json")["speedup"] == min(x["speedup"] for x in grid(r, 1)) else "?"),
    ("bench/README.md", "decode token at 0.5 was {} by the median on\n`grouped@1`", "ffn_centroid_fp16_busy_small_zen4_cpu.json",
     lambda r: f"{fp16_busy('ffn_centroid_fp16_busy_small_zen4_cpu.json')['speedup']:.2f}x"
     if fp16_busy("ffn_centroid_fp16_busy_small_zen4_cpu.json")["path"] == "grouped@1" else "?"),
    ("bench/README.md", "`grouped@1` ({} by the mean)", "ffn_centroid_fp16_busy_small_zen4_cpu.json",
     lambda r: f"{fp16_busy('ffn_centroid_fp16_busy_small_zen4_cpu.json')['speedup_mean']:.2f}x"),
    ("bench/README.md", "then `rerun2`) {} on `kernel@1`", "ffn_centroid_fp16_busy_b1_rerun1_zen4_cpu.json",
     lambda r: " and ".join(f"{fp16_busy(f'ffn_centroid_fp16_busy_b1_rerun{n}_zen4_cpu.json')['speedup']:.2f}x" for n in (1, 2))),
    ("bench/README.md", "on `kernel@1`, {} by the\nmean", "ffn_centroid_fp16_busy_b1_rerun1_zen4_cpu.json",
     lambda r: " and ".join(f"{fp16_busy(f'ffn_centroid_fp16_busy_b1_rerun{n}_zen4_cpu.json')['speedup_mean']:.2f}x" for n in (1, 2))),
    ("bench/README.md", "`grouped@1` for one token, {} ms a call", "ffn_centroid_fp16_busy_small_zen4_cpu.json",
     lambda r: f"{fp16_busy('ffn_centroid_fp16_busy_small_zen4_cpu.json')['bricked_ms']:.3f}"),
    ("bench/README.md", "1.148 ms a call against the kernel's {}\nms in the reruns", "ffn_centroid_fp16_busy_b1_rerun1_zen4_cpu.json",
     lambda r: "-".join(f"{fp16_busy(f'ffn_centroid_fp16_busy_b1_rerun{n}_zen4_cpu.json')['bricked_ms']:.2f}" for n in (1, 2))),
]

FP16_BUSY_LARGE = ("ffn_teal_fp16_busy_large_zen4_cpu.json", "ffn_centroid_fp16_busy_large_zen4_cpu.json")


def fp16_busy_large_row(batch: int) -> str:
    """A row of bench/README.md's busy large fp16 table (Zen 4): the dense FFN's ms (teal's run, 0.5), then teal's
    and the bricks' speedups by the median / the mean at 0.5 and 0.25."""
    cells = [cell(load(name), 11008, "float16", batch, active, 1) for name in FP16_BUSY_LARGE for active in (0.5, 0.25)]
    return (f"| {batch} | {cells[0]['dense_ms']:.3f} | "
            + " | ".join(f"{x['speedup']:.2f}x / {x['speedup_mean']:.2f}x" for x in cells) + " |")


def fp16_busy_large_rows(batch: int | None = None) -> list[dict]:
    return [x for name in FP16_BUSY_LARGE for x in load(name)["rows"] if batch is None or x["batch"] == batch]


HEADLINES += [
    *[("bench/README.md", "{}", FP16_BUSY_LARGE[0], lambda r, batch=batch: fp16_busy_large_row(batch))
      for batch in (1, 8, 32)],
    ("bench/README.md", "mean, every cell on {}; the dense FFN's median", FP16_BUSY_LARGE[1],
     lambda r: "`kernel@1`" if {x["path"] for x in fp16_busy_large_rows()} == {"kernel@1"} else "?"),
    ("bench/README.md", "Every cell is above {}, against a baseline", FP16_BUSY_LARGE[0],
     lambda r: f"{int(min(x[k] for x in fp16_busy_large_rows() for k in ('speedup', 'speedup_mean')))}x"),
    ("bench/README.md", "two threads took\n{} ms a token here", FP16_BUSY_LARGE[0],
     lambda r: span(fp16_busy_large_rows(1), "dense_ms", "{:.3f}")),
    ("bench/README.md", "the kernel on one thread\n{} ms.", FP16_BUSY_LARGE[0],
     lambda r: span(fp16_busy_large_rows(1), "bricked_ms", "{:.3f}")),
]

PAIR_BLOCKS = {router: {side: [f"ffn_{router}_pair_blocks_{side}{n}_zen4_cpu.json" for n in (1, 2, 3)]
                         for side in ("before", "after")} for router in ("teal", "centroid")}


def pair_blocks_row(router: str, shape: str, d_ff: int, batch: int, active: float) -> str:
    """A row of bench/README.md's table of bf16 batches before and after blocks of 64 pairs (Zen 4)."""
    runs = PAIR_BLOCKS[router]
    return (f"| {router} | {shape} | {batch} | {active} | {runs_cells(runs['before'], d_ff, 'bfloat16', batch, active)} | "
            f"{runs_cells(runs['after'], d_ff, 'bfloat16', batch, active)} |")


def pair_blocks_span(router: str, side: str, batch: int | None = None, active: float | None = None) -> str:
    rows = [x for name in PAIR_BLOCKS[router][side] for x in load(name)["rows"]
            if batch in (None, x["batch"]) and active in (None, x["active"])]
    return span(rows, "speedup")


HEADLINES += [
    *[("bench/README.md", "{}", PAIR_BLOCKS[router]["after"][0],
       lambda r, router=router, shape=shape, d=d, batch=batch, active=active: pair_blocks_row(router, shape, d, batch, active))
      for router in ("teal", "centroid") for shape, d in (("4096x11008", 11008), ("576x1536", 1536))
      for batch in (8, 32) for active in (0.5, 0.25)],
    ("bench/README.md", "in without the fallback's copy, went from {} to", PAIR_BLOCKS["teal"]["before"][0],
     lambda r: pair_blocks_span("teal", "before", 32, 0.5)),
    ("bench/README.md", "the fallback's copy, went from 0.84x-1.05x to {}, and", PAIR_BLOCKS["teal"]["after"][0],
     lambda r: pair_blocks_span("teal", "after", 32, 0.5)),
    ("bench/README.md", "every teal cell is {} in every after run", PAIR_BLOCKS["teal"]["after"][0],
     lambda r: "above 1x" if min(x["speedup"] for n in PAIR_BLOCKS["teal"]["after"] for x in load(n)["rows"]) > 1
     else "?"),
    ("README.md", "teal's kernel alone took those batches of 32 from {} to", PAIR_BLOCKS["teal"]["before"][0],
     lambda r: pair_blocks_span("teal", "before", 32, 0.5)),
    ("README.md", "batches of 32 from 0.84x-1.05x to\n  {} (0.5, both", PAIR_BLOCKS["teal"]["after"][0],
     lambda r: pair_blocks_span("teal", "after", 32, 0.5)),
]

GRID_PAIR_BLOCKS = "ffn_teal_grid_pair_blocks_zen4_cpu.json"
ZEN4_BUSY_GRIDS = ("ffn_teal_grid_zen4_cpu.json", "ffn_teal_grid_stale_zen4_cpu.json", "ffn_teal_fallback_zen4_cpu.json")


def busy_token(name: str, active: float) -> dict:
    return cell(load(name), 11008, "bfloat16", 1, active, 1)


HEADLINES += [
    *grid_table(GRID_PAIR_BLOCKS),
    ("bench/README.md", "By the median {} of the 48 cells is below 0.9x, by the mean", GRID_PAIR_BLOCKS,
     lambda r: str(below(r["rows"], "speedup"))),
    ("bench/README.md", "below 0.9x, by the mean\n{} (the grid at `a8bf438`", GRID_PAIR_BLOCKS,
     lambda r: str(below(r["rows"], "speedup_mean"))),
    ("README.md", "grid then had {} cell below 0.9x by the median", GRID_PAIR_BLOCKS, lambda r: str(below(r["rows"], "speedup"))),
    ("README.md", "beside a busy process) and {} by the mean, the brick", GRID_PAIR_BLOCKS,
     lambda r: "none" if below(r["rows"], "speedup_mean") == 0 else "?"),
    ("bench/README.md", "the first of this section: {}): the small bf16", ZEN4_BUSY_GRIDS[0],
     lambda r: f"{below(r['rows'], 'speedup')} and\n{below(r['rows'], 'speedup_mean')}"),
    ("bench/README.md", "with a busy process,\n{} by the mean on one thread", GRID_PAIR_BLOCKS,
     lambda r: f"{cell(r, 1536, 'bfloat16', 32, 0.5, 1)['speedup']:.2f}x by the median and "
               f"{cell(r, 1536, 'bfloat16', 32, 0.5, 1)['speedup_mean']:.2f}x"),
    ("bench/README.md", "Idle\nthe lowest is {} (the large bf16 batch of 32 at 0.5, on the kernel)", GRID_PAIR_BLOCKS,
     lambda r: lowest(grid(r, 0), "speedup") if lowest(grid(r, 0), "speedup") == ffn_speedup(r, 11008, "bfloat16", 32, 0.5)
     else "?"),
    ("bench/README.md", "than in that grid\n({} at 0.5 / 0.25, against", GRID_PAIR_BLOCKS,
     lambda r: f"{busy_token(GRID_PAIR_BLOCKS, 0.5)['speedup']:.2f}x / {busy_token(GRID_PAIR_BLOCKS, 0.25)['speedup']:.2f}x"),
    ("bench/README.md", "at 0.5 / 0.25, against {}) on one-token code", ZEN4_BUSY_GRIDS[0],
     lambda r: f"{busy_token(ZEN4_BUSY_GRIDS[0], 0.5)['speedup']:.2f}x / {busy_token(ZEN4_BUSY_GRIDS[0], 0.25)['speedup']:.2f}x"),
    ("bench/README.md", "its call took {}, against", GRID_PAIR_BLOCKS,
     lambda r: f"{busy_token(GRID_PAIR_BLOCKS, 0.5)['bricked_ms']:.3f} / {busy_token(GRID_PAIR_BLOCKS, 0.25)['bricked_ms']:.3f} ms"),
    ("bench/README.md", "against\n{} then, for the same rows", ZEN4_BUSY_GRIDS[0],
     lambda r: f"{busy_token(ZEN4_BUSY_GRIDS[0], 0.5)['bricked_ms']:.3f} / {busy_token(ZEN4_BUSY_GRIDS[0], 0.25)['bricked_ms']:.3f} ms"),
    ("bench/README.md", "with a busy process: {} at 0.5)", ZEN4_BUSY_GRIDS[0],
     lambda r: span([busy_token(n, 0.5) for n in ZEN4_BUSY_GRIDS], "bricked_ms", "{:.3f} ms").replace(" ms-", "-")),
]

TRACE_FP16 = "chooser_trace_centroid_fp16_busy_b1_run{}_zen4_cpu.json"


def traced(run: int, path: str, key: str) -> float:
    return load(TRACE_FP16.format(run))["paths"][path][key]


def trace_stalls(run: int, path: str, over_ms: float) -> list[float]:
    return [x["ms"] for x in load(TRACE_FP16.format(run))["calls"] if x["path"] == path and x["ms"] > over_ms]


HEADLINES += [
    ("bench/README.md", "led for most of the {} calls (248 calls", TRACE_FP16.format(1),
     lambda r: str(len(r["calls"]))),
    ("bench/README.md", "most of the 306 calls ({} calls, median 0.249 ms)", TRACE_FP16.format(1),
     lambda r: str(traced(1, "kernel", "calls"))),
    ("bench/README.md", "(248 calls, median {} ms) with a 4.4 ms", TRACE_FP16.format(1),
     lambda r: f"{traced(1, 'kernel', 'median_ms'):.3f}"),
    ("bench/README.md", "until two stalls of {} ms took its", TRACE_FP16.format(1),
     lambda r: " and ".join(f"{v:.1f}" for v in trace_stalls(1, "kernel", 10))),
    ("bench/README.md", "expected time up to {} ms, and the lead", TRACE_FP16.format(1),
     lambda r: f"{traced(1, 'kernel', 'expected_ms'):.3f}"),
    ("bench/README.md", "`kernel@1` ({} ms median over 9 calls)", TRACE_FP16.format(1),
     lambda r: f"{traced(1, 'kernel@1', 'median_ms'):.3f}" if traced(1, "kernel@1", "calls") == 9 else "?"),
    ("bench/README.md", "stood at\n{} ms, the one call of its last", TRACE_FP16.format(1),
     lambda r: f"{traced(1, 'kernel@1', 'expected_ms'):.2f}"),
    ("bench/README.md", "where the rest of the run took {} s.", TRACE_FP16.format(1),
     lambda r: f"{sum(x['ms'] for x in r['calls'][-248:]) / 1e3:.3f}"
     if [x["path"] for x in r["calls"][-249:-248]] == ["kernel@1"] else "?"),
    ("bench/README.md", "led (152 calls, median {} ms; the cell", TRACE_FP16.format(2),
     lambda r: f"{traced(2, 'kernel@1', 'median_ms'):.3f}" if traced(2, "kernel@1", "calls") == 152 else "?"),
    ("bench/README.md", "the cell {} by the median,", TRACE_FP16.format(2), lambda r: f"{r['row']['speedup']:.2f}x"),
    ("bench/README.md", "by the median,\n{} by the mean), with `kernel`", TRACE_FP16.format(2),
     lambda r: f"{r['row']['speedup_mean']:.2f}x"),
    ("bench/README.md", "one stalled call of\n{} ms. In a", TRACE_FP16.format(2),
     lambda r: f"{traced(2, 'kernel', 'expected_ms'):.3f}"),
]

HEADLINES += [
    *grid_table("ffn_centroid_grid_pair_blocks_zen4_cpu.json"),
    ("README.md", "the brick router's none\n  (its lowest {}).", "ffn_centroid_grid_pair_blocks_zen4_cpu.json",
     lambda r: lowest(r["rows"], "speedup") if below(r["rows"], "speedup") + below(r["rows"], "speedup_mean") == 0 else "?"),
    ("bench/README.md", "No cell is below {} by the median or", "ffn_centroid_grid_pair_blocks_zen4_cpu.json",
     lambda r: lowest(r["rows"], "speedup") if min(r["rows"], key=lambda x: x["speedup"]) is cell(r, 1536, "bfloat16", 32, 0.5)
     else "?"),
    ("bench/README.md", "by the median or {} by the mean (the first grid", "ffn_centroid_grid_pair_blocks_zen4_cpu.json",
     lambda r: lowest(r["rows"], "speedup_mean")),
    ("bench/README.md", "this section: {} below 0.9x by the median, the busy", "ffn_centroid_grid_zen4_cpu.json",
     lambda r: "one" if below(r["rows"], "speedup") == 1 else "?"),
    ("bench/README.md", "at 0.5, {}); the lowest is the small", "ffn_centroid_grid_zen4_cpu.json",
     lambda r: ffn_speedup(r, 1536, "bfloat16", 32, 0.5, 1)),
]

# bench/README.md's durations table: one row per job of the file.
HEADLINES += [("bench/README.md", " | {} | ", "durations_cpu.json", lambda r, j=job: f"{r['seconds'][j]}")
              for job in ("gguf", "analyze", "notebook:neuron_specialization", "notebook:routing_tradeoffs",
                          "notebook:merging_adapters", "notebook:compressed_bricks", "notebook:fusing_specialists")]
HEADLINES.append(("README.md", "gate`, with the gate's weights per domain and per token ({} s top to", "durations_cpu.json",
                  lambda r: f"{r['seconds']['notebook:fusing_specialists']:.0f}"))


# Figures a document quotes from a probe's kept output (a text file, not a results file).
PROBE_OUTPUTS = [
    ("bench/README.md", "zen4_probes/output_teal_batch_parts.txt",
     ("0.884", "0.857", "0.599", "0.544", "0.384", "0.288", "0.122", "36.763", "33.188", "26.425", "21.544", "11.761",
      "11.712")),
    ("bench/README.md", "zen4_probes/output_pair_blocks.txt",
     ("0.305", "0.359", "35.214", "37.515", "37.734", "44.163", "45.438", "46.570")),
    ("bench/README.md", "kernel_probe_h200.txt", ("27.5", "45.8", "59.1")),
    ("bench/README.md", "zen4_probes/output_prefill_parts.txt", ("19.63", "8.42", "27.53", "0.96", "2.86")),
    ("bench/README.md", "zen4_probes/output_top_magnitudes.txt", ("5.43", "5.8", "4.116", "4.387", "6.608")),
    ("bench/README.md", "zen4_probes/output_prefill_parts.txt", ("2.26", "1.43")),
    ("bench/README.md", "zen4_probes/output_gated_silu.txt", ("1.769", "2.347", "1.913", "3.389", "1.861", "2.739",
                                                              "1.950", "3.394")),
    ("bench/README.md", "kernel_sass_sm90.txt", ("4.05", "5.15", "4.78", "5.06")),
    ("bench/README.md", "zen4_probes/output_unit_major_gemm.txt",
     ("26.85", "19.54", "14.33", "10.49", "17.83", "12.35", "223.01", "214.13", "114.33", "107.74", "26.20", "0.37",
      "81.92", "109.34", "672.57", "615.49")),
]


@pytest.mark.parametrize("doc, output, figures", PROBE_OUTPUTS, ids=[o[1] for o in PROBE_OUTPUTS])
def test_probe_figures_are_in_their_output(doc, output, figures):
    text, kept = (ROOT / doc).read_text(), (RESULTS / output).read_text()
    for figure in figures:
        assert re.search(rf"(?<![\d.]){re.escape(figure)}(?![\d])", kept), f"{output} has no {figure}"
        assert figure in text, f"{doc} should quote {figure} from {output}"


@pytest.mark.parametrize("doc, pattern, name, compute", HEADLINES, ids=[f"{h[0]}:{h[2]}:{i}" for i, h in enumerate(HEADLINES)])
def test_headline_figures_are_in_their_results_files(doc, pattern, name, compute):
    text = (ROOT / doc).read_text()
    figure = compute(load(name))
    expected = pattern.format(figure) if "{}" in pattern else pattern
    assert figure in expected, f"{doc} says {pattern!r}, {name} gives {figure}"
    assert expected in text, f"{doc} should say {expected!r} (from bench/results/{name})"


@pytest.mark.parametrize("doc", ["README.md", "bench/README.md"])
def test_every_results_file_a_document_names_exists(doc):
    names = re.findall(r"results/([\w./-]+\.json)", (ROOT / doc).read_text())
    assert names or doc == "README.md", doc  # the README links to bench/README.md, which names them
    missing = [n for n in names if not (RESULTS / n).is_file()]
    assert not missing, f"{doc} names results files that do not exist: {missing}"


@pytest.mark.parametrize("path", sorted(RESULTS.rglob("*.json")), ids=lambda p: str(p.relative_to(RESULTS)))
def test_results_files_hold_their_settings_and_environment(path):
    doc = json.loads(path.read_text())
    assert "args" in doc or "settings" in doc, f"{path.name} does not say how it was run"
    assert "env" in doc or path.parent.name == "leaky-split", f"{path.name} does not say where it was run"
    if "env" in doc and path.parent.name != "leaky-split":
        assert doc["env"].get("device"), path.name


def test_no_measured_figure_in_code_docstrings():
    """Speed-ups and ratios belong in bench/README.md beside their results files, not in code."""
    figure = re.compile(r"\b\d+\.\d+x\b|\bx\d+\.\d+\b|\d+(\.\d+)? s a step|~\d+x (faster|slower)")
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in sorted((ROOT / "bricks").rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if figure.search(line)]
    assert not found, "measured figures in code:\n" + "\n".join(found)


def test_the_helpers_patch_took_one_thread_idle():
    """bench/README.md: idle, the chooser took `kernel@1` in every cell with the patch, and `kernel` before."""
    for name in HELPERS_AFTER:
        assert {x["path"] for x in ffn_rows(load(name), 1536, 0)} == {"kernel@1"}, name
    for name in HELPERS_BEFORE:
        assert {x["path"] for x in ffn_rows(load(name), 1536, 0)} == {"kernel"}, name
