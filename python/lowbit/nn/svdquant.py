"""SVDQuant (Li et al. 2024): W4A4 made accurate by smoothing and a 16-bit low-rank branch.

A weight W (N, K) becomes

* a smoothing vector λ (K,) — SmoothQuant's migration of activation outliers into the weight:
  ``λ_k = max|X_k|^α / max_n |W_nk|^(1−α)`` from calibration activations X (λ = 1 without them);
* the smoothed weight ``W' = W · diag(λ)`` split into its best rank-r part ``L1 · L2`` (top-r singular triplets
  in float64: ``L1 = U_r · S_r`` (N, r), ``L2 = V_rᵀ`` (r, K)) and the residual ``R = W' − L1 · L2``;
* R in 4 bits: symmetric, one fp32 scale per row and group of 64 along K (``qw`` packed (N, K/2) uint8,
  ``sw`` (N, K/64) fp32) — the quantizer of include/lowbit/svdquant.h, :func:`lowbit.reference.svdquant_quantize_ref`.

The layer computes ``y = Q(x / λ) · dequant(R)ᵀ + (x / λ) · L2ᵀ · L1ᵀ + b`` with the activations also
quantized to 4 bits per group of 64 (:func:`lowbit.ops.svdquant_linear`): the branch sees x in 16/32 bits,
so the outliers it absorbed never pass through the 4-bit quantizers. :func:`svdquant_decompose` is the
math (``lowbit.init.svdquant`` is its public name); :class:`SVDQuantLinear` the drop-in module.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import reference as ref
from ..formats import DTYPE_NAME
from ..functional import svdquant_linear
from ..ops.svdquant import SVDQ_GROUP, SVDQ_MAX_RANK, check_svdquant_weight

__all__ = ["SVDQuantWeight", "svdquant_decompose", "SVDQuantLinear", "activation_amax"]

SMOOTH_FLOOR = 1e-5  # SmoothQuant's clamp: a dead channel (max |x| = 0 or max |w| = 0) must not give λ = 0 or ∞


class SVDQuantWeight:
    """What :func:`svdquant_decompose` returns: ``smooth`` λ (K,) fp32 and ``inv_smooth`` 1/λ (K,) fp32 (the one
    the kernel multiplies by), ``l1`` (N, r) and ``l2`` (r, K) in the branch dtype, ``qw`` (N, K/2) uint8 and
    ``sw`` (N, K/64) fp32 the packed 4-bit residual. The weight it stands for is
    ``(l1 · l2 + dequant(qw, sw)) · diag(inv_smooth)`` (:meth:`dequantize`)."""

    __slots__ = ("smooth", "inv_smooth", "l1", "l2", "qw", "sw")

    def __init__(self, smooth, inv_smooth, l1, l2, qw, sw):
        self.smooth, self.inv_smooth, self.l1, self.l2, self.qw, self.sw = smooth, inv_smooth, l1, l2, qw, sw

    @property
    def shape(self) -> tuple[int, int]:
        return self.qw.shape[0], self.qw.shape[1] * 2

    @property
    def rank(self) -> int:
        return self.l1.shape[1]

    def residual(self) -> torch.Tensor:
        """dequant(R) (N, K) fp32: q · s per group."""
        q = ref.svdquant_unpack_ref(self.qw).float()
        n, k = self.shape
        return (q.reshape(n, k // SVDQ_GROUP, SVDQ_GROUP) * self.sw[..., None]).reshape(n, k)

    def dequantize(self) -> torch.Tensor:
        """The effective weight (N, K) in float64: ``(l1 · l2 + dequant(R)) · diag(inv_smooth)``."""
        w = self.residual().double() + self.l1.double() @ self.l2.double()
        return w * self.inv_smooth.double()

    def __iter__(self):  # smooth, inv_smooth, l1, l2, qw, sw = svdquant(...)
        return iter((self.smooth, self.inv_smooth, self.l1, self.l2, self.qw, self.sw))

    def __repr__(self) -> str:
        n, k = self.shape
        return f"SVDQuantWeight(shape=({n}, {k}), rank={self.rank}, branch dtype={self.l1.dtype})"


def activation_amax(calib_x: torch.Tensor, k: int) -> torch.Tensor:
    """max |x_k| over all rows of calibration activations (..., K): (K,) fp32. ValueError on a wrong width or
    a non-finite value (a smoothing vector from them would be NaN)."""
    if not isinstance(calib_x, torch.Tensor) or not calib_x.is_floating_point() or calib_x.dim() < 1:
        raise TypeError(f"calib_x must be a float tensor (..., K), got {type(calib_x).__name__} "
                        f"{getattr(calib_x, 'dtype', '')}")
    if calib_x.shape[-1] != k:
        raise ValueError(f"calib_x has width {calib_x.shape[-1]} (shape {tuple(calib_x.shape)}); the weight has "
                         f"K={k} input features")
    x = calib_x.detach().reshape(-1, k)
    if x.shape[0] == 0:
        raise ValueError(f"calib_x has no rows (shape {tuple(calib_x.shape)})")
    if not torch.isfinite(x).all():
        raise ValueError(f"calib_x holds {int((~torch.isfinite(x)).sum())} non-finite values")
    return x.abs().amax(0).float()


def _top_singular(a: torch.Tensor, r: int):
    """The top-r singular triplets of a float64 (N, K) as ``(U_r · S_r (N, r), V_rᵀ (r, K))``: from the symmetric
    eigendecomposition of the smaller Gram matrix (min(N, K)² in float64), ~5x faster here than a full SVD
    (torch's gesdd) and as exact for the leading triplets (only singular values below ~1e-8 · σ_1, which
    carry nothing, lose accuracy by the squaring). L1 · L2 is the orthogonal projection of ``a`` onto its
    top-r singular subspace — the best rank-r approximation (Eckart–Young)."""
    n, k = a.shape
    if k <= n:
        _, v = torch.linalg.eigh(a.T @ a)                    # ascending eigenvalues
        v = v[:, -r:].flip(1)                                # (K, r) V_r
        return a @ v, v.T.contiguous()                       # U_r S_r = A V_r
    _, u = torch.linalg.eigh(a @ a.T)
    u = u[:, -r:].flip(1)                                    # (N, r) U_r
    p = u.T @ a                                              # (r, K) = S_r V_rᵀ
    s = p.norm(dim=1)
    live = s > 0
    l2 = torch.where(live[:, None], p / torch.where(live, s, torch.ones_like(s))[:, None], torch.zeros_like(p))
    return u * s, l2


@torch.no_grad()
def svdquant_decompose(w: torch.Tensor, r: int = 32, *, calib_x: Optional[torch.Tensor] = None,
                       act_amax: Optional[torch.Tensor] = None, alpha: float = 0.5,
                       dtype: torch.dtype = torch.float32) -> SVDQuantWeight:
    """SVDQuant's decomposition of ``w`` (N, K): see the module docstring and :class:`SVDQuantWeight`.

    ``calib_x`` (..., K) calibration activations, or their per-channel maxima ``act_amax`` (K,) (what
    :func:`lowbit.quantize_model` collects); neither: no smoothing (λ = 1). ``alpha`` in [0, 1] the migration
    strength. ``r`` in 0..min(N, K, 256) (0: no branch, plain W4A4). ``dtype`` the branch's storage dtype
    (fp32/bf16/fp16): R is computed against L1 · L2 *as stored*, so the residual absorbs their rounding.

    In float64: ``λ = clamp(a_x, 1e-5)^α / clamp(a_w, 1e-5)^(1−α)`` clamped to >= 1e-5, ``inv_smooth = fp32(1/λ)``
    and ``W' = W / inv_smooth`` (so ``W' · diag(inv_smooth) = W`` for the vector the kernel really uses),
    ``smooth = fp32(1 / inv_smooth)``; the top-r singular triplets of W' (:func:`_top_singular`);
    ``R = fp32(W' − L1 · L2)`` quantized by
    :func:`lowbit.reference.svdquant_quantize_ref` and packed by :func:`lowbit.reference.svdquant_pack_ref`.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise TypeError(f"w must be a 2-D float tensor (N, K), got {type(w).__name__} {getattr(w, 'shape', '')}")
    n, k = w.shape
    if n == 0 or k == 0 or k % SVDQ_GROUP:
        raise ValueError(f"w has shape ({n}, {k}): K={k} must be a positive multiple of {SVDQ_GROUP} (one scale per "
                         f"group of {SVDQ_GROUP} along K) and N >= 1")
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise ValueError(f"w holds {bad} non-finite values; SVDQuant quantizes finite weights only")
    r_max = min(n, k, SVDQ_MAX_RANK)
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= r_max:
        raise ValueError(f"r={r!r} must be an int in [0, min(N={n}, K={k}, {SVDQ_MAX_RANK})] = [0, {r_max}]")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must be a number in [0, 1]")
    if dtype not in DTYPE_NAME:
        raise TypeError(f"dtype={dtype} must be float32, bfloat16 or float16")
    if calib_x is not None and act_amax is not None:
        raise ValueError("give calib_x or act_amax, not both")
    if calib_x is not None:
        act_amax = activation_amax(calib_x, k)
    elif act_amax is not None:
        if not isinstance(act_amax, torch.Tensor) or tuple(act_amax.shape) != (k,):
            raise ValueError(f"act_amax must be a ({k},) tensor, got {tuple(getattr(act_amax, 'shape', ()))}")
        if not torch.isfinite(act_amax).all() or (act_amax < 0).any():
            raise ValueError("act_amax must hold finite values >= 0 (max |x_k| per input channel)")
    dev = w.device
    w64 = w.detach().to(device="cpu", dtype=torch.float64)
    if act_amax is None:
        inv_smooth = torch.ones(k, dtype=torch.float32)
    else:
        ax = act_amax.detach().to(device="cpu", dtype=torch.float64).clamp_min(SMOOTH_FLOOR)
        aw = w64.abs().amax(0).clamp_min(SMOOTH_FLOOR)
        lam = (ax.pow(alpha) / aw.pow(1.0 - alpha)).clamp_min(SMOOTH_FLOOR)
        inv_smooth = (1.0 / lam).float()
    inv64 = inv_smooth.double()
    smooth = (1.0 / inv64).float()
    ws = w64 / inv64                                         # W' = W · diag(λ), λ = 1 / inv_smooth exactly
    if r:
        l1, l2 = _top_singular(ws, r)
        l1, l2 = l1.to(dtype), l2.to(dtype)
        resid = (ws - l1.double() @ l2.double()).float()     # against the branch as stored
    else:
        l1, l2 = torch.zeros(n, 0, dtype=dtype), torch.zeros(0, k, dtype=dtype)
        resid = ws.float()
    q, sw = ref.svdquant_quantize_ref(resid)
    qw = ref.svdquant_pack_ref(q)
    return SVDQuantWeight(smooth.to(dev), inv_smooth.to(dev), l1.to(dev), l2.to(dev), qw.to(dev), sw.to(dev))


_FROZEN_DTYPE = ("qw", "sw", "smooth", "inv_smooth")  # never cast by .to(dtype) / .half(): the kernel's contract


class SVDQuantLinear(nn.Module):
    """Drop-in ``nn.Linear`` computing SVDQuant W4A4: ``y = Q(x / λ) · dequant(R)ᵀ + (x / λ) · L2ᵀ · L1ᵀ + b``.

    Buffers (saved by ``state_dict``, frozen): ``qw`` (N, K/2) uint8 and ``sw`` (N, K/64) fp32 — the 4-bit
    residual; ``smooth`` / ``inv_smooth`` (K,) fp32 — λ and 1/λ; ``l1`` (N, r), ``l2`` (r, K) — the branch, in the
    layer's dtype. ``.to(device)`` moves everything; ``.to(dtype)`` / ``.half()`` cast the branch and the bias only
    (qw, sw and the smoothing vectors are the kernel's fp32/uint8 contract). The layer computes in its input's
    dtype (fp32/bf16/fp16; the branch and bias are cast to it). Gradients flow to x (straight-through the
    activation quantizer, :func:`lowbit.functional.svdquant_linear`) and to the bias.
    Build with :meth:`from_linear`, :func:`lowbit.quantize_model` (``"w4a4"``) or the constructor + :meth:`set_weight`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 32,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if in_features % SVDQ_GROUP:
            raise ValueError(f"in_features={in_features} is not a multiple of {SVDQ_GROUP} (one scale per group of "
                             f"{SVDQ_GROUP} along K)")
        r_max = min(in_features, out_features, SVDQ_MAX_RANK)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= r_max:
            raise ValueError(f"rank={rank!r} must be an int in [0, min(in_features={in_features}, "
                             f"out_features={out_features}, {SVDQ_MAX_RANK})] = [0, {r_max}]")
        if dtype not in DTYPE_NAME:
            raise TypeError(f"dtype={dtype} must be float32, bfloat16 or float16")
        self.in_features, self.out_features = in_features, out_features
        n, k = out_features, in_features
        e = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        self.register_buffer("qw", e(n, k // 2, dt=torch.uint8))
        self.register_buffer("sw", e(n, k // SVDQ_GROUP))
        self.register_buffer("smooth", torch.ones(k, dtype=torch.float32, device=device))
        self.register_buffer("inv_smooth", torch.ones(k, dtype=torch.float32, device=device))
        self.register_buffer("l1", e(n, rank, dt=dtype))
        self.register_buffer("l2", e(rank, k, dt=dtype))
        self.bias = nn.Parameter(torch.zeros(n, dtype=dtype, device=device)) if bias else None

    # ---- construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 32, calib_x: Optional[torch.Tensor] = None,
                    alpha: float = 0.5, act_amax: Optional[torch.Tensor] = None) -> "SVDQuantLinear":
        """SVDQuant an ``nn.Linear`` (:func:`svdquant_decompose`; the branch keeps the weight's dtype, the bias
        is copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        dtype = w.dtype if w.dtype in DTYPE_NAME else torch.float32
        parts = svdquant_decompose(w, r, calib_x=calib_x, act_amax=act_amax, alpha=alpha, dtype=dtype)
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, r, dtype=dtype, device="meta")
        q.set_weight(parts)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return q

    def set_weight(self, parts: SVDQuantWeight) -> None:
        """Install a decomposition of the same (N, K); its rank may differ from the layer's."""
        if not isinstance(parts, SVDQuantWeight):
            raise TypeError(f"parts must be an SVDQuantWeight, got {type(parts).__name__}")
        n, k = self.out_features, self.in_features
        if check_svdquant_weight(parts.qw, parts.sw, k) != n:
            raise ValueError(f"weight of shape {parts.shape} does not fit this layer ({n}, {k})")
        r = parts.rank
        if tuple(parts.l1.shape) != (n, r) or tuple(parts.l2.shape) != (r, k) or r > SVDQ_MAX_RANK:
            raise ValueError(f"l1 {tuple(parts.l1.shape)} / l2 {tuple(parts.l2.shape)} do not fit ({n}, {k})")
        for name in ("smooth", "inv_smooth"):
            t = getattr(parts, name)
            if t.dtype != torch.float32 or tuple(t.shape) != (k,):
                raise ValueError(f"{name} must be a ({k},) fp32 tensor, got {tuple(t.shape)} {t.dtype}")
        dev = parts.qw.device
        for name in ("qw", "sw", "smooth", "inv_smooth", "l1", "l2"):
            t = getattr(parts, name)
            if t.device != dev:
                raise ValueError(f"{name} is on {t.device}, qw on {dev}")
            self._buffers[name] = t.contiguous()

    def weight_parts(self) -> SVDQuantWeight:
        """The layer's decomposition (the buffers themselves, not copies)."""
        return SVDQuantWeight(self.smooth, self.inv_smooth, self.l1, self.l2, self.qw, self.sw)

    @property
    def rank(self) -> int:
        return self.l1.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qw.device

    def dequantize(self) -> torch.Tensor:
        """The effective dense weight (N, K), float64: ``(L1 · L2 + dequant(R)) · diag(1/λ)`` — what the layer
        applies to x, apart from the activations' 4-bit rounding."""
        return self.weight_parts().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x of shape {tuple(x.shape)} has K={x.shape[-1] if x.dim() else None} input features; "
                             f"this layer has in_features={self.in_features}")
        r = self.rank
        return svdquant_linear(x, self.qw, self.sw, self.inv_smooth, self.l1 if r else None, self.l2 if r else None,
                               self.bias)

    def _apply(self, fn, recurse=True):
        # The 4-bit residual, its scales and the smoothing vectors only change device, never dtype.
        saved = {n: self._buffers.pop(n) for n in _FROZEN_DTYPE}
        out = super()._apply(fn, recurse)
        probe = fn(torch.empty(0, device=saved["qw"].device))
        for n, t in saved.items():
            self._buffers[n] = t.to(probe.device)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, branch_dtype={DTYPE_NAME.get(self.l1.dtype, self.l1.dtype)}, "
                f"bits_per_weight={self.bits_per_weight():.3f}")

    def bits_per_weight(self) -> float:
        """Stored bits per weight: 4-bit residual + its scales + the branch + the smoothing vectors (no bias)."""
        nbytes = sum(self._buffers[n].numel() * self._buffers[n].element_size()
                     for n in ("qw", "sw", "smooth", "inv_smooth", "l1", "l2"))
        return 8 * nbytes / (self.in_features * self.out_features)


def svdquant_layers(model: nn.Module) -> dict[str, SVDQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDQuantLinear)}


__all__ += ["svdquant_layers"]
