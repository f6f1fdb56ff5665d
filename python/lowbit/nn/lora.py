"""LoRALinear: low-rank adapters on a quantized (or dense) base, PEFT-compatible.

``y = base(x) + Σ_active (alpha / r) · (dropout(x) · Aᵀ) · Bᵀ`` with ``A (r, K)`` initialised like
PEFT (Kaiming-uniform, a = √5) and ``B (N, r)`` zero, so a fresh adapter leaves the output unchanged.
On a QuantLinear base with dropout inactive the whole product is one fused op (``lowbit::lowrank``);
when no autograd graph is recorded (decoding) and x is fp32 on the "cpu" backend, the module calls
that op's CPU kernel directly (:func:`lowbit.ops.lowrank_inference`) with a cached stacked (A, s·B)
pair (:meth:`LoRALinear.forward`). On an SVDQuantLinear base the adapters run beside it (autograd to A, B and
x through both) and :meth:`LoRALinear.merge` concatenates them into its low-rank branch (Nunchaku's trick).
Adapters are added to a model by :func:`lowbit.add_lora`.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from .. import ops
from ..ops.lowrank import MAX_RANK
from .quant_linear import QuantLinear
from ..ops.svdquant import SVDQ_MAX_RANK
from .svdquant import SVDQuantLinear


class LoRALinear(nn.Module):
    """A ``QuantLinear``, ``SVDQuantLinear`` or ``nn.Linear`` base plus named low-rank adapters.

    Parameters ``lora_A[name]`` (r, in_features) and ``lora_B[name]`` (out_features, r); scaling
    ``alpha / r`` per adapter. ``set_adapter(name or [names])`` chooses the active adapters (several
    active adapters act as one adapter concatenated along r, each with its own scale).
    """

    _lowrank_cache = None  # class default: modules pickled before the fast path existed load without it

    def __init__(self, base: Union[QuantLinear, SVDQuantLinear, nn.Linear], r: int = 16, alpha: float = 32,
                 dropout: float = 0.0, adapter_name: str = "default"):
        super().__init__()
        if not isinstance(base, (QuantLinear, SVDQuantLinear, nn.Linear)):
            raise TypeError(f"base must be a lowbit.nn.QuantLinear, lowbit.nn.SVDQuantLinear or nn.Linear, got "
                            f"{type(base).__name__}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: Optional[list] = None  # (names, base weight before merge) while merged
        self._lowrank_cache = None  # (key, A, s·B, versions, parameters): _cached_stacked()
        for p in base.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, r, alpha, dropout)

    # ---- adapters
    def add_adapter(self, name: str, r: int = 16, alpha: float = 32, dropout: float = 0.0) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name {name!r} must be a non-empty str without dots")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        r_max = min(MAX_RANK, self.in_features, self.out_features)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= r_max:
            raise ValueError(f"r={r!r} must be an int in [1, min({MAX_RANK}, in_features, out_features)]")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        dev = self.base.device if isinstance(self.base, SVDQuantLinear) else self.base.weight.device
        a = torch.empty(r, self.in_features, device=dev)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default for lora_A
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        self.scaling[name] = float(alpha) / r
        self.dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if not self.active:
            self.active = [name]
        self._lowrank_cache = None

    def set_adapter(self, names: Union[str, list[str]]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; have {list(self.lora_A)}")
        self.active = names
        self._lowrank_cache = None

    @property
    def r(self) -> int:
        return sum(self.lora_A[n].shape[0] for n in self.active)

    def _stacked(self, dtype):
        """Active adapters concatenated along r, each B column block scaled by its adapter's scale:
        Σ s_i B_i A_i x = [s_1 B_1 | s_2 B_2] [A_1; A_2] x."""
        a = torch.cat([self.lora_A[n] for n in self.active], 0).to(dtype)
        b = torch.cat([self.lora_B[n] * self.scaling[n] for n in self.active], 1).to(dtype)
        return a, b

    def _dropout_active(self) -> bool:
        """Whether some active adapter's dropout changes x: nn.Identity and nn.Dropout in eval mode or
        with p = 0 do not; any other module (a user's replacement) counts as active."""
        for n in self.active:
            d = self.dropout[n]
            if not (isinstance(d, nn.Identity) or (type(d) is nn.Dropout and (not d.training or d.p == 0))):
                return True
        return False

    def _cached_stacked(self, params: Optional[list] = None, dtype: torch.dtype = torch.float32):
        """``_stacked(dtype)`` made contiguous, kept until it could be stale: the key holds the dtype, the
        active names, their scales and, for every active lora_A / lora_B, the Parameter object, its
        ``_version`` (bumped by every in-place update: optimizer steps, ``copy_``, ``load_state_dict``)
        and its data pointer (``p.data = ...`` swaps the storage without a version bump). set_adapter,
        add_adapter, merge, unmerge and ``.to()`` / ``.half()`` (``_apply``) also drop it. Memory: one
        (N, r) s·B per layer (and its A in dtype, unless it is a single fp32 adapter's A, used in place);
        one dtype at a time (a model decodes in one). ``params``: the active [A_1, B_1, A_2, B_2, ...] if
        the caller has them."""
        if params is None:
            params = [p for n in self.active for p in (self.lora_A[n], self.lora_B[n])]
        key = (dtype, tuple(self.active), tuple(self.scaling[n] for n in self.active))
        state = [(p._version, p.data_ptr()) for p in params]
        c = self._lowrank_cache
        if (c is not None and c[0] == key and c[3] == state and len(c[4]) == len(params)
                and all(p is q for p, q in zip(params, c[4]))):
            return c[1], c[2]
        with torch.no_grad():
            a_one = params[0] if len(params) == 2 else None
            if a_one is not None and a_one.dtype == dtype and a_one.is_contiguous():
                a = a_one.detach()  # cat of one tensor already in dtype is a copy of the same values: skip it
                b = (params[1] * self.scaling[self.active[0]]).to(dtype).contiguous()
            else:
                a, b = self._stacked(dtype)
                a, b = a.contiguous(), b.contiguous()
        self._lowrank_cache = (key, a, b, state, params)
        return a, b

    def _apply(self, fn, recurse=True):
        self._lowrank_cache = None  # dtype / device moves replace the parameters' storage
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__().copy()  # deepcopy / pickle: no cache (rebuilt on first use)
        state["_lowrank_cache"] = None
        return state

    # ---- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + Σ_active scale · (dropout(x) · Aᵀ) · Bᵀ``.

        Paths: merged or no active adapter → ``base(x)``. QuantLinear base with dropout inactive
        (``p = 0`` or eval mode) → the fused ``lowbit::lowrank`` op with the active adapters stacked
        (``[A_1; A_2]``, ``[s_1·B_1 | s_2·B_2]``, s = 1), restacked on every call so autograd sees A and
        B. **Inference fast path**: when moreover no autograd graph is recorded (``torch.no_grad()``,
        ``torch.inference_mode()``, or nothing requires grad), x is on the "cpu" backend and not under
        ``torch.compile``, the op's CPU kernel is called directly with a cached stacked pair in x's dtype
        — bit-identical to the op path, without the restacking (two (N, r) / (r, K) copies and their
        allocations) and the custom-op dispatch: at M = 1, 4096×4096 nf4, r = 16 the module costs
        about what QuantLinear does instead of ~1.24× (fp32) / ~1.5× (bf16; 2.1–2.3× at SmolLM2's 576-wide
        shapes). Anything else (sim/reference backends, gradients) takes the op path. Otherwise (dense base or active dropout): ``base(x)``
        plus one branch per adapter in the adapters' dtype."""
        if self.merged is not None or not self.active:
            return self.base(x)
        if isinstance(self.base, QuantLinear) and not self._dropout_active():
            y = self._forward_inference(x)
            if y is not None:
                return y
            a, b = self._stacked(x.dtype)
            return ops.lowrank(x, self.base.weight, a, b, 1.0, self.base.bias)
        y = self.base(x)
        for n in self.active:
            h = self.dropout[n](x).to(self.lora_A[n].dtype)
            y = y + (self.scaling[n] * ((h @ self.lora_A[n].T) @ self.lora_B[n].T)).to(y.dtype)
        return y

    def _forward_inference(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The decode fast path of :meth:`forward` (QuantLinear base, dropout inactive):
        :func:`lowbit.ops.lowrank_inference` with the cached stacked pair, when no autograd graph is
        recorded. Returns None to take the op path, which also owns every error message (wrong K,
        r > 256, device mismatch, block size)."""
        if not isinstance(x, torch.Tensor):
            return None
        base, lora_a, lora_b = self.base, self.lora_A, self.lora_B
        bias = base.bias
        params = [p for name in self.active for p in (lora_a[name], lora_b[name])]
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)
                                        or any(p.requires_grad for p in params)):
            return None
        bufs = base._components()
        w = (bufs["codes"], bufs.get("scale"), bufs.get("zero"), bufs.get("scale_q"), bufs.get("scale_nested"),
             bufs.get("scale_offset"))
        return ops.lowrank_inference(x, w, self.out_features, self.in_features, base.spec.block_size, base.spec.fmt,
                                     lambda dtype: self._cached_stacked(params, dtype), bias)

    # ---- merge
    def delta_weight(self) -> torch.Tensor:
        """Σ_active scale · B · A, (out_features, in_features) fp32."""
        a, b = self._stacked(torch.float32)
        return (b @ a).detach()

    @torch.no_grad()
    def merge(self) -> float:
        """Fold the active adapters into the base weight; returns the relative error that the
        re-quantization adds (‖Ŵ_merged − (Ŵ + ΔW)‖ / ‖Ŵ + ΔW‖; 0 for a dense base)."""
        if self.merged is not None:
            raise RuntimeError("adapters are already merged; call unmerge() first")
        self._lowrank_cache = None
        if isinstance(self.base, SVDQuantLinear):
            return self._merge_svdquant()
        if isinstance(self.base, nn.Linear):
            self.merged = [list(self.active), None]
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            return 0.0
        old = self.base.weight
        target = old.dequantize(torch.float32) + self.delta_weight()
        new = ops.quantize(target.to(old.dtype), old.spec)
        self.base.set_weight(new)
        self.merged = [list(self.active), old]
        err = (new.dequantize(torch.float32) - target).norm() / target.norm().clamp_min(1e-30)
        return float(err)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` exactly (a quantized base gets its original weight back)."""
        if self.merged is None:
            raise RuntimeError("adapters are not merged")
        self._lowrank_cache = None
        names, old = self.merged
        if isinstance(self.base, SVDQuantLinear):
            self.base._buffers["l1"], self.base._buffers["l2"] = old
        elif old is None:
            active, self.active = self.active, names
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.active = active
        else:
            self.base.set_weight(old)
        self.merged = None

    def _merge_svdquant(self) -> float:
        """Nunchaku's merge: the adapters join the SVDQuant branch, exactly, with no re-quantization. The branch
        reads x / λ, so ``s · B · A · x = s · B · (A · diag(λ)) · (x / λ)``: ``l2' = [L2; A · diag(λ)]``,
        ``l1' = [L1, s · B]`` and the layer is one ``svdquant_linear`` call again. Returns the relative
        difference between the merged layer's effective weight and (base + adapters) in float64 (fp32 / the
        branch dtype's rounding of the new rows only)."""
        base = self.base
        a, b = self._stacked(torch.float32)
        if base.rank + a.shape[0] > SVDQ_MAX_RANK:
            raise ValueError(f"merging r={a.shape[0]} adapter rows into the SVDQuant branch of rank {base.rank} "
                             f"exceeds the kernel's rank limit {SVDQ_MAX_RANK}")
        old = (base.l1, base.l2)
        target = base.dequantize() + (b.double() @ a.double())
        l2 = torch.cat([base.l2, (a.detach() * base.smooth).to(base.l2.dtype)], 0)
        l1 = torch.cat([base.l1, b.detach().to(base.l1.dtype)], 1)
        base._buffers["l1"], base._buffers["l2"] = l1.contiguous(), l2.contiguous()
        self.merged = [list(self.active), old]
        return float((base.dequantize() - target).norm() / target.norm().clamp_min(1e-30))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.lora_A[n].shape[0]}, scale={self.scaling[n]:g}" for n in self.lora_A) + \
            f", active={self.active}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


__all__ = ["LoRALinear", "lora_layers"]
