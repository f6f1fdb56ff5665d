"""The `medium` precision policy's small-M GEMV (int8 activations, vpdpbusd: csrc/cpu/gemm_gemv_i8.h)
against a dense fp64 product on the dequantized weight. Self-contained like test_gemm_cpu.py, whose
weight builder and helpers it reuses.

Under `medium`, fp32 x at the GEMV's M (route gemv_i16: M <= 24, or <= 8 on paths with a bf16 engine) on a
VNNI path is quantized to int8 per group of 32 (x̂ off by <= 0.5/127 of the group max per element) for
int4/int2 weights (exact), and for nf4 with LOWBIT_GEMV_I8_NF4=1 (opt-in; set here by the `medium`
fixture), whose weights become round(T·112)/112 (off by <= 0.5/112 of the block absmax); fp4, and nf4
by default, keep the int16 GEMV. So, per output (docs/kernels.md):

  |y - y_ref| <= 4 * (2^-24·sqrt(k)·||x∘w|| + EX8·||xg∘w|| + EW8·||x∘absmax||) + eps(dtype)·|y_ref|

(xg: |x| replaced by its group max; absmax: each weight's block absmax, nf4 only). On the other paths
`medium` runs the int16 GEMV or exact fp32 (errors far below this bound), and bf16 / fp16 x keep the
int16 GEMV on every path. The policy's own promise, max |err| / max |ref| <= 1e-2, is checked on
Gaussian weights at K = 4096.
"""
import math

import pytest
import torch

import lowbit

from test_gemm_cpu import DT, EPS, FMT, PATHS, QW, gemm, group_max, path  # noqa: F401 (path: fixture)
from test_lowrank_cpu import lowrank

_C = pytest.importorskip("lowbit._C")

FMTS = ["nf4", "fp4", "int4", "int2"]
EX8 = 0.5 / 127  # int8 activations: half a step of max|x|_g / 127
EW8 = {"nf4": 0.5 / 112, "fp4": 0.0, "int4": 0.0, "int2": 0.0}  # nf4's table image round(T·112)
HIGH, MEDIUM = 1, 2
VNNI = "avx512" in PATHS


@pytest.fixture
def medium(monkeypatch):
    """The `medium` policy, with nf4 on the int8 GEMV too (LOWBIT_GEMV_I8_NF4=1, read per call) and the
    GEMV's range M <= 8 on every path (LOWBIT_GEMV_MAX_M: the 'avx512bf16' path keeps only M = 1 there)."""
    monkeypatch.setenv("LOWBIT_GEMV_I8_NF4", "1")
    monkeypatch.setenv("LOWBIT_GEMV_MAX_M", "8")
    old = _C.matmul_precision()
    _C.set_matmul_precision(MEDIUM)
    yield
    _C.set_matmul_precision(old)


def int8_route(m, fmt):
    """Whether fp32 x of M = m, weight format fmt, runs the GEMV under the current policy and path, and
    that GEMV is the int8 one (a VNNI path: 'avx512' and above; not fp4, nf4 only with its opt-in)."""
    return (VNNI and _C.cpu_path() not in ("portable", "avx2") and fmt != "fp4"
            and _C.gemm_route(0, m, False, FMT[fmt]) == "gemv_i16")


def tol_medium(x, qw, k, dtype, r_term=None):
    x64, w64 = x.double(), qw.w_hat.double()
    xg = group_max(x.float()).double()
    t = 2.0**-24 * math.sqrt(k) * ((x64 * x64) @ (w64 * w64).T).sqrt() + EX8 * ((xg * xg) @ (w64 * w64).T).sqrt()
    if EW8[qw.fmt]:
        t = t + EW8[qw.fmt] * ((x64 * x64) @ (qw.block_absmax.double() ** 2).T).sqrt()
    if r_term is not None:
        t = t + r_term
    return 4 * t


def check_medium(y, ref, x, qw, dtype=torch.float32, r_term=None):
    tol = tol_medium(x, qw, qw.k, dtype, r_term) + EPS[dtype] * ref.abs() + 1e-30
    err = (y.double() - ref).abs()
    bad = ~(err <= tol)  # NaN counts as bad
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outside tolerance; worst err/tol {float((err / tol).max()):.3g}"


def run(m, n, k, fmt, block, dq, with_bias=True, seed=0):
    qw = QW(n, k, fmt, block, dq, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) * 0.1 if with_bias else None
    y = gemm(x, qw, bias)
    ref = x.double() @ qw.w_hat.double().T
    if bias is not None:
        ref += bias.double()
    check_medium(y, ref, x, qw)
    return qw, x, bias, y


