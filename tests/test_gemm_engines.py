"""The bf16 matrix engines (csrc/cpu/gemm_bf16.h) and the precision policy (lowbit.set_matmul_precision).

Every engine the machine can run is tested: 'amx-emulated' everywhere (the AMX kernel code over the
tile emulator of csrc/cpu/tile.h), 'avx512bf16' and 'amx' where the CPU has them. The references are
float64 products of the same rounded operands: bf16-rounded x (and A, B of the lowrank branch) and
``qt.dequantize(torch.bfloat16)``, the weight the engines decode. ``LOWBIT_GEMV_MAX_M=0`` sends every
M to the engines (the small-M GEMV would take M <= 24 otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit import _native
from lowbit.ops.gemm import gemm_t
from lowbit.ops.lowrank import fused_backward_applies, lowrank_backward_op, lowrank_op

pytestmark = pytest.mark.skipif("cpu" not in _native._modules, reason="lowbit._C not built")
if "cpu" in _native._modules:
    _C = _native.module("cpu")
    ENGINES = [p for p in ("amx-emulated", "avx512bf16", "amx") if p in _C.available_cpu_paths()]
else:  # pragma: no cover
    _C, ENGINES = None, []
FMTS = ("nf4", "fp4", "int4", "int2")
ROUTE = {"amx-emulated": "amx_emulated", "avx512bf16": "avx512bf16", "amx": "amx"}


@pytest.fixture
def engine_path(request, monkeypatch):
    """Force a CPU path and every M onto the tile kernels; restore both after."""
    monkeypatch.setenv("LOWBIT_GEMV_MAX_M", "0")
    old = _C.cpu_path()
    _C.set_cpu_path(request.param)
    yield request.param
    _C.set_cpu_path(old)


def quantized(n, k, fmt, block, dq, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, :: max(1, k // 7)] *= 8.0  # outlier columns
    return lowbit.quantize(w, lowbit.QuantSpec(fmt, block, double_quant=dq))


def bf16_ref(a: torch.Tensor) -> torch.Tensor:
    return a.to(torch.bfloat16).double()


def assert_bf16_out(y, ref, scale):
    """bf16 output: round to nearest even (≤ 2^-9 relative) after an fp32 sum (≤ 1e-5 of the scale here)."""
    err = (y.double() - ref).abs()
    tol = 2.0 ** -8 * ref.abs() + 1e-5 * scale
    assert bool((err <= tol).all()), f"worst err/tol {float((err / tol).max()):.3g}"


def assert_f32_out(y, ref, rel):
    err = float((y.double() - ref).abs().max())
    assert err <= rel * float(ref.abs().max()), f"max|err|/max|ref| = {err / float(ref.abs().max()):.3g} > {rel}"


# ---------------------------------------------------------------- bf16 activations: torch's bf16 matmul
def check_linear_bf16(qt, m, g):
    """lowbit.linear on m random bf16 rows (and a bf16 bias) from g against float64 on the same operands;
    the weight it decodes (dequantize(bf16), float64)."""
    n, k = qt.shape
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    y = lowbit.linear(x, qt, bias)
    wd = qt.dequantize(torch.bfloat16).double()
    assert y.dtype == torch.bfloat16
    assert_bf16_out(y, x.double() @ wd.T + bias.double(), float((x.double().abs() @ wd.abs().T).max()))
    return wd


CASES = [  # (fmt, block, double quant): every format, every block, dq on and off
    ("nf4", 64, True), ("nf4", 32, False), ("fp4", 128, True), ("fp4", 256, False),
    ("int4", 32, False), ("int4", 256, True), ("int2", 64, False), ("int2", 128, True),
]


@pytest.mark.parametrize("engine_path", ENGINES, indirect=True)
@pytest.mark.parametrize("fmt,block,dq", CASES)
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 16, 17, 33, 128, 300])
def test_engine_gemm_bf16(engine_path, fmt, block, dq, m):
    k = block * 3  # an odd multiple of the block; N too (odd M), or 200 (no multiple of 16 or 32)
    n = block * 3 if m % 2 else 200
    qt = quantized(n, k, fmt, block, dq, seed=m)
    g = torch.Generator().manual_seed(100 + m)
    assert _C.gemm_route(1, m, False) == ROUTE[engine_path]
    wd = check_linear_bf16(qt, m, g)
    # gemm_t: gx = gy · Ŵ, contraction over N (odd or not a multiple of 32: zero-padded)
    gy = torch.randn(m, n, generator=g).to(torch.bfloat16)
    assert _C.gemm_route(1, m, True) == ROUTE[engine_path]
    gx = gemm_t(gy, qt)
    rt = gy.double() @ wd
    assert_bf16_out(gx, rt, float((gy.double().abs() @ wd.abs()).max()))


@pytest.mark.parametrize("engine_path", ENGINES, indirect=True)
@pytest.mark.parametrize("fmt,dq", [("nf4", True), ("fp4", False), ("int4", False), ("int2", True)])
@pytest.mark.parametrize("n,k", [(201, 160), (17, 224), (97, 96)])
@pytest.mark.parametrize("m", [3, 40])
def test_engine_ragged_edges(engine_path, fmt, dq, n, k, m):
    """The decodes' edges: an odd N (gemm_t's last pair of W rows has one row, forward's last 16 rows
    are partial) and K not a multiple of the engines' column blocks (gemm_t's last block is partial)."""
    qt = quantized(n, k, fmt, 32, dq, seed=n + k + m)
    g = torch.Generator().manual_seed(n * k + m)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    gy = torch.randn(m, n, generator=g).to(torch.bfloat16)
    wd = qt.dequantize(torch.bfloat16).double()
    ref = x.double() @ wd.T
    assert_bf16_out(lowbit.linear(x, qt), ref, float((x.double().abs() @ wd.abs().T).max()))
    rt = gy.double() @ wd
    assert_bf16_out(gemm_t(gy, qt), rt, float((gy.double().abs() @ wd.abs()).max()))


@pytest.mark.parametrize("engine_path", ENGINES, indirect=True)
@pytest.mark.parametrize("fmt,dq", [("nf4", True), ("nf4", False), ("fp4", False), ("int4", False)])
def test_engine_tiny_scales(engine_path, fmt, dq):
    """Block scales around 2^-118, where the decode's fast table rounding (vcvtneps2bf16 reads a denormal
    as zero) gives way to the exact integer rounding: 16-row groups of both kinds decode right. x is
    large (2^20) so that no product is denormal: the engines flush those, as the hardware does — which
    is also why a denormal *weight* value cannot be told from zero through an engine."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 256, generator=g) * 2.0 ** -119
    w[::3] *= 16.0  # every third row well above the threshold
    qt = lowbit.quantize(w, lowbit.QuantSpec(fmt, 64, double_quant=dq))
    x = (torch.randn(40, 256, generator=g) * 2.0 ** 20).to(torch.bfloat16)
    wd = qt.dequantize(torch.bfloat16).double()
    ref = x.double() @ wd.T
    assert float(ref.abs().max()) > 0
    assert_bf16_out(lowbit.linear(x, qt), ref, float((x.double().abs() @ wd.abs().T).max()))
    gy = (torch.randn(40, 64, generator=g) * 2.0 ** 20).to(torch.bfloat16)
    rt = gy.double() @ wd
    assert_bf16_out(gemm_t(gy, qt), rt, float((gy.double().abs() @ wd.abs()).max()))


