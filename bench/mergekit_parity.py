"""bricks merge against mergekit on the same YAML, tensor by tensor: every method both have, float32 and bfloat16,
the `models:` and the `slices:` forms (SLERP over a layer range with a gradient, a passthrough frankenmerge).

Three fine-tuned variants of the default model (base + small noise); each config merged by both tools. Per
config: the largest |difference|, the share of entries that differ at all, and (bf16) the share within one
bf16 ulp of mergekit's value. The random methods (DARE, DELLA) draw differently in the two tools and are left
to `tests/test_merge.py`'s statistics.

    python bench/mergekit_parity.py --mergekit PATH/mergekit-yaml [--json OUT.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from bench_merge import state_of, variants

import bricks
from record import save

METHODS = {
    "linear": ({"weight": [1.0, 0.7, 0.4]}, {"normalize": True}),
    "task_arithmetic": ({"weight": [1.0, 0.7, 0.4]}, {}),
    "ties": ({"weight": [1.0, 0.7, 0.4], "density": [0.5, 0.5, 0.5]}, {"normalize": True}),
    "breadcrumbs": ({"weight": [1.0, 0.7, 0.4], "density": [0.8, 0.8, 0.8]}, {}),
    "breadcrumbs_ties": ({"weight": [1.0, 0.7, 0.4], "density": [0.8, 0.8, 0.8]}, {}),
    "model_stock": ({}, {}),
}


def configs(base: Path, tuned: list[Path], depth: int) -> dict[str, dict]:
    out = {}
    for dtype in ("float32", "bfloat16"):
        for method, (per_model, shared) in METHODS.items():
            models = [{"model": str(d), "parameters": {k: v[i] for k, v in per_model.items()}} for i, d in enumerate(tuned)]
            out[f"{method} {dtype}"] = {"merge_method": method, "dtype": dtype, "models": models, "parameters": shared,
                                        **({} if method == "linear" else {"base_model": str(base)})}
        out[f"slerp slices {dtype}"] = {
            "merge_method": "slerp", "base_model": str(base), "dtype": dtype, "parameters": {"t": [0.0, 0.5, 1.0]},
            "slices": [{"sources": [{"model": str(base), "layer_range": [0, depth]},
                                    {"model": str(tuned[0]), "layer_range": [0, depth]}]}]}
        out[f"passthrough frankenmerge {dtype}"] = {
            "merge_method": "passthrough", "dtype": dtype,
            "slices": [{"sources": [{"model": str(tuned[0]), "layer_range": [0, 2 * depth // 3]}]},
                       {"sources": [{"model": str(tuned[1]), "layer_range": [depth // 3, depth]}]}]}
    return out


def compare(x: dict, y: dict, dtype: str) -> dict:
    common = sorted(set(x) & set(y))
    total = differ = within_ulp = 0
    worst = 0.0
    for k in common:
        a, b = x[k].float(), y[k].float()
        d = (a - b).abs()
        worst = max(worst, float(d.max()))
        differ += int((d > 0).sum())
        total += d.numel()
        if dtype == "bfloat16":  # one bf16 ulp at b's magnitude: 2^(exponent - 7)
            ulp = torch.ldexp(torch.ones_like(b), torch.frexp(b).exponent - 8)
            within_ulp += int((d <= ulp).sum())
    res = {"tensors": len(common), "only_bricks": sorted(set(x) - set(y)), "only_mergekit": sorted(set(y) - set(x)),
           "max_abs_diff": worst, "share_differing": differ / max(total, 1)}
    if dtype == "bfloat16":
        res["share_within_one_ulp"] = within_ulp / max(total, 1)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mergekit", required=True, help="path of a mergekit-yaml executable (its own venv)")
    p.add_argument("--model", default="default", help="the model whose variants are merged")
    p.add_argument("--workdir", default=None)
    p.add_argument("--only", default=None, help="run the configs whose name contains this")
    p.add_argument("--json")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="mergekit_parity_"))
    base, tuned = variants(work, a.model)
    depth = bricks.load_model(base)[0].config.num_hidden_layers
    rows = {}
    for name, cfg in configs(base, tuned, depth).items():
        if a.only and a.only not in name:
            continue
        path = work / f"{name.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        outs = {tool: work / f"out_{tool}_{path.stem}" for tool in ("bricks", "mergekit")}
        for out in outs.values():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        subprocess.run([str(Path(sys.executable).parent / "bricks"), "merge", str(path), "--out", str(outs["bricks"])],
                       check=True, capture_output=True)
        r = subprocess.run([a.mergekit, str(path), str(outs["mergekit"])], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode != 0:
            print(f"{name}: mergekit failed: {r.stderr.strip().splitlines()[-1]}", flush=True)
            rows[name] = {"mergekit_error": r.stderr.strip().splitlines()[-1]}
            continue
        rows[name] = compare(state_of(outs["bricks"]), state_of(outs["mergekit"]), cfg["dtype"])
        r = rows[name]
        print(f"{name:>34}: max |diff| {r['max_abs_diff']:.3g}, differing {100 * r['share_differing']:.3f}%"
              + (f", within one bf16 ulp {100 * r['share_within_one_ulp']:.3f}%" if "share_within_one_ulp" in r else "")
              + (f", names only in one: {r['only_bricks'][:2]} / {r['only_mergekit'][:2]}" if r["only_bricks"] or r["only_mergekit"] else ""),
              flush=True)
    save(a.json, {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
