"""hadamard family: the Walsh–Hadamard transform on every backend (reference, cpu, cpu-portable, and
the CUDA kernels on the simt simulator under forward / reverse / random schedules — the `backend`
fixture of conftest.py) against independent references
(scipy.linalg.hadamard for powers of two, float64 products with H_m ⊗ H_{2^k} for the other sizes),
the H_m tables (C++ == Python, H Hᵀ = m I), autograd, out= / in place, and errors."""

from __future__ import annotations

import math

import pytest
import torch

import lowbit
from lowbit import _native, ops, reference as ref

from conftest import assert_close, require_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
POW2 = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
# m · 2^k for every m, small and large k (k < 3 exercises the scalar path of the CPU kernel)
NONPOW2 = [12, 24, 48, 96, 20, 40, 80, 160, 28, 56, 448, 320, 172, 344, 1376, 2752]
LARGE = [16384, 32768, 14336, 28672, 20480, 22016]  # 28·512, 28·1024, 40·512, 172·128
ROWS = [1, 3, 7]


def _x(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _dense(n: int) -> torch.Tensor:
    """H_n in float64 by an independent route: scipy for powers of two, else the Kronecker product of
    the reference's H_m (itself checked against the C++ table and H Hᵀ = m I) with scipy's H_{2^k}."""
    sl = pytest.importorskip("scipy.linalg")
    m, l = ref.hadamard_split(n)
    h_l = torch.tensor(sl.hadamard(l), dtype=torch.float64)
    return h_l if m == 1 else torch.kron(ref.hadamard_matrix(m, torch.float64), h_l)


def _check(y, x, h, scale, dtype, name):
    """y ≈ x · h · scale in float64; the bound is a fp32 sum of n terms of |x|."""
    x64 = x.double().reshape(-1, x.shape[-1])
    expected = (x64 @ h * scale).reshape(x.shape)
    bound = (x64.abs().sum(-1, keepdim=True) * abs(scale)).expand(-1, x.shape[-1]).reshape(x.shape)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, expected, dtype=dtype, k=x.shape[-1], scale=bound, name=name)


# ------------------------------------------------------------------------- H_m tables
@pytest.mark.parametrize("m", [12, 20, 28, 40, 172])
def test_hm_is_hadamard_and_cpp_equals_python(m):
    h = ref.hadamard_matrix(m, torch.float64)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))
    # Paley II (12, 20, 28) and its doubling (40) are symmetric; the Williamson H_172 is not, which
    # is why the backward uses the transpose.
    assert torch.equal(h, h.T) == (m != 172)
    require_backend("cpu")
    assert torch.equal(torch.tensor(_native.module("cpu").hadamard_matrix(m), dtype=torch.float64), h)


def test_williamson_quadruple():
    circ = [torch.tensor([1 if c == "+" else -1 for c in s])[(torch.arange(43)[None] - torch.arange(43)[:, None]) % 43]
            for s in ref.WILLIAMSON_43]
    assert all(torch.equal(a, a.T) for a in circ)
    assert torch.equal(sum(a @ a for a in circ), 172 * torch.eye(43, dtype=torch.int64))


def test_split_rule():
    assert ref.hadamard_split(4096) == (1, 4096)
    assert ref.hadamard_split(11008) == (172, 64)
    assert ref.hadamard_split(28672) == (28, 1024)
    assert ref.hadamard_split(20) == (20, 1)
    assert ref.hadamard_split(80) == (40, 2)  # the largest m: H_40 ⊗ H_2, not H_20 ⊗ H_4


