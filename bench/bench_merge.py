"""Merging three fine-tuned checkpoints of the default model onto its base: bricks vs mergekit, one run.

Builds three "fine-tuned" variants of SmolLM2-135M (base + small random task
vectors, fp32 safetensors, ~0.54 GB each), writes one mergekit YAML, runs
`bricks merge` and (when given) `mergekit-yaml` on it as subprocesses, and
prints for each: wall time, peak RSS above the interpreter's own baseline, and
that over the size of one checkpoint; then the max |difference| between the two
merged models' tensors.

    python bench/bench_merge.py [--method ties] [--mergekit /path/to/venv/bin/mergekit-yaml]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import bricks
from record import save

# Peak RSS of a child, and of an interpreter that only imports torch (the baseline any Python tool pays).
_PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); " \
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _PEAK, *cmd], check=True, capture_output=True, text=True)
    return time.perf_counter() - t, int(out.stdout.strip().splitlines()[-1]) / 1024


def state_of(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    s = {}
    for f in sorted(d.glob("*.safetensors")):
        s.update(load_file(str(f)))
    return s


def variants(work: Path, spec: str = "default") -> tuple[Path, list[Path]]:
    """The model and three 'fine-tuned' variants of it (small noise), saved under `work` once."""
    base_dir = work / "base"
    if not base_dir.exists():
        model, tok = bricks.load_model(spec)
        model.save_pretrained(base_dir)
        tok.save_pretrained(base_dir)
        for i in range(3):
            torch.manual_seed(i)
            with torch.no_grad():
                tuned = {k: v + torch.randn_like(v) * 0.002 * v.std() for k, v in model.state_dict().items()
                         if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}  # keep the tie
            model.save_pretrained(work / f"tuned{i}", state_dict=tuned)
            tok.save_pretrained(work / f"tuned{i}")
    return base_dir, [work / f"tuned{i}" for i in range(3)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="ties")
    p.add_argument("--mergekit", default=None, help="path of a mergekit-yaml executable (its own venv), to compare with")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_merge_"))
    base_dir, _ = variants(work)
    ckpt_mb = sum(f.stat().st_size for f in (work / "tuned0").glob("*.safetensors")) / 2**20
    cfg = {"merge_method": a.method, "base_model": str(base_dir), "dtype": "float32",
           "models": [{"model": str(work / f"tuned{i}"), "parameters": {"weight": w, "density": 0.5}}
                      for i, w in enumerate((1.0, 0.7, 0.4))],
           "parameters": {"normalize": True}}
    (work / "merge.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    _, baseline = peak_rss_mb([sys.executable, "-c", "import torch, safetensors"])
    rows = {}
    for tool, cmd in (("bricks", [str(Path(sys.executable).parent / "bricks"), "merge", str(work / "merge.yaml"), "--out", str(work / "out_bricks")]),
                      ("mergekit", [a.mergekit, str(work / "merge.yaml"), str(work / "out_mergekit"), "--lazy-unpickle"]
                       if a.mergekit else None)):
        if cmd is None:
            continue
        out = Path(cmd[-1] if tool == "bricks" else cmd[2])
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        wall, peak = peak_rss_mb(cmd)
        rows[tool] = {"wall_s": round(wall, 1), "peak_rss_mb": round(peak), "above_baseline_mb": round(peak - baseline),
                      "over_checkpoint": round((peak - baseline) / ckpt_mb, 2)}
        print(f"{tool:>9}: {wall:6.1f} s wall, peak RSS {peak:6.0f} MB ({peak - baseline:+.0f} MB over the torch "
              f"interpreter's {baseline:.0f} MB = {(peak - baseline) / ckpt_mb:.2f}x one {ckpt_mb:.0f} MB checkpoint)",
              flush=True)
    if "mergekit" in rows:
        x, y = state_of(work / "out_bricks"), state_of(work / "out_mergekit")
        common = sorted(set(x) & set(y))
        diff = max(float((x[k].float() - y[k].float()).abs().max()) for k in common)
        rows["agreement"] = {"tensors": len(common), "only_bricks": sorted(set(x) - set(y)),
                             "only_mergekit": sorted(set(y) - set(x)), "max_abs_diff": diff}
        rows["ratio_wall_bricks_over_mergekit"] = round(rows["bricks"]["wall_s"] / rows["mergekit"]["wall_s"], 3)
        print(f"agreement: {len(common)} common tensors, max |bricks - mergekit| = {diff:.3g}; "
              f"wall time bricks/mergekit = {rows['ratio_wall_bricks_over_mergekit']}")
    save(a.json, {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
