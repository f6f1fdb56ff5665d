"""Functional API with autograd: what the nn modules call.

Each function validates its inputs (in :mod:`lowbit.ops`, the only door to native code) and runs
the backend chosen by device or by :func:`lowbit.use_backend`. Gradients flow to activations and to adapter parameters; the
quantized base weight is frozen.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from .formats import QuantizedTensor

__all__ = ["linear"]


def linear(x: torch.Tensor, weight: QuantizedTensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x · dequant(weight)ᵀ + bias`` without materialising the dense weight.

    x: (..., K) fp32/bf16/fp16; weight: QuantizedTensor (N, K); bias: (N,) or None -> y: (..., N)
    in x's dtype. Autograd: gradients to x (a packed transposed product) and to bias.
    """
    return ops.gemm(x, weight, bias)


# ============================================================================================ hadamard
__all__ += ["hadamard"]


def hadamard(x: torch.Tensor, scale: float = 1.0, out: Optional[torch.Tensor] = None,
             inplace: bool = False, transpose: bool = False) -> torch.Tensor:
    """Walsh–Hadamard transform ``x @ H_n * scale`` along the last dimension (any leading shape).

    Same convention as ``fast_hadamard_transform.hadamard_transform``: H_n unnormalised ±1, so
    ``scale=n**-0.5`` is orthonormal and then ``hadamard(hadamard(x, s), s) == x``. n = m · 2^k ≤ 32768
    with m in (1, 12, 20, 28, 40, 172); H_n = H_m ⊗ H_{2^k} (:func:`lowbit.reference.hadamard_matrix`).
    fp32/bf16/fp16 in and out, fp32 arithmetic. Autograd: the backward is ``g @ H_nᵀ * scale`` (the
    same transform except for m = 172, whose H_m is not symmetric). ``transpose=True`` applies
    ``H_nᵀ`` (differs from H_n only for m = 172). ``out=`` / ``inplace=True`` write into an existing
    tensor and do not record autograd.
    """
    return ops.hadamard(x, scale, out=out, inplace=inplace, transpose=transpose)


# ============================================================================================ lowrank
__all__ += ["lora_linear"]


def lora_linear(x: torch.Tensor, weight: QuantizedTensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scale: float = 1.0, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x · dequant(weight)ᵀ + scale · (x · lora_Aᵀ) · lora_Bᵀ + bias``: a LoRA layer on a quantized
    base as one fused product (the base weight is never materialised).

    x: (..., K) fp32/bf16/fp16; weight: QuantizedTensor (N, K); lora_A: (r, K); lora_B: (N, r), 1 ≤ r ≤ 256;
    bias: (N,) or None -> y: (..., N) in x's dtype. Autograd: gradients to x, lora_A, lora_B and bias.
    """
    return ops.lowrank(x, weight, lora_A, lora_B, scale, bias)
