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


@pytest.mark.parametrize("path", ["avx512bf16", "amx-emulated", "avx2"])
def test_crossover_runs_and_restores(path, tmp_path, capsys):
    """--crossover on a small weight: both kernels validated, a crossover row per dtype / format where the
    path has an engine (none on 'avx2'), and the environment and the policy left as they were."""
    import json

    import lowbit

    C = _native.module("cpu")
    if path not in C.available_cpu_paths():
        pytest.skip(f"no {path} path here")
    before_env, before_prec = os.environ.get("LOWBIT_GEMV_MAX_M"), lowbit.get_matmul_precision()
    C.set_cpu_path(path)
    try:
        rc = bench_gemm.main(["--crossover", "--shapes", "96x256", "--ms-bf16", "1,6", "--ab-rounds", "2",
                              "--threads", "1", "--json", str(tmp_path / "c.json")])
    finally:
        C.set_cpu_path("auto")
    assert rc == 0
    res = json.loads((tmp_path / "c.json").read_text())
    assert os.environ.get("LOWBIT_GEMV_MAX_M") == before_env and lowbit.get_matmul_precision() == before_prec
    if path == "avx2":
        assert res["crossover"] == [] and "no matrix engine on this path" in capsys.readouterr().out
        assert res["rows"] == []
        return
    engine = "amx_emulated" if path == "amx-emulated" else path
    assert {(c["dtype"], c["fmt"]) for c in res["crossover"]} == {
        (d, f) for d in ("torch.bfloat16", "torch.float32") for f in ("nf4+dq", "int4")}
    kernels = ["gemv_i16", "gemv_bf16", "engine"] if path == "avx512bf16" else ["gemv_i16", "rows", "engine"]
    assert all(c["engine"] == engine and c["kernels"] == kernels for c in res["crossover"])
    routed = {(r["dtype"], r["fmt"], r["m"]): r["routed"] for r in res["rows"]}
    # M = 6: fp32 x under medium — the dot form on 'avx512bf16', the rows form on the AMX paths
    assert routed[("torch.float32", "int4", 6)] == ("gemv_bf16" if path == "avx512bf16" else "rows")
    assert routed[("torch.float32", "nf4+dq", 6)] == ("gemv_bf16" if path == "avx512bf16" else "rows")
    assert routed[("torch.bfloat16", "int4", 1)] == ("gemv_bf16" if path == "avx512bf16" else "gemv_i16")
    assert len(res["rows"]) == 8 and all(set(r["ms"]) == set(kernels) and min(r["ms"].values()) > 0
                                         for r in res["rows"])


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


def test_timeit_group_swap_alternates_the_order():
    """swap: odd rounds run the functions in reverse order (no function always follows the same one) and
    the times still land with their own function. A simulated clock on which a call right after "c" costs
    one unit more (as a kernel timed right after torch's dense call ran slower): without swap "a" pays it
    every round, with swap no function does."""
    now, calls = [0.0], []

    def work(cost, name):
        def f():
            now[0] += cost + (1.0 if calls and calls[-1] == "c" else 0.0)
            calls.append(name)
        return f

    fns = [work(2.0, "a"), work(4.0, "b"), work(1.0, "c")]
    meds, _ = _timing.timeit_group(fns, reps=4, warmup=0, clock=lambda: now[0])
    assert meds == [3.0, 4.0, 1.0]  # "a" always right after "c"
    calls.clear()
    ts = _timing._rounds(fns, 4, 0, lambda: now[0], False, swap=True)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert ts == [[2.0, 2.0, 2.0, 2.0], [4.0, 5.0, 4.0, 5.0], [1.0, 2.0, 1.0, 2.0]]
