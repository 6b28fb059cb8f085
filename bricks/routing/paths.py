"""How a routed FFN runs a call: chosen by timing the ways that compute the same function, on this machine, now.

A routed FFN can run the same function several ways: read only the kept rows
of its weights per token (on one thread, or split over all of them), or run
the dense matmuls on zeroed entries. Which is fastest is not a property of
the code. It depends on the number of tokens (one decode token reads a
share of the rows, 32 tokens together read them all), on the shape and the
CPU's caches, and on what else the machine is doing: a call split over
every thread waits for all of them, and with one other busy process on a
2-core machine one of them is often descheduled (`bench/README.md`).

Each path can also run on one thread (`masked@1`): on an idle machine that is
slower, on a busy one it is often the fastest, as nothing waits for a
descheduled thread. So the paths are timed as they run. Every path is
measured at first use, then calls take the one with the lowest expected
time per call from its recent timings, and the others are re-measured now
and then (a few calls in a row, replacing their old timings), less often
while they keep losing or win by a hair (MARGIN), and a slow one less often
than a close one, so that a path that becomes the fastest again (the machine
went quiet) is found without much time spent on paths that will not be. A
path timed while it stalled looks slow until it is re-measured, so one whose
timings are old is re-measured too, if it came close to the best path or
stalled (STALE_SECONDS).

The expected time is the mean of the recent timings. A decode waits for
the sum of its calls, so a path that stalls for a scheduler tick on a third
of its calls costs what its mean says, not its median: with one busy process
on 2 cores, the small bf16 FFN's kernel at 32 tokens had a median of 1.17 ms
and a mean of 3.72 ms on two threads, 1.43 and 1.58 ms on one
(`bench/results/ffn_centroid_paths_busy_cpu.json`). One stall alone in a
window of four or more (a timing over twice the window's median, the only
one) is left out, so that a stall, rare on any path, does not hand the lead
to a slower path. Two or more count: a path whose stalls are rare but long
(a 30 ms call among 1.5 ms ones) would otherwise look as fast as its calls
between stalls, window after window, since WINDOW calls rarely hold more
than one of them (`bench/chooser_trace.py`). A runner-up's re-measurement
(three calls) counts all of them: a path that stalls on every third call
would otherwise win the lead back on the two calls between its stalls.
Timings are shared by every FFN of the same shape and settings.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

# Recent timings kept per path: their mean, less one lone stall (`expected_seconds`), ranks it. Sixteen, so that
# the stalls of a path that stalls once in ten or so calls are seen two at a time, and counted.
WINDOW = 16
# Calls of each path before the first choice: the first pays allocations and cold caches (and is not kept), and
# the other four, less a lone stall, outlast one call stalled by a scheduler tick (with one, a path that stalled once
# could lose for hundreds of calls, until it was re-measured).
FIRST_CALLS = 5
# A re-measured runner-up runs this many calls in a row, so that its rank rests on fresh timings only.
CHECK_CALLS = 3
# Re-measure a runner-up after this many calls, doubling while it keeps losing, up to MAX_INTERVAL.
FIRST_INTERVAL, MAX_INTERVAL = 8, 256
# A re-measured runner-up that beats the best of the other paths by less than this share takes the lead, but the
# re-measurements keep spacing out: two paths about as fast as each other (the bricks' kernel and dense at 32 small
# bf16 tokens) would otherwise trade the lead on noise, and each trade brought the re-measurements of every
# runner-up, the slow ones too, back to every FIRST_INTERVAL calls.
MARGIN = 0.1
# A runner-up whose timings are older than this many seconds of the key's calls is re-measured (looked for every
# FIRST_INTERVAL calls, beside the schedule of `choose`), whatever it cost lately, if it could win once a load has
# gone: its fastest call ever took less than STALL times the best path's expected time, or it stalled (its expected
# time is over STALL times its fastest call; a path first timed under a load may have no fast call yet). Timed with
# another process busy, a call on two threads waits for a descheduled one (ten times its median, and more), and the
# cost weighting in `choose` had such a path re-measured once in thousands of calls after the load ended, while a
# slower one-thread path ran (bench/chooser_recovery.py). The one with the fastest call goes first, and after
# each re-measurement none for STALE_COST times what it took: under a load that stays, they take about a thirtieth
# of the time.
STALE_SECONDS, STALE_COST = 0.25, 30
# A timing over this many times its window's median is a stall (a thread descheduled, a scheduler tick waited).
STALL = 2.0
# Suffix of a path run on one thread: slower on an idle machine, but with no other thread to wait for.
SERIAL = "@1"


def expected_seconds(recent) -> float:
    """The mean of `recent` timings, less a lone stall: with four or more, the only timing over STALL times
    their median (see the module's doc)."""
    total, n = sum(recent), len(recent)
    if n >= 4:
        median = sorted(recent)[n // 2]
        stalls = [t for t in recent if t > STALL * median]
        if len(stalls) == 1:
            return (total - stalls[0]) / (n - 1)
    return total / n


def token_bucket(tokens: int) -> int:
    """Calls with similar token counts share timings: 1, 2, then powers of two (3-4 -> 4, 5-8 -> 8, ...)."""
    return tokens if tokens <= 2 else 1 << (tokens - 1).bit_length()


@dataclass
class _Timings:
    recent: dict[str, deque] = field(default_factory=dict)  # last WINDOW timings per path
    seconds: dict[str, float] = field(default_factory=dict)  # their expected time (`expected_seconds`), per path
    samples: dict[str, int] = field(default_factory=dict)  # calls timed, per path
    elapsed: float = 0.0  # seconds of every call timed, in all
    measured: dict[str, float] = field(default_factory=dict)  # `elapsed` at each path's last timing
    fastest: dict[str, float] = field(default_factory=dict)  # each path's fastest call (the cold first left out)
    refresh_at: float = 0.0  # `elapsed` before which no stale runner-up is re-measured (STALE_COST)
    calls: int = 0
    interval: int = FIRST_INTERVAL
    next_check: int = FIRST_INTERVAL
    spent: dict[str, float] = field(default_factory=dict)  # seconds of re-measurement calls, per runner-up
    checking: str | None = None  # the runner-up being re-measured, if any
    left: int = 0  # its calls still to run


class PathChooser:
    """Per key (what the call computes), the fastest of its paths by recent timing.

    Example:
        >>> path = CHOOSER.choose(key, ("bags", "masked"))
        >>> t = time.perf_counter(); y = run(path); CHOOSER.record(key, path, time.perf_counter() - t)
    """

    def __init__(self):
        self.timings: dict[tuple, _Timings] = {}

    def choose(self, key: tuple, paths: tuple[str, ...]) -> str:
        t = self.timings.get(key)
        if t is None:
            t = self.timings[key] = _Timings()
        for p in paths:  # each path FIRST_CALLS times before any choice
            if t.samples.get(p, 0) < FIRST_CALLS:
                return p
        if t.checking in paths:
            return t.checking
        t.calls += 1
        seconds = t.seconds
        best = min(paths, key=seconds.__getitem__)
        if len(paths) < 2:
            return best
        # Every FIRST_INTERVAL calls, whether a runner-up's timings have gone stale (`_stale`): it is re-measured
        # then, beside the schedule below, which it leaves as it was.
        check = self._stale(t, paths, best) if t.calls % FIRST_INTERVAL == 0 else None
        if check is None and t.calls >= t.next_check:
            # Re-measure a runner-up, at an interval that doubles while the best stays best: the one whose
            # re-measurements have cost least so far (their seconds, and this one's CHECK_CALLS calls at its expected
            # time), so that each runner-up takes about the same time in all and a slow one is re-measured less
            # often. In turn, the bricks' eager brick-by-brick path, many times the best at 32 small bf16 tokens,
            # was re-measured as often as the close paths (bench/README.md, the centroid `--dense-fallback` grid).
            check = min((p for p in paths if p != best), key=lambda p: t.spent.get(p, 0.0) + CHECK_CALLS * seconds[p])
            t.next_check = t.calls + t.interval
        if check is not None:
            t.checking = check
            t.recent[check].clear()  # its old timings may date from a stall that has passed
            t.left = CHECK_CALLS
            return check
        return best

    @staticmethod
    def _stale(t: _Timings, paths: tuple[str, ...], best: str) -> str | None:
        """Of the runner-ups measured over STALE_SECONDS ago that could win once a load has gone, the one with the
        fastest call; None while the last re-measurement's STALE_COST lasts."""
        if t.elapsed < t.refresh_at:
            return None
        stale = [p for p in paths if p != best and p in t.fastest and t.elapsed - t.measured[p] > STALE_SECONDS
                 and (t.fastest[p] < STALL * t.seconds[best] or t.seconds[p] > STALL * t.fastest[p])]
        return min(stale, key=t.fastest.__getitem__, default=None)

    def record(self, key: tuple, path: str, seconds: float) -> None:
        t = self.timings[key]
        t.elapsed += seconds
        t.measured[path] = t.elapsed
        n = t.samples.get(path, 0)
        t.samples[path] = n + 1
        if n == 0:
            t.recent[path] = deque(maxlen=WINDOW)
            return  # the cold first call
        recent = t.recent[path]
        recent.append(seconds)
        t.fastest[path] = min(seconds, t.fastest.get(path, seconds))
        t.seconds[path] = expected_seconds(recent)
        if path == t.checking:
            t.spent[path] = t.spent.get(path, 0.0) + seconds
            t.left -= 1
            rival = min((s for p, s in t.seconds.items() if p != path), default=float("inf"))
            # Its calls so far already take more than CHECK_CALLS of the best's: it cannot win; no more of them (a
            # path that stalls for a scheduler tick, or ten, costs one stalled call per re-measurement).
            if t.left <= 0 or sum(recent) > CHECK_CALLS * rival:
                t.checking = None
                t.refresh_at = max(t.refresh_at, t.elapsed + STALE_COST * sum(recent))
                # The re-measured path won clearly: check often again (the load changed); else less often.
                won = t.seconds[path] < (1 - MARGIN) * rival
                t.interval = FIRST_INTERVAL if won else min(MAX_INTERVAL, 2 * t.interval)

    def best(self, key: tuple) -> str | None:
        """The path calls with this key take now (None before it was timed)."""
        t = self.timings.get(key)
        return None if t is None or not t.seconds else min(t.seconds, key=t.seconds.get)


# One chooser for the process: FFNs of the same shape and settings learn from each other's calls.
CHOOSER = PathChooser()


def with_serial(paths: tuple[str, ...], threads: int) -> tuple[str, ...]:
    """`paths`, and each of them on one thread (SERIAL) when there are several threads to avoid waiting for
    (`split` exists to use them all)."""
    if threads <= 1:
        return paths
    return paths + tuple(p + SERIAL for p in paths if p != "split")


class running:
    """Run one call on `path` and record its time under `key` (None: not timed, as on accelerators, which return
    before they ran). Yields the path's name; a SERIAL path runs on one thread for the call (`set_threads=False`:
    the path sees to that itself). A class rather than a generator: it runs around every FFN call of a decode.

    Example:
        >>> with running(key, "bags@1") as path:  # path == "bags", on one thread
        ...     y = run(path)
    """

    def __init__(self, key: tuple | None, path: str, set_threads: bool = True):
        self.key, self.path = key, path
        self.threads = torch.get_num_threads() if set_threads and path.endswith(SERIAL) else None

    def __enter__(self) -> str:
        if self.threads is not None:
            torch.set_num_threads(1)  # cheap next to any FFN call; restored after it
        self.start = time.perf_counter()
        return self.path.removesuffix(SERIAL)

    def __exit__(self, kind, error, trace) -> None:
        seconds = time.perf_counter() - self.start
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if self.key is not None and kind is None:
            CHOOSER.record(self.key, self.path, seconds)
