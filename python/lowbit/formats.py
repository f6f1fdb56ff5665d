"""Formats: code tables, packing rules, QuantSpec and QuantizedTensor.

The tables and rules here are the Python copy of ``include/lowbit/formats.h`` (tests check that
the two agree and that both equal bitsandbytes' tables), including the one list of accepted block
sizes (``block_sizes_of`` for quantize, ``GEMM_BLOCKS`` for the packed products). This module is the
ground floor: it imports nothing from lowbit. ``QuantizedTensor.dequantize`` reaches the kernels
through torch's dispatcher (``torch.ops.lowbit.dequantize``, registered by :mod:`lowbit.ops.quant`).

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
import json
import math
import sys
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
    "TABLE_BLOCKS",
    "INT_BLOCKS",
    "GEMM_BLOCKS",
    "to_bnb",
    "from_bnb",
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
# The accepted block sizes: Python's one copy of quant_block_ok / gemm_block_ok (include/lowbit/formats.h;
# tests/test_quant.py checks them against _C.tables()). nf4/fp4 go up to 4096 like bitsandbytes; the
# packed products (gemm, gemm_t, lowrank) take the blocks their kernels are instantiated for.
TABLE_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INT_BLOCKS = (32, 64, 128, 256)
GEMM_BLOCKS = (32, 64, 128, 256)


def bits_of(fmt: str) -> int:
    return _BITS[fmt]


def block_sizes_of(fmt: str) -> tuple[int, ...]:
    """Block sizes a format accepts (nf4/fp4 go up to 4096 like bitsandbytes)."""
    return TABLE_BLOCKS if fmt in ("nf4", "fp4") else INT_BLOCKS


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


def is_dtensor(t) -> bool:
    """Whether t is a torch.distributed DTensor (an FSDP2 shard). No DTensor exists before
    torch.distributed.tensor is imported, and until then that module is not even an attribute of
    torch.distributed (an AttributeError in a fresh process): so the check reads sys.modules."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def check_storage(name: str, t: torch.Tensor) -> None:
    """Refuse a tensor whose storage does not hold the elements its view spans (a storage shrunk
    with ``untyped_storage().resize_()`` after the view was made): native code would read past it."""
    if not t.numel() or t.is_meta or torch.compiler.is_compiling():
        return  # under torch.compile the ops' kernel door checks the real tensors at run time
    if t.is_contiguous():
        span = t.numel()
    else:  # the furthest element a strided view reaches (strides are never negative in torch)
        span = 1 + sum((d - 1) * st for d, st in zip(t.shape, t.stride()))
    need = (t.storage_offset() + span) * t.element_size()
    have = t.untyped_storage().nbytes()
    if have < need:
        raise ValueError(f"{name} spans {need} bytes of its storage but the storage holds {have} "
                         f"(shape {tuple(t.shape)}, strides {t.stride()}, offset {t.storage_offset()})")


