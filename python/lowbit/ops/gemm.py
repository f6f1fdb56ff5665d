"""gemm family: ``y = x · dequant(W)ᵀ (+ bias)`` and its transpose ``gx = gy · dequant(W)``.

torch.library custom ops: opaque to torch.compile (fake impls give shapes), autograd registered on
the op itself, so ``torch.compile(model)`` and ``opcheck`` see one op per product. The public
functions resolve the backend once and pass it to the op (``backend``); the op resolves it itself
when called without one (torch.compile graphs, backward passes, opcheck).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference as ref
from ..formats import DTYPE_ID, FMT_ID, GEMM_BLOCKS, QuantizedTensor
from ._common import (FLOAT_DTYPES, backend_for, call, check_tensor, dense, dense_out, dense_weight, ptr, qt_from_args,
                      tracing, weight_args)

__all__ = ["gemm", "gemm_t", "gemm_op", "gemm_t_op", "gemm_inference", "native_gemm", "check_gemm_operands",
           "resolve_backend"]


def native_gemm(fn: str, be: str, a: torch.Tensor, bias, w, n, k, block, fmt) -> torch.Tensor:
    """The ``gemm`` / ``gemm_t`` kernel of backend ``be`` on a (M, ·) into a new (M, ·) of a's dtype; w =
    the weight's component tensors (``weight_args``). Every pointer passes the kernel door
    (``_common.dense*``) but the output's: allocated here, it is dense and holds what the kernel writes."""
    inner, outer = (k, n) if fn == "gemm" else (n, k)
    if a.dtype not in DTYPE_ID or a.dim() != 2 or a.shape[1] != inner:
        raise ValueError(f"{fn}: the input must be a (M, {inner}) fp32/bf16/fp16 matrix, got "
                         f"{tuple(a.shape)} {a.dtype}")
    m = a.shape[0]
    a = dense("x" if fn == "gemm" else "gy", a)
    bias = dense("bias", bias, dtype=a.dtype, numel=n, device=a.device)
    codes, scale, zero, scale_q, scale_nested, scale_offset = dense_weight(w, n, k, block, fmt, a.device)
    out = torch.empty(m, outer, dtype=a.dtype, device=a.device)
    args = [a.data_ptr(), out.data_ptr()]
    if fn == "gemm":
        args.append(ptr(bias))
    args += [DTYPE_ID[a.dtype], m, n, k, codes.data_ptr(), ptr(scale), ptr(zero), ptr(scale_q),
             ptr(scale_nested), float(scale_offset) if scale_offset is not None else 0.0, block, FMT_ID[fmt]]
    call(be, fn, *args)
    return out


@torch.library.custom_op("lowbit::gemm", mutates_args=())
def gemm_op(x: torch.Tensor, codes: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor],
            scale_q: Optional[torch.Tensor], scale_nested: Optional[torch.Tensor],
            scale_offset: Optional[torch.Tensor], bias: Optional[torch.Tensor], n: int, k: int, block: int,
            fmt: str, backend: Optional[str] = None) -> torch.Tensor:
    """y (M, N) = x (M, K) · dequant(W)ᵀ (+ bias); inputs validated by :func:`gemm`."""
    w = (codes, scale, zero, scale_q, scale_nested, scale_offset)
    be = backend or backend_for(x)
    if be == "reference":
        return ref.gemm_ref(x, qt_from_args(*w, n, k, block, fmt, torch.float32), bias)
    return native_gemm("gemm", be, x, bias, w, n, k, block, fmt)


@gemm_op.register_fake
def _(x, codes, scale, zero, scale_q, scale_nested, scale_offset, bias, n, k, block, fmt, backend=None):
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("lowbit::gemm_t", mutates_args=())
def gemm_t_op(gy: torch.Tensor, codes: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor],
              scale_q: Optional[torch.Tensor], scale_nested: Optional[torch.Tensor],
              scale_offset: Optional[torch.Tensor], n: int, k: int, block: int, fmt: str,
              backend: Optional[str] = None) -> torch.Tensor:
    """gx (M, K) = gy (M, N) · dequant(W): the backward of gemm to its input."""
    w = (codes, scale, zero, scale_q, scale_nested, scale_offset)
    be = backend or backend_for(gy)
    if be == "reference":
        return ref.gemm_t_ref(gy, qt_from_args(*w, n, k, block, fmt, torch.float32))
    return native_gemm("gemm_t", be, gy, None, w, n, k, block, fmt)


