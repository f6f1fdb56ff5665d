"""Functional API with autograd: what the nn modules call.

Each function validates its inputs (in :mod:`lowbit.ops`, the only door to native code) and runs
the backend chosen by device or by :func:`lowbit.use_backend`. Gradients flow to activations and to adapter parameters; the
quantized base weight is frozen.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from .formats import QuantizedTensor, QuantSpec
from .ops.svdquant import SVDQ_GROUP

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


# ============================================================================================ svdquant
__all__ += ["svdquant_linear"]


def _svdquant_residual_as_int4(qw: torch.Tensor, sw: torch.Tensor) -> QuantizedTensor:
    """The packed residual (two's-complement nibbles q in [-7, 7], scales sw per group of 64) as lowbit's
    asymmetric ``int4`` weight, exactly: ``nibble ^ 8`` is the offset-binary code q + 8 in [1, 15], and with
    zero point 8 the int4 rule ``(code - 8) · s`` is q · s again. Lets the backward run the packed transposed
    GEMM (:func:`lowbit.ops.gemm_t`) on the residual instead of materialising it."""
    n, k = qw.shape[0], qw.shape[1] * 2
    return QuantizedTensor(QuantSpec("int4", SVDQ_GROUP, False), (n, k), torch.float32,
                           codes=torch.bitwise_xor(qw, 0x88), scale=sw.reshape(-1),
                           zero=torch.full((sw.numel(),), 8.0, dtype=torch.float32, device=sw.device))


class _SVDQuantLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, qw, sw, inv_smooth, l1, l2):
        k = x.shape[-1]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k).contiguous()
        r = 0 if l1 is None else l1.shape[1]
        l1c = l1.to(x.dtype).contiguous() if r else None
        l2c = l2.to(x.dtype).contiguous() if r else None
        y = ops.svdquant_linear(x2, qw, sw, inv_smooth, l1c, l2c, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(qw, sw, inv_smooth, l1, l2)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*lead, qw.shape[0])

    @staticmethod
    def backward(ctx, gy):
        qw, sw, inv_smooth, l1, l2 = ctx.saved_tensors
        n, k = qw.shape[0], qw.shape[1] * 2
        gy2 = gy.reshape(-1, n).contiguous()
        gx = gbias = None
        if ctx.needs_input_grad[0]:
            # straight-through estimator: the activation quantizer counts as the identity, so
            # gx = gy · W_eff with W_eff = (L1·L2 + dequant(R)) · diag(1/λ), the weight the forward applies
            g = torch.zeros(gy2.shape[0], k, dtype=torch.float32, device=gy.device)
            if gy2.shape[0]:
                g += ops.gemm_t(gy2, _svdquant_residual_as_int4(qw, sw)).float()
                if l1 is not None and l1.shape[1]:
                    g += (gy2.float() @ l1.float()) @ l2.float()
            if inv_smooth is not None:
                g *= inv_smooth
            gx = g.to(gy.dtype).reshape(*gy.shape[:-1], k)
        if ctx.needs_input_grad[1]:
            gbias = gy2.sum(0).to(ctx.bias_dtype)
        return gx, gbias, None, None, None, None, None


def svdquant_linear(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, inv_smooth: Optional[torch.Tensor] = None,
                    l1: Optional[torch.Tensor] = None, l2: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SVDQuant W4A4 forward with autograd to ``x`` and ``bias``: ``y = Q(x · diag(inv_smooth)) ·
    dequant(R)ᵀ + (x · diag(inv_smooth)) · l2ᵀ · l1ᵀ + bias`` (:func:`lowbit.ops.svdquant_linear`).

    x: (..., K) fp32/bf16/fp16; qw (N, K/2) uint8 packed residual, sw (N, K/64) fp32 its scales;
    inv_smooth (K,) fp32 = 1/λ or None; l1 (N, r), l2 (r, K) the low-rank branch (any float dtype, cast to
    x's; None or r = 0: no branch); bias (N,) or None -> y (..., N) in x's dtype.

    Backward (to x): straight-through the 4-bit activation quantizer, so
    ``gx = gy · (l1 · l2 + dequant(R)) · diag(inv_smooth)`` — the residual's product is lowbit's packed
    transposed GEMM (:func:`lowbit.ops.gemm_t`) on R read as an exact int4 weight (never materialised; its
    fp32 path follows the matmul precision policy, :func:`lowbit.set_matmul_precision`), the branch two thin
    fp32 products. The quantized parts are frozen: no gradient to qw, sw, inv_smooth, l1, l2.
    """
    return _SVDQuantLinearFn.apply(x, bias, qw, sw, inv_smooth, l1, l2)
