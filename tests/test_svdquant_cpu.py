"""svdquant family on the CPU: every CPU path this machine has (portable, avx2, avx512, avx512bf16, amx,
amx-emulated — csrc/cpu/svdquant*.cpp) against independent references, on shapes that cross the fast
kernels' blocking (the GEMV path for M <= 4, 6-row / 2-row micro-kernels and 32-column panels of the
VNNI / AVX2 path, 32 x 32 AMX tile blocks, 8 / 4-row activation blocks, odd group counts):

- the activation quantizer bit-exact with the reference (codes and scales), ties and non-finite groups included;
- the down-projection within fp32 accumulation error of the float64 product;
- the W4A4 integer sums exact (unit scales, r = 0: y is an integer below 2^24, exact in fp32);
- the whole product within the documented fp32 bound of the float64 product of the same quantized operands;
- non-finite activations confined to their rows; the bits independent of the thread count.
"""

from __future__ import annotations

import pytest
import torch

from conftest import svdq_expected_y, svdq_operands, svdq_rand, svdq_y_tol
from lowbit import _native, ops, reference as ref

pytestmark = pytest.mark.skipif("cpu" not in _native._modules, reason="lowbit._C not built")
_C = _native.module("cpu") if "cpu" in _native._modules else None
PATHS = list(_C.available_cpu_paths()) if _C else []
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MS = [1, 2, 4, 5, 7, 8, 16, 17, 33, 128, 300]


@pytest.fixture(params=PATHS)
def cpu_path(request):
    import lowbit

    old = _C.cpu_path()
    _C.set_cpu_path(request.param)
    try:
        with lowbit.use_backend("cpu"):
            yield request.param
    finally:
        _C.set_cpu_path(old)


def _expected(x, inv, qw, sw, l1, l2, bias, dtype):
    """float64 product of the reference's quantized operands, and the fp32 error bound of the kernels."""
    qx, sx, down = ref.svdquant_act_ref(x, inv, l2)
    exp, bound = svdq_expected_y(qx, sx, qw, sw, down, l1, bias, x.shape[1])
    return exp, svdq_y_tol(exp, bound, x.shape[1], 0 if l1 is None else l1.shape[1], dtype)

# ---------------------------------------------------------------------------- the activation pass
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,r", [(1, 64, 0), (2, 128, 1), (5, 192, 16), (8, 320, 32), (9, 64, 128), (33, 192, 2),
                                   (300, 128, 3)])
def test_act_bit_exact(cpu_path, dtype, m, k, r):
    x, inv, _, _, _, l2, _ = svdq_operands(m, 64, k, r, dtype, seed=m + k + r)
    x[0, :64] = (torch.arange(64) - 31.5).to(dtype)  # amax 31.5 → s = 4.5: v/s hits exact .5 ties (half to even)
    qx, sx, down = ops.svdquant_act(x, None if m == 9 else inv, l2)
    rq, rs, rdown = ref.svdquant_act_ref(x, None if m == 9 else inv, l2)
    assert torch.equal(qx, rq) and torch.equal(sx, rs)
    assert down.shape == (m, r) and down.dtype == torch.float32
    if r:
        xs = x.double() if m == 9 else (x.double() * inv.double()).float().double()
        exp = xs @ l2.double().T
        bound = xs.abs() @ l2.double().abs().T * (k + 4) * 2 ** -24 + 1e-30
        assert ((down.double() - exp).abs() <= bound).all()