@gemm_t_op.register_fake
def _(gy, codes, scale, zero, scale_q, scale_nested, scale_offset, n, k, block, fmt, backend=None):
    return gy.new_empty(gy.shape[0], k)


def _gemm_setup_context(ctx, inputs, output):
    x, codes, scale, zero, scale_q, scale_nested, scale_offset, bias, n, k, block, fmt = inputs[:12]
    ctx.save_for_backward(codes, scale, zero, scale_q, scale_nested, scale_offset)
    ctx.meta = (n, k, block, fmt, bias is not None)


def _gemm_backward(ctx, gy):
    n, k, block, fmt, has_bias = ctx.meta
    # the backend of the backward is resolved when it runs (it may run outside the forward's use_backend)
    gx = gemm_t_op(gy.contiguous(), *ctx.saved_tensors, n, k, block, fmt) if ctx.needs_input_grad[0] else None
    gb = gy.sum(0) if has_bias and ctx.needs_input_grad[7] else None
    return gx, None, None, None, None, None, None, gb, None, None, None, None, None


def _gemm_t_setup_context(ctx, inputs, output):
    gy, codes, scale, zero, scale_q, scale_nested, scale_offset, n, k, block, fmt = inputs[:11]
    ctx.save_for_backward(codes, scale, zero, scale_q, scale_nested, scale_offset)
    ctx.meta = (n, k, block, fmt)


def _gemm_t_backward(ctx, ggx):
    n, k, block, fmt = ctx.meta
    # d/d(gy) of gy · W is ggx · Wᵀ: the forward product again
    ggy = gemm_op(ggx.contiguous(), *ctx.saved_tensors, None, n, k, block, fmt) if ctx.needs_input_grad[0] else None
    return ggy, None, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("lowbit::gemm", _gemm_backward, setup_context=_gemm_setup_context)
torch.library.register_autograd("lowbit::gemm_t", _gemm_t_backward, setup_context=_gemm_t_setup_context)


def resolve_backend(a) -> Optional[str]:
    """The backend for input ``a``, resolved once per call; None under torch.compile tracing (the ops
    resolve it at run time) or for a non-tensor (the checks then name the argument)."""
    if tracing() or not isinstance(a, torch.Tensor):
        return None
    return backend_for(a)


def check_gemm_operands(a: torch.Tensor, a_name: str, qt: QuantizedTensor, inner: int, inner_name: str,
                        be: Optional[str]) -> None:
    """Checks shared by the packed products; ``be`` from :func:`resolve_backend`."""
    # float64 is accepted by the reference backend only (gradcheck); kernels take fp32/bf16/fp16.
    ref_only = isinstance(a, torch.Tensor) and a.dtype == torch.float64 and be == "reference"
    check_tensor(a_name, a, dtypes=FLOAT_DTYPES + ((torch.float64,) if ref_only else ()))
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"weight must be a lowbit.QuantizedTensor, got {type(qt).__name__}")
    if a.dim() == 0 or a.shape[-1] != inner:
        raise ValueError(f"{a_name}.shape[-1]={a.shape[-1] if a.dim() else None} does not match "
                         f"{inner_name}={inner} of the weight {tuple(qt.shape)}")
    if a.device != qt.device:
        raise ValueError(f"{a_name} is on {a.device} but the weight is on {qt.device}")
    if qt.block_size not in GEMM_BLOCKS and be != "reference":
        raise ValueError(f"the gemm kernels take block_size in {GEMM_BLOCKS}, the weight has "
                         f"block_size={qt.block_size}; use lowbit.use_backend('reference') or requantize")


