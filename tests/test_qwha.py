"""QWHA adapter (HadamardAdapterLinear): forward and gradients against a dense float64 formulation
(ΔW = s · F · Hᵀ / K built densely HERE only, H from reference.hadamard_matrix), merge, state dict,
errors; qwha_init against independent solutions; add_qwha; on SmolLM2's real layers, QWHA's
initialisation removes more layer-output error than a plain-SVD LoRA with the same parameter count."""

from __future__ import annotations

import os

import pytest
import torch

import lowbit
from lowbit import init
from lowbit import reference as ref
from lowbit.nn import HadamardAdapterLinear, LoRALinear, QuantLinear

from conftest import assert_close, require_backend

# (in_features K, out_features N, the factors of H_K the adapter uses)
EPS_I16 = 0.5 / 16383 + 2.6e-5  # relative error of the CPU GEMV's int16 path (tests/test_gemm_cpu.py)
SHAPES = [(128, 96, (128,)), (576, 40, (12, 48)), (768, 33, (768,)), (172 * 16, 24, (2752,))]


def dense_h(k: int, factors) -> torch.Tensor:
    """H_K as a dense float64 matrix: H_K itself or H_{K1} ⊗ H_{K2} (index i = a·K2 + b)."""
    hs = [ref.hadamard_matrix(f, torch.float64) for f in factors]
    return hs[0] if len(hs) == 1 else torch.kron(hs[0], hs[1])


def make_layer(k, n, r=3, scale=0.75, fmt="nf4", block=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(n, generator=g))
    with lowbit.use_backend("reference"):
        base = QuantLinear.from_linear(lin, fmt, block, True)
        w64 = base.weight.dequantize(torch.float32).double()
    layer = HadamardAdapterLinear(base, r=r, scale=scale, seed=seed)
    with torch.no_grad():
        layer.values.copy_(torch.randn(layer.nnz, generator=g))
    return layer, w64, lin.bias.detach().double()


def dense_f(layer) -> torch.Tensor:
    f = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    f[layer.support[0], layer.support[1]] = layer.values.detach().double()
    return f


def use(be):
    require_backend(be)
    return lowbit.use_backend(be)


# ------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("be", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("k, n, factors", SHAPES, ids=[f"{k}x{n}" for k, n, _ in SHAPES])
def test_forward_matches_dense_float64(be, dtype, m, k, n, factors):
    layer, w64, b64 = make_layer(k, n, seed=m)
    h = dense_h(k, factors)
    assert (h @ h.T == k * torch.eye(k, dtype=torch.float64)).all()  # a Hadamard matrix: H⁻¹ = Hᵀ / K
    f = dense_f(layer)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    with use(be), torch.no_grad():
        y = layer(x)
    x64 = x.double()
    expected = x64 @ (w64 + layer.scale * f @ h.T / k).T + b64
    scale = x64.abs() @ w64.abs().T + layer.scale * (x64.abs() @ h.abs() / k) @ f.abs().T + b64.abs()
    if be == "cpu":  # the base GEMV's small-M path rounds x to int16 per group of 32 (tests/test_gemm_cpu.py)
        xg = x64.abs().reshape(m, -1, 32).amax(-1, keepdim=True).expand(m, k // 32, 32).reshape(m, k)
        scale = scale + EPS_I16 * (xg @ w64.abs().T) / ((2 * k) ** 0.5 * torch.finfo(torch.float32).eps)
    if dtype != torch.float32:  # the base computes in dtype (its terms rounded to bf16: Σ|x||w|); the
        # base output and the adapter term are each rounded to dtype before the sum
        parts = x64.abs() @ w64.abs().T + b64.abs() + (layer.scale * (x64 @ h / k) @ f.T).abs()
        scale = scale + parts * torch.finfo(dtype).eps / ((2 * k) ** 0.5 * torch.finfo(torch.float32).eps)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y, expected, dtype=dtype, k=2 * k, scale=scale, factor=8 if dtype == torch.bfloat16 else 4)


