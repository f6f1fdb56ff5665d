"""Shared by the ops modules: argument checks, pointers, the weight's component tuple, backend lookup.

The ops package is the only door to native code (``lowbit._native``): every module above it calls
these functions, never ``_C`` / ``_sim`` / ``_cuda``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .._native import backend_for, call, module
from ..formats import DTYPE_ID, NESTED_BLOCK, QuantizedTensor, QuantSpec, check_storage

FLOAT_DTYPES = tuple(DTYPE_ID)

__all__ = ["FLOAT_DTYPES", "backend_for", "call", "has_kernel", "ptr", "check_tensor", "check_finite", "check_scalar",
           "weight_args", "qt_from_args", "tracing", "dense", "dense_out", "dense_weight"]


def ptr(t: Optional[torch.Tensor]) -> int:
    """The address native code gets; only of tensors that went through :func:`dense` / :func:`dense_out`
    / :func:`dense_weight` (the kernel door)."""
    return 0 if t is None else t.data_ptr()


# ---- the kernel door (issue 14, findings 1 and 2): every tensor whose data_ptr() goes to native code
# passes one of these three right before the call. Kernels index their arguments as dense arrays of a
# known dtype and length, so that is what is checked here, whoever called the op (the public
# functions, autograd, torch.ops.lowbit.* directly): an input view is copied (a stride-0 expand
# becomes a real buffer), an output view is refused (a copy would lose the writes), and a storage
# that does not hold the elements is refused.
def _door(name: str, t, dtype, numel, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}.dtype={t.dtype}, the kernel reads {dtype}")
    count = t.numel()
    if numel is not None and count != numel:
        raise ValueError(f"{name} has {count} elements (shape {tuple(t.shape)}), the kernel reads {numel}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, the kernel runs on {device}")
    # check_storage's rule, inline for the common case (a dense tensor that its storage holds: ≈ 0.4 µs
    # of the ≈ 1 µs a tensor that decode pays per call); anything else takes check_storage itself
    if not (count and t.is_contiguous() and not t.is_meta
            and (t.storage_offset() + count) * t.element_size() <= t.untyped_storage().nbytes()):
        check_storage(name, t)
    return t


def dense(name: str, t: Optional[torch.Tensor], *, dtype=None, numel=None, device=None) -> Optional[torch.Tensor]:
    """An input for native code: checked, made contiguous (keep the result alive across the call)."""
    if t is None:
        return None
    t = _door(name, t, dtype, numel, device)
    return t if t.is_contiguous() else t.contiguous()


def dense_out(name: str, t: torch.Tensor, *, dtype=None, numel=None, device=None) -> torch.Tensor:
    """An output native code writes: checked, and contiguous or refused."""
    t = _door(name, t, dtype, numel, device)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})")
    return t


@functools.lru_cache(maxsize=1024)
def _weight_layout(n: int, k: int, block: int, fmt: str, double_quant: bool) -> tuple:
    """(name, dtype, numel) per component in weight_args order (dtype None: the format has no such
    component) for an (n, k) weight: the spec is validated once per shape, not once per call."""
    spec = QuantSpec(fmt, block, double_quant)
    if n <= 0 or k <= 0 or k % block:
        raise ValueError(f"weight shape ({n}, {k}) does not hold whole blocks of block_size={block}")
    nb = n * k // block
    is_int = fmt in ("int4", "int2")
    return (("codes", torch.uint8, n * k * spec.bits // 8),
            ("scale", None if double_quant else torch.float32, nb),
            ("zero", torch.float32 if is_int else None, nb),
            ("scale_q", torch.uint8 if double_quant else None, nb),
            ("scale_nested", torch.float32 if double_quant else None, -(-nb // NESTED_BLOCK)),
            ("scale_offset", torch.float32 if double_quant else None, 1))


def dense_weight(w, n: int, k: int, block: int, fmt: str, device: torch.device) -> tuple:
    """The weight's components (``weight_args`` order) for native code, each through the door against
    the dtype and length the kernels read for (n, k, block, fmt) — the checks of QuantizedTensor's
    constructor without building one (that cost ~30 µs per call at M = 1), so no stale, foreign or
    strided component reaches a kernel, whoever called the op."""
    layout = _weight_layout(int(n), int(k), int(block), fmt, w[3] is not None)
    out = []
    for (name, dtype, numel), t in zip(layout, w):
        if dtype is None:
            if t is not None:
                raise ValueError(f"{name} given, but a {fmt} weight with double_quant={w[3] is not None} has none")
            out.append(None)
        elif t is None:
            raise ValueError(f"{name} is missing for a {fmt} weight with double_quant={w[3] is not None}")
        else:
            out.append(dense(name, t, dtype=dtype, numel=numel, device=device))
    return tuple(out)


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
    # on every backend, the reference too: torch itself reads a view of a shrunk storage past its end
    check_storage(name, t)
    return t


FP32_MAX = torch.finfo(torch.float32).max


def check_scalar(name: str, v) -> float:
    """A real scalar argument the kernels take as an fp32 (``scale``...): an int or float, or a
    one-element real tensor, finite in fp32 (NaN, inf, 1e300 and 10**400 are refused, not turned into
    NaN/inf outputs). TypeError / ValueError naming ``name`` and the value."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype.is_complex or v.dtype == torch.bool or v.device.type == "meta":
            raise TypeError(f"{name} must be a real number or a one-element real tensor, got a tensor of shape "
                            f"{tuple(v.shape)} {v.dtype} on {v.device}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}={v!r} must be a real number, got {type(v).__name__}")
    if not -FP32_MAX <= v <= FP32_MAX:  # also NaN; an int of any size compares exactly
        raise ValueError(f"{name}={v!r} must be finite in float32")
    return float(v)


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
