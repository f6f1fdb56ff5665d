"""svdquant family (W4A4 + low-rank branch): the kernels on every backend against independent references.
`kernel_backend` runs each kernel test on the CPU kernels (the machine's path and `portable`) and on the
CUDA kernels on the simt simulator under four schedules (`sim-forward`, `sim-reverse`, `sim-random7`,
`sim-random123`: the fast kernels of csrc/kernels/svdquant_mma.cuh; tests/test_svdquant_mma.py also forces
the simplest ones of svdquant.cuh).

- the 4-bit quantizer: the reference against a float64 re-derivation of the rule (numpy rounding), and
  every kernel bit-exact against the reference (codes and scales);
- the W4A4 integer sums: exact, with unit scales (y is then an integer sum, exact in fp32);
- the whole product: within fp32 accumulation error of the float64 product of the same quantized
  operands (+ branch + bias);
- M = 0 and 1, odd multiples of 64, r in {0, 1, 16, 128}, all dtypes, non-finite rows, bad input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import svdq_expected_y, svdq_operands, svdq_rand, svdq_y_tol
from lowbit import ops, reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _quantize_np(v: np.ndarray):
    """The rule of include/lowbit/svdquant.h re-derived with numpy in float32 (independent of torch)."""
    r, k = v.shape
    g = v.astype(np.float32).reshape(r, k // 64, 64)
    finite = np.isfinite(g).all(-1)
    amax = np.where(finite, np.abs(np.where(np.isfinite(g), g, 0)).max(-1), np.float32(0)).astype(np.float32)
    s = (amax / np.float32(7)).astype(np.float32)
    q = np.zeros_like(g, dtype=np.int8)
    live = finite & (s != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.rint((g / s[..., None]).astype(np.float32))
    q[live] = np.clip(t[live], -7, 7).astype(np.int8)
    return q.reshape(r, k), np.where(finite, s, np.float32(np.nan))


# ---------------------------------------------------------------------------- the quantizer
def test_reference_quantizer_matches_the_rule():
    v = svdq_rand(9, 256, seed=3)
    v[1, :64] = 0.0                       # a zero group
    v[2, 5] = float("inf")                # a non-finite group
    v[3, 70] = float("nan")
    v[4, :64] = torch.linspace(-3.5, 3.5, 64)  # ties at .5 steps: half to even
    q, s = ref.svdquant_quantize_ref(v)
    q_np, s_np = _quantize_np(v.numpy())
    assert np.array_equal(q.numpy(), q_np)
    assert np.array_equal(s.numpy(), s_np, equal_nan=True)
    assert q.abs().max() <= 7 and torch.isnan(s[2, 0]) and torch.isnan(s[3, 1]) and s[1, 0] == 0
    # |v - s·q| <= s/2 wherever the group is finite
    err = (v.reshape(9, 4, 64) - s[..., None] * q.reshape(9, 4, 64).float()).abs()
    fin = torch.isfinite(s)
    assert (err[fin] <= s[fin][..., None] / 2 * (1 + 1e-6)).all()


def test_pack_round_trip():
    q = torch.randint(-8, 8, (5, 128), dtype=torch.int8)
    packed = ref.svdquant_pack_ref(q)
    assert packed.shape == (5, 64) and packed.dtype == torch.uint8
    assert torch.equal(ref.svdquant_unpack_ref(packed), q)
    # element 0 in the high nibble, two's complement
    assert packed[0, 0].item() == ((int(q[0, 0]) & 0xF) << 4) | (int(q[0, 1]) & 0xF)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,r", [(1, 64, 0), (3, 192, 1), (17, 320, 16), (5, 64, 128)])
def test_act_bit_exact(kernel_backend, dtype, m, k, r):
    x, inv, _, _, _, l2, _ = svdq_operands(m, 64, k, r, dtype, seed=m + k)
    qx, sx, down = ops.svdquant_act(x, inv, l2)
    rq, rs, rdown = ref.svdquant_act_ref(x, inv, l2)
    assert torch.equal(qx, rq) and torch.equal(sx, rs)
    assert down.shape == (m, r) and down.dtype == torch.float32
    if r:
        exp = (x.double() * inv.double()).float().double() @ l2.double().T
        bound = (x.double().abs() * inv.double()) @ l2.double().abs().T * k * 2 ** -23 + 1e-30
        assert ((down.double() - exp).abs() <= bound).all()


def test_act_without_smoothing_and_nonfinite_rows(kernel_backend):
    x = svdq_rand(4, 128, seed=1)
    x[1, 3] = float("nan")
    x[2, 100] = float("-inf")
    qx, sx, _ = ops.svdquant_act(x)
    rq, rs = ref.svdquant_quantize_ref(x)
    assert torch.equal(qx, rq) and torch.equal(sx.isnan(), rs.isnan()) and torch.equal(sx.nan_to_num(), rs.nan_to_num())
    assert sx[1, 0].isnan() and not sx[1, 1].isnan() and sx[2, 1].isnan() and torch.isfinite(sx[[0, 3]]).all()


# ---------------------------------------------------------------------------- the W4A4 GEMM
@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (7, 192, 320), (33, 65, 192)])
def test_gemm_integer_sums_exact(kernel_backend, m, n, k):
    g = torch.Generator().manual_seed(m * n)
    qx = torch.randint(-7, 8, (m, k), generator=g, dtype=torch.int8)
    qw = torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)
    ones_x, ones_w = torch.ones(m, k // 64), torch.ones(n, k // 64)
    y = ops.svdquant_gemm(qx, ones_x, ref.svdquant_pack_ref(qw), ones_w)
    exact = qx.to(torch.int64) @ qw.to(torch.int64).T  # |y| < 2^24: exact in fp32
    assert torch.equal(y, exact.to(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,r", [(0, 64, 64, 4), (1, 64, 128, 0), (2, 192, 320, 1), (17, 130, 192, 16),
                                     (33, 64, 64, 128)])
def test_linear_against_float64(kernel_backend, dtype, m, n, k, r):
    x, inv, qw, sw, l1, l2, bias = svdq_operands(m, n, k, r, dtype, seed=n + r)
    y = ops.svdquant_linear(x, qw, sw, inv, l1, l2, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    qx, sx, down = ref.svdquant_act_ref(x, inv, l2)
    exp, bound = svdq_expected_y(qx, sx, qw, sw, down, l1, bias, k)
    assert ((y.double() - exp).abs() <= svdq_y_tol(exp, bound, k, r, dtype)).all()


def test_nonfinite_activation_stays_in_its_row(kernel_backend):
    x, inv, qw, sw, l1, l2, bias = svdq_operands(5, 64, 128, 4, torch.float32)
    x[2, 7] = float("nan")
    x[4, 70] = float("inf")
    y = ops.svdquant_linear(x, qw, sw, inv, l1, l2, bias)
    assert y[[2, 4]].isnan().all() and torch.isfinite(y[[0, 1, 3]]).all()


# ---------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    x, inv, qw, sw, l1, l2, bias = svdq_operands(3, 64, 128, 4, torch.float32)
    with pytest.raises(ValueError, match="K=96"):
        ops.svdquant_act(torch.zeros(2, 96))
    with pytest.raises(ValueError, match="rank r=257"):
        ops.svdquant_act(x, inv, torch.zeros(257, 128))
    with pytest.raises(ValueError, match="inv_smooth"):
        ops.svdquant_act(x, torch.ones(64), l2)
    with pytest.raises(TypeError, match="l2.dtype"):
        ops.svdquant_act(x, inv, l2.double())
    with pytest.raises(ValueError, match="K=128, the weight K=256|do not hold"):
        ops.svdquant_linear(x, torch.zeros(64, 128, dtype=torch.uint8), torch.ones(64, 3))
    with pytest.raises(ValueError, match="l1 and l2"):
        ops.svdquant_linear(x, qw, sw, inv, l1, None)
    with pytest.raises(ValueError, match="disagree on the rank"):
        ops.svdquant_linear(x, qw, sw, inv, l1, l2[:3])
    with pytest.raises(TypeError, match="qx.dtype"):
        ops.svdquant_gemm(torch.zeros(2, 128), torch.ones(2, 2), qw, sw)
    with pytest.raises(ValueError, match="bias"):
        ops.svdquant_gemm(torch.zeros(2, 128, dtype=torch.int8), torch.ones(2, 2), qw, sw, bias=torch.zeros(3))