def test_forward_keeps_leading_dims_and_starts_at_base():
    layer, _, _ = make_layer(128, 96)
    fresh = HadamardAdapterLinear(layer.base, r=2)
    x = torch.randn(2, 5, 128)
    assert torch.equal(fresh(x), layer.base(x))  # values start at zero
    assert layer(x).shape == (2, 5, 96)
    assert_close(layer(x).reshape(10, 96), layer(x.reshape(10, 128)).double(), dtype=torch.float32, k=128)


# ----------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("be", ["reference", "cpu"])
@pytest.mark.parametrize("k, n, factors", SHAPES, ids=[f"{k}x{n}" for k, n, _ in SHAPES])
def test_grads_match_autograd_of_dense_float64(be, k, n, factors):
    """d(values) and dx against torch autograd through x · (deq(W) + s F Hᵀ / K)ᵀ in float64."""
    layer, w64, b64 = make_layer(k, n, seed=1)
    h = dense_h(k, factors)
    x = torch.randn(4, k, requires_grad=True)
    gy = torch.randn(4, n)
    with use(be):
        layer(x).backward(gy)
    assert layer.base.bias.grad is None and layer.values.grad.shape == (layer.nnz,)

    def dense_grads(sign):  # with sign=abs: sums of |terms|, the error scale
        x6 = sign(x.detach().double()).requires_grad_()
        f6 = sign(dense_f(layer)).requires_grad_()
        (x6 @ (sign(w64) + layer.scale * f6 @ sign(h).T / k).T + b64).backward(sign(gy.double()))
        return x6.grad, f6.grad[layer.support[0], layer.support[1]]

    (gx, gv), (sx, sv) = dense_grads(lambda t: t), dense_grads(torch.abs)
    assert_close(x.grad, gx, dtype=torch.float32, k=2 * k, scale=sx, name="grad x")
    assert_close(layer.values.grad, gv, dtype=torch.float32, k=2 * k, scale=sv, name="grad values")


def test_gradcheck_float64_reference():
    layer, _, _ = make_layer(96, 16, r=2, block=32)  # 96 = 12 · 8
    layer.double()
    x = torch.randn(3, 96, dtype=torch.float64, requires_grad=True)
    with lowbit.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda x_, v_: _with_values(layer, v_)(x_), (x, layer.values.detach().clone().requires_grad_()))


def _with_values(layer, v):
    def fn(x):
        from lowbit.ops.qwha import qwha_spmm, adapter_hadamard

        z = adapter_hadamard(x, 1.0 / layer.in_features, fn=ref.hadamard_ref)
        return layer.base(x) + qwha_spmm(z, v, layer.crow, layer.cols, layer.ccol, layer.rows_t, layer.perm,
                                         layer.out_features, layer.scale)
    return fn


def test_qwha_spmm_opcheck():
    layer, _, _ = make_layer(128, 96)
    z = torch.randn(5, 128, requires_grad=True)
    v = layer.values.detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.lowbit.qwha_spmm.default,
                          (z, v, layer.crow, layer.cols, layer.ccol, layer.rows_t, layer.perm, 96, 0.5))
    torch.library.opcheck(torch.ops.lowbit.qwha_spmm_backward.default,
                          (torch.randn(5, 96), z.detach(), v.detach(), layer.crow, layer.cols, layer.ccol, layer.rows_t,
                           layer.perm, True, True))


