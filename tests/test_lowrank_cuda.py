"""CUDA lowrank kernels (csrc/kernels/lowrank.cuh + the LrEpi epilogue of csrc/kernels/gemm.cuh) on
the simulator: the tensor-core epilogue (M > 8, bf16 / fp16), the GEMV epilogue, r not a multiple
of 16, xa output, and identical bits under every schedule. tests/test_lowrank.py covers the public
API on every backend with small cases."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import ops

from conftest import assert_close, require_backend


@pytest.fixture(autouse=True)
def _sim():
    require_backend("sim")
    from lowbit import _native

    if not hasattr(_native.module("sim"), "lowrank"):
        pytest.fail("lowbit._sim has no lowrank kernel")


def case(m, n, k, r, fmt, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    with lowbit.use_backend("reference"):
        qt = lowbit.quantize(torch.randn(n, k, generator=g) * 0.05, fmt, 32, seed % 2 == 0)
        w64 = qt.dequantize(torch.float32).double()
    x = torch.randn(m, k, generator=g).to(dtype)
    a = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype)
    b = (torch.randn(n, r, generator=g) / r ** 0.5).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return qt, w64, x, a, b, bias


def fused(qt, x, a, b, s, bias):
    return ops.lowrank_op(x, *ops._weight_args(qt), a, b, s, bias, qt.shape[0], qt.shape[1], qt.block_size, qt.fmt)


# (m, n, k, r, fmt, dtype): M > 8 takes the mma kernel + tensor-core epilogue (r = 5: one padded
# k16 step; r = 20: two, the second partial); M ≤ 8 and fp32 the GEMV epilogue (r = 40 > 32 lanes).
CASES = [(12, 96, 64, 5, "nf4", torch.bfloat16), (20, 64, 96, 20, "int4", torch.float16),
         (9, 32, 64, 16, "fp4", torch.bfloat16), (3, 64, 128, 40, "int2", torch.float16),
         (10, 40, 64, 7, "nf4", torch.float32)]


@pytest.mark.parametrize("m,n,k,r,fmt,dtype", CASES)
def test_lowrank_paths(m, n, k, r, fmt, dtype):
    qt, w64, x, a, b, bias = case(m, n, k, r, fmt, dtype, seed=m)
    with lowbit.use_backend("sim", schedule="random:9", threads=2):
        y, xa = fused(qt, x, a, b, 0.5, bias)
    x64, a64, b64 = x.double(), a.double(), b.double()
    xa64 = x64 @ a64.T
    assert_close(xa, xa64, dtype=dtype, k=k, scale=x64.abs() @ a64.abs().T, name="xa")
    exp = x64 @ w64.T + 0.5 * xa64 @ b64.T + bias.double()
    scale = x64.abs() @ w64.abs().T + 0.5 * (x64.abs() @ a64.abs().T) @ b64.abs().T
    assert_close(y, exp, dtype=dtype, k=k + r, scale=scale, name=f"lowrank {fmt} {dtype} m={m} r={r}")


def test_lowrank_bit_identical_across_schedules():
    qt, _, x, a, b, bias = case(17, 64, 64, 9, "int4", torch.bfloat16, seed=3)
    outs = []
    for sched, th in (("forward", 2), ("reverse", 2), ("random:4", 1)):
        with lowbit.use_backend("sim", schedule=sched, threads=th):
            outs.append(fused(qt, x, a, b, 0.25, bias))
    for y, xa in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(xa, outs[0][1])
