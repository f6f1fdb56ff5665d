"""lowrank family: ``y = x · dequant(W)ᵀ + s · (x · Aᵀ) · Bᵀ (+ bias)``, one fused product.

The op also returns xa = x · Aᵀ (M, r): the backward needs it for dB, and recomputing it would be a
second pass over x. :func:`lowrank_inference` is the decode entry point of ``LoRALinear``'s fast path:
the same kernel without the custom-op dispatch, for callers that hold no autograd graph.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference as ref
from ..formats import DTYPE_ID, FMT_ID, GEMM_BLOCKS, QuantizedTensor
from ._common import (FLOAT_DTYPES, backend_for, call, check_scalar, check_tensor, dense, dense_weight,
                      has_kernel, module, ptr, qt_from_args, weight_args)
from .gemm import check_gemm_operands, gemm_t_op, native_gemm, resolve_backend

__all__ = ["lowrank", "lowrank_op", "lowrank_inference", "MAX_RANK"]

MAX_RANK = 256  # the fused kernels keep x·Aᵀ of one row in registers / shared memory


def _native_lowrank(be: str, x: torch.Tensor, bias, w, a: torch.Tensor, b: torch.Tensor, s: float, n: int, k: int,
                    block: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused lowrank kernel of backend ``be`` on x (M, K), A (r, K), B (N, r) in x's dtype → new y (M, N)
    and xa (M, r) = x·Aᵀ; w = the weight's component tensors (``weight_args``). Every pointer passes the
    kernel door (``_common.dense*``) but the outputs': allocated here, they hold what the kernel writes."""
    if x.dtype not in DTYPE_ID or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"lowrank: x must be a (M, {k}) fp32/bf16/fp16 matrix, got {tuple(x.shape)} {x.dtype}")
    if a.dim() != 2 or not 1 <= a.shape[0] <= MAX_RANK:
        raise ValueError(f"lowrank: lora_A must be (r, {k}) with 1 <= r <= {MAX_RANK}, got {tuple(a.shape)}")
    m, r, dev = x.shape[0], a.shape[0], x.device
    x = dense("x", x)
    bias = dense("bias", bias, dtype=x.dtype, numel=n, device=dev)
    a = dense("lora_A", a, dtype=x.dtype, numel=r * k, device=dev)
    b = dense("lora_B", b, dtype=x.dtype, numel=n * r, device=dev)
    codes, scale, zero, scale_q, scale_nested, scale_offset = dense_weight(w, n, k, block, fmt, dev)
    y = torch.empty(m, n, dtype=x.dtype, device=dev)
    xa = torch.empty(m, r, dtype=x.dtype, device=dev)  # the kernel always writes x·Aᵀ
    call(be, "lowrank", x.data_ptr(), y.data_ptr(), xa.data_ptr(), ptr(bias), DTYPE_ID[x.dtype], m, n, k,
         codes.data_ptr(), ptr(scale), ptr(zero), ptr(scale_q), ptr(scale_nested),
         float(scale_offset) if scale_offset is not None else 0.0, block, FMT_ID[fmt], a.data_ptr(), b.data_ptr(),
         r, float(s))
    return y, xa


@torch.library.custom_op("lowbit::lowrank", mutates_args=())
def lowrank_op(x: torch.Tensor, codes: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor],
               scale_q: Optional[torch.Tensor], scale_nested: Optional[torch.Tensor],
               scale_offset: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor, s: float,
               bias: Optional[torch.Tensor], n: int, k: int, block: int, fmt: str,
               backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    w = (codes, scale, zero, scale_q, scale_nested, scale_offset)
    be = backend or backend_for(x)
    r = a.shape[0]
    if be == "reference":
        qt = qt_from_args(*w, n, k, block, fmt, torch.float32)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return ref.lowrank_ref(x, qt, a, b, s, bias), (x.to(acc) @ a.to(acc).T).to(x.dtype)
    if has_kernel(be, "lowrank"):  # fused: x·Aᵀ while x is loaded, s·xa·Bᵀ in the epilogue
        return _native_lowrank(be, x, bias, w, a, b, s, n, k, block, fmt)
    # unfused composition on backends without the fused kernel: extra passes over x and y. The base
    # product is taken in fp32 so the sum is rounded to x's dtype once (a bf16 intermediate would
    # lose the branch under cancellation).
    xf = x.float()
    yf = native_gemm("gemm", be, xf, None if bias is None else bias.float(), w, n, k, block, fmt)
    xa = xf @ a.float().T
    y = (yf + s * (xa @ b.float().T)).to(x.dtype)
    return y, xa.to(x.dtype)