def random_csr(n, k, nnz, seed, empty_rows=()):
    """A random F (n, k) as int32 CSR (rows in order, as the module builds it) and its dense float64 copy."""
    g = torch.Generator().manual_seed(seed)
    key = torch.unique(torch.randint(0, n * k, (nnz,), generator=g))
    rows, cols = key // k, key % k
    keep = ~torch.isin(rows, torch.tensor(list(empty_rows), dtype=torch.int64))
    rows, cols = rows[keep], cols[keep]
    vals = torch.randn(rows.numel(), generator=g)
    crow = torch.zeros(n + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    perm = torch.argsort(cols * n + rows)
    ccol = torch.zeros(k + 1, dtype=torch.int64)
    ccol[1:] = torch.bincount(cols, minlength=k).cumsum(0)
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    dense = torch.zeros(n, k, dtype=torch.float64)
    dense[rows, cols] = vals.double()
    return vals, (i32(crow), i32(cols), i32(ccol), i32(rows[perm]), perm), dense, (rows, cols)


@pytest.mark.parametrize("be", ["reference", "cpu", "cpu-portable"])
@pytest.mark.parametrize("m, n, k, nnz", [(m, 96, 128, 700) for m in (0, 1, 3, 7, 8, 9, 33)]
                         + [(m, 4096, 4096, 131072) for m in (1, 9)])
def test_qwha_spmm_and_backward_match_dense_float64(be, m, n, k, nnz):
    """y = s·z·Fᵀ, gz = gy·F, dF at the support — each against a dense float64 product (the CPU kernels:
    gather path for M < 8, 8-row panels from M = 8 with a partial last panel; rows without nonzeros)."""
    from lowbit.ops.qwha import qwha_spmm, qwha_spmm_backward

    vals, idx, f, (rows, cols) = random_csr(n, k, nnz, seed=m, empty_rows=(0, 5, n - 1))
    g = torch.Generator().manual_seed(100 + m)
    z, gy = torch.randn(m, k, generator=g), torch.randn(m, n, generator=g)
    path = "portable" if be == "cpu-portable" else "auto"
    with use(be.split("-")[0]):
        if be != "reference":
            lowbit._native.module("cpu").set_cpu_path(path)
        try:
            y = qwha_spmm(z, vals, *idx, n, 0.5)
            gz, gv = qwha_spmm_backward(gy, z, vals, *idx, True, True)
        finally:
            if be != "reference":
                lowbit._native.module("cpu").set_cpu_path("auto")
    z6, gy6 = z.double(), gy.double()
    per_nz = max(1, int(torch.bincount(rows, minlength=n).max()))
    assert_close(y, 0.5 * z6 @ f.T, dtype=torch.float32, k=per_nz, scale=0.5 * z6.abs() @ f.abs().T, name="y")
    assert_close(gz, gy6 @ f, dtype=torch.float32, k=n, scale=gy6.abs() @ f.abs(), name="gz")
    assert_close(gv, (gy6.T @ z6)[rows, cols], dtype=torch.float32, k=max(m, 1),
                 scale=(gy6.abs().T @ z6.abs())[rows, cols], name="grad values")


@pytest.mark.parametrize("m", [1, 3, 9])
def test_inference_fast_path_equals_the_op_path(m):
    """Under no_grad / inference_mode the CPU fp32 forward takes raw kernel calls (accumulating into the
    base output): the same numbers as the autograd op path, and the float64 dense formulation."""
    require_backend("cpu")
    layer, w64, b64 = make_layer(128, 96)
    x = torch.randn(2, m, 128)
    with lowbit.use_backend("cpu"):
        y_op = layer(x)  # values require grad: the op path
        assert y_op.requires_grad
        with torch.no_grad():
            y_ng = layer(x)
        with torch.inference_mode():
            y_inf = layer(x)
    assert torch.equal(y_ng, y_op.detach()) and torch.equal(y_inf, y_op.detach())
    h = dense_h(128, (128,))
    ref64 = x.double() @ (w64 + layer.scale * dense_f(layer) @ h.T / 128).T + b64
    sums = x.double().abs() @ (w64.abs() + layer.scale * dense_f(layer).abs() @ h.abs().T / 128).T + b64.abs()
    assert_close(y_ng, ref64, dtype=torch.float32, k=2 * 128, scale=sums, extra=EPS_I16 * sums, name="y")


def test_qwha_spmm_bad_csr_raises_without_crashing():
    from lowbit.ops.qwha import qwha_spmm, qwha_spmm_backward

    vals, (crow, cols, ccol, rows_t, perm), _, _ = random_csr(96, 128, 3000, seed=0)  # ~30 nonzeros a row
    z = torch.randn(9, 128)
    require_backend("cpu")
    bad_col = cols.clone()
    bad_col[3] = 128  # == k: out of range, inside the first 8-wide gather of row 0
    neg_col = cols.clone()
    neg_col[int(crow[1]) - 1] = -1  # the scalar tail of row 0
    bad_crow = crow.clone()
    bad_crow[10] = bad_crow[11] + 1  # decreasing
    with lowbit.use_backend("cpu"):
        for m in (1, 2, 9):  # the gather path (AVX2: 8 per gather + tail) and the panel path
            for c in (bad_col, neg_col):
                with pytest.raises(ValueError, match="column index"):
                    qwha_spmm(z[:m], vals, crow, c, ccol, rows_t, perm, 96, 1.0)
                with pytest.raises(ValueError, match="column index"):
                    qwha_spmm_backward(torch.randn(m, 96), z[:m], vals, crow, c, ccol, rows_t, perm, False, True)
            with pytest.raises(ValueError, match="crow"):
                qwha_spmm(z[:m], vals, bad_crow, cols, ccol, rows_t, perm, 96, 1.0)
        with pytest.raises(ValueError, match="crow"):
            qwha_spmm(z, vals, crow[:-1], cols, ccol, rows_t, perm, 96, 1.0)
        with pytest.raises(ValueError, match="int32"):
            qwha_spmm(z, vals, crow.long(), cols, ccol, rows_t, perm, 96, 1.0)
        with pytest.raises(ValueError, match="values"):
            qwha_spmm(z, vals[:-1], crow, cols, ccol, rows_t, perm, 96, 1.0)
        with pytest.raises(ValueError, match="dtype"):
            qwha_spmm(z, vals.double(), crow, cols, ccol, rows_t, perm, 96, 1.0)


def test_training_step_updates_only_values():
    layer, _, _ = make_layer(576, 40)
    before = layer.base.weight.codes.clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["values"]
    x, target = torch.randn(8, 576), torch.randn(8, 40)
    losses = []
    for _ in range(3):
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[2] < losses[0] and torch.equal(layer.base.weight.codes, before)


# --------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("k, n, factors", SHAPES[:3], ids=[f"{k}x{n}" for k, n, _ in SHAPES[:3]])
def test_merge(k, n, factors):
    layer, w64, _ = make_layer(k, n, scale=0.01)
    target = w64 + layer.scale * dense_f(layer) @ dense_h(k, factors).T / k
    dense = layer.merge(dense=True)
    assert_close(dense, target, dtype=torch.float32, k=2 * k, scale=w64.abs() + 0.01 * dense_f(layer).abs().sum(1, keepdim=True) / k)
    qt, err = layer.merge()
    assert qt.spec == layer.base.weight.spec and tuple(qt.shape) == (n, k)
    want = lowbit.quantize(dense.to(layer.base.weight.dtype), layer.base.weight.spec).dequantize(torch.float32)
    assert torch.equal(qt.dequantize(torch.float32), want)
    assert err == pytest.approx(float((want.double() - dense.double()).norm() / dense.double().norm()), rel=1e-5)
    assert 0 < err < 0.2
    x = torch.randn(3, k)
    merged = QuantLinear(k, n, True, "nf4", 64, True)
    merged.set_weight(qt)
    merged.bias = layer.base.bias
    # the merged layer differs from the adapter only by the re-quantization error
    diff = (merged(x) - layer(x)).norm() / layer(x).norm()
    assert diff < 2 * err + 1e-3
    dense_base = HadamardAdapterLinear(torch.nn.Linear(k, n), support=layer.support, values=layer.values.detach())
    with pytest.raises(ValueError, match="merge.dense=True"):
        dense_base.merge()


# ---------------------------------------------------------------------------------- state dict
def test_state_dict_round_trip():
    layer, _, _ = make_layer(576, 40, r=3)
    sd = layer.state_dict()
    assert {"support", "values"} <= set(sd) and sd["support"].shape == (2, 3 * (576 + 40))
    assert not any(k in sd for k in ("crow", "cols", "ccol", "rows_t", "perm"))  # derived, rebuilt on load
    # a module with another support (another nnz) takes this one's support and values
    other = HadamardAdapterLinear(QuantLinear(576, 40, True, "nf4", 64, True), r=1, scale=layer.scale, seed=5)
    other.base.load_state_dict(layer.base.state_dict())
    other.load_state_dict(sd)
    assert torch.equal(other.support, layer.support) and torch.equal(other.values, layer.values)
    x = torch.randn(4, 576)
    assert torch.equal(other(x), layer(x))
    bad = dict(sd)
    bad["support"] = sd["support"].flip(1)
    with pytest.raises(RuntimeError, match="not sorted"):
        other.load_state_dict(bad)
    assert "H_12 ⊗ H_48" in repr(layer) and "LoRA-equivalent r=3" in repr(layer)


def test_support_given_in_any_order():
    layer, _, _ = make_layer(128, 96)
    perm = torch.randperm(layer.nnz)
    again = HadamardAdapterLinear(layer.base, support=layer.support[:, perm], values=layer.values.detach()[perm])
    assert torch.equal(again.support, layer.support) and torch.equal(again.values, layer.values)


# -------------------------------------------------------------------------------------- errors
def test_errors():
    with pytest.raises(ValueError, match="in_features=352 has no Hadamard"):  # 352 = 11·32
        HadamardAdapterLinear(QuantLinear(352, 64, True, "nf4", 32))
    with pytest.raises(ValueError, match="in_features=100 has no Hadamard"):
        HadamardAdapterLinear(torch.nn.Linear(100, 8))
    base = QuantLinear(128, 64, True, "nf4", 64)
    with pytest.raises(TypeError, match="base must be"):
        HadamardAdapterLinear(torch.nn.Conv1d(1, 1, 1))
    with pytest.raises(ValueError, match="r=0"):
        HadamardAdapterLinear(base, r=0)
    with pytest.raises(ValueError, match="r=100"):
        HadamardAdapterLinear(base, r=100)  # 100 · 192 > 128 · 64
    with pytest.raises(ValueError, match="out of range"):
        HadamardAdapterLinear(base, support=torch.tensor([[0, 64], [0, 1]]))
    with pytest.raises(ValueError, match="out of range"):
        HadamardAdapterLinear(base, support=torch.tensor([[0, 1], [-1, 1]]))
    with pytest.raises(ValueError, match="1 duplicate"):
        HadamardAdapterLinear(base, support=torch.tensor([[0, 0, 1], [3, 3, 1]]))
    with pytest.raises(ValueError, match="shape .2, nnz."):
        HadamardAdapterLinear(base, support=torch.tensor([[0, 1, 2]]))
    with pytest.raises(TypeError, match="support must be"):
        HadamardAdapterLinear(base, support=torch.tensor([[0.0], [1.0]]))
    with pytest.raises(ValueError, match="values must be"):
        HadamardAdapterLinear(base, support=torch.tensor([[0, 1], [2, 3]]), values=torch.zeros(3))
    with pytest.raises(ValueError, match="scale"):
        HadamardAdapterLinear(base, scale=float("nan"))
    with pytest.raises(ValueError, match="x must be a tensor .*in_features=128.*100"):
        HadamardAdapterLinear(base)(torch.randn(2, 100))
    with pytest.raises(ValueError, match="r=0"):
        init.qwha_init(torch.randn(64, 128), 0, qweight=torch.randn(64, 128))
    with pytest.raises(ValueError, match="in_features=100"):
        init.qwha_init(torch.randn(64, 100), 1, qweight=torch.randn(64, 100))
    with pytest.raises(ValueError, match="cov has shape"):
        init.qwha_init(torch.randn(64, 128), 1, qweight=torch.randn(64, 128), cov=torch.eye(64))


# ------------------------------------------------------------------------------------ qwha_init
def _correlated_activations(k, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k ** 0.5)
    x[:, :8] *= 10  # outlier channels, as LLM activations have
    return x


def _delta(support, values, n, k, factors):
    f = torch.zeros(n, k, dtype=torch.float64)
    f[support[0], support[1]] = values.double()
    return f @ dense_h(k, factors).T / k


def test_qwha_init_without_data_keeps_the_largest_spectrum_coefficients():
    """Without activations the basis H/√K is orthogonal: the optimum keeps, per row, the k_j largest
    |(E·H)_ji| with their exact values, k_j ∝ ‖E_j‖ (alpha = 1)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 576, generator=g) * 0.02
    w[:5] *= 4  # rows with larger error get larger budgets
    qt = lowbit.quantize(w, "int4", 64)
    e = w.double() - qt.dequantize(torch.float32).double()
    support, values = init.qwha_init(w, 2, qweight=qt)
    assert support.shape == (2, 2 * (576 + 40)) and values.dtype == torch.float32
    assert torch.equal(support, support[:, torch.argsort(support[0] * 576 + support[1])])  # row-major sorted
    spec = e @ dense_h(576, (12, 48))
    counts = torch.bincount(support[0], minlength=40)
    want = 2 * (576 + 40) * e.norm(dim=1) / e.norm(dim=1).sum()
    assert (counts - want).abs().max() <= 1
    for j in range(40):
        cols = support[1][support[0] == j]
        top = spec[j].abs().topk(int(counts[j])).indices.sort().values
        assert torch.equal(cols, top)
        assert_close(values[support[0] == j], spec[j, cols], dtype=torch.float32, k=576)


def test_qwha_init_values_are_the_least_squares_solution():
    """With activations: on the chosen support the values minimise ‖X (e_j − ΔW_j)‖ row by row
    (compared with torch.linalg.lstsq on the raw activations, not on the normal equations)."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 128, generator=g) * 0.02
    qt = lowbit.quantize(w, "nf4", 64)
    x = _correlated_activations(128, 512).double()
    support, values = init.qwha_init(w, 2, qweight=qt, calib_x=x, ridge=0.0)
    e = w.double() - qt.dequantize(torch.float32).double()
    basis = x @ dense_h(128, (128,)) / 128  # X H / K: column i is X times ΔW's direction for F_ji
    for j in range(24):
        sel = support[0] == j
        cols = support[1][sel]
        sol = torch.linalg.lstsq(basis[:, cols], x @ e[j]).solution
        assert_close(values[sel], sol, dtype=torch.float32, k=128, scale=sol.abs().max())


@pytest.mark.parametrize("fmt", ["nf4", "int2"])
def test_qwha_init_beats_svd_lora_on_output_error(fmt):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(192, 256, generator=g) * 0.02
    x = _correlated_activations(256)
    x_eval = _correlated_activations(256, seed=9)[:, :]  # same distribution, other samples
    qt = lowbit.quantize(w, fmt, 64)
    e = w.double() - qt.dequantize(torch.float32).double()
    s, v = init.qwha_init(w, 8, qweight=qt, calib_x=x)
    a, b = init._svd_r(e, 8)
    xe = x_eval.double()
    qwha = (xe @ (e - _delta(s, v, 192, 256, (256,))).T).norm() / (xe @ e.T).norm()
    svd = (xe @ (e - b @ a).T).norm() / (xe @ e.T).norm()
    assert qwha < svd < 1


# ------------------------------------------------------------------------------------ add_qwha
def _model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"q_proj": torch.nn.Linear(128, 128), "down_proj": torch.nn.Linear(256, 128),
                                "lm_head": torch.nn.Linear(128, 50)})


