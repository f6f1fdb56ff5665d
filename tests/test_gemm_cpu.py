"""CPU gemm / gemm_t kernels (lowbit._C) against a dense fp64 product on the dequantized weight.

Self-contained (talks to lowbit._C directly): only accumulation error remains, so the tolerance
follows from the precision of each path (docs/kernels.md, "CPU gemm"):

  |y - y_ref| <= c * (2^-24 * sqrt(k) * ||x∘w||  +  EPS_I16 * ||xg∘w||)  +  eps(dtype) * |y_ref|

where ||x∘w|| = sqrt(Σ_k x_k² w_k²) per output (fp32 accumulation, random-walk growth), xg is |x|
replaced by the max of its group of 32 (the int16 activation quantization of the small-M path is
relative to that max), and eps(dtype) covers the final rounding of the output.
"""
import math

import pytest
import torch

_C = pytest.importorskip("lowbit._C")
from lowbit import reference as ref  # noqa: E402  (the double-quant rule's one home)
from conftest import BF16_ROUTES  # noqa: E402

FMT = {"nf4": 0, "fp4": 1, "int4": 2, "int2": 3}
DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# Small-M path: activations int16 per group of 32 (half a step: 0.5/16383 of the group max) and
# the NF4 table as int16/16384 (max error 2.6e-5 of the block absmax). Other paths: 0.
EPS_I16 = 0.5 / 16383 + 2.6e-5
# The int16 tile kernel (M > 8 on the 'avx512' path): x per group of 32 with QX = 8191 (nf4),
# 16383 (fp4), 32767 (int4/int2); nf4 weights as round(T·8192) (0.5/8192 of the block absmax).
EPS_TILE16 = {"nf4": 0.5 / 8191 + 0.5 / 8192, "fp4": 0.5 / 16383, "int4": 0.5 / 32767, "int2": 0.5 / 32767}


ENGINE_ROUTES = tuple(r for r in BF16_ROUTES if r != "tile_f32_bf16w")  # round s·xa to bf16 in the lowrank branch


def eps_i16(fmt, m, dtype=torch.float32, transposed=False):
    """The int16 error term of the kernel that runs for M = m on the current CPU path and policy (the
    GEMV in passes of 8 rows up to M = 24, the tile kernels above; 0 for the fp32 and bf16 routes)."""
    route = _C.gemm_route(DT[dtype], m, transposed, FMT[fmt])
    return EPS_TILE16[fmt] if route == "tile_i16" else (EPS_I16 if route == "gemv_i16" else 0.0)


def w_ref(qw, dtype, m, transposed=False):
    """The weight the kernel multiplies: dequant(W), or dequant(W) rounded to bf16 on the bf16 routes
    (torch's bf16 matmul semantics: csrc/cpu/gemm_bf16.h)."""
    route = _C.gemm_route(DT[dtype], m, transposed, FMT[qw.fmt])
    return qw.w_hat.to(torch.bfloat16).float() if route in BF16_ROUTES else qw.w_hat


def _available_paths():
    """The CPU paths this machine and build can run: 'avx512' (the AVX2 kernels plus the AVX-512
    VNNI build of the small-M GEMV), 'avx2', 'portable'."""
    old, out = _C.cpu_path(), []
    for p in ("avx512", "avx2", "portable"):
        try:
            _C.set_cpu_path(p)
            out.append(p)
        except ValueError:
            pass
    _C.set_cpu_path(old)
    return out


PATHS = _available_paths()


@pytest.fixture(params=PATHS)
def path(request):
    old = _C.cpu_path()
    _C.set_cpu_path(request.param)
    yield request.param
    _C.set_cpu_path(old)


