"""A CPU kernel for the tokens of an activation-sparse FFN (TEAL), compiled on the user's machine.

A batch-1 decode step is bound by the bytes of weights it reads, so skipping
half the FFN's weight rows should make the FFN up to twice as fast. In eager
torch it is not, at the default model's size (576x1536): the sparse token
takes about twelve small operations (two top-k, two gathers, two
`embedding_bag`s, the activation, ...) where the dense FFN takes five, and
inside a decode step, with the caches full of weights, each eager operation
costs tens of microseconds (`bench/README.md`). Together they eat the bytes
saved. This kernel does the whole call in one:

1. per token, keep the `keep_in` inputs of largest |x| (or those above a
   calibrated threshold), in memory order; the k-th largest magnitude is
   found by bisection on its bits, in vectorized counts that do not branch
   on the data (a new token's values would mispredict every other branch of
   a partition);
2. gate|up pre-activations from the kept rows of `w_in_t` only, the columns
   split over the threads. One token streams a long contiguous piece of
   every kept row into fp32 sums held in the thread's L2 cache (a new piece
   is a new memory stream, slow to start). Several tokens go a
   block of rows at a time: the block is read from memory once, and each
   token adds its kept rows of it to sums held in registers, so that a row
   several tokens keep costs the memory traffic of one (a batch of 8 keeps
   nearly every row between its tokens, but each token still skips the
   compute of the rows it drops). With bf16 weights and a CPU with AVX-512
   BF16, the block holds pairs of rows side by side and each token adds a
   pair it touches with one bf16 dot-product instruction per 16 columns
   (`vdpbf16ps`), at twice the products per instruction of fp32 sums: bf16
   matmuls run about twice as fast as fp32 ones, and fp32 sums of bf16 rows
   lost to them. A block of pairs that most of the tokens touch runs densely,
   six tokens at a time against each loaded vector, with 0 for the rows a
   token drops: at compute 0.5 a token keeps 0.6 of the inputs, so touches
   0.84 of gate|up's pairs, and a matrix product over the block is faster
   than each token's own pairs (the executed fraction counts the products
   on 0). On a CPU with AMX (Intel Xeons from Sapphire Rapids on), every
   block of pairs runs densely on its tiles instead, sixteen tokens at a
   time: one tile instruction makes 8192 of the products where
   `vdpbf16ps` makes 32;
3. `silu(gate) * up`, sixteen lanes at a time;
4. keep the `keep_act` neurons of largest |a| (or above a threshold), and
   the output from their rows of `w_down_t` only, the same way.

Two more ops run the tokens of a bricked FFN (`BrickedFFN`, a router's
bricks), in one call where eager torch takes a few small matmuls per
brick: each selected brick's gate|up rows as dot products with the tokens
that selected it (a tile of its rows against four tokens at a time, so that
a brick's rows are read once for all its tokens; bf16 tokens and rows in
`vdpbf16ps`), then each token's sum of its selected bricks' down rows, as
above.

It runs on torch's own thread pool, so a path timed on one thread (`@1`,
`bricks.routing.paths`) runs it serially.

It is built at first use with torch's C++ extension tools (a C++ compiler
and ninja, which a Linux machine with build tools has) for this machine's CPU
(`-march=native`), into `~/.cache/bricks/kernels`, which takes about a
minute once. `BRICKS_CPU_MARCH` names another target (`x86-64-v3`: AVX2
without AVX-512), for machines of several kinds that share one cache, or to
run the AVX2 paths on an AVX-512 machine (the tests do); `isa()` says which
vector instructions the loaded build's hot loops use. `BRICKS_CPU_AMX=0`
leaves AMX's tiles unused (to compare, or where they misbehave). Without a compiler, or
with `BRICKS_CPU_KERNELS=0`, SparseFFN runs its eager paths (`reason()` says
why).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from ..errors import BricksError

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")


def march() -> str:
    """The CPU target of the build: `BRICKS_CPU_MARCH`, else this machine's (`native`)."""
    return os.environ.get("BRICKS_CPU_MARCH", "native")


def flags() -> list[str]:
    return ["-O3", f"-march={march()}", "-fopenmp"]


