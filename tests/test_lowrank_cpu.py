"""CPU lowrank kernel (lowbit._C.lowrank) against a dense fp64 product on the dequantized weight.

y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ (+ bias) and xa = x·Aᵀ, on both CPU paths, every format, fp32/bf16/fp16,
double quant, bias, r = 1 … 256 and M across the GEMV (≤ 8) / tile (> 8) switch. Self-contained
like test_gemm_cpu.py, whose weight builder and tolerance terms it reuses:

  |y - y_ref| <= 4 * (2^-24·sqrt(k)·||x∘w|| + EPS_I16·||xg∘w||                  base (test_gemm_cpu)
                      + 2^-24·sqrt(k + r)·s·(|x|·|A|ᵀ)·|B|ᵀ)                     branch, fp32 sums
                 + eps(dtype)·|y_ref|                                             output rounding
"""
import math

import pytest
import torch

from test_gemm_cpu import DT, ENGINE_ROUTES, EPS, FMT, QW, eps_i16, group_max, gemm, path, w_ref  # noqa: F401 (path: fixture)

_C = pytest.importorskip("lowbit._C")


def lowrank(x, qw, a, b, s, bias=None):
    m, r = x.shape[0], a.shape[0]
    y = torch.full((m, qw.n), float("nan"), dtype=x.dtype)
    xa = torch.full((m, r), float("nan"), dtype=x.dtype)
    _C.lowrank(x.data_ptr(), y.data_ptr(), xa.data_ptr(), 0 if bias is None else bias.data_ptr(), DT[x.dtype],
               m, qw.n, qw.k, *qw.args(), a.data_ptr(), b.data_ptr(), r, s)
    return y, xa


def run(m, n, k, r, fmt="nf4", block=32, dq=True, dtype=torch.float32, with_bias=True, s=0.75, seed=0):
    qw = QW(n, k, fmt, block, dq, seed)
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(m, k, generator=g).to(dtype)
    a = (torch.randn(r, k, generator=g) / math.sqrt(k)).to(dtype)
    b = (torch.randn(n, r, generator=g) / math.sqrt(r)).to(dtype)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype) if with_bias else None
    y, xa = lowrank(x, qw, a, b, s, bias)

    route = _C.gemm_route(DT[dtype], m, False, FMT[fmt])
    x64, w64, a64, b64 = x.double(), w_ref(qw, dtype, m).double(), a.double(), b.double()
    xa_ref = x64 @ a64.T
    y_ref = x64 @ w64.T + s * xa_ref @ b64.T + (0 if bias is None else bias.double())
    xg = group_max(x.float()).double()
    # the bf16 engines round s·xa to bf16 for the up-projection (csrc/cpu/gemm_bf16.h)
    branch16 = 2.0**-8 * abs(s) * (xa_ref.abs() @ b64.abs().T) if route in ENGINE_ROUTES else 0.0
    tol = 4 * (2.0**-24 * math.sqrt(k) * ((x64 * x64) @ (w64 * w64).T).sqrt()
               + eps_i16(fmt, m, dtype) * ((xg * xg) @ (w64 * w64).T).sqrt()
               + 2.0**-24 * math.sqrt(k + r) * abs(s) * (x64.abs() @ a64.abs().T) @ b64.abs().T) + branch16
    tol = tol + EPS[dtype] * y_ref.abs() + 1e-30
    err = (y.double() - y_ref).abs()
    assert not (~(err <= tol)).any(), f"y: worst err/tol {float((err / tol).max()):.3g}"  # NaN fails

    tol_xa = 4 * 2.0**-24 * math.sqrt(k) * ((x64 * x64) @ (a64 * a64).T).sqrt() + EPS[dtype] * xa_ref.abs() + 1e-30
    err_xa = (xa.double() - xa_ref).abs()
    assert not (~(err_xa <= tol_xa)).any(), f"xa: worst err/tol {float((err_xa / tol_xa).max()):.3g}"
    return qw, x, a, b, bias, y


# ---------------------------------------------------------------- ranks × M (GEMV and tile paths)
@pytest.mark.parametrize("r", [1, 7, 16, 64, 256])
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 33, 512])
def test_lowrank_ranks(path, m, r):
    # n = 101: not a multiple of the GEMV row groups (4) nor of the micro-kernel's 6 rows
    run(m, 101, 320, r, seed=m * 1000 + r)


# ---------------------------------------------------------------- formats, dtypes, double quant, bias
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "int2"])
@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("dq, with_bias", [(False, True), (True, False)])
def test_lowrank_formats_dtypes(path, dtype, fmt, m, dq, with_bias):
    run(m, 96, 512, 12, fmt, 64, dq, dtype, with_bias, seed=m)


# ---------------------------------------------------------------- tiling edges
@pytest.mark.parametrize("m, n, k", [(1, 64, 4000), (3, 64, 4000), (33, 64, 4000),  # GEMV tail chunk
                                     (300, 400, 288)])  # two m-blocks, several n-blocks per thread
def test_lowrank_tiling(path, m, n, k):
    if path == "portable" and m * n * k > 2e7:
        pytest.skip("portable path is scalar")
    run(m, n, k, 16, "nf4", 32, True, seed=n)


@pytest.mark.parametrize("m", [1, 4, 8, 20])
def test_lowrank_zero_scale_is_the_gemm(path, m):
    """s = 0: the fused branch must leave the base product bit-for-bit unchanged."""
    qw, x, a, b, bias, y = run(m, 96, 256, 8, "int4", 64, False, s=0.0, seed=m)
    assert torch.equal(y, gemm(x, qw, bias))


def test_lowrank_m_zero_is_noop(path):
    qw = QW(32, 64, "nf4", 32, False)
    lowrank(torch.empty(0, 64), qw, torch.randn(4, 64), torch.randn(32, 4), 1.0)


def test_lowrank_rank_out_of_range():
    qw = QW(32, 64, "nf4", 32, False)
    with pytest.raises((ValueError, RuntimeError), match="r=300"):
        lowrank(torch.randn(2, 64), qw, torch.randn(300, 64), torch.randn(32, 300), 1.0)



@pytest.mark.parametrize("fmt, dtype", [("int4", torch.float32), ("nf4", torch.bfloat16)])
@pytest.mark.parametrize("m, r", [(1, 16), (3, 256), (8, 64)])
def test_lowrank_gemv_bits_do_not_depend_on_threads(path, fmt, dtype, m, r, monkeypatch):
    """The GEMV splits the down-projection over the threads, and rows computed before all of xa is
    published get their branch added later (deferred epilogue; LOWBIT_LOWRANK_TEST_DEFER=1 forces
    it for every row, and xa recomputed privately): same operations in the same order, so 1 and 2
    threads, either epilogue, run after run, must give identical bits (and match the reference)."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        qw, x, a, b, bias, _ = run(m, 301, 1024, r, fmt, 64, True, dtype, seed=m + r)
        y1, xa1 = lowrank(x, qw, a, b, 0.75, bias)
        torch.set_num_threads(2)
        for defer in ("0", "1"):
            monkeypatch.setenv("LOWBIT_LOWRANK_TEST_DEFER", defer)
            run(m, 301, 1024, r, fmt, 64, True, dtype, seed=m + r)  # against the reference
            for _ in range(10):
                y2, xa2 = lowrank(x, qw, a, b, 0.75, bias)
                assert torch.equal(y2, y1) and torch.equal(xa2, xa1)
    finally:
        torch.set_num_threads(old)
