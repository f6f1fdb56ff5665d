"""CUDA lowrank kernels (csrc/kernels/lowrank.cuh + the LrEpi branch of csrc/kernels/gemm.cuh) on
the simulator: the mma kernel with the down-projection fused into its main loop (M > 8, bf16 / fp16,
r ≤ 64: RP = 16 / 32 / 64, several row blocks and column tiles, K not a multiple of the k-tile), the
two-launch paths (GEMV, r > 64, misaligned A), the tensor-core and GEMV epilogues, r not a multiple
of 16, the xa output, and identical bits under every schedule. tests/test_lowrank.py covers the
public API on every backend with small cases."""

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
    return ops.lowrank_op(x, *ops.weight_args(qt), a, b, s, bias, qt.shape[0], qt.shape[1], qt.block_size, qt.fmt)


# (m, n, k, r, fmt, dtype): M > 8 takes the mma kernel with the fused down-projection + tensor-core
# epilogue (r = 5: RP = 16, one padded k16 step; r = 20: RP = 32, two k16 steps, the second partial;
# r = 64: RP = 64 with the shared-memory opt-in, 2 row blocks × 3 column tiles, K = 96 ends in a
# half k-tile; r = 100 > 64: separate down-projection launch + mma epilogue); M ≤ 8 and fp32 the
# GEMV epilogue (r = 40 > 32 lanes).
CASES = [(12, 96, 64, 5, "nf4", torch.bfloat16), (20, 64, 96, 20, "int4", torch.float16),
         (9, 32, 64, 16, "fp4", torch.bfloat16), (70, 136, 96, 64, "nf4", torch.bfloat16),
         (40, 72, 128, 32, "fp4", torch.float16), (66, 64, 64, 48, "int2", torch.bfloat16),
         (33, 64, 64, 100, "int4", torch.bfloat16), (3, 64, 128, 40, "int2", torch.float16),
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


def launches(qt, x, a, b, bias):
    from lowbit import _native

    sim = _native.module("sim")
    with lowbit.use_backend("sim", schedule="forward", threads=2):
        sim.reset_stats()
        out = fused(qt, x, a, b, 0.5, bias)
        return int(sim.stats()["launches"]), out


@pytest.mark.parametrize("m,r,dtype,want", [(12, 16, torch.bfloat16, 1), (40, 64, torch.float16, 1),
                                            (40, 65, torch.bfloat16, 2), (8, 16, torch.bfloat16, 2),
                                            (12, 16, torch.float32, 2)])
def test_lowrank_launches(m, r, dtype, want):
    """The mma path (M > 8, bf16/fp16) with r ≤ 64 is one launch (down-projection fused into the main
    loop); the GEMV (M ≤ 8, fp32 x) and r > 64 run the separate down-projection kernel first."""
    qt, w64, x, a, b, bias = case(m, 64, 64, r, "nf4", dtype, seed=r)
    n, (y, xa) = launches(qt, x, a, b, bias)
    assert n == want
    x64, a64 = x.double(), a.double()
    assert_close(xa, x64 @ a64.T, dtype=dtype, k=64, scale=x64.abs() @ a64.abs().T, name="xa")


def test_lowrank_misaligned_a_takes_two_launches():
    """A not 16-byte aligned cannot be streamed by cp.async: the separate down-projection runs, and
    the result still matches the reference."""
    qt, w64, x, a, b, bias = case(24, 64, 64, 12, "int4", torch.bfloat16, seed=5)
    buf = torch.empty(a.numel() + 1, dtype=a.dtype)
    a_odd = buf[1:].view(a.shape)
    a_odd.copy_(a)
    assert a_odd.data_ptr() % 16 != 0
    n, (y, xa) = launches(qt, x, a_odd, b, bias)
    assert n == 2
    _, (y0, xa0) = launches(qt, x, a, b, bias)
    x64, a64, b64 = x.double(), a.double(), b.double()
    exp = x64 @ w64.T + 0.5 * (x64 @ a64.T) @ b64.T + bias.double()
    scale = x64.abs() @ w64.abs().T + 0.5 * (x64.abs() @ a64.abs().T) @ b64.abs().T
    for yy in (y, y0):
        assert_close(yy, exp, dtype=torch.bfloat16, k=64 + 12, scale=scale, name="misaligned A")


def test_lowrank_fused_bit_identical_across_schedules():
    """RP = 64, 2 row blocks × 3 column tiles: xa is stored by the first column tile of each row
    block and every CTA uses its own copy — the bits must not depend on the schedule."""
    qt, _, x, a, b, bias = case(80, 150, 128, 50, "nf4", torch.float16, seed=7)
    outs = []
    for sched, th in (("forward", 2), ("reverse", 2), ("random:11", 2), ("random:3", 1)):
        with lowbit.use_backend("sim", schedule=sched, threads=th):
            outs.append(fused(qt, x, a, b, -0.75, bias))
    for y, xa in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(xa, outs[0][1])