class QW:
    """A quantized (n, k) weight in the canonical layout, built with lowbit._C.quantize."""

    def __init__(self, n, k, fmt, block, double_quant, seed=0, outliers=True):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=g) * 0.05
        if outliers:
            w[:, :: max(1, k // 7)] *= 8.0  # a few outlier columns
        bits = 2 if fmt == "int2" else 4
        nb = n * k // block
        self.n, self.k, self.fmt, self.block = n, k, fmt, block
        self.codes = torch.empty(n * k * bits // 8, dtype=torch.uint8)
        scale = torch.empty(nb)
        self.zero = torch.empty(nb) if fmt.startswith("int") else None
        _C.quantize(w.data_ptr(), 0, n * k, block, FMT[fmt], self.codes.data_ptr(), scale.data_ptr(), _ptr(self.zero))
        if double_quant:
            self.scale_q, self.scale_nested, offset = ref.double_quant_ref(scale, _quantize8)
            self.scale_offset = float(offset)
            self.scale = None
        else:
            self.scale, self.scale_q, self.scale_nested, self.scale_offset = scale, None, None, 0.0
        self.w_hat = torch.empty(n, k)
        _C.dequantize(self.codes.data_ptr(), _ptr(self.scale), _ptr(self.zero), _ptr(self.scale_q),
                      _ptr(self.scale_nested), self.scale_offset, self.w_hat.data_ptr(), 0, n * k, block, FMT[fmt])
        # per weight, the absmax of its block (the scale the nf4 table image is relative to)
        self.block_absmax = self.w_hat.abs().reshape(n, k // block, block).amax(-1, keepdim=True) \
            .expand(n, k // block, block).reshape(n, k)

    def args(self):
        return (self.codes.data_ptr(), _ptr(self.scale), _ptr(self.zero), _ptr(self.scale_q),
                _ptr(self.scale_nested), self.scale_offset, self.block, FMT[self.fmt])


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _quantize8(x, block, signed, offset):
    """lowbit._C.quantize8 with the reference's signature (for ref.double_quant_ref)."""
    q = torch.empty(x.numel(), dtype=torch.uint8)
    absmax = torch.empty(-(-x.numel() // block))
    _C.quantize8(x.data_ptr(), x.numel(), block, signed, offset, q.data_ptr(), absmax.data_ptr())
    return q, absmax


def gemm(x, qw, bias=None):
    m = x.shape[0]
    y = torch.full((m, qw.n), float("nan"), dtype=x.dtype)
    _C.gemm(x.data_ptr(), y.data_ptr(), _ptr(bias), DT[x.dtype], m, qw.n, qw.k, *qw.args())
    return y


def gemm_t(gy, qw):
    m = gy.shape[0]
    gx = torch.full((m, qw.k), float("nan"), dtype=gy.dtype)
    _C.gemm_t(gy.data_ptr(), gx.data_ptr(), DT[gy.dtype], m, qw.n, qw.k, *qw.args())
    return gx


def group_max(a, group=32):
    """|a| with every entry replaced by the max |a| of its group of `group` along the last dim."""
    m, k = a.shape
    g = a.abs().reshape(m, k // group, group).amax(-1, keepdim=True)
    return g.expand(m, k // group, group).reshape(m, k)


def check(out, ref, x, w, k, dtype, xg=None, worst_case=False, eps16=EPS_I16, wabs=None):
    """worst_case: same-sign data, where rounding errors add up linearly (bound k·2^-24·Σ|x||w|).
    eps16: the int16 term of the path (eps_i16). wabs: for nf4, each weight's block absmax
    (QW.block_absmax): the int16 table image rounds relative to it, not to |w|, so blocks with an
    outlier add eps16 · ||x∘absmax|| (worst case eps16 · |x|·absmax)."""
    x, w = x.double(), w.double()
    xg = x.abs() if xg is None else xg.double()
    if worst_case:
        tol = (k * 2.0**-24 + eps16) * (xg @ w.abs().T)
        if wabs is not None:
            tol = tol + eps16 * (x.abs() @ wabs.double().T)
    else:
        norm = (x * x) @ (w * w).T
        norm_g = (xg * xg) @ (w * w).T
        tol = 4 * (2.0**-24 * math.sqrt(k) * norm.sqrt() + eps16 * norm_g.sqrt())
        if wabs is not None:
            tol = tol + 4 * eps16 * ((x * x) @ (wabs.double() ** 2).T).sqrt()
    tol = tol + EPS[dtype] * ref.abs() + 1e-30
    err = (out.double() - ref).abs()
    bad = ~(err <= tol)  # NaN counts as bad
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outside tolerance; worst err/tol {float((err / tol).max()):.3g}"


def run_gemm(m, n, k, fmt, block, dq, dtype, with_bias, seed=0):
    qw = QW(n, k, fmt, block, dq, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype) if with_bias else None
    y = gemm(x, qw, bias)
    wr = w_ref(qw, dtype, m)
    ref = x.double() @ wr.double().T
    if bias is not None:
        ref += bias.double()
    check(y, ref, x, wr, k, dtype, group_max(x.float()), eps16=eps_i16(fmt, m, dtype),
          wabs=qw.block_absmax if fmt == "nf4" else None)


def run_gemm_t(m, n, k, fmt, block, dq, dtype, seed=0):
    qw = QW(n, k, fmt, block, dq, seed)
    gy = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 2)).to(dtype)
    gx = gemm_t(gy, qw)
    wr = w_ref(qw, dtype, m, transposed=True)
    ref = gy.double() @ wr.double()
    if _C.gemm_route(DT[dtype], m, True) == "tile_i16" and n % 32 == 0:
        # int16 gemm_t: gy·s (the block scales folded in) quantized per row and group of 32 n, so an
        # element's error follows the group max of |gy·s|, not |gy|: bounded in max norm (docs:
        # measured max |err| / max |ref| ≤ 1.6e-4 for nf4), plus the output rounding.
        err = (gx.double() - ref).abs()
        tol = 4 * EPS_TILE16[fmt] * ref.abs().max() + EPS[dtype] * ref.abs()
        assert not (~(err <= tol)).any(), f"worst err/tol {float((err / tol).max()):.3g}"
        return
    check(gx, ref, gy, wr.T, n, dtype)


# ---------------------------------------------------------------- every format / block / dq / path
@pytest.mark.parametrize("fmt", list(FMT))
@pytest.mark.parametrize("block", [32, 64, 128, 256])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("m", [1, 3, 33])
def test_gemm_formats(path, fmt, block, dq, m):
    run_gemm(m, 3 * block, 5 * block, fmt, block, dq, torch.float32, with_bias=True, seed=block + m)


@pytest.mark.parametrize("fmt", list(FMT))
@pytest.mark.parametrize("block", [32, 64, 128, 256])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("m", [7, 33])  # 33: the int16 gemm_t on the 'avx512' path
def test_gemm_t_formats(path, fmt, block, dq, m):
    run_gemm_t(m, 3 * block, 5 * block, fmt, block, dq, torch.float32, seed=block + m)


# ---------------------------------------------------------------- shapes (edge cases of the tiling)
SHAPES_NK = [(32, 32), (96, 32), (160, 4096), (96, 4000), (224, 1120), (200, 64), (33, 96)]
# K=4000, 1120: not multiples of 256 / 64; N = 200, 33: not multiples of the int16 gemm_t's group of 32 n


@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 16, 33, 128])
@pytest.mark.parametrize("n,k", SHAPES_NK)
@pytest.mark.parametrize("fmt", ["nf4", "int4", "int2"])
def test_gemm_shapes(path, m, n, k, fmt):
    if path == "portable" and m * n * k > 2e7:
        pytest.skip("portable path is scalar: large shapes are covered on the avx2 path")
    run_gemm(m, n, k, fmt, 32, dq=fmt == "nf4", dtype=torch.float32, with_bias=m % 2 == 1, seed=m + n)


@pytest.mark.parametrize("m", [1, 2, 3, 7, 16, 33, 128])
@pytest.mark.parametrize("n,k", SHAPES_NK)
def test_gemm_t_shapes(path, m, n, k):
    if path == "portable" and m * n * k > 2e7:
        pytest.skip("portable path is scalar")
    run_gemm_t(m, n, k, "nf4", 32, dq=True, dtype=torch.float32, seed=m)


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("block", [64, 128, 256])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_gemm_dq_long_rows(path, fmt, block, m):
    """Double quant with rows of 100 blocks: the 256-block nested groups start in the middle of
    rows, so the small-M kernel's per-row scale tables (nf4/fp4) switch mid-row; 23 rows = 5
    passes of 4 rows + 3 single rows."""
    if path == "portable" and m > 2:
        pytest.skip("portable path is scalar")
    run_gemm(m, 23, 100 * block, fmt, block, dq=True, dtype=torch.float32, with_bias=True, seed=block + m)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
def test_gemm_dq_short_rows(path, fmt, block, m):
    """Double quant with rows of 9 blocks (SmolLM2's K = 576 at block 64): a group of rows is far less
    than a nested group of 256 blocks, so groups share the per-thread scale tables (built once per
    nested group, not per group) and some groups straddle two nested groups; 123 rows = 4-row groups
    over 5 nested groups + 3 single rows."""
    run_gemm(m, 123, 9 * block, fmt, block, dq=True, dtype=torch.float32, with_bias=m % 2 == 0, seed=block + m)


# ---------------------------------------------------------------- activation dtypes, bias
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", list(FMT))
@pytest.mark.parametrize("m", [1, 2, 5, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_dtypes(path, dtype, fmt, m, with_bias):
    run_gemm(m, 192, 576, fmt, 64, dq=True, dtype=dtype, with_bias=with_bias, seed=m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", list(FMT))
def test_gemm_t_dtypes(path, dtype, fmt):
    run_gemm_t(9, 192, 576, fmt, 64, dq=False, dtype=dtype)


# ---------------------------------------------------------------- numerics of the small-M path
def test_gemv_extreme_values(path):
    """Constant-sign activations at the group max against all-(-1) NF4 codes: the int32 partial
    sums are at their worst case (no overflow allowed), and zeros in x must stay exact."""
    k, n = 4096, 64
    qw = QW(n, k, "nf4", 256, False)
    qw.codes.zero_()  # code 0 = -1.0 everywhere
    qw.w_hat = -qw.scale.repeat_interleave(256).reshape(n, k)
    for x in (torch.full((1, k), -3.0), torch.full((1, k), 1e30), torch.zeros(1, k)):
        y = gemm(x, qw)
        ref = x.double() @ qw.w_hat.double().T
        check(y, ref, x, qw.w_hat, k, torch.float32, group_max(x), worst_case=True)


def test_gemv_outlier_groups(path):
    """Groups whose scales differ by 1e6: each group of 32 is quantized on its own max."""
    k, n = 1024, 96
    qw = QW(n, k, "int4", 64, True)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(5))
    x[:, 32:64] *= 1e6
    x[:, 64:96] *= 1e-6
    y = gemm(x, qw)
    check(y, x.double() @ qw.w_hat.double().T, x, qw.w_hat, k, torch.float32, group_max(x))


def test_m_zero_is_noop(path):
    qw = QW(32, 64, "nf4", 32, False)
    gemm(torch.empty(0, 64), qw)
    gemm_t(torch.empty(0, 32), qw)


# ---------------------------------------------------------------- the AVX-512 VNNI build of the GEMV
@pytest.mark.skipif("avx512" not in PATHS, reason="this CPU/build has no AVX-512 VL/BW/VNNI")
@pytest.mark.parametrize("fmt", list(FMT))
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dq", [False, True])
def test_gemv_avx512_matches_avx2(fmt, m, dq):
    """Same activations, layout and int32 sums as the AVX2 GEMV: int4/int2 outputs are bit-identical
    (the int32 sums are exact, the fp32 epilogue the same); nf4/fp4 decode into a different lane
    order (vpermw on the int4 nibble split), so they meet the same bound against fp64 instead."""
    k, n = 4096 + 64 * 3, 3 * 64 + 4  # a tail chunk and rows outside the groups of 4
    qw = QW(n, k, fmt, 64, dq, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2.0
    bias = torch.randn(n)
    ys = {}
    for p in ("avx2", "avx512"):
        _C.set_cpu_path(p)
        try:
            ys[p] = gemm(x, qw, bias)
        finally:
            _C.set_cpu_path("auto")
    ref = x.double() @ qw.w_hat.double().T + bias.double()
    if fmt in ("int4", "int2"):
        check(ys["avx512"], ref, x, qw.w_hat, k, torch.float32, group_max(x))
        assert torch.equal(ys["avx512"], ys["avx2"])
    else:  # same error level as the AVX2 build (docs/kernels.md: max |err| / max |ref| 2-6e-5)
        err = {p: float((y.double() - ref).abs().max() / ref.abs().max()) for p, y in ys.items()}
        assert err["avx512"] < 2e-4 and err["avx512"] < 1.5 * err["avx2"] + 1e-6, err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_tile_non_finite_rows_stay_in_their_row(path, bad):
    """M > 24 (tile kernels, fp32 or int16): a NaN / inf in one row of x (gy) makes that row's outputs
    non-finite and leaves every other row equal to the reference within the path's bound."""
    m, n, k = 40, 96, 256
    qw = QW(n, k, "nf4", 64, True, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3))
    x[5, 17] = bad
    y = gemm(x, qw)
    assert not torch.isfinite(y[5]).any()
    keep = [i for i in range(m) if i != 5]
    xk = x[keep]
    check(y[keep], xk.double() @ qw.w_hat.double().T, xk, qw.w_hat, k, torch.float32, group_max(xk),
          eps16=eps_i16("nf4", m), wabs=qw.block_absmax)
    gy = torch.randn(m, n, generator=torch.Generator().manual_seed(4))
    gy[7, 40] = bad
    gx = gemm_t(gy, qw)
    assert not torch.isfinite(gx[7]).any()
    keep = [i for i in range(m) if i != 7]
    assert torch.isfinite(gx[keep]).all()


def test_gemv_nf4_outlier_blocks(path):
    """nf4 blocks holding an outlier weight: the int16 table image rounds relative to the block
    absmax, so the small weights of such a block carry a larger relative error than |w| suggests
    (the bound's wabs term). Rows 0-19 go through the GEMV in passes of 8 (the seed that first
    exceeded a bound without that term)."""
    m, n, k = 20, 96, 256
    qw = QW(n, k, "nf4", 64, True, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3))
    y = gemm(x, qw)
    check(y, x.double() @ qw.w_hat.double().T, x, qw.w_hat, k, torch.float32, group_max(x),
          eps16=eps_i16("nf4", m), wabs=qw.block_absmax)


def test_results_do_not_depend_on_thread_count(path):
    """Threads split N (forward) or whole blocks of K (gemm_t), and the GEMV passes' rows: every output
    element is computed by the same operations whatever the thread count, so 1, 2 and 3 threads
    give the same bits (M = 13: GEMV passes; M = 40: tile kernels)."""
    qw = QW(640, 1024, "nf4", 64, True, seed=9)
    g = torch.Generator().manual_seed(9)
    x, gy = torch.randn(40, 1024, generator=g), torch.randn(40, 640, generator=g)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append((gemm(x, qw), gemm(x[:13], qw), gemm_t(gy, qw)))
    finally:
        torch.set_num_threads(old)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)