@pytest.mark.parametrize("engine_path", ENGINES, indirect=True)
@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_engine_zero_points_near_integers(engine_path, fmt):
    """int formats: zero points within 2^-26 of an integer (but not on it) send a 16-row group's tables
    to the exact rounding (a product (q - z)·s could be denormal); groups of both kinds decode right."""
    qt = quantized(64, 256, fmt, 64, False, seed=11)
    z = qt.zero.view(64, -1)
    z[:16] = 1e-9  # the first 16-row group: near 0, not on it
    z[16:32] = torch.round(z[16:32])  # on integers: the fast path
    g = torch.Generator().manual_seed(12)
    x = torch.randn(24, 256, generator=g).to(torch.bfloat16)
    wd = qt.dequantize(torch.bfloat16).double()
    assert_bf16_out(lowbit.linear(x, qt), x.double() @ wd.T, float((x.double().abs() @ wd.abs().T).max()))


@pytest.mark.parametrize("engine_path", ENGINES, indirect=True)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m", [1, 17, 130])
def test_engine_fp32_accumulation(engine_path, fmt, m):
    """fp32 x under 'medium' runs the engine on bf16(x): against the float64 product of the same
    rounded operands only fp32 accumulation error remains (≤ 1e-5 of max|ref| at K = 768)."""
    n, k, block = 96 + 40, 768, 64
    qt = quantized(n, k, fmt, block, True, seed=3)
    g = torch.Generator().manual_seed(m)
    x, gy = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
    wd = qt.dequantize(torch.bfloat16).double()
    with lowbit.matmul_precision("medium"):
        assert _C.gemm_route(0, m, False) == ROUTE[engine_path]
        y, gx = lowbit.linear(x, qt), gemm_t(gy, qt)
    assert y.dtype == torch.float32
    assert_f32_out(y, bf16_ref(x) @ wd.T, 1e-5)
    assert_f32_out(gx, bf16_ref(gy) @ wd, 1e-5)


@pytest.mark.parametrize("engine_path", ENGINES, indirect=True)
@pytest.mark.parametrize("fmt,block,dq", [("nf4", 64, True), ("int4", 32, False), ("int2", 256, True)])
@pytest.mark.parametrize("m,r", [(1, 1), (5, 16), (33, 40), (130, 96), (44, 120)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_engine_lowrank(engine_path, fmt, block, dq, m, r, dtype):
    """lowrank forward: xa = x·Aᵀ on the engine (fp32 sums of bf16 products), the branch (s·xa rounded
    to bf16)·Bᵀ accumulated with the base in fp32 — as PEFT on a bf16 model computes it, more
    accurately (one rounding of s·xa where PEFT rounds xa, the product and the sum)."""
    qt, x, a, b, bias, n, k = lowrank_case(fmt, block, dq, m, r, dtype)
    s = 0.75
    ctx = lowbit.matmul_precision("medium")
    with ctx:
        y, xa = lowrank_op(x, *lowbit.ops.weight_args(qt), a, b, s, bias, n, k, block, fmt)
    check_lowrank_out(y, xa, x, a, b, s, bias, qt, dtype)


def lowrank_case(fmt, block, dq, m, r, dtype):
    """A lowrank forward's operands: W (3·block + 8, 3·block), x (m, K), A (r, K), B (N, r), bias."""
    n, k = 3 * block + 8, 3 * block
    qt = quantized(n, k, fmt, block, dq, seed=r)
    g = torch.Generator().manual_seed(m + r)
    x = torch.randn(m, k, generator=g).to(dtype)
    a = (torch.randn(r, k, generator=g) * 0.1).to(dtype)
    b = (torch.randn(n, r, generator=g) * 0.1).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return qt, x, a, b, bias, n, k


def check_lowrank_out(y, xa, x, a, b, s, bias, qt, dtype):
    """The engines' lowrank forward against float64 on their operands (bf16 x, A, B; dequantize(bf16)): the
    xa output at bf16 (or fp32-sum) level, y within bf16 rounding plus the branch's s·xa rounding."""
    wd = qt.dequantize(torch.bfloat16).double()
    xr, ar, br = bf16_ref(x), bf16_ref(a), bf16_ref(b)
    xa_ref = xr @ ar.T
    ref = xr @ wd.T + s * (xa_ref @ br.T) + bias.double()
    branch = float((s * (xa_ref.abs() @ br.abs().T)).max())
    scale = float((xr.abs() @ wd.abs().T).max())
    if dtype == torch.bfloat16:
        assert_bf16_out(xa, xa_ref, float((xr.abs() @ ar.abs().T).max()))
        err, tol = (y.double() - ref).abs(), 2.0 ** -8 * ref.abs() + 1e-5 * scale + 2.0 ** -8 * branch
        assert bool((err <= tol).all()), f"worst err/tol {float((err / tol).max()):.3g}"
    else:
        assert_f32_out(xa, xa_ref, 1e-5)
        err = float((y.double() - ref).abs().max())
        assert err <= 1e-5 * scale + 2.0 ** -8 * branch


# ---------------------------------------------------------------- small M on AMX: the rows form
AMX_PATHS = [p for p in ("amx-emulated", "amx") if p in ENGINES]
ROWS_ROUTE = {"amx-emulated": "amx_rows_emulated", "amx": "amx_rows"}
# the decodes the rows form can run here: the dot form's (AVX-512 BF16 CPUs) and the emulator's generic one
ROWS_DECODES = ["generic"] + (["fast"] if "avx512bf16" in ENGINES else [])


@pytest.fixture
def rows_path(request, monkeypatch):
    """An AMX path with every M ≤ 128 on the rows form (gemm_amx.h; the route's default stops at 32) and
    the given decode."""
    path, decode = request.param
    monkeypatch.setenv("LOWBIT_GEMV_MAX_M", "0")
    monkeypatch.setenv("LOWBIT_AMX_ROWS_MAX_M", "128")
    monkeypatch.setenv("LOWBIT_AMX_ROWS_DECODE", decode)
    old = _C.cpu_path()
    _C.set_cpu_path(path)
    yield path
    _C.set_cpu_path(old)


ROWS_PARAMS = [(p, d) for p in AMX_PATHS for d in ROWS_DECODES]


@pytest.mark.parametrize("rows_path", ROWS_PARAMS, indirect=True)
@pytest.mark.parametrize("fmt,block,dq", CASES)
@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 32])
@pytest.mark.parametrize("kb", [3, 5])
def test_amx_rows_gemm(rows_path, fmt, block, dq, m, kb):
    """The rows form against float64 on its operands (bf16 x, dequantize(bf16)): every format and block,
    K = 3 or 5 blocks (whole steps of 64 / 128 weights and the k-order tails: K % 64 = 32, K % 128 = 32,
    64 or 96), N odd or 200 (a partial group of 32 rows), one or two B tiles of x (M ≤ 16, ≤ 32)."""
    k = block * kb
    n = block * 3 + 1 if m % 2 else 200
    qt = quantized(n, k, fmt, block, dq, seed=m + kb)
    assert _C.gemm_route(1, m, False) == ROWS_ROUTE[rows_path]
    check_linear_bf16(qt, m, torch.Generator().manual_seed(200 + m))


