"""What every results file records beside its numbers: the command, the settings, the environment, the date.

    from record import environment, save      # bench scripts run as `python bench/NAME.py`
    save(path, {"args": vars(args), **results}, model)
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def _head() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        return None


# Read once, when the bench imports this module: the code a long run executes is the commit it started on, not
# whatever the repository holds when it writes its last row. Uncommitted changes are flagged, save those to other
# results files (a bench started while the previous one's results wait to be committed runs the same code).
COMMIT = _head()
if COMMIT is not None:
    _dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)bench/results"],
                            capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    COMMIT += "+changes" if _dirty else ""


def cpu_model() -> str:
    """The CPU's model name, the widest vector instructions the kernels use ("AVX-512 BF16", "AVX-512", "AVX2") and AMX:
    the same kernel ran several times faster or slower than dense on two CPUs of this workplace (bench/README.md)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()

    def field(key):  # of the first CPU listed
        return next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.split(":")[0].strip() == key), "?")

    name = f"{field('model name')} (family {field('cpu family')}, model {field('model')})"  # VMs often say no more
    flags = set(field("flags").split())
    isa = next((label for flag, label in (("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
                if flag in flags), "no AVX2")
    # Not used by the kernels, but by torch's bf16 matrix products (oneDNN), the dense side of every bf16 batch.
    amx = ", AMX BF16" if "amx_bf16" in flags else ""
    return f"{name}, {isa}{amx}"


def environment(model=None, device=None) -> dict:
    """Where the run happened. The built-in code and prose corpora come from the interpreter's own standard library
    and documentation, so perplexities are comparable only between runs on the same Python version."""
    import peft
    import torch
    import transformers

    dev = torch.device(device or "cpu") if model is None else next(model.parameters()).device
    device = torch.cuda.get_device_name(dev) + " (cuda)" if dev.type == "cuda" else "cpu"
    if device == "cpu":
        device = f"cpu ({os.cpu_count()} cores, {platform.machine()}), {torch.get_num_threads()} threads"
    from bricks.routing import cpu_kernels

    # The build of the CPU kernels the run loaded, if any: `BRICKS_CPU_MARCH` may have chosen another target.
    return {"device": device, "cpu": cpu_model(), "cpu_kernels": cpu_kernels.isa(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bricks_commit": COMMIT, "date": datetime.date.today().isoformat()}


def save(path: str | os.PathLike | None, result: dict, model=None, device=None) -> None:
    """Write `result` with the command line and the environment (of `model`'s device, or `device`) to `path`
    (atomically; nothing when path is None)."""
    if not path:
        return
    doc = {"command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]), **result}
    doc.setdefault("env", environment(model, device))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
