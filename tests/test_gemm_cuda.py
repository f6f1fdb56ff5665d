"""CUDA gemm kernels on the simulator: the edge cases of each path (csrc/kernels/gemm.cuh: the GEMV and
gemm_t; csrc/kernels/gemm_mma.cuh: the tensor-core kernel).

Paths (csrc/launch/gemm.inl): gemv_kernel for M ≤ 8 and for fp32 x (MR = 1 / 4 / 8 rows per CTA,
intra-CTA split-K), gemm_mma_kernel (mma.m16n8k16, 64×64×64 tiles, 3-stage cp.async) for M > 8
with bf16 / fp16 x, gemm_t_kernel for the backward. Every case compares with a float64 matmul on
the dequantized weight (tests/conftest.py::assert_close), and the deterministic-output test
requires identical bits under every simulator schedule. Shapes stay small: the simulator runs
~1 M threads/s.
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import ops

from conftest import assert_close, require_backend

FORMATS = ["nf4", "fp4", "int4", "int2"]
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _sim():
    require_backend("sim")
    from lowbit import _native

    if not hasattr(_native.module("sim"), "gemm"):
        pytest.fail("lowbit._sim has no gemm kernel")


def make(n, k, fmt, block, dq, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, ::13] *= 6.0
    with lowbit.use_backend("reference"):
        qt = lowbit.quantize(w, fmt, block, dq)
        w64 = qt.dequantize(torch.float32).double()
    return qt, w64


def run(schedule, fn, *args, threads=2):
    with lowbit.use_backend("sim", schedule=schedule, threads=threads):
        return fn(*args)


def check_fwd(y, x, w64, bias, dtype, name):
    x64 = x.double()
    exp = x64 @ w64.T + (bias.double() if bias is not None else 0)
    assert_close(y, exp, dtype=dtype, k=w64.shape[1], scale=x64.abs() @ w64.abs().T, name=name)


def check_bwd(gx, gy, w64, dtype, name):
    assert_close(gx, gy.double() @ w64, dtype=dtype, k=w64.shape[0], scale=gy.double().abs() @ w64.abs(), name=name)


# ------------------------------------------------------------------ tensor-core path (M > 8)
# (m, n, k, block): M straddling the GEMV/mma threshold (8 | 9), one m16 tile, a partial 64-row
# tile (33, 65); N not a multiple of the 64-wide tile (32, 96, 160); K = block (one k-tile, or half
# of one: K = 32); K with a half k-tile tail (96, 160).
MMA_CASES = [(9, 96, 64, 64), (16, 32, 32, 32), (33, 160, 96, 32), (65, 64, 128, 128), (12, 96, 160, 32)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: str(d)[6:])
def test_mma_path_formats_dtypes(fmt, dtype):
    for i, (m, n, k, block) in enumerate(MMA_CASES):
        if fmt == "int2" and i % 2:
            continue  # keep the run short; int2 K % 64 == 32 falls back to the GEMV (case below)
        dq = bool(i % 2)
        qt, w64 = make(n, k, fmt, block, dq, seed=i)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(50 + i)).to(dtype)
        bias = torch.randn(n).to(dtype) if i % 2 == 0 else None
        y = run("random:3", lowbit.linear, x, qt, bias)
        check_fwd(y, x, w64, bias, dtype, f"mma {fmt} {dtype} m={m} n={n} k={k} block={block} dq={dq}")


def test_mma_int2_rows_not_16_byte_multiple_fall_back():
    """int2 rows of K/4 bytes = 8 mod 16 cannot be cp.async'ed: the GEMV runs them, any M."""
    qt, w64 = make(64, 96, "int2", 32, True)
    x = torch.randn(20, 96).to(torch.bfloat16)
    check_fwd(run("forward", lowbit.linear, x, qt), x, w64, None, torch.bfloat16, "int2 k=96 m=20")


