"""LoRALinear: low-rank adapters on a quantized (or dense) base, PEFT-compatible.

``y = base(x) + Σ_active (alpha / r) · (dropout(x) · Aᵀ) · Bᵀ`` with ``A (r, K)`` initialised like
PEFT (Kaiming-uniform, a = √5) and ``B (N, r)`` zero, so a fresh adapter leaves the output unchanged.
On a QuantLinear base without dropout the whole product is one fused op (``lowbit::lowrank``).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from .. import ops
from .quant_linear import QuantLinear


class LoRALinear(nn.Module):
    """A ``QuantLinear`` or ``nn.Linear`` base plus named low-rank adapters.

    Parameters ``lora_A[name]`` (r, in_features) and ``lora_B[name]`` (out_features, r); scaling
    ``alpha / r`` per adapter. ``set_adapter(name or [names])`` chooses the active adapters (several
    active adapters act as one adapter concatenated along r, each with its own scale).
    """

    def __init__(self, base: Union[QuantLinear, nn.Linear], r: int = 16, alpha: float = 32, dropout: float = 0.0,
                 adapter_name: str = "default"):
        super().__init__()
        if not isinstance(base, (QuantLinear, nn.Linear)):
            raise TypeError(f"base must be a lowbit.nn.QuantLinear or nn.Linear, got {type(base).__name__}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: Optional[list] = None  # (names, base weight before merge) while merged
        for p in base.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, r, alpha, dropout)

    # ---- adapters
    def add_adapter(self, name: str, r: int = 16, alpha: float = 32, dropout: float = 0.0) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name {name!r} must be a non-empty str without dots")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(256, self.in_features, self.out_features):
            raise ValueError(f"r={r!r} must be an int in [1, min(256, in_features, out_features)]")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        dev = self.base.weight.device
        a = torch.empty(r, self.in_features, device=dev)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default for lora_A
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        self.scaling[name] = float(alpha) / r
        self.dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if not self.active:
            self.active = [name]

    def set_adapter(self, names: Union[str, list[str]]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; have {list(self.lora_A)}")
        self.active = names

    @property
    def r(self) -> int:
        return sum(self.lora_A[n].shape[0] for n in self.active)

    def _stacked(self, dtype):
        """Active adapters concatenated along r, each B column block scaled by its adapter's scale:
        Σ s_i B_i A_i x = [s_1 B_1 | s_2 B_2] [A_1; A_2] x."""
        a = torch.cat([self.lora_A[n] for n in self.active], 0).to(dtype)
        b = torch.cat([self.lora_B[n] * self.scaling[n] for n in self.active], 1).to(dtype)
        return a, b

    # ---- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None or not self.active:
            return self.base(x)
        no_dropout = all(isinstance(self.dropout[n], nn.Identity) for n in self.active)
        if isinstance(self.base, QuantLinear) and no_dropout:
            a, b = self._stacked(x.dtype)
            return ops.lowrank(x, self.base.weight, a, b, 1.0, self.base.bias)
        y = self.base(x)
        for n in self.active:
            h = self.dropout[n](x).to(self.lora_A[n].dtype)
            y = y + (self.scaling[n] * ((h @ self.lora_A[n].T) @ self.lora_B[n].T)).to(y.dtype)
        return y

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
        names, old = self.merged
        if old is None:
            active, self.active = self.active, names
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.active = active
        else:
            self.base.set_weight(old)
        self.merged = None

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.lora_A[n].shape[0]}, scale={self.scaling[n]:g}" for n in self.lora_A) + \
            f", active={self.active}"


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
             target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
             adapter_name: str = "default") -> list[str]:
    """Wrap the matching ``QuantLinear`` / ``nn.Linear`` modules of ``model`` in :class:`LoRALinear`
    (a module matches when the last component of its name is in ``target_modules``) and freeze
    every other parameter. Returns the wrapped module names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    wrapped = []
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear) and name.rpartition(".")[2] in targets:
            m.add_adapter(adapter_name, r, alpha, dropout)
            wrapped.append(name)
            continue
        if isinstance(m, (QuantLinear, nn.Linear)) and name.rpartition(".")[2] in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if isinstance(parent, LoRALinear):
                continue
            setattr(parent, child, LoRALinear(m, r, alpha, dropout, adapter_name))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no Linear/QuantLinear module of the model matches target_modules={targets}")
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_A." in pname or ".lora_B." in pname)
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


__all__ = ["LoRALinear", "add_lora", "lora_layers"]
