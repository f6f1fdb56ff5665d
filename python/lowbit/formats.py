"""Formats: code tables, packing rules, QuantSpec and QuantizedTensor.

The tables and rules here are the Python copy of ``include/lowbit/formats.h`` (tests check that
the two agree and that both equal bitsandbytes' tables).

Canonical layout of a weight ``W`` of shape ``(N, K)`` quantized with ``block_size`` ``B``:

* ``codes``: ``uint8 (N, K * bits // 8)`` — flat row-major element order; the first element of a
  byte sits in its most significant bits (4-bit: element ``2i`` is the high nibble of byte ``i``,
  bitsandbytes' order; 2-bit: element ``4i`` is bits 7..6).
* ``scale``: ``float32 (N * K // B,)`` — per block: the absmax for nf4/fp4, the step ``s`` for
  int4/int2. With double quant it is replaced by ``scale_q`` (``uint8``, the signed 8-bit dynamic
  map), ``scale_nested`` (``float32``, one per 256 blocks) and ``scale_offset`` (0-d ``float32``):
  ``scale = dynamic_signed[scale_q] * scale_nested[b // 256] + scale_offset`` (two fp32 roundings).
* ``zero``: ``float32 (N * K // B,)`` — int formats only; ``w_hat = (q - zero) * scale``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

__all__ = [
    "FORMATS",
    "FMT_ID",
    "DTYPE_ID",
    "NF4",
    "FP4",
    "FP4_SORTED_CODES",
    "NESTED_BLOCK",
    "QuantSpec",
    "QuantizedTensor",
    "bits_of",
    "dynamic_map",
    "block_sizes_of",
]

FORMATS = ("nf4", "fp4", "int4", "int2")
FMT_ID = {"nf4": 0, "fp4": 1, "int4": 2, "int2": 3}  # == lowbit::Fmt
DTYPE_ID = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # == lowbit::DType
DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
NESTED_BLOCK = 256

# NF4 as bitsandbytes stores it (fp32, sorted). Written as hex floats: exact.
NF4 = [float.fromhex(h) for h in (
    "-0x1p+0", "-0x1.647362p-1", "-0x1.0cd66p-1", "-0x1.94654p-2", "-0x1.23449ap-2", "-0x1.7a6a7ep-3",
    "-0x1.74f0e2p-4", "0x0p+0", "0x1.45f5fep-4", "0x1.4995c6p-3", "0x1.f809bap-3", "0x1.5a0674p-2",
    "0x1.c3497p-2", "0x1.200f56p-1", "0x1.722766p-1", "0x1p+0")]
# FP4 (bitsandbytes' e2m1 variant): [0, .0625, 8, 12, 4, 6, 2, 3] / 12 in fp32, bit 3 the sign.
FP4 = [float(torch.tensor(v / 12.0, dtype=torch.float32)) for v in (0, 0.0625, 8, 12, 4, 6, 2, 3)]
FP4 = FP4 + [-v if v != 0 else 0.0 for v in FP4]
# FP4 codes in increasing value order; +0 (code 0) sorts before the other zero (code 8).
FP4_SORTED_CODES = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]

_BITS = {"nf4": 4, "fp4": 4, "int4": 4, "int2": 2}
_TABLE_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_INT_BLOCKS = (32, 64, 128, 256)


def bits_of(fmt: str) -> int:
    return _BITS[fmt]


def block_sizes_of(fmt: str) -> tuple[int, ...]:
    """Block sizes a format accepts (nf4/fp4 go up to 4096 like bitsandbytes)."""
    return _TABLE_BLOCKS if fmt in ("nf4", "fp4") else _INT_BLOCKS


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 8-bit dynamic tree map (Dettmers 2015, arXiv:1511.04561), fp32, sorted, 256 entries.

    A sign bit (signed map), a run of zeros encoding a decimal exponent ``10**-e`` (``e`` in 0..6),
    then a linear fraction: exponent ``e`` owns ``2**e`` (signed) or ``2**(e+1)`` (unsigned)
    values, the midpoints of ``linspace(0.1, 1)``; plus 0 and 1. Computed with fp32 tensor
    arithmetic so it equals bitsandbytes' ``create_dynamic_map`` bit for bit (tested).
    """
    parts = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        n = 2 ** (e + (0 if signed else 1)) + 1
        edges = torch.linspace(0.1, 1.0, n, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        parts.append(mids * 10.0 ** (e - 6))
        if signed:
            parts.append(mids * -(10.0 ** (e - 6)))
    vals = torch.cat(parts)
    vals = torch.cat([vals, vals.new_zeros(256 - vals.numel())])  # unsigned map: pad with zeros
    return vals.sort().values


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized: format, block size (along the input dimension K), double quant."""

    fmt: str = "nf4"
    block_size: int = 64
    double_quant: bool = False

    def __post_init__(self):
        if not isinstance(self.fmt, str) or self.fmt not in FORMATS:
            raise ValueError(f"fmt={self.fmt!r} is not one of {FORMATS}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"block_size={self.block_size!r} must be an int")
        if self.block_size not in block_sizes_of(self.fmt):
            raise ValueError(f"block_size={self.block_size} is not supported for fmt={self.fmt!r}; "
                             f"choose one of {block_sizes_of(self.fmt)}")
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant={self.double_quant!r} must be a bool")

    @property
    def bits(self) -> int:
        return _BITS[self.fmt]


_COMPONENTS = ("codes", "scale", "zero", "scale_q", "scale_nested", "scale_offset")


class QuantizedTensor:
    """A weight of shape ``(N, K)`` in a low-bit format (see the module docstring for the layout).

    Built by :func:`lowbit.quantize`; frozen (no autograd). ``dequantize(dtype)`` returns the
    ``(N, K)`` dense weight, by default in the dtype of the original weight.
    """

    __slots__ = ("spec", "shape", "dtype", "codes", "scale", "zero", "scale_q", "scale_nested",
                 "scale_offset")

    def __init__(self, spec: QuantSpec, shape, dtype: torch.dtype, codes: torch.Tensor,
                 scale: Optional[torch.Tensor] = None, zero: Optional[torch.Tensor] = None,
                 scale_q: Optional[torch.Tensor] = None, scale_nested: Optional[torch.Tensor] = None,
                 scale_offset: Optional[torch.Tensor] = None):
        self.spec = spec
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.codes, self.scale, self.zero = codes, scale, zero
        self.scale_q, self.scale_nested, self.scale_offset = scale_q, scale_nested, scale_offset
        self._check()

    # ---- metadata
    @property
    def fmt(self) -> str:
        return self.spec.fmt

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def double_quant(self) -> bool:
        return self.spec.double_quant

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def n_blocks(self) -> int:
        return self.shape.numel() // self.spec.block_size

    @property
    def nbytes(self) -> int:
        """Bytes of all components (codes + scales + zeros + nested statistics)."""
        return sum(t.numel() * t.element_size() for t in self.components().values())

    def components(self) -> dict[str, torch.Tensor]:
        """The tensors that make up this weight, by name (absent ones left out)."""
        return {k: getattr(self, k) for k in _COMPONENTS if getattr(self, k) is not None}

    def _check(self) -> None:
        spec, n, nb = self.spec, self.shape.numel(), self.shape.numel() // self.spec.block_size
        if len(self.shape) != 2:
            raise ValueError(f"shape={tuple(self.shape)} must be (N, K)")
        if self.shape[1] % spec.block_size:
            raise ValueError(f"K={self.shape[1]} is not a multiple of block_size={spec.block_size}")
        if self.dtype not in DTYPE_ID:
            raise TypeError(f"dtype={self.dtype} must be one of {list(DTYPE_ID)}")

        def need(name, t, dtype, numel):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} is missing (got {type(t).__name__})")
            if t.dtype != dtype:
                raise TypeError(f"{name}.dtype={t.dtype}, expected {dtype}")
            if t.numel() != numel:
                raise ValueError(f"{name} has {t.numel()} elements, expected {numel} for shape "
                                 f"{tuple(self.shape)}, fmt={spec.fmt!r}, block_size={spec.block_size}")
            if t.device != self.codes.device:
                raise ValueError(f"{name} is on {t.device} but codes are on {self.codes.device}")

        need("codes", self.codes, torch.uint8, n * spec.bits // 8)
        # canonical shapes (views: free); bitsandbytes stores codes as (n/2, 1), offsets as 0-d
        self.codes = self.codes.reshape(self.shape[0], self.shape[1] * spec.bits // 8)
        if spec.double_quant:
            need("scale_q", self.scale_q, torch.uint8, nb)
            need("scale_nested", self.scale_nested, torch.float32, -(-nb // NESTED_BLOCK))
            need("scale_offset", self.scale_offset, torch.float32, 1)
            self.scale_offset = self.scale_offset.reshape(())
            if self.scale is not None:
                raise ValueError("scale must be None when double_quant=True (it lives in scale_q)")
        else:
            need("scale", self.scale, torch.float32, nb)
            if self.scale_q is not None or self.scale_nested is not None:
                raise ValueError("scale_q/scale_nested given but double_quant=False")
        if spec.fmt in ("int4", "int2"):
            need("zero", self.zero, torch.float32, nb)
        elif self.zero is not None:
            raise ValueError(f"zero given for fmt={spec.fmt!r} (only int formats have a zero point)")

    # ---- conversions
    def dequantize(self, dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dense ``(N, K)`` weight in ``dtype`` (default: the original weight's dtype, or out's),
        written into ``out`` when given (a contiguous (N, K) workspace)."""
        from . import ops

        if dtype is None:
            dtype = out.dtype if isinstance(out, torch.Tensor) else self.dtype
        return ops.dequantize(self, dtype, out)

    def block_scales(self) -> torch.Tensor:
        """The per-block fp32 scales ``(N * K // block_size,)``, rebuilt from double quant if needed."""
        from . import ops

        return ops.block_scales(self)

    def to(self, device) -> "QuantizedTensor":
        return QuantizedTensor(self.spec, self.shape, self.dtype,
                               **{k: v.to(device) for k, v in self.components().items()})

    def clone(self) -> "QuantizedTensor":
        return QuantizedTensor(self.spec, self.shape, self.dtype,
                               **{k: v.clone() for k, v in self.components().items()})

    def equal(self, other: "QuantizedTensor") -> bool:
        """Exact equality of spec, shape, dtype and every component's bytes."""
        if not isinstance(other, QuantizedTensor):
            return False
        if (self.spec, self.shape, self.dtype) != (other.spec, other.shape, other.dtype):
            return False
        a, b = self.components(), other.components()
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def to_bnb(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """bitsandbytes ``Linear4bit`` state-dict entries (``{prefix}weight`` ...); nf4/fp4 only."""
        from .convert import to_bnb

        return to_bnb(self, prefix)

    # ---- serialization helpers (used by save_file / QuantLinear)
    def metadata(self) -> dict:
        return {"fmt": self.fmt, "block_size": self.block_size, "double_quant": self.double_quant,
                "shape": list(self.shape), "dtype": DTYPE_NAME[self.dtype]}

    @classmethod
    def from_components(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "QuantizedTensor":
        """Inverse of ``(metadata(), components())``; validates everything."""
        try:
            spec = QuantSpec(meta["fmt"], int(meta["block_size"]), bool(meta["double_quant"]))
            shape = [int(s) for s in meta["shape"]]
            dtype = {v: k for k, v in DTYPE_NAME.items()}[meta["dtype"]]
        except KeyError as e:
            raise ValueError(f"quantized-tensor metadata {meta!r} lacks or has a bad entry {e}") from None
        unknown = set(tensors) - set(_COMPONENTS)
        if unknown:
            raise ValueError(f"unknown quantized-tensor components {sorted(unknown)}")
        return cls(spec, shape, dtype, **tensors)

    def __repr__(self) -> str:
        n, k = self.shape
        return (f"QuantizedTensor(shape=({n}, {k}), fmt={self.fmt!r}, block_size={self.block_size}, "
                f"double_quant={self.double_quant}, dtype={self.dtype}, device={self.device}, "
                f"nbytes={self.nbytes}, bits_per_weight={8 * self.nbytes / max(self.shape.numel(), 1):.3f})")

