"""Data-parallel capture under `accelerate launch` with two CPU processes equals one process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HELPER = Path(__file__).with_name("dist_stats.py")


@pytest.mark.slow
def test_two_processes_reduce_to_single_process_stats(llama_dir, tmp_path):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, double = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, str(HELPER), str(llama_dir), str(single)], check=True, env=env)
    r = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
                        str(HELPER), str(llama_dir), str(double)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(single), load_file(double)
    assert a["world"].item() == 1 and b["world"].item() == 2
    for key in ("active", "sample_mean", "coact", "tokens", "ppl"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
