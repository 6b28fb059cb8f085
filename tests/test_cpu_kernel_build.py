"""The compiled CPU kernel builds wherever it can: test_cpu_kernels.py skips all of its tests when the build fails,
so a source that no longer compiles would otherwise pass as 96 skips."""

from __future__ import annotations

import os
import platform
import shutil

import pytest

from bricks.routing import cpu_kernels


@pytest.mark.skipif(platform.system() != "Linux" or shutil.which("c++") is None,
                    reason="the kernel is built with the system's C++ compiler on Linux")
@pytest.mark.skipif(os.environ.get("BRICKS_CPU_KERNELS", "1") == "0", reason="BRICKS_CPU_KERNELS=0 turns it off")
def test_the_cpu_kernel_builds_where_there_is_a_compiler():
    assert cpu_kernels.reason() is None, f"the CPU kernel did not build: {cpu_kernels.reason()}"


def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_one_waited_for(tmp_path, monkeypatch, capsys):
    """torch's build waits, with no time limit, while a `lock` file is in the build directory; a build killed
    midway leaves one, and every later process waited on it forever."""
    import threading
    import time

    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - cpu_kernels.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    cpu_kernels.wait_for_build_lock(tmp_path)
    assert not lock.exists() and "did not finish" in capsys.readouterr().err
    lock.touch()  # a build in progress: waited for until its lock goes
    threading.Timer(1.5, lock.unlink).start()
    start = time.perf_counter()
    cpu_kernels.wait_for_build_lock(tmp_path)
    assert time.perf_counter() - start >= 1.4 and "waiting for another process" in capsys.readouterr().err
    cpu_kernels.wait_for_build_lock(tmp_path)  # no lock: returns at once


def test_each_checkout_of_the_source_builds_into_its_own_directory(tmp_path, monkeypatch):
    """torch's build records the source's path: two checkouts sharing one directory rebuilt it in turn."""
    here = cpu_kernels.build_directory()
    copy = tmp_path / "cpu_kernels.cpp"
    copy.write_text(cpu_kernels.SOURCE.read_text())
    monkeypatch.setattr(cpu_kernels, "SOURCE", copy)
    assert cpu_kernels.build_directory() != here
    assert cpu_kernels.build_directory().parent == here.parent