@pytest.mark.parametrize("rows_path", ROWS_PARAMS, indirect=True)
@pytest.mark.parametrize("fmt,block,dq", [("nf4", 64, True), ("int4", 32, False), ("int2", 128, True)])
@pytest.mark.parametrize("m", [33, 48, 100, 128])
def test_amx_rows_m_blocks(rows_path, fmt, block, dq, m):
    """M above 32: m-blocks of 32 rows of x per decoded chunk (the last one of 16 or 32 rows), C through the
    buffer between chunks (K = 4096 + 3 blocks: two chunks)."""
    qt = quantized(40, 4096 + 3 * block, fmt, block, dq, seed=m)
    assert _C.gemm_route(1, m, False) == ROWS_ROUTE[rows_path]
    check_linear_bf16(qt, m, torch.Generator().manual_seed(300 + m))


@pytest.mark.parametrize("rows_path", ROWS_PARAMS, indirect=True)
@pytest.mark.parametrize("fmt,block", [("nf4", 64), ("int2", 64), ("int4", 32)])
def test_amx_rows_long_k(rows_path, fmt, block):
    """K above the rows form's chunk of 4096 columns: the second chunk's decode starts mid-row (its scales,
    tables and the int2 / 4-bit tails of the step order at K % 128 = 64, K % 64 = 32)."""
    k = 4096 + (320 if block == 64 else 288)
    qt = quantized(40, k, fmt, block, True, seed=11)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    assert _C.gemm_route(1, 3, False) == ROWS_ROUTE[rows_path]
    wd = qt.dequantize(torch.bfloat16).double()
    assert_bf16_out(lowbit.linear(x, qt), x.double() @ wd.T, float((x.double().abs() @ wd.abs().T).max()))


@pytest.mark.parametrize("rows_path", ROWS_PARAMS, indirect=True)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m", [3, 24])
def test_amx_rows_fp32_accumulation(rows_path, fmt, m):
    """fp32 x under 'medium' on the rows form: only fp32 accumulation error against the float64 product of
    the same rounded operands (≤ 1e-5 of max|ref| at K = 768)."""
    n, k = 136, 768
    qt = quantized(n, k, fmt, 64, True, seed=5)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    with lowbit.matmul_precision("medium"):
        assert _C.gemm_route(0, m, False) == ROWS_ROUTE[rows_path]
        y = lowbit.linear(x, qt)
    assert y.dtype == torch.float32
    assert_f32_out(y, bf16_ref(x) @ qt.dequantize(torch.bfloat16).double().T, 1e-5)