def test_add_qwha_initialises_from_the_error():
    model = _model()
    x = torch.randn(64, 128)
    ref_q = model["q_proj"](x).detach()
    names = lowbit.add_qwha(model, r=4, target_modules=("q_proj", "down_proj"))
    assert names == ["q_proj", "down_proj"] and isinstance(model["q_proj"], HadamardAdapterLinear)
    assert isinstance(model["q_proj"].base, QuantLinear) and isinstance(model["lm_head"], torch.nn.Linear)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == ["down_proj.values", "q_proj.values"]
    with torch.no_grad():
        err_adapter = (model["q_proj"](x) - ref_q).norm()
        err_base = (model["q_proj"].base(x) - ref_q).norm()
    assert err_adapter < 0.95 * err_base  # the init cancels part of the quantization error
    # a model already quantized: no W, so zero adapters
    q = _model()
    lowbit.quantize_model(q, "nf4", 64, skip=("lm_head",), progress=False)
    lowbit.add_qwha(q, r=2, target_modules=("q_proj",))
    assert q["q_proj"].values.abs().sum() == 0
    lora = _model()
    assert lowbit.add_lora(lora, r=4, target_modules=("q_proj",), fmt="nf4") == ["q_proj"]
    assert isinstance(lora["q_proj"], LoRALinear) and isinstance(lora["q_proj"].base, QuantLinear)
    bad = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(100, 8)})
    with pytest.raises(ValueError, match="q_proj: in_features=100"):
        lowbit.add_qwha(bad, fmt=None)


