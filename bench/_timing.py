"""Timing shared by the bench scripts: medians of wall time after warm-up (the machine is shared
and noisy — compare implementations measured in the same run, as ratios)."""

from __future__ import annotations

import statistics
import time


def timeit(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def timeit_pair(fa, fb, reps: int, warmup: int = 2):
    """Medians of fa and fb timed alternately (load from other processes hits both alike) and the
    median of the per-pair ratio fb / fa — the figure to quote for an overhead on a shared machine."""
    for _ in range(warmup):
        fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb), statistics.median([b / a for a, b in zip(ta, tb)])
