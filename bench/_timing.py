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


def timeit_pair(fa, fb, reps: int, warmup: int = 5):
    """Medians of ``fa`` and ``fb`` timed alternately (load from other processes hits both alike) and
    the median of the per-round ratio ``fb / fa`` — the figure to quote on a shared machine."""
    ta, tb = _rounds([fa, fb], reps, warmup, time.perf_counter, False)
    return statistics.median(ta), statistics.median(tb), statistics.median([b / a for a, b in zip(ta, tb)])


def timeit_group(fns, reps: int, warmup: int = 2, clock=time.perf_counter, rewarm: bool = False,
                 swap: bool = False):
    """``timeit_pair`` for several functions: each round times every fn once, in order, so load from
    other processes hits all alike. ``rewarm``: an untimed call right before each timed one (an int:
    that many), so a fn whose data fit in the caches finds them there and not evicted by the fn before
    it (on Zen 5, after torch's dense 4096² bf16 call, a 4096² packed weight took ≈ 4 calls to be fast
    again: the L3 there fills with lines evicted from L2, not with every line read). ``swap``: every
    other round in reverse order, so no fn always follows the same one (on Zen 5 a kernel timed right
    after torch's dense bf16 F.linear ran 1.3-1.4x slower even after an untimed call). Returns the
    median seconds of each fn and, per fn, the median of the per-round ratio ``t(fns[0]) / t(fn)``
    (the speed against the first)."""
    ts = _rounds(fns, reps, warmup, clock, rewarm, swap)
    meds = [statistics.median(t) for t in ts]
    speed = [statistics.median([a / b for a, b in zip(ts[0], t)]) for t in ts]
    return meds, speed


def _rounds(fns, reps, warmup, clock, rewarm, swap=False):
    """Per fn, its time in each of ``reps`` rounds that call every fn once, in order (``swap``: odd rounds
    in reverse order), after ``warmup`` untimed rounds (``rewarm``: and that many untimed calls, True = 1,
    right before each timed one)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    ts = [[] for _ in fns]
    for r in range(reps):
        order = list(enumerate(fns))
        if swap and r % 2:
            order.reverse()
        for i, fn in order:
            for _ in range(int(rewarm)):
                fn()
            t0 = clock()
            fn()
            ts[i].append(clock() - t0)
    return ts


def machine_line() -> str:
    """One line naming the machine a run was taken on (the project's VMs are not all the same CPU):
    the CPU's model name, family / model numbers, core count and lowbit's CPU path."""
    import os

    name, family, model = "unknown CPU", "?", "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key, val = key.strip(), val.strip()
                if key == "model name" and name == "unknown CPU":
                    name = val
                elif key == "cpu family" and family == "?":
                    family = val
                elif key == "model" and model == "?":
                    model = val
    except OSError:
        pass
    try:
        import lowbit

        path = lowbit.info().get("cpu_path", "?")
    except Exception as e:  # the bench still runs; the line says why the path is unknown
        path = f"unknown ({type(e).__name__})"
    return f"machine: {name} (family {family}, model {model}), {os.cpu_count()} CPUs, lowbit cpu path {path}"


# SIMD / matrix-engine flags worth naming next to a CPU figure (/proc/cpuinfo spelling)
_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8")


def cpu_features() -> str:
    """The SIMD and matrix-engine flags of this CPU that lowbit's paths care about, e.g.
    ``"avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16"`` (``"?"`` where /proc/cpuinfo is unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    return " ".join(x for x in _FEATURES if x in flags) or "none of " + " ".join(_FEATURES)
    except OSError:
        pass
    return "?"
