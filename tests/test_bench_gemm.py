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
    """Per-round ratios against the first function, on a simulated clock (wall time on a shared machine
    would make this flaky): a function costing twice as much is 0.5x, half as much 2x, and every round
    times each function once after its untimed warm-up call."""
    now = [0.0]
    calls = []

    def work(cost, name):
        def f():
            calls.append(name)
            now[0] += cost
        return f

    meds, speed = _timing.timeit_group([work(2.0, "a"), work(4.0, "b"), work(1.0, "c")], reps=5, warmup=1,
                                       clock=lambda: now[0], rewarm=True)
    assert meds == [2.0, 4.0, 1.0]
    assert speed == [1.0, 0.5, 2.0]
    assert calls == ["a", "b", "c"] + ["a", "a", "b", "b", "c", "c"] * 5
