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

__all__ = ["quantize", "dequantize", "block_scales", "quantize8", "dequantize8", "gemm", "gemm_t", "lowrank"]

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


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense ``(N, K)`` weight of a QuantizedTensor in ``dtype``; ``out``: a contiguous (N, K)
    tensor of that dtype to write into (reusing a workspace skips the page faults of a fresh one)."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype={dtype} is not supported; expected one of {list(_FLOAT_DTYPES)}")
    if out is not None:
        check_tensor("out", out, dtypes=(dtype,))
        if tuple(out.shape) != tuple(qt.shape) or not out.is_contiguous() or out.device != qt.device:
            raise ValueError(f"out must be a contiguous {tuple(qt.shape)} tensor on {qt.device}, got "
                             f"{tuple(out.shape)} (contiguous={out.is_contiguous()}) on {out.device}")
    be = backend_for(qt.codes)
    if be == "reference":
        w = ref.dequantize_qt_ref(qt, dtype)
        return w if out is None else out.copy_(w)
    if out is None:
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


# ----------------------------------------------------------------------------------------- gemm
# torch.library custom ops: opaque to torch.compile (fake impls give shapes), autograd registered
# on the op itself, so `torch.compile(model)` and `opcheck` see one op per product.
GEMM_BLOCKS = (32, 64, 128, 256)


def _weight_args(qt: QuantizedTensor):
    c = qt.components()
    return (c["codes"], c.get("scale"), c.get("zero"), c.get("scale_q"), c.get("scale_nested"), c.get("scale_offset"))


def _qt_from_args(codes, scale, zero, scale_q, scale_nested, scale_offset, n, k, block, fmt, dtype):
    spec = QuantSpec(fmt, block, scale_q is not None)
    return QuantizedTensor(spec, (n, k), dtype, codes, scale=scale, zero=zero, scale_q=scale_q,
                           scale_nested=scale_nested, scale_offset=scale_offset)


def _native_gemm(fn: str, be: str, a: torch.Tensor, out: torch.Tensor, bias, w, n, k, block, fmt):
    codes, scale, zero, scale_q, scale_nested, scale_offset = w
    m = a.numel() // a.shape[-1]
    args = [a.data_ptr(), out.data_ptr()]
    if fn == "gemm":
        args.append(_ptr(bias))
    args += [DTYPE_ID[a.dtype], m, n, k, codes.data_ptr(), _ptr(scale), _ptr(zero), _ptr(scale_q),
             _ptr(scale_nested), float(scale_offset) if scale_offset is not None else 0.0, block, FMT_ID[fmt]]
    call(be, fn, *args)


def _native_lowrank(be: str, x: torch.Tensor, y: torch.Tensor, xa: torch.Tensor, bias, w, a: torch.Tensor,
                    b: torch.Tensor, s: float, n: int, k: int, block: int, fmt: str) -> None:
    """The fused lowrank kernel of backend ``be`` on contiguous x (M, K), y (M, N), xa (M, r), A, B
    in x's dtype; w = the weight's component tensors (``_weight_args``)."""
    codes, scale, zero, scale_q, scale_nested, scale_offset = w
    call(be, "lowrank", x.data_ptr(), y.data_ptr(), xa.data_ptr(), _ptr(bias), DTYPE_ID[x.dtype], x.shape[0], n, k,
         codes.data_ptr(), _ptr(scale), _ptr(zero), _ptr(scale_q), _ptr(scale_nested),
         float(scale_offset) if scale_offset is not None else 0.0, block, FMT_ID[fmt], a.data_ptr(), b.data_ptr(),
         a.shape[0], float(s))


@torch.library.custom_op("lowbit::gemm", mutates_args=())
def gemm_op(x: torch.Tensor, codes: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor],
            scale_q: Optional[torch.Tensor], scale_nested: Optional[torch.Tensor],
            scale_offset: Optional[torch.Tensor], bias: Optional[torch.Tensor], n: int, k: int, block: int,
            fmt: str) -> torch.Tensor:
    """y (M, N) = x (M, K) · dequant(W)ᵀ (+ bias); inputs validated by :func:`gemm`."""
    w = (codes, scale, zero, scale_q, scale_nested, scale_offset)
    be = backend_for(x)
    if be == "reference":
        return ref.gemm_ref(x, _qt_from_args(*w, n, k, block, fmt, torch.float32), bias)
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    _native_gemm("gemm", be, x, y, bias, w, n, k, block, fmt)
    return y