def test_add_adapters_is_a_deprecated_spelling():
    """add_adapters(kind=...) keeps working: "qwha" is add_qwha, "lora" is add_lora(fmt=...)."""
    model = _model()
    with pytest.warns(DeprecationWarning, match="use lowbit.add_qwha"):
        names = lowbit.add_adapters(model, "qwha", r=4, target_modules=("q_proj", "down_proj"))
    assert names == ["q_proj", "down_proj"] and isinstance(model["q_proj"], HadamardAdapterLinear)
    lora = _model()
    with pytest.warns(DeprecationWarning, match="use lowbit.add_lora"):
        assert lowbit.add_adapters(lora, "lora", r=4, target_modules=("q_proj",)) == ["q_proj"]
    assert isinstance(lora["q_proj"], LoRALinear) and isinstance(lora["q_proj"].base, QuantLinear)
    with pytest.raises(ValueError, match="kind="):
        lowbit.add_adapters(_model(), "dora")
    with pytest.warns(DeprecationWarning):
        assert lowbit.nn.add_adapters(_model(), "qwha", r=2, target_modules=("q_proj",)) == ["q_proj"]


def test_qwha_init_old_argument_order_warns():
    w = torch.randn(64, 128) * 0.02
    qt = lowbit.quantize(w, "nf4", 64)
    with pytest.warns(DeprecationWarning, match=r"qwha_init\(w, qweight, r\) is deprecated"):
        s_old, v_old = init.qwha_init(w, qt, 2)
    s_new, v_new = init.qwha_init(w, 2, qweight=qt)
    assert torch.equal(s_old, s_new) and torch.equal(v_old, v_new)