# ---------------------------------------------------------------- every format / block / dq / M
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("block", [32, 64, 128, 256])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 16, 17, 24])
def test_medium_formats(path, medium, fmt, block, dq, m):
    # N, K odd multiples of the block: K = 5·block leaves a half chunk (4-bit) / a partial one (int2)
    run(m, 3 * block, 5 * block, fmt, block, dq, with_bias=m % 2 == 1, seed=block + m)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("block", [64, 256])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_medium_dq_long_rows(medium, fmt, block, m):
    """Rows of 100 blocks with double quant: nf4/fp4 read scales from the per-pass tables, switching
    nested group mid-row; 23 rows = 5 groups of 4 + 3 single rows at M = 1."""
    run(m, 23, 100 * block, fmt, block, True, seed=block + m)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_medium_dq_short_rows(medium, fmt, m):
    """Rows of 9 blocks with double quant: groups of rows share the per-thread scale tables and some
    straddle two nested groups (123 rows, 1107 blocks: 5 nested groups)."""
    run(m, 123, 9 * 64, fmt, 64, True, seed=m)


# ---------------------------------------------------------------- the policy's promise
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m", [1, 8, 24])
def test_medium_policy_bound(medium, fmt, m):
    """max |err| / max |ref| <= 1e-2 (docs/kernels.md, the measured values) on Gaussian weights; on a
    VNNI CPU the int8 path must really have run (nf4/int4/int2): its error is far above the int16 GEMV's
    (~5e-5); fp4 must give exactly what `high` gives."""
    n, k = 512, 4096
    qw = QW(n, k, fmt, 64, True, seed=m, outliers=False)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + 1000))  # not the weight's seed
    ref = x.double() @ qw.w_hat.double().T
    rel = float((gemm(x, qw).double() - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-2, rel
    if int8_route(m, fmt) or (fmt == "fp4" and _C.gemm_route(0, m, False, FMT[fmt]) == "gemv_i16"):
        y_med = gemm(x, qw)
        _C.set_matmul_precision(HIGH)
        y_high = gemm(x, qw)
        rel_high = float((y_high.double() - ref).abs().max() / ref.abs().max())
        assert rel_high < 2e-4, rel_high
        if fmt == "fp4":
            assert torch.equal(y_med, y_high)
        else:
            assert rel > 5e-4, f"medium gave {rel:.2e}: the int8 GEMV did not run"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m", [1, 5, 24])
def test_medium_leaves_bf16_fp16_alone(path, dtype, fmt, m):
    """bf16 and fp16 activations are not governed by the policy's int8 path: same bits as `high`."""
    qw = QW(96, 320, fmt, 64, True, seed=m)
    x = torch.randn(m, 320, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(96).to(dtype)
    old = _C.matmul_precision()
    try:
        _C.set_matmul_precision(HIGH)
        y_high = gemm(x, qw, bias)
        _C.set_matmul_precision(MEDIUM)
        y_med = gemm(x, qw, bias)
    finally:
        _C.set_matmul_precision(old)
    assert torch.equal(y_high, y_med)


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize("fmt", FMTS)
def test_medium_extreme_values(medium, fmt):
    """Constant-sign x at its group max against the largest codes (nf4/fp4 -1.0: the table images' far
    end; int4 15, int2 3): the int32 lane sums at their worst case must not overflow; zeros stay exact."""
    k, n = 4096, 64
    qw = QW(n, k, fmt, 256, False)
    code = {"nf4": 0x00, "fp4": 0xBB, "int4": 0xFF, "int2": 0xFF}[fmt]  # fp4 0xB: -12/12 = -1.0
    qw.codes.fill_(code)
    w_hat = torch.empty(n, k)
    _C.dequantize(qw.codes.data_ptr(), qw.scale.data_ptr(), 0 if qw.zero is None else qw.zero.data_ptr(), 0, 0, 0.0,
                  w_hat.data_ptr(), 0, n * k, 256, {"nf4": 0, "fp4": 1, "int4": 2, "int2": 3}[fmt])
    qw.w_hat = w_hat
    qw.block_absmax = w_hat.abs()
    for x in (torch.full((1, k), -3.0), torch.full((1, k), 1e30), torch.zeros(1, k), torch.full((8, k), 7.0)):
        y = gemm(x, qw)
        ref = x.double() @ w_hat.double().T
        # same-sign data: errors add linearly, so bound with the 1-norm (worst case)
        xg = group_max(x).double()
        tol = (k * 2.0**-24 + EX8 + EW8[fmt]) * (xg @ w_hat.double().abs().T) + EPS[torch.float32] * ref.abs()
        assert not (~((y.double() - ref).abs() <= tol)).any()


def test_medium_outlier_groups(medium):
    """Groups whose scales differ by 1e12: each group of 32 is quantized on its own max."""
    k, n = 1024, 96
    qw = QW(n, k, "int4", 64, True)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(5))
    x[:, 32:64] *= 1e6
    x[:, 64:96] *= 1e-6
    check_medium(gemm(x, qw), x.double() @ qw.w_hat.double().T, x, qw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fmt", FMTS)
def test_medium_non_finite_row_stays_in_its_row(medium, bad, fmt):
    """M = 17 (passes of 8 + 8 + 1): a non-finite x in row 9 makes that row's outputs NaN and leaves
    every other row within the bound."""
    m, n, k = 17, 96, 512
    qw = QW(n, k, fmt, 64, True, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3))
    x[9, 40] = bad
    y = gemm(x, qw)
    assert not torch.isfinite(y[9]).any()
    keep = [i for i in range(m) if i != 9]
    xk = x[keep]
    check_medium(y[keep], xk.double() @ qw.w_hat.double().T, xk, qw)


@pytest.mark.parametrize("fmt, dq", [("nf4", True), ("fp4", False), ("int4", False), ("int2", True)])
def test_medium_threads_do_not_change_bits(medium, fmt, dq):
    """Rows are handed to the threads dynamically, but every output is computed by the same operations
    whatever the thread count: 1, 2 and 3 threads give the same bits (M = 1 and M = 13: two passes)."""
    qw = QW(640, 1024, fmt, 64, dq, seed=9)
    x = torch.randn(13, 1024, generator=torch.Generator().manual_seed(9))
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append((gemm(x[:1], qw), gemm(x, qw)))
    finally:
        torch.set_num_threads(old)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)
    check_medium(outs[0][1], x.double() @ qw.w_hat.double().T, x, qw)


# ---------------------------------------------------------------- the lowrank family on this path
def run_lowrank(m, n, k, r, fmt, block, dq, s=0.75, seed=0, with_bias=True):
    qw = QW(n, k, fmt, block, dq, seed)
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(m, k, generator=g)
    a = torch.randn(r, k, generator=g) / math.sqrt(k)
    b = torch.randn(n, r, generator=g) / math.sqrt(r)
    bias = torch.randn(n, generator=g) * 0.1 if with_bias else None
    y, xa = lowrank(x, qw, a, b, s, bias)
    x64, a64, b64 = x.double(), a.double(), b.double()
    xa_ref = x64 @ a64.T
    y_ref = x64 @ qw.w_hat.double().T + s * xa_ref @ b64.T + (0 if bias is None else bias.double())
    # the branch stays fp32 (x·Aᵀ from the exact x): fp32 sums only
    r_term = 2.0**-24 * math.sqrt(k + r) * abs(s) * (x64.abs() @ a64.abs().T) @ b64.abs().T
    check_medium(y, y_ref, x, qw, r_term=r_term)
    tol_xa = 4 * 2.0**-24 * math.sqrt(k) * ((x64 * x64) @ (a64 * a64).T).sqrt() + EPS[torch.float32] * xa_ref.abs() + 1e-30
    assert not (~((xa.double() - xa_ref).abs() <= tol_xa)).any()
    return qw, x, a, b, bias, y, xa


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m", [1, 3, 8, 17, 24])
@pytest.mark.parametrize("r", [1, 16, 64])
def test_medium_lowrank(path, medium, fmt, m, r):
    run_lowrank(m, 101, 320, r, fmt, 64, fmt in ("nf4", "int2"), seed=m * 100 + r)


@pytest.mark.parametrize("m, r", [(1, 16), (3, 256), (4, 64)])  # M <= 4: the int8 GEMV on every path
def test_medium_lowrank_bits_do_not_depend_on_threads(medium, m, r, monkeypatch):
    """The int8 GEMV reuses the int16 GEMV's down-projection sharing and deferred epilogue: 1 and 2
    threads, either epilogue (LOWBIT_LOWRANK_TEST_DEFER), give identical bits."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        qw, x, a, b, bias, y1, xa1 = run_lowrank(m, 301, 1024, r, "nf4", 64, True, seed=m + r)
        torch.set_num_threads(2)
        for defer in ("0", "1"):
            monkeypatch.setenv("LOWBIT_LOWRANK_TEST_DEFER", defer)
            for _ in range(5):
                y2, xa2 = lowrank(x, qw, a, b, 0.75, bias)
                assert torch.equal(y2, y1) and torch.equal(xa2, xa1)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("m", [1, 4])
def test_medium_lowrank_zero_scale_is_the_gemm(medium, m):
    """s = 0: the fused branch leaves the int8 GEMV's base product bit-for-bit unchanged."""
    qw, x, a, b, bias, y, _ = run_lowrank(m, 96, 256, 8, "int4", 64, False, s=0.0, seed=m)
    assert torch.equal(y, gemm(x, qw, bias))


def test_medium_small_m_route_follows_the_gemv_kind(monkeypatch):
    """With a bf16 engine, fp32 x under `medium` keeps M <= 8 on the GEMV only where that GEMV is the
    int8 one (int4, int2; nf4 with its opt-in); nf4 and fp4 on the int16 GEMV keep M <= 4 as bf16 x does
    (the engine was 1.36-1.39x faster at M = 5-8: bench_gemm.py --crossover). On 'avx512bf16' the dot
    form takes over below that: nf4 / fp4 from M = 1, int4 from 2, int2 from 3 (session 11's crossover).
    lowbit.info() shows the ranges per format group."""
    if not any(p in _C.available_cpu_paths() for p in ("avx512bf16", "amx")):
        pytest.skip("no bf16 engine on this CPU (the amx-emulated path is not chosen by 'auto')")
    monkeypatch.delenv("LOWBIT_GEMV_I8_NF4", raising=False)
    old = _C.matmul_precision()
    try:
        _C.set_matmul_precision(MEDIUM)
        engine = _C.gemm_route(0, 100, False)
        assert engine in ("avx512bf16", "amx")
        dot = engine == "avx512bf16"  # that path also has the dot-form bf16 GEMV, for M up to 12
        gemv_max = {"int4": 1, "int2": 2, "nf4": 0, "fp4": 0} if dot else {"int4": 8, "int2": 8, "nf4": 4, "fp4": 4}
        for m in range(1, 15):
            above = "gemv_bf16" if dot and m <= 12 else engine
            assert [_C.gemm_route(0, m, False, FMT[f]) for f in ("int4", "int2", "nf4", "fp4")] == \
                ["gemv_i16" if m <= gemv_max[f] else above for f in ("int4", "int2", "nf4", "fp4")], m
        monkeypatch.setenv("LOWBIT_GEMV_I8_NF4", "1")
        assert _C.gemm_route(0, gemv_max["int4"], False, FMT["nf4"]) == "gemv_i16"
        monkeypatch.delenv("LOWBIT_GEMV_I8_NF4")
        eng = lowbit.info()["engines"]["float32"]
        first = (lambda f: ("1", "gemv_i16") if gemv_max[f] == 1 else (f"1-{gemv_max[f]}", "gemv_i16"))
        if dot:
            assert eng["gemm"][0] == ("1-12", "gemv_bf16")
            assert eng["gemm (int4)"][0] == first("int4") and eng["gemm (int2)"][0] == first("int2")
        else:
            assert eng["gemm"][0] == first("nf4") and eng["gemm (int4, int2)"][0] == first("int4")
        # and the kernels really take those routes: nf4 at M = 13 gives the engine's bits (x rounded to bf16)
        qw = QW(96, 512, "nf4", 64, True, seed=6)
        x = torch.randn(13, 512, generator=torch.Generator().manual_seed(6))
        y = gemm(x, qw)
        monkeypatch.setenv("LOWBIT_GEMV_MAX_M", "0")
        assert torch.equal(gemm(x, qw), y)
    finally:
        _C.set_matmul_precision(old)
    with pytest.raises(ValueError, match="not a format id"):
        _C.gemm_route(0, 1, False, 9)
    with pytest.raises(ValueError, match="not a dtype id"):
        _C.gemm_route(7, 1, False, 0)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("m", [1, 2])
def test_medium_nf4_fp4_default_is_int16(fmt, m, monkeypatch):
    """Where fp32 x under `medium` runs the GEMV (here M <= 2 through LOWBIT_GEMV_MAX_M: the 'avx512bf16'
    path sends nf4 / fp4 to the dot form from M = 1), nf4 (and fp4 always) keep the int16 GEMV without
    LOWBIT_GEMV_I8_NF4: the same bits as `high`; with it, nf4 runs the int8 GEMV (a different, larger
    error) on a VNNI path."""
    monkeypatch.delenv("LOWBIT_GEMV_I8_NF4", raising=False)
    monkeypatch.setenv("LOWBIT_GEMV_MAX_M", "2")
    qw = QW(96, 1024, fmt, 64, True, seed=m)
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(m + 1000))
    old = _C.matmul_precision()
    try:
        _C.set_matmul_precision(HIGH)
        y_high = gemm(x, qw)
        _C.set_matmul_precision(MEDIUM)
        assert torch.equal(gemm(x, qw), y_high)
        monkeypatch.setenv("LOWBIT_GEMV_I8_NF4", "1")
        y_opt = gemm(x, qw)
        if not int8_route(m, fmt):
            assert torch.equal(y_opt, y_high)
        else:
            assert not torch.equal(y_opt, y_high)
            check_medium(y_opt, x.double() @ qw.w_hat.double().T, x, qw)
    finally:
        _C.set_matmul_precision(old)