@lowrank_op.register_fake
def _(x, codes, scale, zero, scale_q, scale_nested, scale_offset, a, b, s, bias, n, k, block, fmt, backend=None):
    return x.new_empty(x.shape[0], n), x.new_empty(x.shape[0], a.shape[0])


def _lowrank_setup_context(ctx, inputs, output):
    x, codes, scale, zero, scale_q, scale_nested, scale_offset, a, b, s, bias, n, k, block, fmt = inputs[:15]
    ctx.save_for_backward(x, a, b, output[1], codes, scale, zero, scale_q, scale_nested, scale_offset)
    ctx.meta = (s, n, k, block, fmt, bias is not None)


ENGINE_ROUTES = ("avx512bf16", "amx", "amx_emulated")


def fused_backward_applies(gy: torch.Tensor) -> bool:
    """Whether the backward runs as one native call (``lowrank_backward``): CPU tensors on the CPU backend
    whose gemm_t runs on a bf16 matrix engine (bf16 gy; fp32 under 'medium'). Independent of M (gemm_t
    has no small-M route), so it holds for symbolic shapes too."""
    if gy.device.type != "cpu" or gy.dtype not in DTYPE_ID or backend_for(gy) != "cpu":
        return False
    return has_kernel("cpu", "lowrank_backward") and module("cpu").gemm_route(DTYPE_ID[gy.dtype], 1, True) in ENGINE_ROUTES


@torch.library.custom_op("lowbit::lowrank_backward", mutates_args=())
def lowrank_backward_op(gy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, gxa: Optional[torch.Tensor],
                        codes: torch.Tensor, scale: Optional[torch.Tensor], zero: Optional[torch.Tensor],
                        scale_q: Optional[torch.Tensor], scale_nested: Optional[torch.Tensor],
                        scale_offset: Optional[torch.Tensor], a: torch.Tensor, b: torch.Tensor, s: float, n: int,
                        k: int, block: int, fmt: str, need_gx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The lowrank backward on the CPU's bf16 matrix engines (include/lowbit/lowrank.h): gx (M, K) in gy's
    dtype (empty when not ``need_gx``), ga (r, K) and gb (N, r) in fp32."""
    m, r, dev = gy.shape[0], a.shape[0], gy.device
    gy = dense("gy", gy, dtype=gy.dtype, numel=m * n, device=dev)
    x = dense("x", x, dtype=gy.dtype, numel=m * k, device=dev)
    xa = dense("xa", xa, dtype=gy.dtype, numel=m * r, device=dev)
    gxa = dense("gxa", gxa, dtype=gy.dtype, numel=m * r, device=dev)
    a = dense("lora_A", a, dtype=gy.dtype, numel=r * k, device=dev)
    b = dense("lora_B", b, dtype=gy.dtype, numel=n * r, device=dev)
    gx = torch.empty(m if need_gx else 0, k, dtype=gy.dtype, device=dev)
    ga = torch.empty(r, k, dtype=torch.float32, device=dev)
    gb = torch.empty(n, r, dtype=torch.float32, device=dev)
    codes, scale, zero, scale_q, scale_nested, scale_offset = dense_weight(
        (codes, scale, zero, scale_q, scale_nested, scale_offset), n, k, block, fmt, dev)
    call("cpu", "lowrank_backward", gy.data_ptr(), gx.data_ptr() if need_gx else 0, DTYPE_ID[gy.dtype], m, n, k,
         codes.data_ptr(), ptr(scale), ptr(zero), ptr(scale_q), ptr(scale_nested),
         float(scale_offset) if scale_offset is not None else 0.0, block, FMT_ID[fmt], x.data_ptr(), xa.data_ptr(),
         ptr(gxa), a.data_ptr(), b.data_ptr(), ga.data_ptr(), gb.data_ptr(), r, float(s))
    return gx, ga, gb


@lowrank_backward_op.register_fake
def _(gy, x, xa, gxa, codes, scale, zero, scale_q, scale_nested, scale_offset, a, b, s, n, k, block, fmt, need_gx):
    r = a.shape[0]
    return (gy.new_empty(gy.shape[0] if need_gx else 0, k), gy.new_empty(r, k, dtype=torch.float32),
            gy.new_empty(n, r, dtype=torch.float32))


def _lowrank_backward(ctx, gy, gxa):
    # dx = gy·dequant(W) + s·(gy·B)·A ; dA = s·(gy·B)ᵀ·x ; dB = s·gyᵀ·(x·Aᵀ), with u = s·gy·B shared
    # (plus the gradient of the xa output, if a caller used it).
    x, a, b, xa, *w = ctx.saved_tensors
    s, n, k, block, fmt, has_bias = ctx.meta
    need = ctx.needs_input_grad
    gx = ga = gb = gbias = None
    if fused_backward_applies(gy):  # one native call, every product on the engine
        gx, ga, gb = lowrank_backward_op(gy.contiguous(), x, xa, gxa, *w, a, b, s, n, k, block, fmt, need[0])
        gx = gx if need[0] else None
        ga = ga.to(a.dtype) if need[7] else None
        gb = gb.to(b.dtype) if need[8] else None
    else:
        acc = torch.float64 if gy.dtype == torch.float64 else torch.float32
        g = gy.to(acc)
        u = s * (g @ b.to(acc))  # (M, r)
        if gxa is not None:
            u = u + gxa.to(acc)
        if need[0]:
            gx = (gemm_t_op(gy.contiguous(), *w, n, k, block, fmt).to(acc) + u @ a.to(acc)).to(x.dtype)
        if need[7]:
            ga = (u.T @ x.to(acc)).to(a.dtype)
        if need[8]:
            gb = (s * (g.T @ xa.to(acc))).to(b.dtype)
    if has_bias and need[10]:
        gbias = gy.sum(0)
    return gx, None, None, None, None, None, None, ga, gb, None, gbias, None, None, None, None, None


torch.library.register_autograd("lowbit::lowrank", _lowrank_backward, setup_context=_lowrank_setup_context)


def lowrank(x: torch.Tensor, qt: QuantizedTensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0,
            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x (..., K) · dequant(W)ᵀ + scale · (x · Aᵀ) · Bᵀ (+ bias) -> (..., N)``; A (r, K), B (N, r)."""
    n, k = qt.shape
    be = resolve_backend(x)
    check_gemm_operands(x, "x", qt, k, "in_features K", be)
    for name, t in (("lora_A", a), ("lora_B", b)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=2)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    r = a.shape[0]
    if a.shape[1] != k or b.shape != (n, r):
        raise ValueError(f"lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit W {tuple(qt.shape)}: "
                         f"expected A (r, {k}) and B ({n}, r)")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"rank r={r} must be in [1, {MAX_RANK}]")
    scale = check_scalar("scale", scale)  # NaN / inf / beyond fp32 would turn y into NaN silently
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not fit N={n}")
        bias = bias.to(x.dtype).contiguous()  # a view becomes a dense copy (the door would copy it anyway)
    lead = x.shape[:-1]
    # the kernels read A and B in x's dtype (autograd casts their gradients back)
    a, b = a.to(x.dtype).contiguous(), b.to(x.dtype).contiguous()
    y, _ = lowrank_op(x.reshape(-1, k).contiguous(), *weight_args(qt), a, b,
                      float(scale), bias, n, k, qt.block_size, qt.fmt, be)
    return y.reshape(*lead, n)


