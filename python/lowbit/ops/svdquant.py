"""svdquant family: W4A4 with a low-rank branch (SVDQuant; include/lowbit/svdquant.h is the contract).

Two kernels, as Nunchaku splits them: :func:`svdquant_act` reads x once — smoothing (x · 1/λ), the
4-bit activation quantization per group of 64 and the low-rank down-projection xs · L2ᵀ — and
:func:`svdquant_gemm` runs the W4A4 product with the up-projection down · L1ᵀ and the bias in its
epilogue. :func:`svdquant_linear` is the two in sequence. The spec is
``lowbit.reference.svdquant_*_ref``; validation here, so native code never sees input it cannot handle.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference as ref
from ..formats import DTYPE_ID
from ._common import FLOAT_DTYPES, backend_for, call, check_tensor, dense, dense_out, ptr, tracing

__all__ = ["SVDQ_GROUP", "SVDQ_MAX_RANK", "svdquant_act", "svdquant_gemm", "svdquant_linear", "svdquant_act_op",
           "svdquant_gemm_op", "check_svdquant_weight"]

SVDQ_GROUP = ref.SVDQ_GROUP
SVDQ_MAX_RANK = 256  # include/lowbit/svdquant.h::kSvdqMaxRank


def _check_k(name: str, k: int) -> None:
    if k <= 0 or k % SVDQ_GROUP:
        raise ValueError(f"{name}: K={k} must be a positive multiple of {SVDQ_GROUP} (one scale per group of "
                         f"{SVDQ_GROUP} along K)")


def _check_rank(r: int) -> None:
    if not 0 <= r <= SVDQ_MAX_RANK:
        raise ValueError(f"rank r={r} must be in 0..{SVDQ_MAX_RANK}")


def check_svdquant_weight(qw: torch.Tensor, sw: torch.Tensor, k: int) -> int:
    """The packed residual (N, K/2) uint8 and its scales (N, K/64) fp32 of a K-wide layer; returns N."""
    check_tensor("qw", qw, dtypes=(torch.uint8,), ndim=2)
    check_tensor("sw", sw, dtypes=(torch.float32,), ndim=2)
    _check_k("weight", k)
    n = qw.shape[0]
    if tuple(qw.shape) != (n, k // 2) or tuple(sw.shape) != (n, k // SVDQ_GROUP) or n == 0:
        raise ValueError(f"qw {tuple(qw.shape)} and sw {tuple(sw.shape)} do not hold an (N, {k}) weight: "
                         f"expected ({n}, {k // 2}) and ({n}, {k // SVDQ_GROUP}) with N >= 1")
    return n


def _check_branch(name: str, t: Optional[torch.Tensor], rows: int, dtype: torch.dtype, device) -> int:
    """l1 (N, r) or l2 (r, K): its rank (0 when absent)."""
    if t is None:
        return 0
    check_tensor(name, t, dtypes=(dtype,), ndim=2)
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x on {device}")
    r = t.shape[1] if name == "l1" else t.shape[0]
    if (t.shape[0] if name == "l1" else t.shape[1]) != rows:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; its {'rows' if name == 'l1' else 'columns'} must be "
                         f"{rows}")
    _check_rank(r)
    return r


# ---------------------------------------------------------------------------- the activation pass
@torch.library.custom_op("lowbit::svdquant_act", mutates_args=())
def svdquant_act_op(x: torch.Tensor, inv_smooth: Optional[torch.Tensor], l2: Optional[torch.Tensor],
                    backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qx int8 (M, K), sx fp32 (M, K/64), down fp32 (M, r)); inputs validated by :func:`svdquant_act`."""
    be = backend or backend_for(x)
    m, k = x.shape
    r = 0 if l2 is None else l2.shape[0]
    if be == "reference":
        qx, sx, down = ref.svdquant_act_ref(x, inv_smooth, l2)
        return qx, sx, down if down is not None else x.new_empty(m, 0, dtype=torch.float32)
    xd = dense("x", x, dtype=x.dtype, numel=m * k, device=x.device)
    inv = dense("inv_smooth", inv_smooth, dtype=torch.float32, numel=k, device=x.device)
    l2d = dense("l2", l2, dtype=x.dtype, numel=r * k, device=x.device) if r else None
    qx = torch.empty(m, k, dtype=torch.int8, device=x.device)
    sx = torch.empty(m, k // SVDQ_GROUP, dtype=torch.float32, device=x.device)
    down = torch.empty(m, r, dtype=torch.float32, device=x.device)
    call(be, "svdquant_act", xd.data_ptr(), DTYPE_ID[x.dtype], m, k, ptr(inv), ptr(l2d), r, qx.data_ptr(),
         sx.data_ptr(), ptr(down) if r else 0)
    return qx, sx, down


@svdquant_act_op.register_fake
def _(x, inv_smooth, l2, backend=None):
    m, k = x.shape
    r = 0 if l2 is None else l2.shape[0]
    return (x.new_empty(m, k, dtype=torch.int8), x.new_empty(m, k // SVDQ_GROUP, dtype=torch.float32),
            x.new_empty(m, r, dtype=torch.float32))


def _check_x(x: torch.Tensor, k: Optional[int] = None) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    _check_k("x", x.shape[1])
    if k is not None and x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]}, the weight K={k}")