def test_act_ties_round_half_even(cpu_path):
    # the group's amax is 7·s with s = 0.5 exactly, so v / s = ±0.5, ±1.5, ±2.5 ... are exact ties
    v = torch.tensor([3.5, -3.5] + [0.25, -0.25, 0.75, -0.75, 1.25, -1.25, 1.75, -1.75, 2.25, -2.25, 2.75, -2.75] * 5
                     + [0.0, 0.0], dtype=torch.float32)[None]
    qx, sx, _ = ops.svdquant_act(v)
    assert sx.item() == 0.5
    assert qx[0, 2:14].tolist() == [0, 0, 2, -2, 2, -2, 4, -4, 4, -4, 6, -6]
    assert torch.equal(qx, ref.svdquant_act_ref(v, None, None)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_act_nonfinite_groups(cpu_path, dtype):
    x = svdq_rand(10, 192, seed=4, dtype=dtype)
    x[1, 3] = float("nan")
    x[2, 100] = float("-inf")
    x[9, 191] = float("inf")
    x[5, 64:128] = 0.0
    l2 = svdq_rand(4, 192, seed=5, dtype=dtype, scale=0.1)
    qx, sx, down = ops.svdquant_act(x, None, l2)
    rq, rs, _ = ref.svdquant_act_ref(x, None, l2)
    assert torch.equal(qx, rq) and torch.equal(sx.isnan(), rs.isnan()) and torch.equal(sx.nan_to_num(), rs.nan_to_num())
    assert sx[1, 0].isnan() and sx[2, 1].isnan() and sx[9, 2].isnan() and sx[5, 1] == 0
    bad = torch.tensor([1, 2, 9])
    assert (~torch.isfinite(down[bad])).all(1).all() and torch.isfinite(down[[0, 3, 4, 5, 6, 7, 8]]).all()


# ---------------------------------------------------------------------------- the W4A4 GEMM
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", [(64, 64), (65, 192), (33, 320), (96, 128)])
def test_gemm_integer_sums_exact(cpu_path, m, n, k):
    if cpu_path == "amx-emulated" and m * n * k > 300 * 65 * 192:
        pytest.skip("the tile emulator is scalar")
    g = torch.Generator().manual_seed(m * n + k)
    qx = torch.randint(-7, 8, (m, k), generator=g, dtype=torch.int8)
    qw = torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)
    qx[0, :64] = 7  # the extremes: |group sum| = 64·49
    qw[0, :64] = 7 if m % 2 else -7
    y = ops.svdquant_gemm(qx, torch.ones(m, k // 64), ref.svdquant_pack_ref(qw), torch.ones(n, k // 64))
    exact = qx.to(torch.int64) @ qw.to(torch.int64).T  # |y| < 2^24: exact in fp32 whatever the order
    assert torch.equal(y, exact.to(torch.float32))


@pytest.mark.parametrize("m", [1, 3, 6, 40])
def test_gemm_group_sums_exact_with_power_of_two_scales(cpu_path, m):
    # scales 2^e per (row, group) and (column, group): every product sx·sw·acc is exact and so is the sum
    # (all terms are integers times 2^-4 well below 2^24), so y equals the float64 value bit for bit
    n, k = 70, 256
    g = torch.Generator().manual_seed(m)
    qx = torch.randint(-7, 8, (m, k), generator=g, dtype=torch.int8)
    qw = torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)
    sx = 2.0 ** torch.randint(-2, 3, (m, k // 64), generator=g).float()
    sw = 2.0 ** torch.randint(-2, 3, (n, k // 64), generator=g).float()
    y = ops.svdquant_gemm(qx, sx, ref.svdquant_pack_ref(qw), sw)
    acc = torch.einsum("mgc,ngc->mng", qx.double().reshape(m, 4, 64), qw.double().reshape(n, 4, 64))
    exp = (sx.double()[:, None] * sw.double()[None] * acc).sum(-1)
    assert torch.equal(y.double(), exp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [0, 1, 2, 7, 8, 17, 33, 128])
@pytest.mark.parametrize("n,k,r", [(64, 64, 0), (65, 192, 1), (33, 320, 16), (96, 128, 32), (40, 64, 128)])
def test_linear_against_float64(cpu_path, dtype, m, n, k, r):
    x, inv, qw, sw, l1, l2, bias = svdq_operands(m, n, k, r, dtype, seed=m + n + r)
    y = ops.svdquant_linear(x, qw, sw, inv, l1, l2, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    exp, tol = _expected(x, inv, qw, sw, l1, l2, bias, dtype)
    assert ((y.double() - exp).abs() <= tol).all()


@pytest.mark.parametrize("m", [300])
def test_linear_many_rows(cpu_path, m):
    if cpu_path == "amx-emulated":
        pytest.skip("the tile emulator is scalar: covered by the smaller shapes")
    x, inv, qw, sw, l1, l2, bias = svdq_operands(m, 100, 448, 32, torch.bfloat16, seed=11)
    y = ops.svdquant_linear(x, qw, sw, inv, l1, l2, bias)
    exp, tol = _expected(x, inv, qw, sw, l1, l2, bias, torch.bfloat16)
    assert ((y.double() - exp).abs() <= tol).all()


@pytest.mark.parametrize("m", [1, 3, 9, 40])
def test_nonfinite_activation_stays_in_its_row(cpu_path, m):
    x, inv, qw, sw, l1, l2, bias = svdq_operands(m, 70, 192, 4, torch.float32, seed=m)
    bad = [0, m - 1] if m > 1 else [0]
    x[bad[0], 7] = float("nan")
    x[bad[-1], 130] = float("inf")
    y = ops.svdquant_linear(x, qw, sw, inv, l1, l2, bias)
    good = [i for i in range(m) if i not in bad]
    assert y[bad].isnan().all() and torch.isfinite(y[good]).all()


def test_bits_independent_of_thread_count(cpu_path):
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for m in (1, 3, 37):
                x, inv, qw, sw, l1, l2, bias = svdq_operands(m, 200, 320, 16, torch.float32, seed=m)
                qx, sx, down = ops.svdquant_act(x, inv, l2)
                outs.append((threads, m, qx, sx, down, ops.svdquant_gemm(qx, sx, qw, sw, down, l1, bias)))
    finally:
        torch.set_num_threads(old)
    first = {o[1]: o for o in outs if o[0] == 1}
    for o in outs:
        f = first[o[1]]
        assert all(torch.equal(a, b) for a, b in zip(o[2:], f[2:])), (o[0], o[1])


def test_paths_agree_with_portable_within_bound():
    """The fast paths and the simplest correct kernel compute one formula: same codes, y within the bound."""
    x, inv, qw, sw, l1, l2, bias = svdq_operands(19, 130, 384, 8, torch.float32, seed=3)
    exp, tol = _expected(x, inv, qw, sw, l1, l2, bias, torch.float32)
    old = _C.cpu_path()
    try:
        for p in PATHS:
            _C.set_cpu_path(p)
            qx, sx, down = ops.svdquant_act(x, inv, l2)
            assert torch.equal(qx, ref.svdquant_act_ref(x, inv, l2)[0]), p
            y = ops.svdquant_gemm(qx, sx, qw, sw, down, l1, bias)
            assert ((y.double() - exp).abs() <= tol).all(), p
    finally:
        _C.set_cpu_path(old)