def test_threshold_straddle_consistent():
    """M = 8 (GEMV) and M = 9 (mma) on the same rows agree to accumulation accuracy."""
    qt, w64 = make(64, 128, "nf4", 64, True, seed=3)
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    y9 = run("forward", lowbit.linear, x, qt)
    y8 = run("forward", lowbit.linear, x[:8], qt)
    check_fwd(y9, x, w64, None, torch.bfloat16, "m=9")
    check_fwd(y8, x[:8], w64, None, torch.bfloat16, "m=8")
    assert (y9[:8].float() - y8.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * y8.float().abs().max()


# ------------------------------------------------------------------ GEMV path (M ≤ 8, fp32)
# (m, n, k, block): M = 1 / 4 / 8 select MR; N = 8 and 16 make kw > 1 (intra-CTA split-K over 2..8
# warps) with K = 2048 / 4096; N odd-ish multiples; fp32 with M = 20 (> 8) runs here too.
GEMV_CASES = [(1, 8, 4096, 64), (3, 16, 2048, 128), (8, 40, 256, 256), (20, 64, 128, 32)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=lambda d: str(d)[6:])
def test_gemv_path(fmt, dtype):
    for i, (m, n, k, block) in enumerate(GEMV_CASES):
        if dtype != torch.float32 and m > 8:
            continue  # that is the mma path
        qt, w64 = make(n, k, fmt, block, bool(i % 2 == 0), seed=10 + i)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(i)).to(dtype)
        bias = torch.randn(n).to(dtype) if i != 1 else None
        y = run("random:5", lowbit.linear, x, qt, bias)
        check_fwd(y, x, w64, bias, dtype, f"gemv {fmt} {dtype} m={m} n={n} k={k} block={block}")


def test_gemv_misaligned_x_and_codes():
    """x and codes that are not 16-byte aligned take the scalar-load branches (same result)."""
    qt, w64 = make(32, 64, "int4", 32, False)
    buf = torch.randn(3 * 64 + 1)
    x = buf[1:].view(3, 64)  # 4-byte aligned only
    assert x.data_ptr() % 16
    codes = torch.empty(qt.codes.numel() + 1, dtype=torch.uint8)[1:].view_as(qt.codes)
    codes.copy_(qt.codes)
    y = torch.empty(3, 32)
    sim = lowbit._native.module("sim")
    sim.gemm(x.data_ptr(), y.data_ptr(), 0, 0, 3, 32, 64, codes.data_ptr(), qt.scale.data_ptr(),
             qt.zero.data_ptr(), 0, 0, 0.0, 32, 2)
    check_fwd(y, x, w64, None, torch.float32, "misaligned")
    gy = torch.randn(3, 32)
    gx = torch.empty(3, 64)
    sim.gemm_t(gy.data_ptr(), gx.data_ptr(), 0, 3, 32, 64, codes.data_ptr(), qt.scale.data_ptr(),
               qt.zero.data_ptr(), 0, 0, 0.0, 32, 2)
    check_bwd(gx, gy, w64, torch.float32, "misaligned gemm_t")


# ------------------------------------------------------------------ gemm_t
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=lambda d: str(d)[6:])
def test_gemm_t(fmt, dtype):
    for i, (m, n, k, block) in enumerate([(1, 96, 160, 32), (9, 40, 128, 64), (3, 32, 256, 256)]):
        qt, w64 = make(n, k, fmt, block, bool(i % 2), seed=20 + i)
        gy = torch.randn(m, n, generator=torch.Generator().manual_seed(i)).to(dtype)
        gx = run("reverse", ops.gemm_t, gy, qt)
        check_bwd(gx, gy, w64, dtype, f"gemm_t {fmt} {dtype} m={m} n={n} k={k}")


# ------------------------------------------------------------------ determinism, edge cases
@pytest.mark.parametrize("m,dtype", [(2, torch.float32), (24, torch.bfloat16), (17, torch.float16)])
def test_bit_identical_across_schedules(m, dtype):
    qt, _ = make(96, 256, "int4", 64, True, seed=4)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(dtype)
    gy = torch.randn(m, 96, generator=torch.Generator().manual_seed(m + 1)).to(dtype)
    outs = [(run(s, lowbit.linear, x, qt), run(s, ops.gemm_t, gy, qt))
            for s, th in (("forward", 2), ("reverse", 2), ("random:11", 1))]
    for y, gx in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(gx, outs[0][1])


def test_empty_m_and_bad_params():
    qt, _ = make(32, 64, "nf4", 32, False)
    y = run("forward", lowbit.linear, torch.randn(0, 64), qt)
    assert y.shape == (0, 32)
    sim = lowbit._native.module("sim")
    x, out = torch.randn(1, 64), torch.empty(1, 32)
    with pytest.raises(RuntimeError, match="gemm failed"):  # K not a multiple of the block
        sim.gemm(x.data_ptr(), out.data_ptr(), 0, 0, 1, 32, 48, qt.codes.data_ptr(), qt.scale.data_ptr(), 0, 0, 0,
                 0.0, 32, 0)
    with pytest.raises(RuntimeError, match="gemm failed"):  # int format without zero points
        sim.gemm(x.data_ptr(), out.data_ptr(), 0, 0, 1, 32, 64, qt.codes.data_ptr(), qt.scale.data_ptr(), 0, 0, 0,
                 0.0, 32, 2)
