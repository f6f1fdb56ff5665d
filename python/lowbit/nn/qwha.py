"""HadamardAdapterLinear: the QWHA adapter (Walsh–Hadamard adaptation) on a quantized base.

From "QWHA: Quantization-Aware Walsh-Hadamard Adaptation": the update is ΔW = s · F · H⁻¹ with
F a sparse (out_features, in_features) coefficient matrix on a fixed support and H the ±1 Hadamard
matrix of order K = in_features (H Hᵀ = K·I, so H⁻¹ = Hᵀ / K):

    y = base(x) + s · (x · H / K) · Fᵀ

computed as one WHT of each token (``lowbit.hadamard``), then a sparse-dense product with F's
nonzeros (CSR). Neither ΔW nor a dense F exists in the forward or the backward: the backward is a
sampled product for dF (only at the support) and the transposed sparse product followed by the
inverse transform (``g · Hᵀ / K``) for dx. F's values are the only trainable parameters;
``nnz = r · (K + N)`` matches the parameter count of a rank-r LoRA.

K must have a Hadamard matrix here: a size ``lowbit.hadamard`` supports (m·2^k, m ∈ {1, 12, 20, 28,
40, 172}) or a product K = K₁·K₂ of two such sizes, for which H = H_{K₁} ⊗ H_{K₂} (two WHT passes;
e.g. 576 = 12·48, the hidden size of SmolLM2, has no m·2^k form). The initialisation from the
quantization error is :func:`lowbit.init.qwha_init`; :func:`lowbit.add_qwha` wires both into a model.
The transform and the sparse products are the ops of :mod:`lowbit.ops.qwha`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .. import ops
from .. import reference as ref
from ..ops.qwha import adapter_hadamard, adapter_hadamard_factors, qwha_inference, qwha_spmm
from .quant_linear import QuantLinear

__all__ = ["HadamardAdapterLinear", "qwha_layers"]


# --------------------------------------------------------------------------------- the module
def _check_support(support, n: int, k: int) -> torch.Tensor:
    if not isinstance(support, torch.Tensor) or support.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"support must be an int64/int32 tensor (2, nnz) of (row, col) indices, "
                        f"got {type(support).__name__} {getattr(support, 'dtype', '')}")
    if support.dim() != 2 or support.shape[0] != 2 or support.shape[1] < 1:
        raise ValueError(f"support must have shape (2, nnz) with nnz >= 1, got {tuple(support.shape)}")
    s = support.to(torch.int64)
    r, c = s[0], s[1]
    if int(r.min()) < 0 or int(r.max()) >= n or int(c.min()) < 0 or int(c.max()) >= k:
        raise ValueError(f"support indices out of range: rows in [{int(r.min())}, {int(r.max())}] (out_features={n}), "
                         f"cols in [{int(c.min())}, {int(c.max())}] (in_features={k})")
    if torch.unique(r * k + c).numel() != s.shape[1]:
        raise ValueError(f"support has {s.shape[1] - torch.unique(r * k + c).numel()} duplicate (row, col) entries")
    return s


class HadamardAdapterLinear(nn.Module):
    """``y = base(x) + scale · (x · H / K) · Fᵀ``: a QWHA adapter on a ``QuantLinear`` (or ``nn.Linear``).

    ``support`` (2, nnz) int (row, col) indices of F's nonzeros (any order, no duplicates) and
    ``values`` (nnz,) their initial values in the same order (default zeros: the layer starts as its
    base). Without ``support``, each row gets ≈ nnz / N seeded-random columns with
    ``nnz = r · (in_features + out_features)``; the useful support comes from the quantization error
    (:func:`lowbit.init.qwha_init`, :func:`lowbit.add_qwha`). Stored row-major sorted: buffer ``support``,
    parameter ``values`` (fp32) — the state dict holds both.
    """

    def __init__(self, base: Union[QuantLinear, nn.Linear], r: int = 16, scale: float = 1.0,
                 support: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None, seed: int = 0):
        super().__init__()
        if not isinstance(base, (QuantLinear, nn.Linear)):
            raise TypeError(f"base must be a lowbit.nn.QuantLinear or nn.Linear, got {type(base).__name__}")
        n, k = base.out_features, base.in_features
        self.factors = adapter_hadamard_factors(k)  # ValueError for K without a Hadamard matrix
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(float(scale)) < float("inf"):
            raise ValueError(f"scale={scale!r} must be a finite real number")
        self.base, self.in_features, self.out_features, self.scale = base, k, n, float(scale)
        for p in base.parameters():
            p.requires_grad_(False)
        dev = base.weight.device
        if support is None:
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r * (n + k) <= n * k:
                raise ValueError(f"r={r!r} must be an int >= 1 with r * (in_features + out_features) <= "
                                 f"in_features * out_features ({k} * {n})")
            support = _random_support(n, k, r * (n + k), seed)
            if values is not None:
                raise ValueError("values= needs the support= they belong to")
        support = _check_support(support, n, k)
        if values is None:
            values = torch.zeros(support.shape[1])
        if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.shape != (support.shape[1],):
            raise ValueError(f"values must be a float tensor of shape ({support.shape[1]},) (one per support entry), "
                             f"got {getattr(values, 'shape', type(values).__name__)}")
        order = torch.argsort(support[0] * k + support[1])
        self.register_buffer("support", support[:, order].contiguous().to(dev))
        self.values = nn.Parameter(values.detach()[order].to(dev, torch.float32).clone())
        self._build_index()

    @property
    def nnz(self) -> int:
        return self.support.shape[1]

    @property
    def r(self) -> float:
        """The rank of a LoRA with the same number of trainable parameters."""
        return self.nnz / (self.in_features + self.out_features)

    def _build_index(self) -> None:
        """CSR of F and of Fᵀ from the (row-major sorted) support; non-persistent, rebuilt on load."""
        n, k = self.out_features, self.in_features
        rows, cols = self.support[0], self.support[1]
        if self.nnz >= 2**31:
            raise ValueError(f"nnz={self.nnz} does not fit the int32 CSR indices")
        crow = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
        crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
        perm = torch.argsort(cols * n + rows)
        ccol = torch.zeros(k + 1, dtype=torch.int64, device=rows.device)
        ccol[1:] = torch.bincount(cols, minlength=k).cumsum(0)
        i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
        for name, t in (("crow", i32(crow)), ("cols", i32(cols)), ("ccol", i32(ccol)),
                        ("rows_t", i32(rows[perm])), ("perm", perm)):
            self.register_buffer(name, t, persistent=False)

    # ---- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != k:
            raise ValueError(f"x must be a tensor (..., in_features={k}), got {tuple(getattr(x, 'shape', ()))}")
        y = self.base(x)
        if self._forward_inference(x, y):
            return y
        # The adapter branch runs in fp32 (bf16/fp16 x is widened first: a z rounded to bf16 would add
        # eps_bf16 · Σ|z||F| of error for nothing; the cast is M·K elements, the GEMV reads N·K).
        cd = torch.float64 if torch.float64 in (x.dtype, self.values.dtype) else torch.float32
        if cd == torch.float64:  # lowbit.hadamard is fp32/bf16/fp16; fp64 (tests) goes through the spec
            z = adapter_hadamard(x.to(cd), 1.0 / k, fn=_hadamard_ref_autograd)
        else:
            z = adapter_hadamard(x.to(cd), 1.0 / k)  # x · H / K, one WHT per token
        a = qwha_spmm(z.reshape(-1, k), self.values.to(cd), self.crow, self.cols, self.ccol, self.rows_t, self.perm,
                      self.out_features, self.scale)
        return y + a.reshape(*x.shape[:-1], self.out_features).to(y.dtype)

    def _forward_inference(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Decode fast path: with no gradient to record and a single-factor H,
        :func:`lowbit.ops.qwha_inference` adds the branch into the base output y in place (fp32 on the
        "cpu" backend only). Returns False to take the op path."""
        if torch.is_grad_enabled() and (x.requires_grad or self.values.requires_grad):
            return False
        if len(self.factors) != 1:
            return False
        return qwha_inference(x, y, self.values, self.crow, self.cols, self.out_features, self.scale)

    # ---- merge
    def coefficients(self) -> torch.Tensor:
        """Dense F (out_features, in_features) fp32 — for inspection and merging only."""
        f = torch.zeros(self.out_features, self.in_features, device=self.values.device)
        f[self.support[0], self.support[1]] = self.values.detach().float()
        return f

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · F · Hᵀ / K, (out_features, in_features) fp32 (materialised: merging only)."""
        return adapter_hadamard(self.coefficients(), self.scale / self.in_features, transpose=True)

    @torch.no_grad()
    def merge(self, dense: bool = False):
        """The base weight plus ΔW: ``dense=True`` gives the fp32 (N, K) tensor; otherwise
        ``(QuantizedTensor, rel_error)`` — W_Q + ΔW re-quantized in the base's format and the error
        that adds, ‖deq(new) − (deq(W_Q) + ΔW)‖ / ‖deq(W_Q) + ΔW‖. The module is not modified."""
        base_w = self.base.weight
        target = (base_w.dequantize(torch.float32) if isinstance(self.base, QuantLinear) else base_w.float())
        target = target + self.delta_weight()
        if dense:
            return target
        if not isinstance(self.base, QuantLinear):
            raise ValueError("the base is a dense nn.Linear: there is no quantized weight to merge into; "
                             "use merge(dense=True)")
        new = ops.quantize(target.to(base_w.dtype), base_w.spec)
        err = (new.dequantize(torch.float32) - target).norm() / target.norm().clamp_min(1e-30)
        return new, float(err)

    # ---- state dict: the support may have another nnz than this module was built with
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        s = state_dict.get(prefix + "support")
        if isinstance(s, torch.Tensor) and s.shape != self.support.shape:
            try:
                s = _check_support(s, self.out_features, self.in_features)
            except (TypeError, ValueError) as e:
                error_msgs.append(f"{prefix}support: {e}")
                return
            self.support = torch.empty_like(s, device=self.support.device)
            self.values = nn.Parameter(torch.empty(s.shape[1], device=self.values.device, dtype=self.values.dtype),
                                       requires_grad=self.values.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not (torch.all(self.support[0, 1:] * self.in_features + self.support[1, 1:]
                          > self.support[0, :-1] * self.in_features + self.support[1, :-1])):
            error_msgs.append(f"{prefix}support is not sorted row-major without duplicates")
            return
        self._build_index()

    def extra_repr(self) -> str:
        h = " ⊗ ".join(f"H_{f}" for f in self.factors)
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz} "
                f"(LoRA-equivalent r={self.r:g}), scale={self.scale:g}, H={h}")


def _hadamard_ref_autograd(x, scale, transpose):
    """The float64 reference transform, differentiable (plain torch ops)."""
    return ref.hadamard_ref(x, scale, transpose)


def _random_support(n: int, k: int, nnz: int, seed: int) -> torch.Tensor:
    """≈ nnz / n distinct seeded-random columns per row (the first nnz % n rows get one more)."""
    g = torch.Generator().manual_seed(seed)
    per = torch.full((n,), nnz // n, dtype=torch.int64)
    per[: nnz % n] += 1
    kmax = int(per.max())
    cols = torch.rand(n, k, generator=g).topk(kmax, dim=1).indices
    keep = torch.arange(kmax)[None, :] < per[:, None]
    rows = torch.arange(n)[:, None].expand(n, kmax)
    return torch.stack([rows[keep], cols[keep]])


def qwha_layers(model: nn.Module) -> dict[str, HadamardAdapterLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, HadamardAdapterLinear)}
