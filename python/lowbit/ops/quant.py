"""quant family: quantize / dequantize (4- and 2-bit weights) and the blockwise 8-bit quantizer.

``lowbit::dequantize`` and ``lowbit::dequantize_into`` are torch.library custom ops: the door
``QuantizedTensor.dequantize`` reaches the kernels through (the dispatcher, the same one
torch.compile sees), so the format layer needs no import of this module.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference as ref
from ..formats import DTYPE_ID, FMT_ID, QuantizedTensor, QuantSpec
from ._common import (FLOAT_DTYPES, backend_for, call, check_finite, check_tensor, dense, dense_out, dense_weight, ptr,
                      qt_from_args)

__all__ = ["quantize", "dequantize", "quantize8", "dequantize8"]


def quantize(w: torch.Tensor, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False) -> QuantizedTensor:
    """Quantize a weight ``w`` (N, K) (fp32 / bf16 / fp16) blockwise along K. See :mod:`lowbit.formats`.

    ValueError for NaN/Inf in ``w``, and for finite weights whose statistics overflow fp32, on every
    backend alike (docs/formats.md, "Non-finite input"): an int4/int2 block whose range
    ``max - min`` exceeds fp32's largest value (its step would be inf and every value NaN), and with
    ``double_quant`` block scales whose fp32 mean overflows."""
    spec = fmt if isinstance(fmt, QuantSpec) else QuantSpec(fmt, block_size, double_quant)
    check_tensor("w", w, dtypes=FLOAT_DTYPES, ndim=2)
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
        w = dense("w", w)  # the kernel door (outputs above are fresh dense buffers)
        call(be, "quantize", w.data_ptr(), DTYPE_ID[w.dtype], w.numel(), spec.block_size, FMT_ID[spec.fmt],
             codes.data_ptr(), scale.data_ptr(), ptr(zero))
    _check_scales(w, spec, scale)
    if not spec.double_quant:
        return QuantizedTensor(spec, w.shape, w.dtype, codes, scale=scale, zero=zero)
    # the rule is the reference's; the 8-bit quantizer is this backend's kernel (bit-exact with it)
    offset = scale.mean()
    if not torch.isfinite(offset):
        raise ValueError(f"w: double_quant needs the fp32 mean of the block scales, which overflows "
                         f"(largest scale {scale.max().item():.6g}); quantize this weight without double_quant")
    scale_q, scale_nested, offset = ref.double_quant_ref(
        scale, lambda x, block, signed, off: _quantize8(be, x, block, signed, off))
    return QuantizedTensor(spec, w.shape, w.dtype, codes, zero=zero, scale_q=scale_q,
                           scale_nested=scale_nested, scale_offset=offset)


def _check_scales(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor) -> None:
    """Finite weights, non-finite step (issue 14, finding 9): an int block with max - min > 3.4e38 has
    s = inf, inv = 0, so its codes are 0 and it dequantizes to (0 - 0) * inf = NaN. The backends
    agree on that, but a weight that loads as NaN is a silent wrong answer: refuse it by name (one
    pass over the per-block scales, not over w). nf4/fp4 scales are absmaxes: finite for finite w."""
    if torch.isfinite(scale).all():
        return
    b = int((~torch.isfinite(scale)).nonzero()[0])
    k = w.shape[1]
    block = w.reshape(-1, spec.block_size)[b].float()
    row, col = divmod(b * spec.block_size, k)
    raise ValueError(f"w: block {b} (row {row}, columns {col}..{col + spec.block_size - 1}) spans "
                     f"[{block.min().item():.6g}, {block.max().item():.6g}]; its range exceeds float32, so "
                     f"fmt={spec.fmt!r} cannot represent it (the step (max - min) / qmax would be inf)")


def dequantize(qt: QuantizedTensor, dtype: Optional[torch.dtype] = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense ``(N, K)`` weight of a QuantizedTensor in ``dtype``: by default ``out``'s dtype, else the
    original weight's (``qt.dtype``) — the same rule as ``qt.dequantize()``. ``out``: a contiguous
    (N, K) tensor of that dtype to write into (reusing a workspace skips the page faults of a fresh one)."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    return qt.dequantize(dtype, out)


def _check_dequantize(codes: torch.Tensor, n: int, k: int, dtype: torch.dtype, out: Optional[torch.Tensor]) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype={dtype} is not supported; expected one of {list(FLOAT_DTYPES)}")
    if out is not None:
        check_tensor("out", out, dtypes=(dtype,))
        if tuple(out.shape) != (n, k) or not out.is_contiguous() or out.device != codes.device:
            raise ValueError(f"out must be a contiguous {(n, k)} tensor on {codes.device}, got "
                             f"{tuple(out.shape)} (contiguous={out.is_contiguous()}) on {out.device}")


def _dequantize_to(out: torch.Tensor, w, n: int, k: int, block: int, fmt: str) -> None:
    """Write dequant(W) into the contiguous (N, K) ``out`` on the backend of the codes."""
    be = backend_for(w[0])
    if be == "reference":
        out.copy_(ref.dequantize_qt_ref(qt_from_args(*w, n, k, block, fmt, out.dtype), out.dtype))
        return
    codes, scale, zero, scale_q, scale_nested, scale_offset = dense_weight(w, n, k, block, fmt, out.device)
    out = dense_out("out", out, dtype=out.dtype, numel=n * k)
    call(be, "dequantize", codes.data_ptr(), ptr(scale), ptr(zero), ptr(scale_q), ptr(scale_nested),
         float(scale_offset) if scale_offset is not None else 0.0,
         out.data_ptr(), DTYPE_ID[out.dtype], out.numel(), block, FMT_ID[fmt])


def dequantize_op(codes: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor],
                  scale_q: Optional[torch.Tensor], scale_nested: Optional[torch.Tensor],
                  scale_offset: Optional[torch.Tensor], n: int, k: int, block: int, fmt: str,
                  dtype: torch.dtype) -> torch.Tensor:
    """``lowbit::dequantize``: dequant(W) (N, K) in ``dtype``."""
    _check_dequantize(codes, n, k, dtype, None)
    out = torch.empty(n, k, dtype=dtype, device=codes.device)
    _dequantize_to(out, (codes, scale, zero, scale_q, scale_nested, scale_offset), n, k, block, fmt)
    return out


def dequantize_into_op(out: torch.Tensor, codes: torch.Tensor, scale: Optional[torch.Tensor],
                       zero: Optional[torch.Tensor], scale_q: Optional[torch.Tensor],
                       scale_nested: Optional[torch.Tensor], scale_offset: Optional[torch.Tensor], n: int, k: int,
                       block: int, fmt: str, dtype: torch.dtype) -> None:
    """``lowbit::dequantize_into``: dequant(W) written into ``out`` (contiguous (N, K) of ``dtype``): no
    temporary, no copy."""
    _check_dequantize(codes, n, k, dtype, out)
    _dequantize_to(out, (codes, scale, zero, scale_q, scale_nested, scale_offset), n, k, block, fmt)


# Defined with the low-level torch.library API, not torch.library.custom_op: the weight is frozen (no
# autograd to register) and custom_op's Python wrappers cost ~30 µs per call (~90 µs for the mutating
# op), as much as dequantizing a 256 x 256 weight; the dispatcher itself costs ~10 µs.
_W = ("Tensor codes, Tensor? scale, Tensor? zero, Tensor? scale_q, Tensor? scale_nested, Tensor? scale_offset, "
      "int n, int k, int block, str fmt, ScalarType dtype")
_lib = torch.library.Library("lowbit", "FRAGMENT")
_lib.define(f"dequantize({_W}) -> Tensor")
_lib.define(f"dequantize_into(Tensor(a!) out, {_W}) -> ()")
_lib.impl("dequantize", dequantize_op, "CompositeExplicitAutograd")
_lib.impl("dequantize_into", dequantize_into_op, "CompositeExplicitAutograd")


@torch.library.register_fake("lowbit::dequantize", lib=_lib)
def _(codes, scale, zero, scale_q, scale_nested, scale_offset, n, k, block, fmt, dtype):
    return codes.new_empty((n, k), dtype=dtype)


@torch.library.register_fake("lowbit::dequantize_into", lib=_lib)
def _(out, codes, scale, zero, scale_q, scale_nested, scale_offset, n, k, block, fmt, dtype):
    return None


MAX_BLOCK8 = 2 ** 31 - 1  # the kernels' Quantize8Params::block is an int32


def _check8(numel: int, block, signed, offset) -> tuple[int, float]:
    """Validate the 8-bit quantizer's arguments (issue 14, finding 6: block=-10 crashed the kernels,
    block=0 divided by zero). Returns (the block to run, offset as a float). Any block in
    [1, 2**31 - 1] is accepted; one larger than the tensor means a single block, so the block run is
    ``min(block, numel)``: the same result without sizing anything by ``block`` (the reference used to
    pad the input to 2**31 elements for ``block=2**31``)."""
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"block={block!r} must be an int")
    if not 1 <= block <= MAX_BLOCK8:
        raise ValueError(f"block={block} must be in [1, {MAX_BLOCK8}]")
    if not isinstance(signed, bool):
        raise TypeError(f"signed={signed!r} must be a bool")
    if isinstance(offset, torch.Tensor):
        if offset.numel() != 1 or not (offset.dtype.is_floating_point or offset.dtype == torch.int64):
            raise TypeError(f"offset must be a real number or a one-element float tensor, got a tensor of shape "
                            f"{tuple(offset.shape)} {offset.dtype}")
        offset = offset.item()
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"offset={offset!r} must be a real number")
    off = float(offset)
    if not math.isfinite(off) or not math.isfinite(float(torch.tensor(off, dtype=torch.float32))):
        raise ValueError(f"offset={offset!r} must be finite in fp32")
    return min(block, max(numel, 1)), off


def _quantize8(be: str, x: torch.Tensor, block: int, signed: bool, off: float):
    """:func:`quantize8` on backend ``be`` for a flat fp32 x (already validated)."""
    if be == "reference":
        return ref.quantize8_ref(x, block, signed, off)
    x = dense("x", x, dtype=torch.float32)
    q = torch.empty(x.numel(), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-x.numel() // block), dtype=torch.float32, device=x.device)
    call(be, "quantize8", x.data_ptr(), x.numel(), block, bool(signed), off, q.data_ptr(), absmax.data_ptr())
    return q, absmax


def quantize8(x: torch.Tensor, block: int = 256, signed: bool = True, offset=0.0):
    """Blockwise 8-bit dynamic quantization of a flat fp32 tensor: returns ``(q uint8, absmax fp32)``.
    ``block`` in [1, 2**31 - 1] (one larger than x is one block), ``signed`` a bool, ``offset`` a finite
    real number (or a one-element tensor)."""
    check_tensor("x", x, dtypes=(torch.float32,))
    block, off = _check8(x.numel(), block, signed, offset)
    x = x.detach().reshape(-1).contiguous()
    return _quantize8(backend_for(x), x, block, signed, off)


def dequantize8(q: torch.Tensor, absmax: torch.Tensor, block: int = 256, signed: bool = True, offset=0.0):
    """Inverse of :func:`quantize8`: ``map[q] * absmax[i // block] + offset`` in fp32 (same argument rules)."""
    check_tensor("q", q, dtypes=(torch.uint8,))
    check_tensor("absmax", absmax, dtypes=(torch.float32,))
    block, off = _check8(q.numel(), block, signed, offset)
    if absmax.numel() != -(-q.numel() // block):
        raise ValueError(f"absmax has {absmax.numel()} entries, expected {-(-q.numel() // block)} "
                         f"for {q.numel()} codes in blocks of {block}")
    if absmax.device != q.device:
        raise ValueError(f"absmax is on {absmax.device} but q is on {q.device}")
    be = backend_for(q)
    if be == "reference":
        return ref.dequantize8_ref(q.reshape(-1), absmax.reshape(-1), block, signed, off)
    q, absmax = dense("q", q.reshape(-1)), dense("absmax", absmax.reshape(-1))
    out = torch.empty(q.numel(), dtype=torch.float32, device=q.device)
    call(be, "dequantize8", q.data_ptr(), absmax.data_ptr(), q.numel(), block, bool(signed), off, out.data_ptr())
    return out
