"""How long the things the README gives a duration for take, measured: the evidence behind "about N minutes".

Jobs (each timed on its own, one after the other):

- `gguf`: the first use of `default` (de-quantizing the GGUF into a fresh, empty cache) in a new process;
- `analyze`: the README's main job, `bricks analyze default` on the three built-in domains;
- `notebook:NAME`: a notebook executed top to bottom in one kernel, in full (not the tests' fast mode); with
  `--write-notebooks`, its outputs are saved back into `notebooks/NAME.ipynb` (what is committed is this run).

    python bench/durations.py --job gguf --job analyze --json bench/results/durations_cpu.json
    python bench/durations.py --job notebook:compressed_bricks --write-notebooks --json ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import environment, save

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["--data", "code=builtin:code", "--data", "math=builtin:math", "--data", "prose=builtin:prose"]


def timed(cmd: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def run_notebook(name: str, write: bool) -> float:
    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        NotebookClient(nb, timeout=7200, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
    seconds = time.perf_counter() - t
    if write:
        nbformat.write(nb, path)
    return seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", action="append", required=True, help="gguf, analyze, notebook:NAME (repeatable)")
    ap.add_argument("--write-notebooks", action="store_true", help="save executed notebooks with their outputs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    # Jobs measured by earlier invocations are kept; each job records the command and environment it was timed with.
    done = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).is_file() else {}
    seconds, jobs = dict(done.get("seconds", {})), dict(done.get("jobs", {}))
    for job in args.job:
        with tempfile.TemporaryDirectory() as tmp:
            if job == "gguf":
                s = timed([sys.executable, "-c", "import bricks; bricks.load_model('default')"], {"BRICKS_CACHE": tmp})
            elif job == "analyze":
                s = timed(["bricks", "analyze", "default", *DOMAINS, "--out", f"{tmp}/analysis"])
            elif job.startswith("notebook:"):
                s = run_notebook(job.split(":", 1)[1], args.write_notebooks)
            else:
                raise SystemExit(f"unknown job {job!r}")
        seconds[job] = round(s, 1)
        jobs[job] = {"seconds": seconds[job], "command": "python " + " ".join(sys.argv), "env": environment()}
        print(f"{job}: {s:.1f} s", flush=True)
        save(args.json, {"args": vars(args), "seconds": seconds, "jobs": jobs, "env": environment()})


if __name__ == "__main__":
    main()
