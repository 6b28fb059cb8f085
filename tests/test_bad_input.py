"""Bad input and faults: one line on stderr, a non-zero exit, no output and no temporary directory left, inputs
unchanged; two runs to one output and a run killed mid-write lose nothing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file, save_file

from bricks.errors import BricksError
from bricks.io import atomic_dir

from .conftest import one_line_error, run
from .test_adapters import make_adapter


def snapshot(*dirs) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs if d.exists()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 400)
    (root / "afile").write_text("x")
    adapter = make_adapter(llama_dir, root / "lora")
    bdlora = root / "bdlora"
    make_adapter(llama_dir, bdlora, seed=1)
    cfg = json.loads((bdlora / "adapter_config.json").read_text())
    (bdlora / "adapter_config.json").write_text(json.dumps({**cfg, "use_bdlora": True}))
    wrong = root / "wrong-shape"
    wrong.mkdir()
    for f in llama_dir.iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    state = load_file(str(wrong / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:60].clone()
    save_file(state, str(wrong / "model.safetensors"), metadata={"format": "pt"})

    def merge_yaml(name, **cfg):
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path
    twin = [{"model": str(llama_dir), "parameters": {"weight": 1.0}}, {"model": str(wrong), "parameters": {"weight": 1.0}}]
    pair = [{"model": str(llama_dir), "parameters": {"weight": 1.0}}, {"model": f"{llama_dir}+{adapter}", "parameters": {"weight": -1.0}}]
    return {
        "root": root, "model": llama_dir, "adapter": adapter, "bdlora": bdlora, "wrong": wrong,
        "ok_merge": merge_yaml("ok", merge_method="linear", models=twin[:1]),
        "heavy": merge_yaml("heavy", merge_method="linear", models=[{"model": str(llama_dir), "parameters": {"weight": "heavy"}}]),
        "t_gradient": merge_yaml("t", merge_method="slerp", base_model=str(llama_dir), parameters={"t": [0, 1.5]},
                                 models=[{"model": f"{llama_dir}+{adapter}"}]),
        "density_high": merge_yaml("dh", merge_method="ties", base_model=str(llama_dir), models=[
            {"model": f"{llama_dir}+{adapter}", "parameters": {"weight": 1.0, "density": [0.5, 2.0]}}]),
        "density_negative": merge_yaml("dn", merge_method="ties", base_model=str(llama_dir), models=[
            {"model": f"{llama_dir}+{adapter}", "parameters": {"weight": 1.0, "density": [0.5, -1.0]}}]),
        "sum_zero": merge_yaml("z", merge_method="linear", models=pair),
        "nan_weight": merge_yaml("nan", merge_method="linear", models=[
            {"model": str(llama_dir), "parameters": {"weight": float("nan")}}]),
    }


CASES = {
    "partition --out under a file": (["partition", "{model}", "--method", "random", "--bricks", 4, "--out", "{root}/afile/out"], "is a file"),
    "merge --out in /proc": (["merge", "{ok_merge}", "--out", "/proc/bricks-out"], "cannot create output"),
    "adapter import --out under a file": (["adapter", "import", "{adapter}", "--out", "{root}/afile/x"], "is a file"),
    "merge weight heavy": (["merge", "{heavy}", "--out", "{out}"], "weight must be a number"),
    "analyze binary data": (["analyze", "{model}", "--data", "b={root}/binary.bin", "--out", "{out}"], "not UTF-8 text"),
    "eval binary data": (["eval", "{model}", "--data", "b={root}/binary.bin"], "not UTF-8 text"),
    "slerp t gradient out of range": (["merge", "{t_gradient}", "--out", "{out}"], "t must be in [0, 1], got 1.5"),
    "density gradient above 1": (["merge", "{density_high}", "--out", "{out}"], "density must be in [0, 1], got 2.0"),
    "density gradient below 0": (["merge", "{density_negative}", "--out", "{out}"], "density must be in [0, 1], got -1.0"),
    "weights summing to zero": (["merge", "{sum_zero}", "--out", "{out}"], "sum of the weights, which is 0"),
    "nan weight": (["merge", "{nan_weight}", "--out", "{out}"], "weight must be a finite number"),
    "adapter merge density 2": (["adapter", "merge", "{adapter}", "{adapter}", "--method", "ties", "--density", 2,
                                 "--out", "{out}"], "density must be in [0, 1], got 2.0"),
    "info on a wrong-shaped tensor": (["info", "{wrong}"], "up_proj.weight is [60, 32]"),
    "partition --shared 1.5": (["partition", "{model}", "--method", "random", "--bricks", 4, "--shared", 1.5,
                                "--data", "c=builtin:code", "--out", "{out}"], "--shared must be in [0, 1)"),
    "BD-LoRA adapter": (["adapter", "import", "{bdlora}", "--out", "{out}"], "use_bdlora=True is not supported"),
    "BD-LoRA adapter with --base": (["adapter", "import", "{bdlora}", "--base", "{model}", "--out", "{out}"],
                                    "use_bdlora=True is not supported"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_no_output(case, inputs, tmp_path):
    args, message = CASES[case]
    out = tmp_path / "out"
    fields = {**{k: v for k, v in inputs.items()}, "out": out}
    before = snapshot(inputs["root"], inputs["model"])
    line = one_line_error(run(*[str(a).format(**fields) for a in args]))
    assert message in line, line
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no output, no temporary directory
    assert not [p for p in inputs["root"].rglob(".*tmp*")]
    assert snapshot(inputs["root"], inputs["model"]) == before  # inputs unchanged


def test_two_runs_to_one_output_keep_the_first(tmp_path):
    """Two runs writing the same output at once: the one that finishes first keeps it, the other fails cleanly."""
    out = tmp_path / "out"
    first, second = atomic_dir(out), atomic_dir(out)
    a, b = first.__enter__(), second.__enter__()
    (a / "who").write_text("first")
    (b / "who").write_text("second")
    first.__exit__(None, None, None)
    with pytest.raises(BricksError, match="created by another run"):
        second.__exit__(None, None, None)
    assert (out / "who").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_run_killed_mid_write_is_cleaned_up_by_the_next(tmp_path):
    out = tmp_path / "out"
    script = (f"import time; from bricks.io import atomic_dir\n"
              f"with atomic_dir({str(out)!r}) as tmp:\n"
              f"    (tmp / 'half').write_bytes(b'x' * 1000)\n    print('writing', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1 and not out.exists()
    r = subprocess.run([sys.executable, "-c", f"from bricks.io import atomic_dir\nwith atomic_dir({str(out)!r}) as tmp:\n"
                                              f"    (tmp / 'whole').write_text('ok')\n"], capture_output=True, text=True)
    assert r.returncode == 0 and "did not finish" in r.stderr, r.stderr
    assert (out / "whole").read_text() == "ok" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_live_runs_temporary_directory_is_left_alone(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        other = atomic_dir(out)
        other.__enter__()  # looks for stale temporaries of `out`: this process is alive, so `tmp` is not one
        assert tmp.exists()
        other.__exit__(RuntimeError, RuntimeError("stop"), None)
    assert out.exists()
