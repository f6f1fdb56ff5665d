"""hadamard family: the Walsh–Hadamard transform ``x @ H_n * scale`` along the last dimension."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference as ref
from ..formats import DTYPE_ID
from ._common import FLOAT_DTYPES, backend_for, call, check_scalar, check_tensor, dense, dense_out, tracing

__all__ = ["hadamard", "hadamard_op", "hadamard_native"]


def hadamard_native(be: str, x: torch.Tensor, out: torch.Tensor, scale: float, transpose: bool) -> None:
    """The kernel of backend ``be``: x (..., n) into out of the same shape and dtype (both through the
    kernel door: x copied if a view, out contiguous or refused)."""
    n = x.shape[-1]
    if x.dtype not in DTYPE_ID:
        raise TypeError(f"x.dtype={x.dtype}: the hadamard kernels take fp32/bf16/fp16")
    x = dense("x", x)
    out = dense_out("out", out, dtype=x.dtype, numel=x.numel(), device=x.device)
    call(be, "hadamard", x.data_ptr(), out.data_ptr(), DTYPE_ID[x.dtype], x.numel() // n, n, float(scale),
         bool(transpose))


@torch.library.custom_op("lowbit::hadamard", mutates_args=())
def hadamard_op(x: torch.Tensor, scale: float, transpose: bool, backend: Optional[str] = None) -> torch.Tensor:
    """``x (..., n) · H_n · scale`` (``H_nᵀ`` when ``transpose``); x contiguous, validated by :func:`hadamard`."""
    be = backend or backend_for(x)
    if be == "reference":
        return ref.hadamard_ref(x, scale, transpose)
    out = torch.empty_like(x)
    if out.numel():
        hadamard_native(be, x, out, scale, transpose)
    return out


@hadamard_op.register_fake
def _(x, scale, transpose, backend=None):
    return torch.empty_like(x)


def _hadamard_setup_context(ctx, inputs, output):
    _, scale, transpose = inputs[:3]
    ctx.meta = (scale, transpose)


def _hadamard_backward(ctx, g):
    scale, transpose = ctx.meta
    # d(x · H · s)/dx applied to g is g · Hᵀ · s (H_172 is not symmetric; the others are)
    return hadamard_op(g.contiguous(), scale, not transpose), None, None, None


torch.library.register_autograd("lowbit::hadamard", _hadamard_backward, setup_context=_hadamard_setup_context)


def hadamard(x: torch.Tensor, scale: float = 1.0, out: Optional[torch.Tensor] = None, inplace: bool = False,
             transpose: bool = False) -> torch.Tensor:
    """``x @ H_n * scale`` along the last dim (see :func:`lowbit.reference.hadamard_ref`); ``out=`` or
    ``inplace=True`` write into an existing tensor (no autograd through those)."""
    be = None if tracing() or not isinstance(x, torch.Tensor) else backend_for(x)
    ref_only = isinstance(x, torch.Tensor) and x.dtype == torch.float64 and be == "reference"
    check_tensor("x", x, dtypes=FLOAT_DTYPES + ((torch.float64,) if ref_only else ()))
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the transform runs along the last one)")
    ref.hadamard_split(x.shape[-1])  # ValueError naming n for unsupported sizes
    scale = check_scalar("scale", scale)
    if out is None and not inplace:
        return hadamard_op(x.contiguous(), scale, bool(transpose), be)
    if out is not None and inplace:
        raise ValueError("pass either out= or inplace=True, not both")
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("out= / inplace=True do not support autograd (x requires grad); call hadamard(x) instead")
    if inplace:
        if not x.is_contiguous():
            raise ValueError(f"inplace=True needs a contiguous x (got strides {x.stride()} for shape {tuple(x.shape)})")
        out = x
    else:
        check_tensor("out", out)
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out must match x: got shape {tuple(out.shape)} {out.dtype} on {out.device}, "
                             f"expected {tuple(x.shape)} {x.dtype} on {x.device}")
        if not out.is_contiguous():
            raise ValueError(f"out must be contiguous (got strides {out.stride()})")
    be = be or backend_for(x)
    if be == "reference":
        return out.copy_(ref.hadamard_ref(x, scale, bool(transpose)))
    xc = x.contiguous()
    if out is not xc and out.data_ptr() != xc.data_ptr() and _overlaps(out, xc):
        raise ValueError("out overlaps x partially; use inplace=True or a separate tensor")
    if out.numel():
        hadamard_native(be, xc, out, scale, bool(transpose))
    return out


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()