def _machine() -> str:
    """What a `-march=native` build depends on: the CPU's instruction sets."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def build_directory() -> Path:
    """One build per source, flags, torch version and CPU: a shared home never loads a build for another CPU. And
    per checkout: torch's build records the source's path, and two checkouts of one source (a before/after
    comparison) sharing a directory rebuilt it each time the other ran."""
    parts = [SOURCE.read_text(), str(SOURCE.resolve()), *flags(), torch.__version__, _machine()]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    root = Path(os.environ.get("BRICKS_CACHE", Path.home() / ".cache" / "bricks"))
    return root / "kernels" / key[:16]


# torch's build holds a `lock` file in the build directory while it compiles, and waits, with no time limit, while
# one is there. A process killed during its build (Ctrl-C, a timeout) leaves it: every later process then waited
# forever. A build takes about a minute; a lock this old has no build behind it.
STALE_LOCK_SECONDS = 600


def wait_for_build_lock(directory: Path) -> None:
    """Wait while another process builds into `directory`; remove its lock once STALE_LOCK_SECONDS old."""
    lock, said = directory / "lock", False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_SECONDS:
            print(f"bricks: removing {lock}, left {age / 60:.0f} minutes ago by a kernel build that did not finish",
                  file=sys.stderr, flush=True)
            lock.unlink(missing_ok=True)
            return
        if not said:
            print(f"bricks: waiting for another process's kernel build ({lock}; removed if it is still there "
                  f"{STALE_LOCK_SECONDS // 60} minutes after it was made)", file=sys.stderr, flush=True)
            said = True
        time.sleep(1.0)


@functools.lru_cache(maxsize=None)
def reason() -> str | None:
    """None when `torch.ops.bricks.teal_ffn` is loaded (built first if needed), else why it is not."""
    if os.environ.get("BRICKS_CPU_KERNELS", "1") == "0":
        return "BRICKS_CPU_KERNELS=0"
    if hasattr(torch.ops.bricks, "teal_ffn"):  # loaded before: a second library would register the ops again
        return None
    if not re.fullmatch(r"[\w.-]+", march()):
        return f"BRICKS_CPU_MARCH={march()!r} is not a compiler target name (e.g. native, x86-64-v3)"
    try:
        from torch.utils.cpp_extension import load

        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        wait_for_build_lock(directory)
        if not any(directory.glob("*.so")):
            print(f"bricks: building the CPU sparse-decode kernel for -march={march()} (once, about a minute)...",
                  file=sys.stderr, flush=True)
        load(name="bricks_cpu_kernels", sources=[str(SOURCE)], extra_cflags=flags(), extra_ldflags=["-fopenmp"],
             build_directory=str(directory), is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: the eager paths remain
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}"
    return None


# Calls of several tokens are offered the compiled kernels up to this many (teal's and the bricks'). Up to 128
# tokens teal's was faster than `masked` in every setting of a probe on this project's CPU (fp32 and bf16, 576x1536
# and 4096x11008; its output was not kept); at 2048 tokens dense matmuls are far more efficient than at 32, and only
# timing the kernel would cost a prefill seconds. The bricks' kernel takes the same limit, not probed apart.
KERNEL_MAX_TOKENS = 128


def available() -> bool:
    return reason() is None


def isa() -> str | None:
    """The vector instructions of the loaded build's hot loops: `avx512-bf16+amx` (bf16 batches on AMX's tiles),
    `avx512-bf16`, `avx512`, `avx2` or `generic`; None
    when this process has loaded no build (asking builds nothing: a results file records it for every run)."""
    return torch.ops.bricks.isa() if hasattr(torch.ops.bricks, "isa") else None


def _ops():
    """`torch.ops.bricks`, once the kernel is loaded; else a one-line error that says why it is not."""
    if reason() is not None:
        raise BricksError(f"the bricks CPU kernel is not available: {reason()}")
    return torch.ops.bricks


def teal_ffn(x: torch.Tensor, w_in_t: torch.Tensor, w_down_t: torch.Tensor, keep_in: int, keep_act: int,
             t_in: float | None, t_act: float | None, counts: torch.Tensor, parallel: bool = True) -> torch.Tensor:
    """y `[tokens, hidden]` of `x` `[tokens, hidden]` through a gated SiLU FFN stored unit-major (`SparseFFN`): top-k
    selection with `keep_in` inputs and `keep_act` neurons, or threshold selection where `t_in` / `t_act` are
    given, per token. `counts` (int64 `[5]`) gains the tokens, the input and neuron rows they keep (a row several
    tokens keep is read from memory once, and counted for each), and the input and neuron rows multiplied beside
    those: bf16 weights from 4 tokens on go by pairs of rows (AVX-512 bf16 dot products), where a dropped row
    beside a kept one is multiplied by 0, and a block of pairs most tokens touch runs for every token (the
    executed fraction counts them). `parallel=False` runs on the calling thread only."""
    return _ops().teal_ffn(x, w_in_t, w_down_t, -1 if t_in is not None else keep_in,
                           -1 if t_act is not None else keep_act, t_in or 0.0, t_act or 0.0, parallel, counts)


def brick_ffn(x: torch.Tensor, w_in: torch.Tensor, w_down: torch.Tensor, sel: torch.Tensor,
              parallel: bool = True, counts: torch.Tensor | None = None) -> torch.Tensor:
    """y `[tokens, hidden]` of `x` `[tokens, hidden]` through the bricks `sel` (bool `[tokens, n_bricks]`) selects,
    of a gated SiLU FFN stored brick-major as `BrickedFFN` stores it (`w_in` `[n_bricks, 2*size, hidden]`, `w_down`
    `[n_bricks, size, hidden]`), in one call: no bias, no shared brick. `counts[0]` (int64) gains the rows of `w_down`
    multiplied by a token's value, summed over the tokens: in bf16 from 4 tokens, blocks of row pairs that run
    densely (every block, on AMX) multiply rows of bricks a token did not select by 0. `counts[1]` gains the (token,
    brick) pairs whose gate|up rows were multiplied: on AMX, every token of a group of 16 in which one selected the
    brick."""
    return _ops().brick_ffn(x, w_in, w_down, sel, parallel, _UNREAD_COUNTS if counts is None else counts)


# Where a caller reads no counts: the kernel adds into it, nobody reads it, and no call allocates one.
_UNREAD_COUNTS = torch.zeros(2, dtype=torch.int64)


def gated_silu(h: torch.Tensor, size: int) -> torch.Tensor:
    """`silu(gate) * up` of `h` `[..., k * 2 * size]`, whose pieces of 2 * size are gate values then up values (a
    brick-major matmul of every brick, `BrickedFFN._masked`): `[..., k * size]`, computed in fp32. No autograd."""
    return _ops().gated_silu(h, size)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask `[rows, n]` of each row's k largest `scores` `[rows, n]` (ties to the lower index, NaN as the
    largest): a router's top-k in one call instead of three torch operations."""
    return _ops().top_k_mask(scores, k)


def linear_top_k(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask `[rows, n]` of each row's k largest scores `x @ w.T` (`x` `[rows, hidden]`, `w` `[n, hidden]`, one
    dtype below float64), summed in fp32 and ranked as `top_k_mask` ranks them: a linear router's scores and top-k in
    one call, where torch's small matmul alone costs tens of microseconds. No autograd."""
    return _ops().linear_top_k(x, w, k)


def ranks(v: torch.Tensor) -> bool:
    """Whether `top_magnitudes` can rank `v` (on the CPU, below float64, once the kernel is built)."""
    return v.device.type == "cpu" and v.dtype != torch.float64 and v.dim() >= 1 and available()


def top_magnitudes(v: torch.Tensor, k: int, zero_dropped: bool = False) -> torch.Tensor:
    """Each row's k largest |v| of `v` `[rows, n]`, chosen as the teal kernel chooses them (NaN as the largest, ties
    to the lower index): a bool mask `[rows, n]`, or (`zero_dropped`) `v` with the other entries 0. No autograd."""
    return _ops().top_magnitudes(v, k, zero_dropped)
