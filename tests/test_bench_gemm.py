"""bench/bench_gemm.py's A/B of two builds (``--against-build``) cannot rot: it runs here on a small
weight against this checkout's own _C (the same build twice: the bit-for-bit check and the float64
validation must pass, and a speed-up is printed), and it refuses a path that is not an extension."""

from __future__ import annotations

import os
import sys

import pytest

from lowbit import _native

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import _timing  # noqa: E402
import bench_gemm  # noqa: E402

pytestmark = pytest.mark.skipif("cpu" not in _native._modules, reason="lowbit._C not built")


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int2"])
def test_against_build_runs_and_validates(fmt, capsys):
    so = _native.module("cpu").__file__
    rc = bench_gemm.main(["--against-build", so, "--ms", "3,17", "--shapes", "256x512", "--ab-rounds", "2",
                          "--ab-fmt", fmt, "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("this/other speed-up") == 4  # 2 products × 2 M


def test_against_build_refuses_a_non_extension(tmp_path):
    bad = tmp_path / "not_an_extension.so"
    bad.write_bytes(b"\x7fELF but not really")
    with pytest.raises((ImportError, OSError, SystemExit)):
        bench_gemm.main(["--against-build", str(bad), "--ms", "3", "--shapes", "256x512"])


def test_timeit_group_ratios():
    """Per-round ratios against the first function: a function doing twice the work is ≈ 0.5x."""
    import time

    def work(n):
        def f():
            t = time.perf_counter()
            while time.perf_counter() - t < n * 1e-3:
                pass
        return f

    meds, speed = _timing.timeit_group([work(2), work(4), work(1)], reps=5, warmup=1, rewarm=True)
    assert meds[1] > meds[0] > meds[2]
    assert 0.4 < speed[1] < 0.6 and 1.6 < speed[2] < 2.4 and speed[0] == 1.0