def gemm(x: torch.Tensor, qt: QuantizedTensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x (..., K) · dequant(W)ᵀ (+ bias) -> (..., N)`` in x's dtype (fp32 accumulation)."""
    n, k = qt.shape
    be = resolve_backend(x)
    check_gemm_operands(x, "x", qt, k, "in_features K", be)
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=1)
        if bias.shape[0] != n or bias.device != x.device:
            raise ValueError(f"bias of shape {tuple(bias.shape)} on {bias.device} does not fit N={n} on {x.device}")
        # a view (strided, expanded) becomes a dense copy here; the op's door would copy it anyway
        bias = bias.to(x.dtype).contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    w = weight_args(qt)
    if _eager_kernel_call(be, x2, bias, w):  # the kernel straight away: same door, same result
        y = native_gemm("gemm", "cpu", x2, bias, w, n, k, qt.block_size, qt.fmt)
    else:
        y = gemm_op(x2, *w, bias, n, k, qt.block_size, qt.fmt, be)
    return y.reshape(*lead, n)


def gemm_inference(x: torch.Tensor, w, n: int, k: int, block: int, fmt: str,
                   bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The decode entry point of ``QuantLinear``: what :func:`gemm`'s eager kernel call does, from the
    layer's component tensors (``weight_args`` order) without building a QuantizedTensor and running its
    checks first — the kernel door (``native_gemm``: every component against the dtype and length the
    kernel reads) still runs on every call, so the bits and the guarantees are gemm()'s. At M = 1 on
    SmolLM2's 576 × 576 (bf16, Zen 4) the kernel takes ≈ 12 µs and the module had cost ≈ 60 µs.

    Returns None when it does not apply — not plain eager inference on the "cpu" backend (the conditions
    of the eager kernel call), an x or bias that gemm() would refuse or convert, an FSDP2-sharded
    component — and the caller takes :func:`gemm`, which owns every error message."""
    if (tracing() or type(x) not in _PLAIN or x.dtype not in DTYPE_ID or x.device.type != "cpu"
            or x.dim() == 0 or x.shape[-1] != k or block not in GEMM_BLOCKS or backend_for(x) != "cpu"):
        return None
    if bias is not None and (type(bias) not in _PLAIN or bias.dim() != 1 or bias.shape[0] != n
                             or bias.device != x.device or bias.dtype not in DTYPE_ID):
        return None
    if w[0] is None or w[0].device != x.device or not _eager_kernel_call("cpu", x, bias, w):
        return None
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()  # what gemm() passes
    y = native_gemm("gemm", "cpu", x.reshape(-1, k).contiguous(), bias, w, n, k, block, fmt)
    return y.reshape(*x.shape[:-1], n)


def _eager_kernel_call(be: Optional[str], a: torch.Tensor, bias, w) -> bool:
    """Whether a product may skip the ``torch.library`` custom op and call the kernel directly: plain
    eager inference on the CPU kernels — nothing to differentiate, no tracing, no dispatch or function
    mode and no tensor subclass that the op's dispatch would have to see. The op's own dispatch costs
    ≈ 40 µs a call (measured, Zen 4: 0.28 ms kernel → 0.35 ms through the op at M = 1, 4096²), a sixth
    of a small-M product's time."""
    if be != "cpu" or type(a) not in _PLAIN or (bias is not None and type(bias) not in _PLAIN):
        return False
    if torch.is_grad_enabled() and (a.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    for t in w:
        if t is not None and (type(t) not in _PLAIN or t.requires_grad):
            return False
    return True


# Tensors the op's dispatch would not treat specially: plain tensors and nn.Parameter (a layer's bias, a
# frozen component after lowbit.distributed.prepare_model), whose __torch_function__ is disabled.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def gemm_t(gy: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """``gy (..., N) · dequant(W) -> (..., K)``: the product with the transposed weight."""
    n, k = qt.shape
    be = resolve_backend(gy)
    check_gemm_operands(gy, "gy", qt, n, "out_features N", be)
    lead = gy.shape[:-1]
    gx = gemm_t_op(gy.reshape(-1, n).contiguous(), *weight_args(qt), n, k, qt.block_size, qt.fmt, be)
    return gx.reshape(*lead, k)