@gemm_op.register_fake
def _(x, codes, scale, zero, scale_q, scale_nested, scale_offset, bias, n, k, block, fmt):
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("lowbit::gemm_t", mutates_args=())
def gemm_t_op(gy: torch.Tensor, codes: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor],
              scale_q: Optional[torch.Tensor], scale_nested: Optional[torch.Tensor],
              scale_offset: Optional[torch.Tensor], n: int, k: int, block: int, fmt: str) -> torch.Tensor:
    """gx (M, K) = gy (M, N) · dequant(W): the backward of gemm to its input."""
    w = (codes, scale, zero, scale_q, scale_nested, scale_offset)
    be = backend_for(gy)
    if be == "reference":
        return ref.gemm_t_ref(gy, _qt_from_args(*w, n, k, block, fmt, torch.float32))
    gx = torch.empty(gy.shape[0], k, dtype=gy.dtype, device=gy.device)
    _native_gemm("gemm_t", be, gy, gx, None, w, n, k, block, fmt)
    return gx


@gemm_t_op.register_fake
def _(gy, codes, scale, zero, scale_q, scale_nested, scale_offset, n, k, block, fmt):
    return gy.new_empty(gy.shape[0], k)


def _gemm_setup_context(ctx, inputs, output):
    x, codes, scale, zero, scale_q, scale_nested, scale_offset, bias, n, k, block, fmt = inputs
    ctx.save_for_backward(codes, scale, zero, scale_q, scale_nested, scale_offset)
    ctx.meta = (n, k, block, fmt, bias is not None)


def _gemm_backward(ctx, gy):
    n, k, block, fmt, has_bias = ctx.meta
    gx = gemm_t_op(gy.contiguous(), *ctx.saved_tensors, n, k, block, fmt) if ctx.needs_input_grad[0] else None
    gb = gy.sum(0) if has_bias and ctx.needs_input_grad[7] else None
    return gx, None, None, None, None, None, None, gb, None, None, None, None


def _gemm_t_setup_context(ctx, inputs, output):
    gy, codes, scale, zero, scale_q, scale_nested, scale_offset, n, k, block, fmt = inputs
    ctx.save_for_backward(codes, scale, zero, scale_q, scale_nested, scale_offset)
    ctx.meta = (n, k, block, fmt)


def _gemm_t_backward(ctx, ggx):
    n, k, block, fmt = ctx.meta
    # d/d(gy) of gy · W is ggx · Wᵀ: the forward product again
    ggy = gemm_op(ggx.contiguous(), *ctx.saved_tensors, None, n, k, block, fmt) if ctx.needs_input_grad[0] else None
    return ggy, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("lowbit::gemm", _gemm_backward, setup_context=_gemm_setup_context)
torch.library.register_autograd("lowbit::gemm_t", _gemm_t_backward, setup_context=_gemm_t_setup_context)


def _check_gemm_operands(a: torch.Tensor, a_name: str, qt: QuantizedTensor, inner: int, inner_name: str) -> None:
    # float64 is accepted by the reference backend only (gradcheck); kernels take fp32/bf16/fp16.
    # Under torch.compile tracing the backend is resolved inside the op at run time instead.
    tracing = torch.compiler.is_compiling()
    ref_only = (not tracing and isinstance(a, torch.Tensor) and a.dtype == torch.float64
                and backend_for(a) == "reference")
    check_tensor(a_name, a, dtypes=_FLOAT_DTYPES + ((torch.float64,) if ref_only else ()))
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"weight must be a lowbit.QuantizedTensor, got {type(qt).__name__}")
    if a.dim() == 0 or a.shape[-1] != inner:
        raise ValueError(f"{a_name}.shape[-1]={a.shape[-1] if a.dim() else None} does not match "
                         f"{inner_name}={inner} of the weight {tuple(qt.shape)}")
    if a.device != qt.device:
        raise ValueError(f"{a_name} is on {a.device} but the weight is on {qt.device}")
    if qt.block_size not in GEMM_BLOCKS and (tracing or backend_for(a) != "reference"):
        raise ValueError(f"the gemm kernels take block_size in {GEMM_BLOCKS}, the weight has "
                         f"block_size={qt.block_size}; use lowbit.use_backend('reference') or requantize")