def test_add_qwha_with_calibration_on_a_tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()  # 96 = 12·8, 192 = 12·16
    ids = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        want = model(ids).logits
    plain = __import__("copy").deepcopy(model)
    lowbit.quantize_model(plain, "int2", 32, skip=("lm_head",), progress=False)
    names = lowbit.add_qwha(model, r=4, calib=ids, fmt="int2", block_size=32)
    assert len(names) == 14
    with torch.no_grad():
        assert (model(ids).logits - want).norm() < (plain(ids).logits - want).norm()


def test_real_layers_qwha_init_beats_svd_lora(smollm2):
    """SmolLM2 layers, nf4 block 64, r = 16: ‖X(E − ΔW)ᵀ‖ / ‖X Eᵀ‖ on held-out activations is lower
    for QWHA (calibrated on other tokens) than for a rank-16 LoRA from the SVD of E."""
    _, model, ids = smollm2
    assert ids.numel() >= 1024
    calib, held_out = ids[:512].reshape(2, 256), ids[768:1024].reshape(1, 256)
    names = [f"model.layers.20.{p}" for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    c_cal = init.calibration_covariances(model, calib, names)
    c_ev = init.calibration_covariances(model, held_out, names)
    report = []
    for name in names:
        w = model.get_submodule(name).weight.detach()
        n, k = w.shape
        qt = lowbit.quantize(w, "nf4", 64)
        e = w.double() - qt.dequantize(torch.float32).double()
        s, v = init.qwha_init(w, 16, qweight=qt, cov=c_cal[name])
        assert s.shape[1] == 16 * (n + k)
        a, b = init._svd_r(e, 16)
        from lowbit.ops.qwha import adapter_hadamard_factors

        def out_err(d, c=c_ev[name]):
            return float((((e - d) @ c) * (e - d)).sum().sqrt() / ((e @ c) * e).sum().sqrt())

        qwha, svd = out_err(_delta(s, v, n, k, adapter_hadamard_factors(k))), out_err(b @ a)
        report.append(f"{name}: qwha {qwha:.4f} svd {svd:.4f}")
        assert qwha < svd < 1, report[-1]
    print("\n".join(report))