@pytest.mark.parametrize("rows_path", ROWS_PARAMS, indirect=True)
@pytest.mark.parametrize("fmt,block,dq", [("nf4", 64, True), ("int4", 32, False), ("int2", 256, True)])
@pytest.mark.parametrize("m,r", [(1, 1), (5, 16), (17, 40), (32, 120), (70, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_amx_rows_lowrank(rows_path, fmt, block, dq, m, r, dtype):
    """The lowrank forward on the rows form: xa = x·Aᵀ on the tiles, then (s·xa in bf16)·Bᵀ as a second
    term of the same C tiles (one or two groups of A's rows; B padded from r to 32·⌈r/32⌉)."""
    qt, x, a, b, bias, n, k = lowrank_case(fmt, block, dq, m, r, dtype)
    with lowbit.matmul_precision("medium"):
        assert _C.gemm_route(DT_ID[dtype], m, False) == ROWS_ROUTE[rows_path]
        y, xa = lowrank_op(x, *lowbit.ops.weight_args(qt), a, b, 0.75, bias, n, k, block, fmt)
    check_lowrank_out(y, xa, x, a, b, 0.75, bias, qt, dtype)


@pytest.mark.parametrize("rows_path", ROWS_PARAMS, indirect=True)
def test_amx_rows_threads_and_non_finite_rows(rows_path):
    """One thread sums each output in one order (bits independent of the thread count); a non-finite x
    element reaches only its own row of y."""
    n, k = 300, 512
    qt = quantized(n, k, "int4", 128, False, seed=2)
    for m in (20, 70):
        x = torch.randn(m, k).to(torch.bfloat16)
        old = torch.get_num_threads()
        try:
            outs = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                outs.append(lowbit.linear(x, qt))
        finally:
            torch.set_num_threads(old)
        assert all(torch.equal(o, outs[0]) for o in outs[1:])
        x[3, 17], x[m - 2, 200] = float("nan"), float("inf")
        bad = ~torch.isfinite(lowbit.linear(x, qt))
        assert bool(bad[3].all()) and bool(bad[m - 2].any())
        assert not bool(bad[[i for i in range(m) if i not in (3, m - 2)]].any())


@pytest.mark.parametrize("path", AMX_PATHS)
def test_amx_rows_default_range(path, monkeypatch):
    """With no test hooks set: on the AMX paths the GEMV keeps M ≤ 4 (bf16 x), the rows form M = 5-32, the
    engine from 33; the hook LOWBIT_AMX_ROWS_MAX_M=0 turns the rows form off."""
    for v in ("LOWBIT_GEMV_MAX_M", "LOWBIT_GEMV_BF16_MAX_M", "LOWBIT_AMX_ROWS_MAX_M"):
        monkeypatch.delenv(v, raising=False)
    old = _C.cpu_path()
    _C.set_cpu_path(path)
    try:
        routes = [_C.gemm_route(1, m, False) for m in range(1, 35)]
        assert routes == ["gemv_i16"] * 4 + [ROWS_ROUTE[path]] * 28 + [ROUTE[path]] * 2
        assert all(_C.gemm_route(1, m, True) == ROUTE[path] for m in (1, 8, 32))  # gemm_t: the engine
        monkeypatch.setenv("LOWBIT_AMX_ROWS_MAX_M", "0")
        assert _C.gemm_route(1, 8, False) == ROUTE[path]
    finally:
        _C.set_cpu_path(old)


# ---------------------------------------------------------------- small M: the dot-form bf16 GEMV
@pytest.fixture
def dot_path(monkeypatch):
    """The 'avx512bf16' path with every M on the dot form (gemv_bf16; passes of 8 rows above 8)."""
    if "avx512bf16" not in _C.available_cpu_paths():
        pytest.skip("the dot form runs on the 'avx512bf16' path: this CPU has no AVX-512 BF16")
    monkeypatch.setenv("LOWBIT_GEMV_MAX_M", "0")
    monkeypatch.setenv("LOWBIT_GEMV_BF16_MAX_M", "64")
    old = _C.cpu_path()
    _C.set_cpu_path("avx512bf16")
    yield
    _C.set_cpu_path(old)


@pytest.mark.parametrize("fmt,block,dq", CASES + [("int2", 32, True), ("int2", 256, False)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 16, 17])
def test_gemv_bf16_gemm(dot_path, fmt, block, dq, m):
    """bf16 x: torch's bf16 matmul on exactly dequantize(bf16), like the engines; N = 3·block + 3 leaves
    rows outside the passes of 2 / 4 rows, M > 8 runs in passes of 8. K = 5 blocks: whole steps (64
    weights, int2 128) and, for blocks of 32 and 64, a tail of k-order steps."""
    k, n = block * 5, block * 3 + 3
    qt = quantized(n, k, fmt, block, dq, seed=m)
    g = torch.Generator().manual_seed(200 + m)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16) if m % 2 else None
    assert _C.gemm_route(1, m, False) == "gemv_bf16"
    y = lowbit.linear(x, qt, bias)
    wd = qt.dequantize(torch.bfloat16).double()
    ref = x.double() @ wd.T + (bias.double() if bias is not None else 0.0)
    assert y.dtype == torch.bfloat16
    assert_bf16_out(y, ref, float((x.double().abs() @ wd.abs().T).max()))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m", [1, 4, 8, 12])
def test_gemv_bf16_fp32_medium(dot_path, fmt, m):
    """fp32 x under `medium`: x rounded to bf16, fp32 out, only fp32 accumulation error left."""
    n, k = 70, 768
    qt = quantized(n, k, fmt, 64, True, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    with lowbit.matmul_precision("medium"):
        assert _C.gemm_route(0, m, False, lowbit.formats.FMT_ID[fmt]) == "gemv_bf16"
        y = lowbit.linear(x, qt)
    assert y.dtype == torch.float32
    assert_f32_out(y, bf16_ref(x) @ qt.dequantize(torch.bfloat16).double().T, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt,dq", [("nf4", True), ("int4", False), ("int2", True)])
@pytest.mark.parametrize("m,r", [(1, 16), (4, 1), (8, 100), (11, 16)])
def test_gemv_bf16_lowrank(dot_path, dtype, fmt, dq, m, r):
    """The lowrank forward on the dot form: xa = x·Aᵀ (bf16 products, fp32 sums), then (s·xa rounded to
    bf16)·Bᵀ added to the base in fp32 — the engines' arithmetic, checked as test_engine_lowrank does."""
    block = 64
    qt, x, a, b, bias, n, k = lowrank_case(fmt, block, dq, m, r, dtype)
    s = 0.75
    with lowbit.matmul_precision("medium"):
        assert _C.gemm_route(DT_ID[dtype], m, False, lowbit.formats.FMT_ID[fmt]) == "gemv_bf16"
        y, xa = lowrank_op(x, *lowbit.ops.weight_args(qt), a, b, s, bias, n, k, block, fmt)
    check_lowrank_out(y, xa, x, a, b, s, bias, qt, dtype)


DT_ID = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def test_gemv_bf16_threads_and_non_finite_rows(dot_path):
    """Each output is one thread's sum: 1 and 3 threads give the same bits; a NaN / inf row of x stays in
    its row (its own accumulators)."""
    qt = quantized(301, 512, "nf4", 64, True, seed=1)
    x = torch.randn(7, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    a, b = torch.randn(16, 512).bfloat16() * 0.1, torch.randn(301, 16).bfloat16() * 0.1
    old = torch.get_num_threads()
    try:
        outs = []
        for th in (1, 3):
            torch.set_num_threads(th)
            outs.append((lowbit.linear(x, qt), *lowrank_op(x, *lowbit.ops.weight_args(qt), a, b, 0.5, None, 301,
                                                             512, 64, "nf4")))
    finally:
        torch.set_num_threads(old)
    for u, v in zip(*outs):
        assert torch.equal(u, v)
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[3, 100] = bad
        y = lowbit.linear(xb, qt)
        assert not torch.isfinite(y[3]).all()
        assert torch.equal(torch.cat([y[:3], y[4:]]), torch.cat([outs[0][0][:3], outs[0][0][4:]]))


def test_gemv_bf16_default_range():
    """On 'avx512bf16' the 4-bit formats take the dot form from M = 1 to 12 (bf16 x); int2 keeps the int16
    GEMV at M = 1; fp32 x under `medium`: int4 keeps the int8 GEMV at M = 1, int2 to M = 2; the engine above."""
    if "avx512bf16" not in _C.available_cpu_paths():
        pytest.skip("no AVX-512 BF16 here")
    old = _C.cpu_path()
    _C.set_cpu_path("avx512bf16")
    fid = lowbit.formats.FMT_ID
    try:
        routes = {f: [_C.gemm_route(1, m, False, fid[f]) for m in range(1, 15)] for f in FMTS}
        with lowbit.matmul_precision("medium"):
            medium = {f: [_C.gemm_route(0, m, False, fid[f]) for m in range(1, 15)] for f in ("int4", "int2")}
    finally:
        _C.set_cpu_path(old)
    for f in ("nf4", "fp4", "int4"):
        assert routes[f] == ["gemv_bf16"] * 12 + ["avx512bf16"] * 2, f
    assert routes["int2"] == ["gemv_i16"] + ["gemv_bf16"] * 11 + ["avx512bf16"] * 2
    assert medium["int4"] == ["gemv_i16"] + ["gemv_bf16"] * 11 + ["avx512bf16"] * 2
    assert medium["int2"] == ["gemv_i16"] * 2 + ["gemv_bf16"] * 10 + ["avx512bf16"] * 2


@pytest.mark.parametrize("fmt,dq", [("nf4", True), ("nf4", False), ("fp4", False), ("int4", False), ("int2", True)])
@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gemv_bf16_exact_tables(dot_path, fmt, dq, block, m):
    """The dot form's tables where the fast rounding (vcvtne2ps2bf16 reads a denormal as zero) gives way to
    dequantize's: nf4 / fp4 rows whose block absmax is 1.75·2^-119 or 1.5·2^-119 (below the 2^-118 threshold: the pass's
    tables all take the exact path; no decoded value is denormal, fp4's smallest included) next to rows far
    above; int4 / int2 zero points 1e-9 from an integer in every other row. Blocks of 32 pair two blocks
    per table (the 64-weight step; int2's 128-weight step holds four); K = 5 blocks leaves a tail of
    k-order steps. x large so that no product is denormal."""
    k, n = 5 * block, 37
    g = torch.Generator().manual_seed(block + m)
    if fmt in ("int4", "int2"):
        w = torch.randn(n, k, generator=g) * 0.02
    else:
        w = torch.randn(n, k, generator=g).clamp(-1.5, 1.5)
        w[:, ::2 * block] = 1.75  # blocks' absmax alternate 1.75 / 1.5 (the paired tables differ)
        w[:, block::2 * block] = 1.5
        w *= 2.0 ** -119
        w[::3] *= 2.0 ** 100  # every third row far above the threshold
    qt = lowbit.quantize(w, lowbit.QuantSpec(fmt, block, double_quant=dq))
    if fmt in ("int4", "int2"):
        qt.zero.view(n, -1)[1::2] = 1e-9
    x = (torch.randn(m, k, generator=g) * 2.0 ** 20).to(torch.bfloat16)
    wd = qt.dequantize(torch.bfloat16).double()
    ref = x.double() @ wd.T
    y = lowbit.linear(x, qt)
    scale = x.double().abs() @ wd.abs().T
    assert_bf16_out(y, ref, float(scale.max()))
    rows = slice(1, None, 3) if fmt not in ("int4", "int2") else slice(1, None, 2)  # the exact-path rows on their own scale
    assert float(ref[:, rows].abs().max()) > 0
    assert_bf16_out(y[:, rows], ref[:, rows], float(scale[:, rows].max()))


def lowrank_backward_ref(gy, x, xa, gxa, wd, a, b, s):
    """float64 on the engine's operands: gy, x, xa, A, B as given (bf16 here), Ŵ = dequantize(bf16). Returns
    (gx, ga, gb, u) and the error scales |·|-products of each."""
    g, xd, xad, ad, bd = (t.double() for t in (gy, x, xa, a, b))
    u = s * (g @ bd) + (gxa.double() if gxa is not None else 0.0)
    ua = s * (g.abs() @ bd.abs()) + (gxa.double().abs() if gxa is not None else 0.0)
    return ((g @ wd + u @ ad, u.T @ xd, s * (g.T @ xad)),
            (g.abs() @ wd.abs(), ua @ ad.abs(), ua.T @ xd.abs(), s * (g.abs().T @ xad.abs())))


@pytest.mark.parametrize("engine_path", ENGINES, indirect=True)
@pytest.mark.parametrize("fmt,block,dq", [("nf4", 64, True), ("fp4", 32, False), ("int4", 128, False), ("int2", 64, True)])
@pytest.mark.parametrize("m,r", [(1, 1), (7, 16), (40, 3), (130, 100)])
@pytest.mark.parametrize("with_gxa", [False, True])
def test_engine_lowrank_backward(engine_path, fmt, block, dq, m, r, with_gxa):
    """The lowrank backward in one native call (lowrank_backward_op), against float64 on the same operands:
    gx = gy·Ŵ + bf16(u)·A in fp32, rounded once to bf16 (u = s·gy·B + gxa: its bf16 rounding ≤ 2⁻⁹ of |u|·|A|);
    ga = uᵀ·x with u as bf16 hi + lo (≈ 2⁻¹⁷ of |u|) and gb = s·gyᵀ·xa, fp32 sums (≤ 1e-5 of their scales).
    N odd or not a multiple of 32 (gy's rows padded), K = 3 blocks (gx's and ga's last column block partial)."""
    n, k = 3 * block + 8 + (m % 2), 3 * block
    qt = quantized(n, k, fmt, block, dq, seed=m + r)
    g = torch.Generator().manual_seed(7 * m + r)
    gy, x = torch.randn(m, n, generator=g).to(torch.bfloat16), torch.randn(m, k, generator=g).to(torch.bfloat16)
    a = (torch.randn(r, k, generator=g) * 0.1).to(torch.bfloat16)
    b = (torch.randn(n, r, generator=g) * 0.1).to(torch.bfloat16)
    xa = (x.double() @ a.double().T).to(torch.bfloat16)  # as the forward returns it
    gxa = torch.randn(m, r, generator=g).to(torch.bfloat16) if with_gxa else None
    s = 0.75
    assert fused_backward_applies(gy)
    gx, ga, gb = lowrank_backward_op(gy, x, xa, gxa, *lowbit.ops.weight_args(qt), a, b, s, n, k, block, fmt, True)
    assert gx.dtype == torch.bfloat16 and ga.dtype == gb.dtype == torch.float32
    (rx, ra, rb), (sx, su, sa, sb) = lowrank_backward_ref(gy, x, xa, gxa, qt.dequantize(torch.bfloat16).double(), a, b, s)
    err, tol = (gx.double() - rx).abs(), 2.0 ** -8 * rx.abs() + 1e-5 * sx + 2.0 ** -8 * su
    assert bool((err <= tol).all()), f"gx: worst err/tol {float((err / tol).max()):.3g}"
    for name, got, ref, scale in (("ga", ga, ra, sa), ("gb", gb, rb, sb)):
        err, tol = (got.double() - ref).abs(), 1e-5 * scale + 1e-30
        assert bool((err <= tol).all()), f"{name}: worst err/tol {float((err / tol).max()):.3g}"
    gx0, ga0, gb0 = lowrank_backward_op(gy, x, xa, gxa, *lowbit.ops.weight_args(qt), a, b, s, n, k, block, fmt, False)
    assert gx0.numel() == 0 and torch.equal(ga0, ga) and torch.equal(gb0, gb)


@pytest.mark.parametrize("engine_path", ENGINES, indirect=True)
def test_engine_lowrank_backward_through_autograd(engine_path, monkeypatch):
    """ops.lowrank's backward takes the fused call on an engine path, and agrees with the composition
    (gemm_t + torch products) within bf16 rounding; grads of x, lora_A, lora_B, bias all arrive; thread
    count independent (each output element is one thread's fixed-order sum)."""
    n, k, m, r = 200, 192, 50, 8
    qt = quantized(n, k, "nf4", 64, True, seed=3)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(m, k, generator=g).to(torch.bfloat16)
    a0, b0 = torch.randn(r, k, generator=g) * 0.1, torch.randn(n, r, generator=g) * 0.1
    bias0, gy = torch.randn(n, generator=g).to(torch.bfloat16), torch.randn(m, n, generator=g).to(torch.bfloat16)

    def grads(threads=None):
        x, a, b, bias = (t.clone().requires_grad_() for t in (x0, a0, b0, bias0))
        old = torch.get_num_threads()
        try:
            if threads:
                torch.set_num_threads(threads)
            lowbit.ops.lowrank(x, qt, a, b, 1.5, bias).backward(gy)
        finally:
            torch.set_num_threads(old)
        return [t.grad for t in (x, a, b, bias)]

    assert fused_backward_applies(gy)
    fused = grads(1)
    assert all(torch.equal(u, v) for u, v in zip(fused, grads(3)))
    monkeypatch.setattr(sys.modules["lowbit.ops.lowrank"], "fused_backward_applies", lambda gy: False)
    composed = grads()  # gemm_t on the same engine + torch products
    for name, u, v in zip(("x", "A", "B", "bias"), fused, composed):
        assert u.dtype == v.dtype, name
        rel = float((u.double() - v.double()).abs().max() / v.double().abs().max())
        assert rel <= 2.0 ** -7, f"grad {name}: fused vs composed {rel:.3g}"


@pytest.mark.parametrize("engine_path", ENGINES, indirect=True)
def test_lowrank_backward_opcheck(engine_path):
    """The fused backward's op passes torch.library.opcheck (fake kernel, schema, no aliasing)."""
    qt = quantized(64, 128, "int4", 64, False, seed=5)
    gy, x = torch.randn(3, 64).to(torch.bfloat16), torch.randn(3, 128).to(torch.bfloat16)
    a, b = torch.randn(4, 128).to(torch.bfloat16), torch.randn(64, 4).to(torch.bfloat16)
    xa = (x.double() @ a.double().T).to(torch.bfloat16)
    for gxa, need_gx in ((None, True), (torch.randn(3, 4).to(torch.bfloat16), False)):
        torch.library.opcheck(torch.ops.lowbit.lowrank_backward.default,
                              (gy, x, xa, gxa, *lowbit.ops.weight_args(qt), a, b, 0.5, 64, 128, 64, "int4", need_gx))


@pytest.mark.parametrize("engine_path", ENGINES, indirect=True)
def test_engine_more_rows_than_one_block(engine_path):
    """M past the engine's block of rows (kMC: 1024 avx512bf16, 2048 AMX) and not a multiple of kMR: bf16 x
    read in place block by block with a packed tail; forward, gemm_t and the fused backward."""
    m = 2051 if "amx" in engine_path else 1029
    n, k, r = 40, 64, 3
    qt = quantized(n, k, "nf4", 32, False, seed=8)
    g = torch.Generator().manual_seed(8)
    x, gy = torch.randn(m, k, generator=g).to(torch.bfloat16), torch.randn(m, n, generator=g).to(torch.bfloat16)
    wd = qt.dequantize(torch.bfloat16).double()
    assert_bf16_out(lowbit.linear(x, qt), x.double() @ wd.T, float((x.double().abs() @ wd.abs().T).max()))
    assert_bf16_out(gemm_t(gy, qt), gy.double() @ wd, float((gy.double().abs() @ wd.abs()).max()))
    a = (torch.randn(r, k, generator=g) * 0.1).to(torch.bfloat16)
    b = (torch.randn(n, r, generator=g) * 0.1).to(torch.bfloat16)
    xa = (x.double() @ a.double().T).to(torch.bfloat16)
    gx, ga, gb = lowrank_backward_op(gy, x, xa, None, *lowbit.ops.weight_args(qt), a, b, 0.5, n, k, 32, "nf4", True)
    (rx, ra, rb), (sx, su, sa, sb) = lowrank_backward_ref(gy, x, xa, None, wd, a, b, 0.5)
    for name, got, ref, tol in (("gx", gx, rx, 2.0 ** -8 * rx.abs() + 1e-5 * sx + 2.0 ** -8 * su),
                                ("ga", ga, ra, 1e-5 * sa), ("gb", gb, rb, 1e-5 * sb)):
        err = (got.double() - ref).abs()
        assert bool((err <= tol).all()), f"{name}: worst err/tol {float((err / tol).max()):.3g}"


@pytest.mark.parametrize("engine_path", ENGINES, indirect=True)
def test_engine_lowrank_backward_under_compile(engine_path):
    """torch.compile (aot_eager, fullgraph) traces the fused backward through its fake kernel and runs the
    same op: the gradients equal eager's bit for bit."""
    n, k, m, r = 96, 128, 40, 4
    qt = quantized(n, k, "nf4", 64, True, seed=9)
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(m, k, generator=g).to(torch.bfloat16)
    a0, b0 = torch.randn(r, k, generator=g) * 0.1, torch.randn(n, r, generator=g) * 0.1
    gy = torch.randn(m, n, generator=g).to(torch.bfloat16)

    def f(x, a, b):
        return lowbit.ops.lowrank(x, qt, a, b, 0.5)

    def grads(fn):
        x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
        fn(x, a, b).backward(gy)
        return x.grad, a.grad, b.grad

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    grads(compiled)  # compiles
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = grads(compiled)
    assert any(e.key == "lowbit::lowrank_backward" for e in prof.key_averages())
    for u, v in zip(grads(f), got):
        assert torch.equal(u, v)


@pytest.mark.parametrize("engine_path", ENGINES, indirect=True)
def test_engine_lowrank_backward_fp32_medium(engine_path):
    """fp32 x under 'medium' takes the engines (gemm_t's route), so the fused backward too: its operands are
    rounded to bf16 (gy, x, A, B and xa), gx comes back in fp32."""
    n, k, m, r = 96, 128, 24, 4
    qt = quantized(n, k, "int4", 32, True, seed=6)
    g = torch.Generator().manual_seed(6)
    gy, x = torch.randn(m, n, generator=g), torch.randn(m, k, generator=g)
    a, b = torch.randn(r, k, generator=g) * 0.1, torch.randn(n, r, generator=g) * 0.1
    xa = x @ a.T
    with lowbit.matmul_precision("medium"):
        assert fused_backward_applies(gy)
        gx, ga, gb = lowrank_backward_op(gy, x, xa, None, *lowbit.ops.weight_args(qt), a, b, 0.5, n, k, 32, "int4", True)
    assert gx.dtype == torch.float32
    rnd = [t.to(torch.bfloat16) for t in (gy, x, xa, a, b)]
    (rx, ra, rb), (sx, su, sa, sb) = lowrank_backward_ref(*rnd[:3], None, qt.dequantize(torch.bfloat16).double(),
                                                          *rnd[3:], 0.5)
    for name, got, ref, scale, rounded in (("gx", gx, rx, sx, su), ("ga", ga, ra, sa, 0), ("gb", gb, rb, sb, 0)):
        err, tol = (got.double() - ref).abs(), 1e-5 * scale + 2.0 ** -8 * rounded  # gx: bf16(u)·A
        assert bool((err <= tol).all()), f"{name}: worst err/tol {float((err / tol).max()):.3g}"


def test_lowrank_backward_op_refuses_other_routes():
    """On a path without a bf16 engine the native call refuses (the Python layer composes instead)."""
    paths = [p for p in ("avx2", "avx512") if p in _C.available_cpu_paths()]
    if not paths:
        pytest.skip("no AVX2 path")
    qt = quantized(64, 128, "nf4", 64, True, seed=4)
    gy, x = torch.randn(4, 64).to(torch.bfloat16), torch.randn(4, 128).to(torch.bfloat16)
    a, b = torch.randn(2, 128).to(torch.bfloat16), torch.randn(64, 2).to(torch.bfloat16)
    old = _C.cpu_path()
    _C.set_cpu_path(paths[0])
    try:
        assert not fused_backward_applies(gy)
        with pytest.raises(ValueError, match="bf16 matrix engines only"):
            lowrank_backward_op(gy, x, torch.zeros(4, 2, dtype=torch.bfloat16), None, *lowbit.ops.weight_args(qt), a, b,
                                1.0, 64, 128, 64, "nf4", True)
    finally:
        _C.set_cpu_path(old)


@pytest.mark.parametrize("engine_path", ENGINES, indirect=True)
def test_engine_nonfinite_row_stays(engine_path):
    n, k = 100, 256
    qt = quantized(n, k, "nf4", 64, True, seed=1)
    x = torch.randn(40, k).to(torch.bfloat16)
    x[3, 17], x[21, 200] = float("nan"), float("inf")
    y = lowbit.linear(x, qt)
    bad = ~torch.isfinite(y)
    assert bool(bad[3].all()) and bool(bad[21].any())
    assert not bool(bad[[i for i in range(40) if i not in (3, 21)]].any())
    gy = torch.randn(40, n).to(torch.bfloat16)
    gy[5, 9] = float("nan")
    gx = gemm_t(gy, qt)
    assert bool(torch.isnan(gx[5]).all()) and bool(torch.isfinite(gx[torch.arange(40) != 5]).all())


@pytest.mark.parametrize("engine_path", ENGINES, indirect=True)
@pytest.mark.parametrize("m", [70, 200])  # 200: the last column blocks are cut into row slices on AMX too (Tasks)
def test_engine_thread_count_independent(engine_path, m):
    """Each output element is computed by one thread in one order: the bits do not depend on threads."""
    n, k = 300, 512
    qt = quantized(n, k, "int4", 128, False, seed=2)
    x, gy = torch.randn(m, k).to(torch.bfloat16), torch.randn(m, n).to(torch.bfloat16)
    old = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append((lowbit.linear(x, qt), gemm_t(gy, qt)))
    finally:
        torch.set_num_threads(old)
    for y, gx in outs[1:]:
        assert torch.equal(y, outs[0][0]) and torch.equal(gx, outs[0][1])


@pytest.mark.skipif(not {"amx-emulated", "avx512bf16"} <= set(ENGINES), reason="needs two engines to compare")
def test_engines_agree():
    """Two engines, one contract: on the same operands their fp32 results differ only by the order of
    fp32 accumulation."""
    n, k = 160, 1024
    qt = quantized(n, k, "fp4", 64, True, seed=4)
    x = torch.randn(50, k)
    ys = {}
    for p in ("amx-emulated", "avx512bf16"):
        _C.set_cpu_path(p)
        try:
            with lowbit.matmul_precision("medium"):
                ys[p] = lowbit.linear(x, qt).double()
        finally:
            _C.set_cpu_path("auto")
    ref = bf16_ref(x) @ qt.dequantize(torch.bfloat16).double().T
    assert_f32_out(ys["amx-emulated"], ref, 1e-5)
    assert_f32_out(ys["avx512bf16"], ref, 1e-5)


# ---------------------------------------------------------------- the precision policy
def test_policy_api():
    assert lowbit.get_matmul_precision() == "high"
    with lowbit.matmul_precision("medium"):
        assert lowbit.get_matmul_precision() == "medium" and _C.matmul_precision() == 2
        with pytest.raises(RuntimeError):
            with lowbit.matmul_precision("highest"):
                raise RuntimeError("restored on an exception too")
        assert lowbit.get_matmul_precision() == "medium"
    assert lowbit.get_matmul_precision() == "high" and _C.matmul_precision() == 1
    for bad in ("low", "HIGH", None, 1):
        with pytest.raises(ValueError, match="precision must be one of"):
            lowbit.set_matmul_precision(bad)
    assert lowbit.get_matmul_precision() == "high"


POLICY_BOUND = {"highest": 1e-6, "high": 2e-4, "medium": 1e-2}


def _paths_for_policy():
    return [p for p in ("portable", "avx2", "avx512", "avx512bf16", "amx", "amx-emulated")
            if p in _C.available_cpu_paths()] if _C else []


@pytest.mark.parametrize("path", _paths_for_policy())
@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
@pytest.mark.parametrize("m", [1, 40])
def test_policy_error_bounds(path, precision, m):
    """fp32 activations, K = 4096: each policy's documented bound on max|err|/max|ref| against the
    float64 product on the exact dequantized weight, on every path (what each path runs: gemm_route)."""
    n, k = 64, 4096
    qt = quantized(n, k, "nf4", 64, True, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7))
    ref = x.double() @ qt.dequantize().double().T
    _C.set_cpu_path(path)
    try:
        with lowbit.matmul_precision(precision):
            route = _C.gemm_route(0, m, False)
            y = lowbit.linear(x, qt)
    finally:
        _C.set_cpu_path("auto")
    rel = float((y.double() - ref).abs().max() / ref.abs().max())
    assert rel <= POLICY_BOUND[precision], f"{path} {precision} M={m} ({route}): {rel:.3g}"
    if precision == "highest":
        assert route in ("tile_f32", "portable")
    if precision == "medium" and m > 24 and path in ROUTE:
        assert route == ROUTE[path]


def test_policy_fp16_never_bf16():
    """fp16 activations keep fp16-level error: never the bf16 engine, whatever the policy."""
    for precision in ("highest", "high", "medium"):
        with lowbit.matmul_precision(precision):
            for m in (1, 100):
                assert _C.gemm_route(2, m, False) not in ("avx512bf16", "amx", "amx_emulated", "gemv_bf16", "amx_rows",
                                                          "amx_rows_emulated")
                assert _C.gemm_route(2, m, True) not in ("avx512bf16", "amx", "amx_emulated")


def test_bf16_without_engine_rounds_weight():
    """On a path without a bf16 engine, bf16 x still computes on Ŵ = dequantize(bf16) (the fp32 tile
    on the bf16-rounded weight): the result is torch's bf16 matmul up to accumulation order."""
    paths = [p for p in ("avx2", "avx512") if p in _C.available_cpu_paths()]
    if not paths:
        pytest.skip("no AVX2 path")
    qt = quantized(96, 512, "nf4", 64, True, seed=9)
    x = torch.randn(50, 512).to(torch.bfloat16)
    gy = torch.randn(50, 96).to(torch.bfloat16)
    wd = qt.dequantize(torch.bfloat16).double()
    for p in paths:
        _C.set_cpu_path(p)
        try:
            assert _C.gemm_route(1, 50, False) == "tile_f32_bf16w"
            y, gx = lowbit.linear(x, qt), gemm_t(gy, qt)
        finally:
            _C.set_cpu_path("auto")
        assert_bf16_out(y, x.double() @ wd.T, float((x.double().abs() @ wd.abs().T).max()))
        assert_bf16_out(gx, gy.double() @ wd, float((gy.double().abs() @ wd.abs()).max()))


def test_info_reports_engines():
    d = lowbit.info()
    assert d["matmul_precision"] == "high"
    assert d["cpu_path"] in d["cpu_paths"]
    eng = d["engines"]
    assert set(eng) == {"float32", "bfloat16", "float16"}
    for dt, rows in eng.items():
        assert rows["gemm"] and rows["gemm_t"]
        for rng, route in rows["gemm"]:
            assert route in ("gemv_i16", "gemv_bf16", "tile_f32", "tile_f32_bf16w", "tile_i16", "avx512bf16", "amx",
                             "amx_emulated", "amx_rows", "amx_rows_emulated", "portable")
    assert ("amx" in d["cpu_paths"]) == (d["amx_status"] == "")


def test_amx_unavailable_is_explained():
    if "amx" in _C.available_cpu_paths():
        pytest.skip("AMX runs here")
    with pytest.raises(ValueError, match="not available"):
        _C.set_cpu_path("amx")
    assert _C.amx_status()  # the reason, e.g. no AMX in CPUID


def test_policy_is_process_wide_in_a_subprocess():
    """A fresh process starts at 'high'; the setter reaches the kernels there too."""
    code = ("import lowbit, torch\n"
            "c = lowbit._native.module('cpu')\n"
            "assert lowbit.get_matmul_precision() == 'high' and c.matmul_precision() == 1\n"
            "lowbit.set_matmul_precision('highest')\n"
            "assert c.gemm_route(0, 1, False) in ('tile_f32', 'portable')\n")
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