# ------------------------------------------------------------------------- values on every backend
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_pow2_against_scipy(backend, dtype):
    for n in POW2:
        h = _dense(n)
        for rows in ROWS:
            x = _x((rows, n), dtype, seed=n + rows)
            s = 1.0 if n < 64 else n ** -0.5
            _check(lowbit.hadamard(x, s), x, h, s, dtype, f"n={n} rows={rows} {dtype}")
    x = _x((2, 3, 256), dtype)  # leading shape
    _check(lowbit.hadamard(x, 0.25), x, _dense(256), 0.25, dtype, "(2, 3, 256)")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_non_pow2_against_dense(backend, dtype):
    for n in NONPOW2:
        h = _dense(n)
        rows = 3 if n < 4096 else 1
        x = _x((rows, n), dtype, seed=n)
        s = n ** -0.5
        _check(lowbit.hadamard(x, s), x, h, s, dtype, f"n={n} {dtype}")
        if ref.hadamard_split(n)[0] == 172:
            _check(ops.hadamard(x, s, transpose=True), x, h.T, s, dtype, f"n={n} {dtype} transposed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_large_sizes_against_float64(backend, dtype):
    """Too large for a dense H: the float64 structured reference (its rule is pinned down above)."""
    for n in LARGE:
        x = _x((2, n), dtype, seed=n)
        s = n ** -0.5
        expected = ref.hadamard_ref(x.double(), s)
        bound = (x.double().abs().sum(-1, keepdim=True) * s).expand(-1, n)
        assert_close(lowbit.hadamard(x, s), expected, dtype=dtype, k=n, scale=bound, name=f"n={n} {dtype}")


def test_public_hadamard_has_transpose(backend):
    """lowbit.hadamard passes transpose= through (H_172 is the one order where it matters)."""
    x = torch.randn(3, 172 * 2)
    h = ref.hadamard_matrix(172 * 2, torch.float64)
    assert not torch.equal(h, h.T)
    assert torch.equal(lowbit.hadamard(x, 0.5, transpose=True), ops.hadamard(x, 0.5, transpose=True))
    assert torch.equal(lowbit.hadamard(x, 0.5), ops.hadamard(x, 0.5))
    _check(lowbit.hadamard(x, 0.5, transpose=True), x, h.T, 0.5, torch.float32, "lowbit.hadamard transposed")


def test_involution(backend):
    for n in [256, 4096, 28 * 64, 40 * 16, 172 * 8]:
        x = _x((3, n), torch.float32, seed=n)
        s = n ** -0.5
        y = lowbit.hadamard(x, s)
        back = ops.hadamard(y, s, transpose=True)  # H Hᵀ = n I for every H_n
        assert_close(back, x, dtype=torch.float32, k=n, scale=x.abs().amax(), name=f"n={n}")
        if ref.hadamard_split(n)[0] != 172:  # symmetric: the transform is its own inverse
            assert_close(lowbit.hadamard(y, s), x, dtype=torch.float32, k=n, scale=x.abs().amax(), name=f"n={n}")


def test_out_inplace_noncontiguous(backend):
    x = _x((4, 512), torch.float32)
    expected = lowbit.hadamard(x, 0.5)
    out = torch.empty_like(x)
    assert lowbit.hadamard(x, 0.5, out=out) is out and torch.equal(out, expected)
    y = x.clone()
    assert lowbit.hadamard(y, 0.5, inplace=True) is y and torch.equal(y, expected)
    assert lowbit.hadamard(x, 0.5, out=x.clone()).equal(expected)
    xt = _x((512, 4), torch.float32).T  # non-contiguous input
    assert torch.equal(lowbit.hadamard(xt, 0.5), lowbit.hadamard(xt.contiguous(), 0.5))
    assert lowbit.hadamard(torch.empty(0, 64), 2.0).shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_nan_inf_propagate(backend, dtype):
    x = _x((3, 64), dtype)
    x[1, 5] = float("nan")
    y = lowbit.hadamard(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()


# ------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("n", [8, 12, 40, 172])
def test_gradcheck_reference(n):
    x = _x((1, n), torch.float64).requires_grad_()
    with lowbit.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda t: lowbit.hadamard(t, 0.7), (x,))
        if n <= 12:  # the backward is the same op: one second-order check is enough
            assert torch.autograd.gradgradcheck(lambda t: lowbit.hadamard(t, 0.7), (x,))


@pytest.mark.parametrize("n", [256, 28 * 8, 172 * 2])
def test_grad_every_backend(backend, n):
    x = _x((3, n), torch.float32).requires_grad_()
    g = _x((3, n), torch.float32, seed=1)
    s = n ** -0.5
    lowbit.hadamard(x, s).backward(g)
    _check(x.grad, g, _dense(n).T, s, torch.float32, f"grad n={n}")  # g · Hᵀ · s


def test_opcheck(backend):
    x = _x((3, 12 * 8), torch.float32)
    torch.library.opcheck(torch.ops.lowbit.hadamard.default, (x, 0.5, False))
    torch.library.opcheck(torch.ops.lowbit.hadamard.default, (x.requires_grad_(), 0.5, True))


# ------------------------------------------------------------------------- errors
@pytest.mark.parametrize("n", [3, 5, 6, 36, 44, 100, 172 * 3, 65536, 172 * 256])
def test_bad_n_raises(backend, n):
    with pytest.raises(ValueError, match=f"n={n} is not a supported size"):
        lowbit.hadamard(torch.zeros(2, n))


def test_bad_arguments():
    x = torch.zeros(2, 64)
    with pytest.raises(ValueError, match="not a supported size"):
        lowbit.hadamard(torch.zeros(2, 0))
    with pytest.raises(TypeError, match="dtype"):
        lowbit.hadamard(torch.zeros(2, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least one dimension"):
        lowbit.hadamard(torch.tensor(1.0))
    with pytest.raises(ValueError, match="scale"):
        lowbit.hadamard(x, float("nan"))
    with pytest.raises(ValueError, match="either out= or inplace"):
        lowbit.hadamard(x, out=torch.empty_like(x), inplace=True)
    with pytest.raises(ValueError, match="out must match"):
        lowbit.hadamard(x, out=torch.empty(2, 32))
    with pytest.raises(ValueError, match="contiguous"):
        lowbit.hadamard(torch.zeros(64, 2).T, inplace=True)
    with pytest.raises(ValueError, match="autograd"):
        lowbit.hadamard(x.clone().requires_grad_(), inplace=True)
    if _native.has("cpu"):
        with pytest.raises(ValueError, match="m not in"):
            _native.module("cpu").hadamard_matrix(36)


def test_fp64_only_on_reference():
    if _native.has("cpu"):
        with lowbit.use_backend("cpu"), pytest.raises(TypeError, match="dtype"):
            lowbit.hadamard(torch.zeros(2, 8, dtype=torch.float64))
    with lowbit.use_backend("reference"):
        y = lowbit.hadamard(torch.ones(1, 8, dtype=torch.float64))
    assert y.dtype == torch.float64 and y[0, 0].item() == 8.0 and math.isclose(y[0, 1:].abs().sum().item(), 0.0)
