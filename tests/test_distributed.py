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


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), so that parallel or repeated runs do not collide."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_and_two_processes(helper: Path, model_dir, tmp_path) -> tuple[dict, dict]:
    """Run `helper MODEL OUT` alone, then as two CPU processes under `accelerate launch`; both outputs."""
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, double = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, str(helper), str(model_dir), str(single)], check=True, env=env)
    r = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                        str(helper), str(model_dir), str(double)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(single), load_file(double)


@pytest.mark.slow
def test_two_processes_reduce_to_single_process_stats(llama_dir, tmp_path):
    a, b = one_and_two_processes(HELPER, llama_dir, tmp_path)
    assert a["world"].item() == 1 and b["world"].item() == 2
    for key in ("active", "sample_mean", "coact", "tokens", "ppl"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_processes_train_the_weights_one_process_trains(llama_dir, tmp_path):
    """The shared training loop (here CPET: LoRA and recovery bricks, distillation) under `accelerate launch`:
    each process takes half of every batch and the gradients are summed, so the trained weights are those of a
    single process (up to the order of float additions)."""
    a, b = one_and_two_processes(Path(__file__).with_name("dist_train.py"), llama_dir, tmp_path)
    assert a["world"].item() == 1 and b["world"].item() == 2
    moved = [k for k in a if k.endswith(".U") and a[k].abs().max() > 0]
    assert moved, "the recovery bricks did not train"
    # Adam divides by the gradients' scale, so float-order differences of ~1e-8 grow to ~1e-5 relative; without the
    # gradient sum, each process would follow its own half-batch and differ by tens of percent.
    for key in a:
        if key != "world" and a[key].norm() > 0:
            assert (a[key] - b[key]).norm() / a[key].norm() < 1e-4, key


def test_the_process_group_is_left_before_the_interpreter_ends(monkeypatch):
    """`init_distributed` registers the group's destruction to run at exit: left to the interpreter's teardown, gloo
    aborted a process of the test above after its work was done (one CI run)."""
    import atexit

    import torch.distributed as dist

    from bricks.runtime import init_distributed, leave_distributed

    at_exit = []
    monkeypatch.setattr(atexit, "register", at_exit.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    join = dist.init_process_group  # a real gloo group, of this process alone
    monkeypatch.setattr(dist, "init_process_group", lambda backend: join(backend, store=dist.HashStore(), rank=0, world_size=1))
    init_distributed()
    try:
        assert dist.is_initialized() and at_exit == [leave_distributed]
        for handler in at_exit:
            handler()
        assert not dist.is_initialized()
    finally:
        leave_distributed()
