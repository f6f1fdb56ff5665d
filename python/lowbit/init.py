"""Error-reconstructing initialisations: the low-rank branch as a correction of the quantization error.

Each function takes a dense weight ``w`` (N, K) and the rank ``r``, then keywords only — the
quantizer (``fmt``, ``block_size``, ``double_quant``), the data (``calib_x`` or ``cov``), the method's
own (``iters``, ``fisher``, ``ridge``) — and returns ``(qt, A, B)`` with ``w ≈ dequant(qt) + B · A`` —
``A`` (r, K), ``B`` (N, r), fp32, for an adapter of scale 1 (divide ``B`` by the LoRA scaling
``alpha / r`` before loading it into a LoRALinear; :func:`lowbit.add_lora` with ``init=`` does that).
The order before issue 12 (``svd_init(w, fmt, r, ...)``, ``qwha_init(w, qweight, r, ...)``) still works,
with a DeprecationWarning.

* ``svd``: quantize once, then the rank-r SVD of the error (weight-space optimum for that Q).
* ``loftq`` (Li et al. 2023, LoftQ): alternate ``Q = quantize(W − BA)`` and ``BA = SVD_r(W − deq(Q))``.
* ``qera`` (Zhang et al. 2024, QERA): minimise the *output* error ``‖X (W − deq(Q) − BA)ᵀ‖``:
  with ``R = E[xᵀx]`` and ``S = R^{1/2}``, ``BA = SVD_r((W − deq(Q)) S) S⁻¹`` (closed form).
* ``lq_lora`` (Guo et al. 2023, LQ-LoRA): LoftQ's alternation with the data-aware weighting of the
  paper (rank-1 row/column approximation of a Fisher matrix, when given) and early stopping.

:func:`svdquant` (Li et al. 2024, SVDQuant) is the other way round: the low-rank branch is taken *before*
quantization (the SVD of the smoothed weight) and only the residual is quantized, for W4A4 layers
(:class:`lowbit.nn.SVDQuantLinear`); it returns an :class:`~lowbit.nn.svdquant.SVDQuantWeight`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

from . import ops
from . import reference as ref
from .formats import QuantizedTensor, QuantSpec
from .nn.svdquant import SVDQuantWeight, svdquant_decompose
from .ops.qwha import adapter_hadamard, adapter_hadamard_factors

__all__ = ["svd_init", "loftq", "qera", "lq_lora", "output_error", "calibration_covariances", "INITS"]


def _old_order(*names: str):
    """Accept the call form before issue 12, ``fn(w, <names...>)`` — recognised by a second positional
    argument that is not the int rank — with a DeprecationWarning: its positional arguments become
    the keywords ``names``."""

    def wrap(fn):
        @functools.wraps(fn)
        def shim(w, *args, **kwargs):
            if not args or (isinstance(args[0], int) and not isinstance(args[0], bool)):
                return fn(w, *args, **kwargs)
            if len(args) > len(names):
                raise TypeError(f"{fn.__name__}(w, {', '.join(names)}) takes at most {len(names) + 1} positional "
                                f"arguments, got {len(args) + 1}")
            old = dict(zip(names, args))
            twice = sorted(set(old) & set(kwargs))
            if twice:
                raise TypeError(f"{fn.__name__}() got multiple values for {twice}")
            warnings.warn(f"{fn.__name__}(w, {', '.join(old)}) is deprecated: call {fn.__name__}(w, r, ...) with "
                          f"the other arguments as keywords", DeprecationWarning, stacklevel=2)
            return fn(w, **old, **kwargs)

        return shim

    return wrap


def _svd_r(e: torch.Tensor, r: int):
    """Best rank-r factors of e (float64 SVD): B = U √Σ, A = √Σ Vᵀ."""
    u, s, vh = torch.linalg.svd(e.double(), full_matrices=False)
    sq = s[:r].sqrt()
    return (sq[:, None] * vh[:r]), (u[:, :r] * sq[None, :])


def _check(w: torch.Tensor, r: int) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise TypeError(f"w must be a 2-D float tensor, got {type(w).__name__} {getattr(w, 'shape', '')}")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(w.shape):
        raise ValueError(f"r={r!r} must be an int in [1, {min(w.shape)}]")


def _q(w: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> QuantizedTensor:
    return ops.quantize(w.to(dtype), spec)


@_old_order("fmt", "r", "block_size", "double_quant")
def svd_init(w: torch.Tensor, r: int, *, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False):
    """Quantize once, then the rank-r SVD of the error W − deq(Q)."""
    _check(w, r)
    spec = QuantSpec(fmt, block_size, double_quant)
    qt = _q(w, spec, w.dtype)
    a, b = _svd_r(w.double() - qt.dequantize(torch.float32).double(), r)
    return qt, a.float(), b.float()


@_old_order("fmt", "r", "iters", "block_size", "double_quant")
def loftq(w: torch.Tensor, r: int, *, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False,
          iters: int = 5):
    """LoftQ alternation (iters ≥ 1): Q_t = quantize(W − B_{t-1}A_{t-1}), B_tA_t = SVD_r(W − deq(Q_t))."""
    _check(w, r)
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters={iters!r} must be an int >= 1")
    spec = QuantSpec(fmt, block_size, double_quant)
    w64 = w.double()
    a = torch.zeros(r, w.shape[1], dtype=torch.float64)
    b = torch.zeros(w.shape[0], r, dtype=torch.float64)
    for _ in range(iters):
        qt = _q((w64 - b @ a).float(), spec, w.dtype)
        a, b = _svd_r(w64 - qt.dequantize(torch.float32).double(), r)
    return qt, a.float(), b.float()


def _sqrt_and_inv_sqrt(cov: torch.Tensor, ridge: float):
    cov = cov.double()
    cov = cov + ridge * cov.diagonal().mean().clamp_min(1e-30) * torch.eye(cov.shape[0], dtype=torch.float64)
    lam, v = torch.linalg.eigh(cov)
    lam = lam.clamp_min(lam.max() * 1e-12)
    return (v * lam.sqrt()) @ v.T, (v * lam.rsqrt()) @ v.T


@_old_order("fmt", "r", "calib_x", "cov", "block_size", "double_quant", "ridge")
def qera(w: torch.Tensor, r: int, *, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False,
         calib_x: Optional[torch.Tensor] = None, cov: Optional[torch.Tensor] = None, ridge: float = 1e-4):
    """QERA closed form. Give calibration activations ``calib_x`` (..., K) or their second moment
    ``cov = E[xᵀx]`` (K, K). ``ridge`` (relative to the mean eigenvalue) keeps R invertible."""
    _check(w, r)
    if cov is None:
        if calib_x is None:
            raise ValueError("qera needs calib_x (..., K) or cov (K, K)")
        x = calib_x.reshape(-1, calib_x.shape[-1]).double()
        cov = x.T @ x / x.shape[0]
    if cov.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"cov has shape {tuple(cov.shape)}, expected ({w.shape[1]}, {w.shape[1]})")
    spec = QuantSpec(fmt, block_size, double_quant)
    qt = _q(w, spec, w.dtype)
    e = w.double() - qt.dequantize(torch.float32).double()
    s, s_inv = _sqrt_and_inv_sqrt(cov, ridge)
    a, b = _svd_r(e @ s, r)
    return qt, (a @ s_inv).float(), b.float()


@_old_order("fmt", "r", "iters", "fisher", "block_size", "double_quant")
def lq_lora(w: torch.Tensor, r: int, *, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False,
            iters: int = 10, fisher: Optional[torch.Tensor] = None):
    """LQ-LoRA: alternate ``BA = SVD_r(D_r (W − deq(Q)) D_c)`` (unscaled) and ``Q = quantize(W − BA)``,
    keeping the best iterate. ``fisher`` (N, K) (e.g. squared gradients) gives the row/column
    weights ``D_r = √(mean_k F)``, ``D_c = √(mean_n F)``; without it the weighting is uniform."""
    _check(w, r)
    spec = QuantSpec(fmt, block_size, double_quant)
    w64 = w.double()
    if fisher is not None:
        if fisher.shape != w.shape:
            raise ValueError(f"fisher has shape {tuple(fisher.shape)}, expected {tuple(w.shape)}")
        f = fisher.double().clamp_min(0)
        dr = f.mean(1).sqrt().clamp_min(1e-12)[:, None]
        dc = f.mean(0).sqrt().clamp_min(1e-12)[None, :]
    else:
        dr = torch.ones(w.shape[0], 1, dtype=torch.float64)
        dc = torch.ones(1, w.shape[1], dtype=torch.float64)
    qt = _q(w, spec, w.dtype)
    best = None
    for _ in range(iters):
        e = w64 - qt.dequantize(torch.float32).double()
        a, b = _svd_r(dr * e * dc, r)
        a, b = a / dc, b / dr
        err = (dr * (e - b @ a) * dc).norm().item()
        if best is not None and err >= best[0]:
            break
        best = (err, qt, a, b)
        qt = _q((w64 - b @ a).float(), spec, w.dtype)
    _, qt, a, b = best
    return qt, a.float(), b.float()


def output_error(w: torch.Tensor, qt: QuantizedTensor, a: Optional[torch.Tensor], b: Optional[torch.Tensor],
                 x: torch.Tensor) -> float:
    """‖X (W − deq(Q) − BA)ᵀ‖_F / ‖X Wᵀ‖_F on activations x (..., K)."""
    x = x.reshape(-1, x.shape[-1]).double()
    e = w.double() - qt.dequantize(torch.float32).double()
    if a is not None:
        e = e - b.double() @ a.double()
    return float((x @ e.T).norm() / (x @ w.double().T).norm())


@torch.no_grad()
def calibration_covariances(model: torch.nn.Module, inputs, module_names) -> dict[str, torch.Tensor]:
    """E[xᵀx] (K, K, fp64) of the inputs of the named Linear modules over one forward of ``inputs``
    (token ids (B, T) or a dict of model kwargs)."""
    covs, counts, hooks = {}, {}, []

    def hook(name):
        def fn(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            covs[name] = covs.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for name in module_names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        for h in hooks:
            h.remove()
    return {n: covs[n] / counts[n] for n in covs}


INITS = {"svd": svd_init, "loftq": loftq, "qera": qera, "lq_lora": lq_lora}  # lowbit.add_lora(init=...)


# ================================================================================== SVDQuant
__all__ += ["svdquant"]


def svdquant(w: torch.Tensor, r: int = 32, *, calib_x: Optional[torch.Tensor] = None,
             act_amax: Optional[torch.Tensor] = None, alpha: float = 0.5,
             dtype: torch.dtype = torch.float32) -> SVDQuantWeight:
    """SVDQuant's decomposition of a dense ``w`` (N, K) for a W4A4 layer: smoothing λ from calibration
    activations ``calib_x`` (tokens, K) (or their per-channel maxima ``act_amax`` (K,); neither: λ = 1),
    ``λ_k = max|X_k|^alpha / max|W_k|^(1 − alpha)``; the rank-``r`` SVD ``L1 · L2`` of ``W · diag(λ)`` (float64);
    the residual ``R = W · diag(λ) − L1 · L2`` in symmetric int4, groups of 64 along K, packed.

    Returns :class:`~lowbit.nn.svdquant.SVDQuantWeight` (``smooth``, ``inv_smooth``, ``l1`` (N, r), ``l2``
    (r, K), ``qw`` (N, K/2) uint8, ``sw`` (N, K/64) fp32), with ``W ≈ (l1 · l2 + dequant(R)) · diag(1/λ)``.
    ValueError for non-finite ``w``, K not a multiple of 64, ``r`` outside [0, min(N, K, 256)], ``calib_x`` of
    another width than K, ``alpha`` outside [0, 1]. Details: :func:`lowbit.nn.svdquant.svdquant_decompose`."""
    return svdquant_decompose(w, r, calib_x=calib_x, act_amax=act_amax, alpha=alpha, dtype=dtype)


# ================================================================================== QWHA
# Initialisation of the Walsh–Hadamard adapter (lowbit.nn.HadamardAdapterLinear, lowbit.add_qwha):
# ΔW = F · Hᵀ / K with F sparse, chosen to cancel the quantization error E = W − deq(W_Q) where the activations look.
__all__ += ["qwha_init"]


def _qwha_budgets(weight: torch.Tensor, nnz: int, cap: int) -> torch.Tensor:
    """Integers k_j ∝ weight_j summing to nnz with 0 ≤ k_j ≤ cap (water-filling at the cap, then
    largest remainders)."""
    n = weight.numel()
    w = weight.double().clamp_min(0)
    if not torch.isfinite(w).all() or w.sum() <= 0:
        w = torch.ones(n, dtype=torch.float64)
    capped = torch.zeros(n, dtype=torch.bool)
    while True:
        free = nnz - cap * int(capped.sum())
        t = torch.where(capped, torch.tensor(float(cap), dtype=torch.float64),
                        free * w / w[~capped].sum().clamp_min(1e-300))
        over = (t > cap) & ~capped
        if not over.any():
            break
        capped |= over
    t = torch.where(capped, torch.tensor(float(cap), dtype=torch.float64), t)
    k = t.floor().long()
    rest = nnz - int(k.sum())
    if rest > 0:  # largest remainders first, among rows below the cap
        frac = torch.where(k < cap, t - k, torch.tensor(-1.0, dtype=torch.float64))
        k[torch.topk(frac, rest).indices] += 1
    return k


@_old_order("qweight", "r", "calib_x", "alpha")
@torch.no_grad()
def qwha_init(w: torch.Tensor, r: int, *, qweight, calib_x: Optional[torch.Tensor] = None,
              cov: Optional[torch.Tensor] = None, alpha: float = 1.0, ridge: float = 1e-4, max_block: int = 1 << 24):
    """Support and values of a QWHA adapter (scale 1) that cancels the quantization error.

    ``w`` (N, K) the dense weight, ``qweight`` (keyword) its QuantizedTensor or the dequantized (N, K) tensor
    — it stands where the other inits take the quantizer's arguments, since QWHA does not requantize;
    ``nnz = r · (N + K)`` coefficients (a rank-r LoRA's parameter count). With calibration activations
    ``calib_x`` (..., K) or their second moment ``cov = E[xᵀx]`` (K, K) the objective is the layer-output
    error ‖X (E − ΔW)ᵀ‖_F, else the weight error ‖E − ΔW‖_F. In float64:

    1. E = W − deq(W_Q); C = cov + ridge · mean(diag cov) · I (= RᵀR, so ‖X v‖² ∝ ‖R v‖²; C = I without data).
    2. ΔW row j is H f_j / K, so row j's error is the least-squares problem
       ``min ‖R (e_j − H f_j / K)‖`` with Gram matrix G = Hᵀ C H / K² (shared by all rows) and
       right-hand side b_j = Hᵀ C e_j / K. Without data G = I / K and b_j = (row j of the spectrum E·H) / K.
    3. Budgets: k_j ∝ ‖R e_j‖^alpha (∝ the norm of row j of the whitened spectrum E Rᵀ H), Σ k_j = nnz.
    4. Support: per row the top-k_j coefficients by |b_ji| / √G_ii — the error each one removes on its own
       (calibration-weighted magnitude; without data it is |(E·H)_ji|, the optimal choice for an orthogonal basis).
    5. Values: the exact least-squares solution on the support, G[S_j, S_j] f = b_j[S_j] per row
       (Cholesky-based solve of the normal equations in float64, rows batched by k_j).

    Returns ``(support (2, nnz) int64 row-major sorted, values (nnz,) fp32)`` for
    :class:`lowbit.nn.HadamardAdapterLinear` (divide values by its ``scale`` when scale ≠ 1).
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise TypeError(f"w must be a 2-D float tensor, got {type(w).__name__} {getattr(w, 'shape', '')}")
    n, k = w.shape
    adapter_hadamard_factors(k)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r * (n + k) <= n * k:
        raise ValueError(f"r={r!r} must be an int >= 1 with r * (N + K) <= N * K for w of shape {tuple(w.shape)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < float("inf"):
        raise ValueError(f"alpha={alpha!r} must be a finite number >= 0")
    deq = qweight.dequantize(torch.float32) if isinstance(qweight, QuantizedTensor) else qweight
    if not isinstance(deq, torch.Tensor) or tuple(deq.shape) != (n, k):
        raise ValueError(f"qweight must be a QuantizedTensor or tensor of shape {(n, k)}, "
                         f"got {tuple(getattr(deq, 'shape', ()))}")
    if cov is None and calib_x is not None:
        x = calib_x.reshape(-1, calib_x.shape[-1]).double()
        cov = x.T @ x / x.shape[0]
    if cov is not None and tuple(cov.shape) != (k, k):
        raise ValueError(f"cov has shape {tuple(cov.shape)}, expected ({k}, {k})")
    nnz = r * (n + k)
    wht = lambda t, tr=False: adapter_hadamard(t, 1.0, tr, fn=ref.hadamard_ref)  # noqa: E731  (t @ H, fp64)
    e = w.detach().double().cpu() - deq.detach().double().cpu()  # (N, K)
    if cov is None:
        g_diag = torch.full((k,), 1.0 / k, dtype=torch.float64)
        gram = None
        b = wht(e) / k  # (N, K)
        row_norm = e.norm(dim=1)
    else:
        c = cov.detach().double().cpu()
        c = (c + c.T) / 2
        c = c + ridge * c.diagonal().mean().clamp_min(1e-30) * torch.eye(k, dtype=torch.float64)
        ch = wht(c)                                          # C H
        gram = wht(ch.T.contiguous(), False) / k**2          # Hᵀ C H / K²   ((C H)ᵀ = Hᵀ C)
        gram = (gram + gram.T) / 2
        g_diag = gram.diagonal().clone()
        ec = e @ c                                           # (N, K)
        b = wht(ec) / k                                      # rows b_j = e_jᵀ C H / K
        row_norm = (ec * e).sum(1).clamp_min(0).sqrt()       # ‖R e_j‖
    budgets = _qwha_budgets(row_norm ** alpha, nnz, k)
    score = b.abs() / g_diag.sqrt()[None, :]
    rows_out, cols_out, vals_out = [], [], []
    order = torch.argsort(budgets, descending=True)
    i = 0
    while i < n and budgets[order[i]] > 0:
        kmax = int(budgets[order[i]])
        m = max(1, min(n - i, max_block // max(1, kmax * kmax)))
        rows = order[i:i + m]
        rows = rows[budgets[rows] > 0]
        i += m
        kj = budgets[rows]
        idx = torch.topk(score[rows], kmax, dim=1).indices               # (m, kmax), best first
        mask = torch.arange(kmax)[None, :] < kj[:, None]                   # the first k_j of each row
        rhs = torch.gather(b[rows], 1, idx) * mask
        if gram is None:
            f = rhs * k                                                    # G = I / K
        else:
            gs = gram[idx[:, :, None], idx[:, None, :]]                    # (m, kmax, kmax)
            mm = mask[:, :, None] & mask[:, None, :]
            gs = torch.where(mm, gs, torch.eye(kmax, dtype=torch.float64).expand_as(gs))
            chol, info = torch.linalg.cholesky_ex(gs)
            if int(info.max()) == 0:
                f = torch.cholesky_solve(rhs[:, :, None], chol)[:, :, 0]
            else:  # not positive definite in floating point (tiny ridge): the minimum-norm LS solution
                f = torch.linalg.lstsq(gs, rhs[:, :, None], driver="gelsd").solution[:, :, 0]
        rows_out.append(rows[:, None].expand_as(idx)[mask])
        cols_out.append(idx[mask])
        vals_out.append(f[mask])
    rows_t, cols_t, vals_t = torch.cat(rows_out), torch.cat(cols_out), torch.cat(vals_out)
    srt = torch.argsort(rows_t * k + cols_t)
    return torch.stack([rows_t[srt], cols_t[srt]]), vals_t[srt].float()
