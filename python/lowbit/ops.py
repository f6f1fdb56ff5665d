"""The ops layer: input validation, then dispatch to reference / cpu / sim / cuda.

Every public entry point validates before any native code touches memory; the kernels receive
contiguous tensors of the right dtype and size, so native code never sees input it cannot handle.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference as ref
from ._native import backend_for, call
from .formats import DTYPE_ID, FMT_ID, NESTED_BLOCK, QuantizedTensor, QuantSpec

__all__ = ["quantize", "dequantize", "block_scales", "quantize8", "dequantize8"]

_FLOAT_DTYPES = tuple(DTYPE_ID)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


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


# ---------------------------------------------------------------------------------------- quant
def quantize(w: torch.Tensor, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False) -> QuantizedTensor:
    """Quantize a weight ``w`` (N, K) (fp32 / bf16 / fp16) blockwise along K. See :mod:`lowbit.formats`."""
    spec = fmt if isinstance(fmt, QuantSpec) else QuantSpec(fmt, block_size, double_quant)
    check_tensor("w", w, dtypes=_FLOAT_DTYPES, ndim=2)
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"w has an empty shape {tuple(w.shape)}")
    if k % spec.block_size:
        raise ValueError(f"in_features K={k} is not a multiple of block_size={spec.block_size}")
    check_finite("w", w)
    w = w.detach().contiguous()
    be = backend_for(w)
    if be == "reference":
        codes, scale, zero = ref.quantize_ref(w, spec.fmt, spec.block_size)
    else:
        nb = w.numel() // spec.block_size
        codes = torch.empty(n, k * spec.bits // 8, dtype=torch.uint8, device=w.device)
        scale = torch.empty(nb, dtype=torch.float32, device=w.device)
        zero = torch.empty(nb, dtype=torch.float32, device=w.device) if spec.fmt in ("int4", "int2") else None
        call(be, "quantize", w.data_ptr(), DTYPE_ID[w.dtype], w.numel(), spec.block_size, FMT_ID[spec.fmt],
             codes.data_ptr(), scale.data_ptr(), _ptr(zero))
    if not spec.double_quant:
        return QuantizedTensor(spec, w.shape, w.dtype, codes, scale=scale, zero=zero)
    offset = scale.mean()  # torch's fp32 mean on every backend, as bitsandbytes computes it
    scale_q, scale_nested = quantize8(scale, NESTED_BLOCK, True, offset)
    return QuantizedTensor(spec, w.shape, w.dtype, codes, zero=zero, scale_q=scale_q,
                           scale_nested=scale_nested, scale_offset=offset.reshape(()))


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``(N, K)`` weight of a QuantizedTensor in ``dtype``."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype={dtype} is not supported; expected one of {list(_FLOAT_DTYPES)}")
    be = backend_for(qt.codes)
    if be == "reference":
        return ref.dequantize_qt_ref(qt, dtype)
    out = torch.empty(qt.shape, dtype=dtype, device=qt.device)
    c = {k: v.contiguous() for k, v in qt.components().items()}
    call(be, "dequantize", c["codes"].data_ptr(), _ptr(c.get("scale")), _ptr(c.get("zero")),
         _ptr(c.get("scale_q")), _ptr(c.get("scale_nested")),
         float(c["scale_offset"]) if qt.double_quant else 0.0,
         out.data_ptr(), DTYPE_ID[dtype], out.numel(), qt.block_size, FMT_ID[qt.fmt])
    return out


def block_scales(qt: QuantizedTensor) -> torch.Tensor:
    """Per-block fp32 scales (absmax for nf4/fp4, step for int), rebuilt from double quant if needed."""
    if not qt.double_quant:
        return qt.scale
    return dequantize8(qt.scale_q, qt.scale_nested, NESTED_BLOCK, True, qt.scale_offset)


def _offset(offset) -> float:
    return float(offset.item()) if isinstance(offset, torch.Tensor) else float(offset)


def quantize8(x: torch.Tensor, block: int = 256, signed: bool = True, offset=0.0):
    """Blockwise 8-bit dynamic quantization of a flat fp32 tensor: returns ``(q uint8, absmax fp32)``."""
    check_tensor("x", x, dtypes=(torch.float32,))
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"block={block!r} must be a positive int")
    x = x.detach().reshape(-1).contiguous()
    off = _offset(offset)
    be = backend_for(x)
    if be == "reference":
        return ref.quantize8_ref(x, block, signed, off)
    q = torch.empty(x.numel(), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-x.numel() // block), dtype=torch.float32, device=x.device)
    call(be, "quantize8", x.data_ptr(), x.numel(), block, bool(signed), off, q.data_ptr(), absmax.data_ptr())
    return q, absmax


def dequantize8(q: torch.Tensor, absmax: torch.Tensor, block: int = 256, signed: bool = True, offset=0.0):
    """Inverse of :func:`quantize8`: ``map[q] * absmax[i // block] + offset`` in fp32."""
    check_tensor("q", q, dtypes=(torch.uint8,))
    check_tensor("absmax", absmax, dtypes=(torch.float32,))
    if absmax.numel() != -(-q.numel() // block):
        raise ValueError(f"absmax has {absmax.numel()} entries, expected {-(-q.numel() // block)} "
                         f"for {q.numel()} codes in blocks of {block}")
    off = _offset(offset)
    q, absmax = q.reshape(-1).contiguous(), absmax.contiguous()
    be = backend_for(q)
    if be == "reference":
        return ref.dequantize8_ref(q, absmax, block, signed, off)
    out = torch.empty(q.numel(), dtype=torch.float32, device=q.device)
    call(be, "dequantize8", q.data_ptr(), absmax.data_ptr(), q.numel(), block, bool(signed), off, out.data_ptr())
    return out
