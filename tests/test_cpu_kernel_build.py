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
