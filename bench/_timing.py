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