def lowrank_inference(x: torch.Tensor, w, n: int, k: int, block: int, fmt: str, stacked,
                      bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The decode entry point: ``x · dequant(W)ᵀ + (x · Aᵀ) · Bᵀ (+ bias)`` (s = 1, B pre-scaled) by the
    CPU fused kernel, with the arguments :func:`lowrank_op` would pass it (x made contiguous, bias in x's
    dtype, a fresh (M, r) xa that nobody reads) — bit-identical to the op path, without its dispatch.

    For callers with no autograd graph to record; w = the weight's component tensors; ``stacked(dtype)``
    returns contiguous A (r, K) and B (N, r) in x's dtype, called only once this path applies (a cache
    stays unbuilt otherwise). Returns None when it does not (x not fp32 / bf16 / fp16 on the "cpu"
    backend, devices differ, block or rank outside the kernel's range, under torch.compile): the caller
    then takes :func:`lowrank`, which also owns every error message."""
    if torch.compiler.is_compiling():
        return None
    if (not isinstance(x, torch.Tensor) or x.dtype not in DTYPE_ID or x.device.type != "cpu" or x.dim() == 0
            or x.shape[-1] != k or backend_for(x) != "cpu" or not has_kernel("cpu", "lowrank")):
        return None
    if w[0].device != x.device or block not in GEMM_BLOCKS:
        return None
    if bias is not None:
        if bias.device != x.device:
            return None
        if bias.dtype != x.dtype or not bias.is_contiguous():
            bias = bias.detach().to(x.dtype).contiguous()  # what lowrank() passes
    a, b = stacked(x.dtype)
    if a.shape[0] > MAX_RANK or a.device != x.device:
        return None
    y, _ = _native_lowrank("cpu", x.reshape(-1, k).contiguous(), bias, w, a, b, 1.0, n, k, block, fmt)
    return y.reshape(*x.shape[:-1], n)
