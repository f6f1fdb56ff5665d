"""Shared by the ops modules: argument checks, pointers, the weight's component tuple, backend lookup.

The ops package is the only door to native code (``lowbit._native``): every module above it calls
these functions, never ``_C`` / ``_sim`` / ``_cuda``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .._native import backend_for, call, module
from ..formats import DTYPE_ID, QuantizedTensor, QuantSpec

FLOAT_DTYPES = tuple(DTYPE_ID)

__all__ = ["FLOAT_DTYPES", "backend_for", "call", "has_kernel", "ptr", "check_tensor", "check_finite",
           "weight_args", "qt_from_args", "tracing"]


def ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


@functools.lru_cache(maxsize=None)
def _module_has(be: str, fn: str) -> bool:
    return hasattr(module(be), fn)  # a compiled module does not change within a process


def has_kernel(be: str, fn: str) -> bool:
    """Whether backend ``be`` was built with kernel ``fn`` (the reference has none)."""
    return be != "reference" and _module_has(be, fn)


def tracing() -> bool:
    """Under torch.compile tracing the backend is resolved inside the ops at run time instead."""
    return torch.compiler.is_compiling()


def check_tensor(name: str, t, *, dtypes=None, ndim=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}.dtype={t.dtype} is not supported; expected one of {list(dtypes)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def check_finite(name: str, t: torch.Tensor) -> None:
    # One reduction (no temporaries) detects NaN/Inf: they propagate into the sum. Only when the
    # sum is not finite (or overflowed) is the exact count taken, for the message.
    if torch.isfinite(t.sum()):
        return
    bad = (~torch.isfinite(t)).sum().item()
    if bad:
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); lowbit does not quantize non-finite "
                         f"values (a NaN would poison its whole block's scale)")


def weight_args(qt: QuantizedTensor):
    """The weight's components in the order the custom ops take them."""
    c = qt.components()
    return (c["codes"], c.get("scale"), c.get("zero"), c.get("scale_q"), c.get("scale_nested"), c.get("scale_offset"))


def qt_from_args(codes, scale, zero, scale_q, scale_nested, scale_offset, n, k, block, fmt, dtype):
    spec = QuantSpec(fmt, block, scale_q is not None)
    return QuantizedTensor(spec, (n, k), dtype, codes, scale=scale, zero=zero, scale_q=scale_q,
                           scale_nested=scale_nested, scale_offset=scale_offset)
