"""The spec: short, readable, pure-torch fp32 implementations of every lowbit kernel.

Importable without the compiled extension. The CPU kernels (``csrc/cpu``) and the CUDA kernels
(``csrc/kernels``, run here on the simulator) are tested against these functions: bit-exact for
quantize / dequantize, up to fp32 accumulation error for products.

Every rule is written as a fixed sequence of IEEE fp32 operations (no fused multiply-add), which is
what lets compiled kernels reproduce it bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch

from .formats import FP4, FP4_SORTED_CODES, NESTED_BLOCK, NF4, bits_of, dynamic_map

__all__ = [
    "quantize_ref",
    "dequantize_ref",
    "quantize8_ref",
    "dequantize8_ref",
    "double_quant_ref",
    "block_scales_ref",
    "gemm_ref",
    "gemm_t_ref",
]

ABSMAX_FLOOR = 1e-38  # bitsandbytes' clamp before the reciprocal (subnormal in fp32: no FTZ anywhere)
MIN_INT_STEP = 1e-30  # int formats: a block with a smaller step is constant; its step becomes 1


def _f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _midpoints(sorted_table: torch.Tensor) -> torch.Tensor:
    return (sorted_table[:-1] + sorted_table[1:]) / 2.0


def _nearest(x: torch.Tensor, sorted_table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted table; exact ties go to the lower index.

    ``torch.bucketize(right=False)`` counts the midpoints strictly below ``x``.
    """
    return torch.bucketize(x, _midpoints(sorted_table).to(x.device), right=False)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (..., n) in [0, 2**bits) into bytes; the first element in the high bits."""
    per = 8 // bits
    q = q.to(torch.uint8).reshape(*q.shape[:-1], -1, per)
    out = torch.zeros(q.shape[:-1], dtype=torch.uint8, device=q.device)
    for j in range(per):
        out |= q[..., j] << (8 - bits * (j + 1))
    return out


def unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: bytes (..., m) -> codes (..., m * 8 // bits) as int64."""
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(codes >> (8 - bits * (j + 1))) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).reshape(*codes.shape[:-1], -1).long()


def quantize_ref(w: torch.Tensor, fmt: str, block_size: int):
    """Quantize ``w`` (N, K) blockwise along K.

    Returns ``codes`` uint8 (N, K*bits/8), ``scale`` fp32 (N*K/B,), ``zero`` fp32 (N*K/B,) or None.

    * nf4 / fp4 (bitsandbytes' rule): ``absmax`` per block; ``x * (1 / max(absmax, 1e-38))``
      clamped to [-1, 1]; nearest table entry, ties to the lower one (fp4 through its sorted order).
    * int4 / int2: ``s = (max - min) / qmax`` (1 if below 1e-30), ``inv = 1 / s``,
      ``zero = -(min * inv)``, ``q = clamp(round_half_even(w * inv + zero), 0, qmax)``.
    """
    n, k = w.shape
    x = w.float().reshape(-1, block_size)  # exact for bf16 / fp16 inputs
    bits = bits_of(fmt)
    if fmt in ("nf4", "fp4"):
        absmax = x.abs().amax(dim=1)
        inv = 1.0 / absmax.clamp(min=ABSMAX_FLOOR)
        scaled = (x * inv[:, None]).clamp(-1.0, 1.0)
        if fmt == "nf4":
            q = _nearest(scaled, _f32(NF4))
        else:
            order = torch.tensor(FP4_SORTED_CODES, device=x.device)
            q = order[_nearest(scaled, _f32(FP4)[order.cpu()])]
        return pack(q.reshape(n, k), bits), absmax, None
    qmax = (1 << bits) - 1
    mn, mx = x.amin(dim=1), x.amax(dim=1)
    s = (mx - mn) / float(qmax)
    s = torch.where(s >= MIN_INT_STEP, s, torch.ones_like(s))
    inv = 1.0 / s
    zero = -(mn * inv)
    t = x * inv[:, None]
    t = t + zero[:, None]
    q = torch.round(t).clamp(0, qmax)
    return pack(q.reshape(n, k).to(torch.uint8), bits), s, zero