def gemm(x: torch.Tensor, qt: QuantizedTensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x (..., K) · dequant(W)ᵀ (+ bias) -> (..., N)`` in x's dtype (fp32 accumulation)."""
    n, k = qt.shape
    _check_gemm_operands(x, "x", qt, k, "in_features K")
    if bias is not None:
        check_tensor("bias", bias, dtypes=_FLOAT_DTYPES + (torch.float64,), ndim=1)
        if bias.shape[0] != n or bias.device != x.device:
            raise ValueError(f"bias of shape {tuple(bias.shape)} on {bias.device} does not fit N={n} on {x.device}")
        if bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
    lead = x.shape[:-1]
    y = gemm_op(x.reshape(-1, k).contiguous(), *_weight_args(qt), bias, n, k, qt.block_size, qt.fmt)
    return y.reshape(*lead, n)


def gemm_t(gy: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """``gy (..., N) · dequant(W) -> (..., K)``: the product with the transposed weight."""
    n, k = qt.shape
    _check_gemm_operands(gy, "gy", qt, n, "out_features N")
    lead = gy.shape[:-1]
    gx = gemm_t_op(gy.reshape(-1, n).contiguous(), *_weight_args(qt), n, k, qt.block_size, qt.fmt)
    return gx.reshape(*lead, k)


# ============================================================================================ hadamard
__all__ += ["hadamard"]


def _hadamard_native(be: str, x: torch.Tensor, out: torch.Tensor, scale: float, transpose: bool) -> None:
    n = x.shape[-1]
    call(be, "hadamard", x.data_ptr(), out.data_ptr(), DTYPE_ID[x.dtype], x.numel() // n, n, float(scale),
         bool(transpose))


@torch.library.custom_op("lowbit::hadamard", mutates_args=())
def hadamard_op(x: torch.Tensor, scale: float, transpose: bool) -> torch.Tensor:
    """``x (..., n) · H_n · scale`` (``H_nᵀ`` when ``transpose``); x contiguous, validated by :func:`hadamard`."""
    be = backend_for(x)
    if be == "reference":
        return ref.hadamard_ref(x, scale, transpose)
    out = torch.empty_like(x)
    if out.numel():
        _hadamard_native(be, x, out, scale, transpose)
    return out


@hadamard_op.register_fake
def _(x, scale, transpose):
    return torch.empty_like(x)


def _hadamard_setup_context(ctx, inputs, output):
    _, scale, transpose = inputs
    ctx.meta = (scale, transpose)


def _hadamard_backward(ctx, g):
    scale, transpose = ctx.meta
    # d(x · H · s)/dx applied to g is g · Hᵀ · s (H_172 is not symmetric; the others are)
    return hadamard_op(g.contiguous(), scale, not transpose), None, None


torch.library.register_autograd("lowbit::hadamard", _hadamard_backward, setup_context=_hadamard_setup_context)


def hadamard(x: torch.Tensor, scale: float = 1.0, out: Optional[torch.Tensor] = None, inplace: bool = False,
             transpose: bool = False) -> torch.Tensor:
    """``x @ H_n * scale`` along the last dim (see :func:`lowbit.reference.hadamard_ref`); ``out=`` or
    ``inplace=True`` write into an existing tensor (no autograd through those)."""
    tracing = torch.compiler.is_compiling()
    ref_only = (not tracing and isinstance(x, torch.Tensor) and x.dtype == torch.float64
                and backend_for(x) == "reference")
    check_tensor("x", x, dtypes=_FLOAT_DTYPES + ((torch.float64,) if ref_only else ()))
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the transform runs along the last one)")
    ref.hadamard_split(x.shape[-1])  # ValueError naming n for unsupported sizes
    if isinstance(scale, torch.Tensor):
        scale = scale.item()
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not torch.isfinite(torch.tensor(float(scale))):
        raise ValueError(f"scale={scale!r} must be a finite real number")
    scale = float(scale)
    if out is None and not inplace:
        return hadamard_op(x.contiguous(), scale, bool(transpose))
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
    be = backend_for(x)
    if be == "reference":
        return out.copy_(ref.hadamard_ref(x, scale, bool(transpose)))
    xc = x.contiguous()
    if out is not xc and out.data_ptr() != xc.data_ptr() and _overlaps(out, xc):
        raise ValueError("out overlaps x partially; use inplace=True or a separate tensor")
    if out.numel():
        _hadamard_native(be, xc, out, scale, bool(transpose))
    return out


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


# -------------------------------------------------------------------------------------- lowrank
# y = x · dequant(W)ᵀ + s · (x · Aᵀ) · Bᵀ (+ bias). The op also returns xa = x · Aᵀ (M, r): the
# backward needs it for dB, and recomputing it would be a second pass over x.
def _has_kernel(be: str, fn: str) -> bool:
    from ._native import module

    return be != "reference" and hasattr(module(be), fn)


@torch.library.custom_op("lowbit::lowrank", mutates_args=())
def lowrank_op(x: torch.Tensor, codes: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor],
               scale_q: Optional[torch.Tensor], scale_nested: Optional[torch.Tensor],
               scale_offset: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor, s: float,
               bias: Optional[torch.Tensor], n: int, k: int, block: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    w = (codes, scale, zero, scale_q, scale_nested, scale_offset)
    be = backend_for(x)
    r = a.shape[0]
    if be == "reference":
        qt = _qt_from_args(*w, n, k, block, fmt, torch.float32)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return ref.lowrank_ref(x, qt, a, b, s, bias), (x.to(acc) @ a.to(acc).T).to(x.dtype)
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    xa = torch.empty(x.shape[0], r, dtype=x.dtype, device=x.device)
    if _has_kernel(be, "lowrank"):  # fused: x·Aᵀ while x is loaded, s·xa·Bᵀ in the epilogue
        _native_lowrank(be, x, y, xa, bias, w, a, b, s, n, k, block, fmt)
        return y, xa
    # unfused composition on backends without the fused kernel: extra passes over x and y. The base
    # product is taken in fp32 so the sum is rounded to x's dtype once (a bf16 intermediate would
    # lose the branch under cancellation).
    xf = x.float()
    yf = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    _native_gemm("gemm", be, xf, yf, None if bias is None else bias.float(), w, n, k, block, fmt)
    xa = xf @ a.float().T
    y = (yf + s * (xa @ b.float().T)).to(x.dtype)
    return y, xa.to(x.dtype)


@lowrank_op.register_fake
def _(x, codes, scale, zero, scale_q, scale_nested, scale_offset, a, b, s, bias, n, k, block, fmt):
    return x.new_empty(x.shape[0], n), x.new_empty(x.shape[0], a.shape[0])


def _lowrank_setup_context(ctx, inputs, output):
    x, codes, scale, zero, scale_q, scale_nested, scale_offset, a, b, s, bias, n, k, block, fmt = inputs
    ctx.save_for_backward(x, a, b, output[1], codes, scale, zero, scale_q, scale_nested, scale_offset)
    ctx.meta = (s, n, k, block, fmt, bias is not None)


def _lowrank_backward(ctx, gy, gxa):
    # dx = gy·dequant(W) + s·(gy·B)·A ; dA = s·(gy·B)ᵀ·x ; dB = s·gyᵀ·(x·Aᵀ), with u = s·gy·B shared
    # (plus the gradient of the xa output, if a caller used it).
    x, a, b, xa, *w = ctx.saved_tensors
    s, n, k, block, fmt, has_bias = ctx.meta
    need = ctx.needs_input_grad
    acc = torch.float64 if gy.dtype == torch.float64 else torch.float32
    g = gy.to(acc)
    u = s * (g @ b.to(acc))  # (M, r)
    if gxa is not None:
        u = u + gxa.to(acc)
    gx = ga = gb = gbias = None
    if need[0]:
        gx = (gemm_t_op(gy.contiguous(), *w, n, k, block, fmt).to(acc) + u @ a.to(acc)).to(x.dtype)
    if need[7]:
        ga = (u.T @ x.to(acc)).to(a.dtype)
    if need[8]:
        gb = (s * (g.T @ xa.to(acc))).to(b.dtype)
    if has_bias and need[10]:
        gbias = gy.sum(0)
    return gx, None, None, None, None, None, None, ga, gb, None, gbias, None, None, None, None


torch.library.register_autograd("lowbit::lowrank", _lowrank_backward, setup_context=_lowrank_setup_context)


def lowrank(x: torch.Tensor, qt: QuantizedTensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0,
            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x (..., K) · dequant(W)ᵀ + scale · (x · Aᵀ) · Bᵀ (+ bias) -> (..., N)``; A (r, K), B (N, r)."""
    n, k = qt.shape
    _check_gemm_operands(x, "x", qt, k, "in_features K")
    for name, t, shape in (("lora_A", a, None), ("lora_B", b, None)):
        check_tensor(name, t, dtypes=_FLOAT_DTYPES + (torch.float64,), ndim=2)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    r = a.shape[0]
    if a.shape[1] != k or b.shape != (n, r):
        raise ValueError(f"lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit W {tuple(qt.shape)}: "
                         f"expected A (r, {k}) and B ({n}, r)")
    if not 1 <= r <= 256:
        raise ValueError(f"rank r={r} must be in [1, 256]")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale={scale!r} must be a float")
    if bias is not None:
        check_tensor("bias", bias, dtypes=_FLOAT_DTYPES + (torch.float64,), ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not fit N={n}")
        bias = bias.to(x.dtype)
    lead = x.shape[:-1]
    # the kernels read A and B in x's dtype (autograd casts their gradients back)
    a, b = a.to(x.dtype).contiguous(), b.to(x.dtype).contiguous()
    y, _ = lowrank_op(x.reshape(-1, k).contiguous(), *_weight_args(qt), a, b,
                      float(scale), bias, n, k, qt.block_size, qt.fmt)
    return y.reshape(*lead, n)
