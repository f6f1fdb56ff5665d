"""Functional API with autograd: what the nn modules call.

Each function validates its inputs (in :mod:`lowbit.ops`) and runs the backend chosen by device
or by :func:`lowbit.use_backend`. Gradients flow to activations and to adapter parameters; the
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