def dequantize_ref(codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], fmt: str,
                   block_size: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """``table[q] * scale`` (nf4/fp4) or ``(q - zero) * scale`` (int) in fp32, rounded to ``dtype``."""
    n, k = shape
    q = unpack(codes.reshape(n, -1), bits_of(fmt)).reshape(-1, block_size)
    if fmt in ("nf4", "fp4"):
        table = _f32(NF4 if fmt == "nf4" else FP4).to(codes.device)
        w = table[q] * scale[:, None]
    else:
        w = (q.float() - zero[:, None]) * scale[:, None]
    return w.reshape(n, k).to(dtype)


def quantize8_ref(x: torch.Tensor, block: int, signed: bool = True, offset: float = 0.0):
    """Blockwise 8-bit dynamic quantization of a flat fp32 tensor (last block may be partial).

    ``absmax = max |x - offset|``; ``q`` = nearest map entry to
    ``clamp((x - offset) * (1 / max(absmax, 1e-38)), -1, 1)``, ties to the lower entry.
    """
    x = x.reshape(-1).float() - torch.tensor(offset, dtype=torch.float32)
    n = x.numel()
    pad = (-n) % block
    xb = torch.cat([x, x.new_zeros(pad)]).reshape(-1, block)  # zeros never raise an absmax
    absmax = xb.abs().amax(dim=1)
    inv = 1.0 / absmax.clamp(min=ABSMAX_FLOOR)
    scaled = (xb * inv[:, None]).clamp(-1.0, 1.0).reshape(-1)[:n]
    q = _nearest(scaled, dynamic_map(signed).to(x.device)).to(torch.uint8)
    return q, absmax


def dequantize8_ref(q: torch.Tensor, absmax: torch.Tensor, block: int, signed: bool = True,
                    offset: float = 0.0) -> torch.Tensor:
    """``map[q] * absmax[i // block] + offset`` (multiply, round, add, round) in fp32."""
    n = q.numel()
    idx = torch.arange(n, device=q.device) // block
    v = dynamic_map(signed).to(q.device)[q.reshape(-1).long()] * absmax[idx]
    return v + torch.tensor(offset, dtype=torch.float32)


def double_quant_ref(scale: torch.Tensor):
    """Compress per-block fp32 scales: ``offset = mean(scale)`` (torch's fp32 mean, as
    bitsandbytes), then signed 8-bit dynamic quantization of ``scale - offset`` in nested blocks of 256.
    Returns ``(scale_q uint8, scale_nested fp32, scale_offset 0-d fp32)``."""
    offset = scale.mean()
    q, nested = quantize8_ref(scale, NESTED_BLOCK, True, float(offset))
    return q, nested, offset.reshape(())


def block_scales_ref(qt) -> torch.Tensor:
    """Per-block fp32 scales of a QuantizedTensor, rebuilt from double quant if needed."""
    if not qt.double_quant:
        return qt.scale
    return dequantize8_ref(qt.scale_q, qt.scale_nested, NESTED_BLOCK, True, float(qt.scale_offset))


def dequantize_qt_ref(qt, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_ref(qt.codes, block_scales_ref(qt), qt.zero, qt.fmt, qt.block_size, qt.shape, dtype)


def gemm_ref(x: torch.Tensor, qt, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x @ dequantize(W).T (+ bias)`` computed in fp32, returned in ``x.dtype``. x: (..., K)."""
    w = dequantize_qt_ref(qt, torch.float32)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gemm_t_ref(gy: torch.Tensor, qt) -> torch.Tensor:
    """``gx = gy @ dequantize(W)`` in fp32, returned in ``gy.dtype``. gy: (..., N) -> (..., K)."""
    w = dequantize_qt_ref(qt, torch.float32)
    return (gy.float() @ w).to(gy.dtype)