def svdquant_act(x: torch.Tensor, inv_smooth: Optional[torch.Tensor] = None, l2: Optional[torch.Tensor] = None):
    """One pass over x (M, K): ``(qx, sx, down)`` — the 4-bit codes (int8 in [-7, 7]) and fp32 scales of
    x · inv_smooth per group of 64, and down = (x · inv_smooth) · l2ᵀ in fp32 ((M, 0) without l2)."""
    _check_x(x)
    k = x.shape[1]
    if inv_smooth is not None:
        check_tensor("inv_smooth", inv_smooth, dtypes=(torch.float32,), ndim=1)
        if inv_smooth.shape[0] != k or inv_smooth.device != x.device:
            raise ValueError(f"inv_smooth has shape {tuple(inv_smooth.shape)} on {inv_smooth.device}; expected ({k},) "
                             f"on {x.device}")
    _check_branch("l2", l2, k, x.dtype, x.device)
    return svdquant_act_op(x, inv_smooth, l2, None if tracing() else backend_for(x))


# ---------------------------------------------------------------------------- the W4A4 GEMM
@torch.library.custom_op("lowbit::svdquant_gemm", mutates_args=())
def svdquant_gemm_op(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                     down: Optional[torch.Tensor], l1: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     dtype: torch.dtype, backend: Optional[str] = None) -> torch.Tensor:
    """y (M, N) in ``dtype``; inputs validated by :func:`svdquant_gemm`."""
    be = backend or backend_for(qx)
    m, k = qx.shape
    n = qw.shape[0]
    r = 0 if l1 is None else l1.shape[1]
    if be == "reference":
        return ref.svdquant_gemm_ref(qx, sx, qw, sw, down if r else None, l1, bias, dtype)
    dev = qx.device
    args = (dense("qx", qx, dtype=torch.int8, numel=m * k, device=dev),
            dense("sx", sx, dtype=torch.float32, numel=m * (k // SVDQ_GROUP), device=dev),
            dense("qw", qw, dtype=torch.uint8, numel=n * (k // 2), device=dev),
            dense("sw", sw, dtype=torch.float32, numel=n * (k // SVDQ_GROUP), device=dev),
            dense("down", down, dtype=torch.float32, numel=m * r, device=dev) if r else None,
            dense("l1", l1, dtype=dtype, numel=n * r, device=dev) if r else None,
            dense("bias", bias, dtype=dtype, numel=n, device=dev))
    y = dense_out("y", torch.empty(m, n, dtype=dtype, device=dev), dtype=dtype, numel=m * n, device=dev)
    call(be, "svdquant_gemm", *(ptr(a) for a in args), y.data_ptr(), DTYPE_ID[dtype], m, n, k, r)
    return y


@svdquant_gemm_op.register_fake
def _(qx, sx, qw, sw, down, l1, bias, dtype, backend=None):
    return qx.new_empty(qx.shape[0], qw.shape[0], dtype=dtype)


def svdquant_gemm(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                  down: Optional[torch.Tensor] = None, l1: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y (M, N) = Σ_g sx·sw·(qx · qwᵀ over group g) + down · l1ᵀ + bias, fp32 arithmetic, in ``dtype``."""
    check_tensor("qx", qx, dtypes=(torch.int8,), ndim=2)
    check_tensor("sx", sx, dtypes=(torch.float32,), ndim=2)
    m, k = qx.shape
    _check_k("qx", k)
    if tuple(sx.shape) != (m, k // SVDQ_GROUP):
        raise ValueError(f"sx has shape {tuple(sx.shape)}, expected ({m}, {k // SVDQ_GROUP})")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype={dtype} is not one of {list(FLOAT_DTYPES)}")
    n = check_svdquant_weight(qw, sw, k)
    for name, t in (("sx", sx), ("qw", qw), ("sw", sw)):
        if t.device != qx.device:
            raise ValueError(f"{name} is on {t.device}, qx on {qx.device}")
    r = _check_branch("l1", l1, n, dtype, qx.device)
    if (down is None) != (l1 is None):
        raise ValueError("down and l1 come together (the low-rank branch) or not at all")
    if r:
        check_tensor("down", down, dtypes=(torch.float32,), ndim=2)
        if tuple(down.shape) != (m, r) or down.device != qx.device:
            raise ValueError(f"down has shape {tuple(down.shape)} on {down.device}, expected ({m}, {r}) on {qx.device}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(dtype,), ndim=1)
        if bias.shape[0] != n or bias.device != qx.device:
            raise ValueError(f"bias has shape {tuple(bias.shape)} on {bias.device}, expected ({n},) on {qx.device}")
    return svdquant_gemm_op(qx, sx, qw, sw, down if r else None, l1 if r else None, bias, dtype,
                            None if tracing() else backend_for(qx))


def svdquant_linear(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, inv_smooth: Optional[torch.Tensor] = None,
                    l1: Optional[torch.Tensor] = None, l2: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The SVDQuant forward of x (M, K) in x's dtype: :func:`svdquant_act` then :func:`svdquant_gemm`."""
    _check_x(x)
    if (l1 is None) != (l2 is None):
        raise ValueError("l1 and l2 come together (the low-rank branch) or not at all")
    if l1 is not None and l2 is not None and l1.shape[1:] != l2.shape[:1]:
        raise ValueError(f"l1 {tuple(l1.shape)} and l2 {tuple(l2.shape)} disagree on the rank")
    qx, sx, down = svdquant_act(x, inv_smooth, l2)
    return svdquant_gemm(qx, sx, qw, sw, down if l2 is not None else None, l1, bias, x.dtype)