def _check_shape(shape) -> torch.Size:
    """(N, K) as two ints >= 0 (torch.Size would raise RuntimeError for -8, and take 8.0 or True)."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__") or len(shape) != 2:
        raise ValueError(f"shape={shape!r} must be (N, K)")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"shape={tuple(shape)!r} must hold ints, got {type(d).__name__}")
        if d < 0:
            raise ValueError(f"shape={tuple(shape)} has a negative dimension")
    return torch.Size(int(d) for d in shape)


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
        # Immutable once built (issue 14, finding 4): _check's guarantees (sizes, dtypes, dense
        # buffers) are what the kernels rely on, so nothing may replace a component afterwards.
        # The constructor is the only writer; derive a new weight with QuantizedTensor(...)/.to/.clone.
        init = object.__setattr__
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a lowbit.QuantSpec, got {type(spec).__name__}")
        init(self, "spec", spec)
        init(self, "shape", _check_shape(shape))
        init(self, "dtype", dtype)
        for name, t in zip(_COMPONENTS, (codes, scale, zero, scale_q, scale_nested, scale_offset)):
            init(self, name, t)
        self._check()

    def __setattr__(self, name, value):
        raise AttributeError(f"QuantizedTensor is immutable: cannot set {name!r} (build a new weight with "
                             f"QuantizedTensor(...), .to() or .clone())")

    def __delattr__(self, name):
        raise AttributeError(f"QuantizedTensor is immutable: cannot delete {name!r}")

    def __reduce__(self):
        # copy / deepcopy / pickle rebuild through the constructor, so a loaded weight is validated
        return (QuantizedTensor, (self.spec, tuple(self.shape), self.dtype, self.codes, self.scale, self.zero,
                                  self.scale_q, self.scale_nested, self.scale_offset))

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

        def need(name, t, dtype, numel, shape=None):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} is missing (got {type(t).__name__})")
            if t.dtype != dtype:
                raise TypeError(f"{name}.dtype={t.dtype}, expected {dtype}")
            if t.numel() != numel:
                raise ValueError(f"{name} has {t.numel()} elements, expected {numel} for shape "
                                 f"{tuple(self.shape)}, fmt={spec.fmt!r}, block_size={spec.block_size}")
            if t.device != self.codes.device:
                raise ValueError(f"{name} is on {t.device} but codes are on {self.codes.device}")
            check_storage(name, t)
            # Dense buffers only (issue 14, finding 1): the kernels index every component as a
            # contiguous array, and checkpoints (from_bnb, load_state_dict) come with views: a
            # transposed or strided view is copied, a stride-0 expand becomes a real buffer.
            t = t.reshape(shape) if shape is not None else t
            object.__setattr__(self, name, t if t.is_contiguous() else t.contiguous())

        # canonical shapes: codes (N, K*bits/8), per-block statistics 1-D, offset 0-d (bitsandbytes
        # stores codes as (n/2, 1), offsets as 0-d)
        need("codes", self.codes, torch.uint8, n * spec.bits // 8, (self.shape[0], self.shape[1] * spec.bits // 8))
        if spec.double_quant:
            need("scale_q", self.scale_q, torch.uint8, nb, (nb,))
            need("scale_nested", self.scale_nested, torch.float32, -(-nb // NESTED_BLOCK), (-1,))
            need("scale_offset", self.scale_offset, torch.float32, 1, ())
            if self.scale is not None:
                raise ValueError("scale must be None when double_quant=True (it lives in scale_q)")
        else:
            need("scale", self.scale, torch.float32, nb, (nb,))
            if self.scale_q is not None or self.scale_nested is not None:
                raise ValueError("scale_q/scale_nested given but double_quant=False")
        if spec.fmt in ("int4", "int2"):
            need("zero", self.zero, torch.float32, nb, (nb,))
        elif self.zero is not None:
            raise ValueError(f"zero given for fmt={spec.fmt!r} (only int formats have a zero point)")

    # ---- conversions
    def dequantize(self, dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dense ``(N, K)`` weight in ``dtype`` (default: ``out``'s dtype, else the original weight's),
        written into ``out`` when given (a contiguous (N, K) workspace, no extra copy). The ops
        ``lowbit::dequantize`` / ``lowbit::dequantize_into`` validate and run the kernel."""
        if dtype is None:
            dtype = out.dtype if isinstance(out, torch.Tensor) else self.dtype
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype={dtype!r} must be a torch.dtype")
        c = self.components()
        w = (c["codes"], c.get("scale"), c.get("zero"), c.get("scale_q"), c.get("scale_nested"), c.get("scale_offset"))
        n, k = self.shape
        if out is None:
            return torch.ops.lowbit.dequantize(*w, n, k, self.block_size, self.fmt, dtype)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        torch.ops.lowbit.dequantize_into(out, *w, n, k, self.block_size, self.fmt, dtype)
        return out

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
        return to_bnb(self, prefix)

    # ---- serialization helpers (used by save_tensors / QuantLinear)
    def metadata(self) -> dict:
        return {"fmt": self.fmt, "block_size": self.block_size, "double_quant": self.double_quant,
                "shape": list(self.shape), "dtype": DTYPE_NAME[self.dtype]}

    @classmethod
    def from_components(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "QuantizedTensor":
        """Inverse of ``(metadata(), components())``; validates everything."""
        spec, shape, dtype = parse_metadata(meta)
        unknown = set(tensors) - set(_COMPONENTS)
        if unknown:
            raise ValueError(f"unknown quantized-tensor components {sorted(unknown)}")
        return cls(spec, shape, dtype, **tensors)

    def __repr__(self) -> str:
        n, k = self.shape
        return (f"QuantizedTensor(shape=({n}, {k}), fmt={self.fmt!r}, block_size={self.block_size}, "
                f"double_quant={self.double_quant}, dtype={self.dtype}, device={self.device}, "
                f"nbytes={self.nbytes}, bits_per_weight={8 * self.nbytes / max(self.shape.numel(), 1):.3f})")


# ----------------------------------------------------------------------------- bitsandbytes
# Interchange with bitsandbytes' Linear4bit is format data only (no kernel): it lives here, beside the
# layout it converts, so QuantizedTensor.to_bnb needs nothing above this module.
def to_bnb(qt: QuantizedTensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """State-dict entries that bitsandbytes' ``Linear4bit`` / ``Params4bit.from_prequantized`` loads.

    Keys: ``weight`` (uint8 (N*K/2, 1)), ``weight.absmax``, ``weight.quant_map``, with double
    quant ``weight.nested_absmax`` and ``weight.nested_quant_map``, and
    ``weight.quant_state.bitsandbytes__<fmt>`` (uint8 bytes of a JSON dict).
    """
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    if qt.fmt not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes stores only nf4/fp4 weights; this weight is fmt={qt.fmt!r}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    p = prefix + "weight"
    table = NF4 if qt.fmt == "nf4" else FP4
    sd = {p: qt.codes.reshape(-1, 1).clone(), f"{p}.quant_map": torch.tensor(table, dtype=torch.float32).to(qt.device)}
    state = {"quant_type": qt.fmt, "blocksize": qt.block_size, "dtype": DTYPE_NAME[qt.dtype],
             "shape": list(qt.shape)}
    if qt.double_quant:
        sd[f"{p}.absmax"] = qt.scale_q.clone()
        sd[f"{p}.nested_absmax"] = qt.scale_nested.clone()
        sd[f"{p}.nested_quant_map"] = dynamic_map(True).to(qt.device)
        # float(fp32) -> JSON keeps every bit (a double holds any fp32 exactly)
        state.update(nested_blocksize=NESTED_BLOCK, nested_dtype="float32",
                     nested_offset=float(qt.scale_offset))
    else:
        sd[f"{p}.absmax"] = qt.scale.clone()
    sd[f"{p}.quant_state.bitsandbytes__{qt.fmt}"] = torch.tensor(
        list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    return sd


def finite_float(v) -> Optional[float]:
    """``float(v)`` for a real number (int or float, not bool) that is finite as a double, else None
    (float() of an int past 1.8e308 raises OverflowError instead)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, int) and abs(v) > 1.7976931348623157e308:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def json_loads(where: str, text):
    """JSON from a checkpoint: any way it fails is ``ValueError(f"{where}: ...")`` (json raises
    RecursionError for deep nesting, UnicodeDecodeError for bytes that are not UTF-8)."""
    try:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{where}: invalid JSON: {e}") from None


def _json_int(where: str, field: str, v, lo: int = 0) -> int:
    """A JSON integer (not a bool, float or string: ``blocksize`` 64.9 or "64" is refused, not rounded)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{where}: {field}={v!r} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{where}: {field}={v} must be >= {lo}")
    return v


def _json_shape(where: str, field: str, v) -> list[int]:
    """A list of two non-negative ints whose product fits int64 (torch.Size wraps on overflow)."""
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ValueError(f"{where}: {field}={v!r} must be a list [N, K] (lowbit stores 2-D weights)")
    shape = [_json_int(where, f"{field}[{i}]", d) for i, d in enumerate(v)]
    if shape[0] * shape[1] >= 2 ** 62:
        raise ValueError(f"{where}: {field}={shape} has more elements than any tensor can hold")
    return shape


def _json_str(where: str, field: str, v) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{where}: {field}={v!r} must be a str, got {type(v).__name__}")
    return v


def parse_metadata(meta, where: str = "quantized-tensor metadata") -> tuple[QuantSpec, list[int], torch.dtype]:
    """Read ``QuantizedTensor.metadata()`` back strictly: real JSON ints and booleans only
    (``bool("false")`` is True, ``int(64.9)`` is 64: coercing would load other numbers)."""
    if not isinstance(meta, dict):
        raise TypeError(f"{where} must be a dict, got {type(meta).__name__}: {meta!r}")
    missing = [k for k in ("fmt", "block_size", "double_quant", "shape", "dtype") if k not in meta]
    if missing:
        raise ValueError(f"{where} {meta!r} lacks {missing}")
    dq = meta["double_quant"]
    if not isinstance(dq, bool):
        raise TypeError(f"{where}: double_quant={dq!r} must be a bool (JSON true/false), got {type(dq).__name__}")
    spec = QuantSpec(_json_str(where, "fmt", meta["fmt"]), _json_int(where, "block_size", meta["block_size"]), dq)
    shape = _json_shape(where, "shape", meta["shape"])
    dtype = {v: k for k, v in DTYPE_NAME.items()}.get(_json_str(where, "dtype", meta["dtype"]))
    if dtype is None:
        raise ValueError(f"{where}: dtype={meta['dtype']!r} is not one of {sorted(DTYPE_NAME.values())}")
    return spec, shape, dtype


def _need(sd, key):
    if key not in sd:
        raise ValueError(f"state dict lacks {key!r} (keys present: {sorted(sd)[:12]})")
    v = sd[key]
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"state dict entry {key!r} must be a tensor, got {type(v).__name__}")
    return v


def from_bnb(state_dict: dict, prefix: str = "") -> QuantizedTensor:
    """Read a bitsandbytes 4-bit weight (``{prefix}weight`` + its quant-state entries), bit-exactly.

    Accepts ``quant_storage`` uint8, bf16, fp16 or fp32 (the packed bytes are reinterpreted).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    p = prefix + "weight"
    packed = _need(state_dict, p)
    qs_keys = [k for k in state_dict if isinstance(k, str) and k.startswith(f"{p}.quant_state.bitsandbytes__")]
    if len(qs_keys) != 1:
        raise ValueError(f"expected exactly one '{p}.quant_state.bitsandbytes__nf4|fp4' entry, found {qs_keys}")
    where = qs_keys[0]
    raw = _need(state_dict, where)
    if raw.dtype != torch.uint8:  # bytes of JSON; a cast would turn 123.7 into 123
        raise TypeError(f"{where}.dtype={raw.dtype}: a bitsandbytes quant state is uint8 bytes of JSON")
    if raw.device.type == "meta":
        raise ValueError(f"{where} is on the meta device: it holds no bytes to read")
    state = json_loads(f"{where} is not a valid bitsandbytes quant state", bytes(raw.reshape(-1).tolist()))
    if not isinstance(state, dict):
        raise ValueError(f"{where} is not a valid bitsandbytes quant state: a JSON {type(state).__name__}, not an object")
    missing = [k for k in ("quant_type", "blocksize", "shape", "dtype") if k not in state]
    if missing:
        raise ValueError(f"{where} is not a valid bitsandbytes quant state: it lacks {missing}")
    fmt = _json_str(where, "quant_type", state["quant_type"])
    if fmt not in ("nf4", "fp4") or not where.endswith(fmt):
        raise ValueError(f"quant_type={fmt!r} does not match key {where!r}")
    block = _json_int(where, "blocksize", state["blocksize"])
    shape = _json_shape(where, "shape", state["shape"])
    dtype_name = _json_str(where, "dtype", state["dtype"])
    dtype = {v: k for k, v in DTYPE_NAME.items()}.get(dtype_name)
    if dtype is None:
        raise ValueError(f"dtype={dtype_name!r} in {where} is not float32/bfloat16/float16")
    quant_map = _need(state_dict, f"{p}.quant_map")
    expected = torch.tensor(NF4 if fmt == "nf4" else FP4, dtype=torch.float32)
    if quant_map.shape != expected.shape or not torch.equal(quant_map.float().cpu(), expected):
        raise ValueError(f"{p}.quant_map is not the standard {fmt} table; custom maps are not supported")
    # quant_storage: bitsandbytes packs the bytes into uint8 or a float dtype; the bytes are reinterpreted,
    # never converted (an int64 or bool tensor is not packed data: converting it would invent codes)
    if packed.dtype not in (torch.uint8, torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{p}.dtype={packed.dtype}: packed 4-bit weights are stored as uint8, bfloat16, "
                        f"float16 or float32")
    n_bytes = packed.numel() * packed.element_size()
    if n_bytes * 2 != shape[0] * shape[1]:
        raise ValueError(f"{p} holds {n_bytes} bytes; shape={shape} at 4 bits needs {shape[0] * shape[1] // 2}")
    codes = packed.contiguous().reshape(-1).view(torch.uint8)
    spec_dq = "nested_offset" in state or f"{p}.nested_absmax" in state_dict
    absmax = _need(state_dict, f"{p}.absmax")
    if not spec_dq:
        if absmax.dtype != torch.float32:
            raise TypeError(f"{p}.absmax.dtype={absmax.dtype}: expected float32 (or uint8 with nested_* entries)")
        return QuantizedTensor(QuantSpec(fmt, block, False), shape, dtype, codes, scale=absmax.reshape(-1))
    # double quant: absmax holds 8-bit codes into the nested map; a float absmax cast to uint8 would
    # truncate (2.7 -> 2) and load other numbers
    if absmax.dtype != torch.uint8:
        raise TypeError(f"{p}.absmax.dtype={absmax.dtype}: with nested_* entries (double quant) it must be uint8")
    nested = _need(state_dict, f"{p}.nested_absmax")
    if nested.dtype != torch.float32:
        raise TypeError(f"{p}.nested_absmax.dtype={nested.dtype}: expected float32")
    nested_block = state.get("nested_blocksize")
    if isinstance(nested_block, bool) or not isinstance(nested_block, int) or nested_block != NESTED_BLOCK:
        raise ValueError(f"nested_blocksize={nested_block!r} in {where} is not supported (lowbit uses {NESTED_BLOCK})")
    if state.get("nested_dtype", "float32") != "float32":
        raise ValueError(f"nested_dtype={state['nested_dtype']!r} in {where}: only float32 nested statistics are supported")
    nmap = _need(state_dict, f"{p}.nested_quant_map")
    if nmap.shape != (256,) or not torch.equal(nmap.float().cpu(), dynamic_map(True)):
        raise ValueError(f"{p}.nested_quant_map is not the signed 8-bit dynamic map")
    if "nested_offset" not in state:
        raise ValueError(f"{where} lacks nested_offset")
    off = state["nested_offset"]
    if isinstance(off, bool) or not isinstance(off, (int, float)):
        raise TypeError(f"{where}: nested_offset={off!r} must be a number, got {type(off).__name__}")
    # fp32 like bitsandbytes' QuantState.from_dict; a finite double beyond fp32's range becomes inf,
    # an int beyond a double's raises OverflowError. Checked on the CPU (codes may be on meta).
    try:
        offset = torch.tensor(float(off), dtype=torch.float32)
    except OverflowError:
        offset = torch.tensor(math.inf)
    if not torch.isfinite(offset):
        raise ValueError(f"{where}: nested_offset={off!r} is not a finite float32")
    offset = offset.to(codes.device)
    return QuantizedTensor(QuantSpec(fmt, block, True), shape, dtype, codes,
                           scale_q=absmax.reshape(-1), scale_nested=nested.reshape(-1), scale_offset=offset)
