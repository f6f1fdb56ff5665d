"""svdquant's fast CUDA kernels on the simulator (csrc/kernels/svdquant_mma.cuh), against the spec and
against the simplest correct CUDA kernels (csrc/kernels/svdquant.cuh, forced with
``_sim.svdquant_kernels("reference")``).

- svdq_act_fused_kernel: codes and scales bit-exact with ``reference.svdquant_act_ref``; the fused
  down-projection within fp32 accumulation error of float64; every rank class of the kernel (JI = 0, 1,
  2, 4, 8 accumulators per lane: r = 0, 1..32, 33..64, 65..128, 129..256);
- svdq_gemm_mma_kernel (mma.m16n8k32 .s8, 64 × 128 CTA tiles, one 64-group per K step): the integer
  sums exact (unit scales, full int8 / int4 ranges), the whole output within the fp32 bound of the
  float64 product of the same quantized operands, M from 0 to 300 (across the 64-row tiles and the
  act kernel's 8-row blocks), N and K odd multiples of 64 (partial 128-column tiles), all dtypes;
- non-finite activations poison exactly their own rows; identical bits under every schedule; operands
  the tensor-core path cannot stream (not 16-byte aligned) fall back to the reference kernel.
Shapes stay small: the simulator runs ~1 M threads/s on this project's 2-core machines.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import lowbit
from lowbit import ops, reference as ref

from conftest import require_backend, svdq_expected_y, svdq_operands, svdq_rand, svdq_y_tol

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCHEDULES = ["forward", "reverse", "random:3"]


@pytest.fixture(autouse=True)
def _sim_module():
    require_backend("sim")
    from lowbit import _native

    mod = _native.module("sim")
    if not hasattr(mod, "svdquant_kernels"):
        pytest.fail("lowbit._sim has no svdquant_kernels switch")
    assert mod.svdquant_kernels("fast") == "fast"
    yield mod
    mod.svdquant_kernels("fast")


@contextlib.contextmanager
def kernels(which: str, schedule: str = "forward"):
    from lowbit import _native

    mod = _native.module("sim")
    prev = mod.svdquant_kernels(which)
    try:
        with lowbit.use_backend("sim", schedule=schedule, threads=2):
            yield
    finally:
        mod.svdquant_kernels(prev)


def _down_bound_ok(down, x, inv, l2):
    exp = (x.double() * inv.double()).float().double() @ l2.double().T
    bound = (x.double().abs() * inv.double()) @ l2.double().abs().T * x.shape[1] * 2.0 ** -23 + 1e-30
    return bool(((down.double() - exp).abs() <= bound).all())


def _assert_y(y, exp, bound, k, r, dtype):
    tol = svdq_y_tol(exp, bound, k, r, dtype)
    err = (y.double() - exp).abs()
    assert (err <= tol).all(), f"max err {float(err.max()):.3g}, worst ratio {float((err / tol).max()):.3g}"

# ---------------------------------------------------------------------------- switch
def test_kernel_switch(_sim_module):
    assert _sim_module.svdquant_kernels("reference") == "fast"
    assert _sim_module.svdquant_kernels("fast") == "reference"
    with pytest.raises(ValueError, match="which='both'"):
        _sim_module.svdquant_kernels("both")


# ---------------------------------------------------------------------------- the activation pass
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("m,k,r", [(1, 64, 0), (2, 192, 1), (7, 320, 16), (17, 64, 32), (33, 192, 33),
                                   (16, 128, 128), (9, 64, 200), (300, 64, 0)])
def test_act_fused_bit_exact_codes(dtype, m, k, r):
    x, inv, _, _, _, l2, _ = svdq_operands(m, 64, k, r, dtype, seed=m + r, outliers=True)
    with kernels("fast", SCHEDULES[(m + r) % 3]):
        qx, sx, down = ops.svdquant_act(x, inv, l2)
    rq, rs, _ = ref.svdquant_act_ref(x, inv, l2)
    assert torch.equal(qx, rq) and torch.equal(sx, rs)
    assert down.shape == (m, r) and down.dtype == torch.float32
    if r:
        assert _down_bound_ok(down, x, inv, l2)


def test_act_fused_without_smoothing_and_nonfinite_groups():
    x = svdq_rand(19, 192, seed=4)
    x[3, 7] = float("nan")       # group 0 of row 3
    x[11, 130] = float("-inf")   # group 2 of row 11 (second 8-row block)
    x[18, 64:128] = 0.0          # a zero group: s = 0, q = 0
    l2 = svdq_rand(40, 192, seed=5, scale=0.1)
    with kernels("fast", "random:9"):
        qx, sx, down = ops.svdquant_act(x, None, l2)
    rq, rs = ref.svdquant_quantize_ref(x)
    assert torch.equal(qx, rq) and torch.equal(sx.isnan(), rs.isnan()) and torch.equal(sx.nan_to_num(), rs.nan_to_num())
    assert sx[3, 0].isnan() and sx[11, 2].isnan() and sx[18, 1] == 0 and int(sx.isnan().sum()) == 2
    assert down[3].isnan().all() and not torch.isfinite(down[11]).any()  # NaN row; inf row: ±inf or NaN
    ok = [i for i in range(19) if i not in (3, 11)]
    assert _down_bound_ok(down[ok], x[ok], torch.ones(192), l2)


# ---------------------------------------------------------------------------- the W4A4 GEMM
@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (2, 192, 320), (7, 320, 192), (16, 64, 448), (17, 192, 64),
                                   (33, 128, 192), (128, 64, 64), (300, 192, 64)])
def test_gemm_integer_sums_exact(m, n, k):
    # Unit scales, r = 0: y is the integer sum, exact in fp32 (|y| ≤ 448 · 128 · 8 < 2^24), over the full
    # int8 range of qx and the full int4 range of the weight (the mma sees all of it).
    g = torch.Generator().manual_seed(m + n + k)
    qx = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int16).to(torch.int8)
    qw = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    with kernels("fast", SCHEDULES[m % 3]):
        y = ops.svdquant_gemm(qx, torch.ones(m, k // 64), ref.svdquant_pack_ref(qw), torch.ones(n, k // 64))
    exact = qx.to(torch.int64) @ qw.to(torch.int64).T
    assert torch.equal(y, exact.to(torch.float32))


CASES = [(0, 64, 64, 4), (1, 64, 128, 0), (2, 192, 320, 1), (7, 64, 192, 16), (16, 320, 64, 32),
         (17, 192, 192, 16), (33, 64, 64, 128), (128, 192, 64, 32), (300, 64, 128, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("m,n,k,r", CASES)
def test_linear_against_float64(dtype, m, n, k, r):
    x, inv, qw, sw, l1, l2, bias = svdq_operands(m, n, k, r, dtype, seed=n + r + m, outliers=True)
    with kernels("fast", SCHEDULES[(m + n) % 3]):
        y = ops.svdquant_linear(x, qw, sw, inv, l1, l2, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    qx, sx, down = ref.svdquant_act_ref(x, inv, l2)
    exp, bound = svdq_expected_y(qx, sx, qw, sw, down, l1, bias, k)
    _assert_y(y, exp, bound, k, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
def test_fast_and_reference_kernels_agree(dtype):
    # The same quantized operands through both CUDA GEMMs: each within the fp32 bound of float64, so
    # within twice it of each other; no bias, so the up-projection is tested alone with the groups.
    m, n, k, r = 40, 192, 192, 32
    x, inv, qw, sw, l1, l2, _ = svdq_operands(m, n, k, r, dtype, seed=8, outliers=True)
    qx, sx, down = ref.svdquant_act_ref(x, inv, l2)
    with kernels("fast", "reverse"):
        y_fast = ops.svdquant_gemm(qx, sx, qw, sw, down, l1, None, dtype)
    with kernels("reference"):
        y_ref = ops.svdquant_gemm(qx, sx, qw, sw, down, l1, None, dtype)
    exp, bound = svdq_expected_y(qx, sx, qw, sw, down, l1, None, k)
    _assert_y(y_fast, exp, bound, k, r, dtype)
    _assert_y(y_ref, exp, bound, k, r, dtype)


def test_nonfinite_activations_stay_in_their_rows():
    m, n, k, r = 70, 192, 128, 16  # rows in both 64-row tiles and several 8-row act blocks
    x, inv, qw, sw, l1, l2, bias = svdq_operands(m, n, k, r, torch.bfloat16, seed=2, outliers=True)
    bad = [0, 9, 63, 64, 69]
    x[0, 3] = float("nan")
    x[9, 100] = float("inf")
    x[63, 64] = float("-inf")
    x[64, 0] = float("nan")
    x[69, 127] = float("inf")
    with kernels("fast", "random:5"):
        y = ops.svdquant_linear(x, qw, sw, inv, l1, l2, bias)
    good = [i for i in range(m) if i not in bad]
    assert y[bad].isnan().all() and torch.isfinite(y[good]).all()
    qx, sx, down = ref.svdquant_act_ref(x[good], inv, l2)
    exp, bound = svdq_expected_y(qx, sx, qw, sw, down, l1, bias, k)
    _assert_y(y[good], exp, bound, k, r, torch.bfloat16)


def test_same_bits_under_every_schedule():
    x, inv, qw, sw, l1, l2, bias = svdq_operands(33, 192, 192, 40, torch.float16, seed=6, outliers=True)
    outs = []
    for schedule in ["forward", "reverse", "random:1", "random:2"]:
        with kernels("fast", schedule):
            qx, sx, down = ops.svdquant_act(x, inv, l2)
            outs.append((qx, sx, down, ops.svdquant_gemm(qx, sx, qw, sw, down, l1, bias, torch.float16)))
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o, outs[0]))


def test_unaligned_operands_fall_back_to_the_reference_kernel():
    # qx one byte off a 16-byte boundary (contiguous, so ops.py hands it over as it is): cp.async cannot
    # stream it, the launcher runs svdq_gemm_kernel — the same bits as forcing the reference kernels.
    m, n, k, r = 9, 64, 128, 8
    x, inv, qw, sw, l1, l2, bias = svdq_operands(m, n, k, r, torch.float32, seed=3, outliers=True)
    qx, sx, down = ref.svdquant_act_ref(x, inv, l2)
    buf = torch.empty(m * k + 1, dtype=torch.int8)
    qx_off = buf[1:].view(m, k)
    qx_off.copy_(qx)
    assert qx_off.data_ptr() % 16 != 0 and qx_off.is_contiguous()
    with kernels("fast"):
        y_off = ops.svdquant_gemm(qx_off, sx, qw, sw, down, l1, bias)
    with kernels("reference"):
        y_ref = ops.svdquant_gemm(qx, sx, qw, sw, down, l1, bias)
    assert torch.equal(y_off, y_ref)
