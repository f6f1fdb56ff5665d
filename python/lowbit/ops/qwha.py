"""qwha family: the transform and the sparse products of the QWHA adapter (``lowbit.nn.HadamardAdapterLinear``).

* :func:`adapter_hadamard` — ``x @ H_K`` for any K the adapter accepts: one WHT (``lowbit::hadamard``) when
  K = m·2^k, else H = H_{K₁} ⊗ H_{K₂} (:func:`adapter_hadamard_factors`).
* ``lowbit::qwha_spmm`` / ``lowbit::qwha_spmm_backward`` — ``scale · z · Fᵀ`` for F in CSR, and its
  gradients (the sparse product on Fᵀ for dz, the sampled product at the support for dF).
* :func:`qwha_inference` — the decode entry point of the module's fast path (the WHT and the sparse
  product as two kernel calls, accumulating into the base output).
"""

from __future__ import annotations

import functools

import torch

from .. import reference as ref
from ..formats import DTYPE_ID
from ._common import backend_for, call, dense, dense_out, has_kernel
from .hadamard import hadamard_op

__all__ = ["adapter_hadamard_factors", "adapter_hadamard", "qwha_spmm", "qwha_spmm_backward", "qwha_inference"]


# ----------------------------------------------------------------------------- the transform
def _supported(n: int) -> bool:
    try:
        ref.hadamard_split(n)
        return True
    except ValueError:
        return False


@functools.lru_cache(maxsize=None)
def adapter_hadamard_factors(n: int) -> tuple[int, ...]:
    """``(n,)`` when ``lowbit.hadamard`` supports n, else ``(n1, n2)`` with n = n1·n2 both supported
    (largest n2 first), meaning H_n = H_{n1} ⊗ H_{n2}; ValueError naming n otherwise."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"in_features={n!r} must be a positive int")
    if _supported(n):
        return (n,)
    for n2 in range(n // 2, 1, -1):
        if n % n2 == 0 and _supported(n2) and _supported(n // n2):
            return (n // n2, n2)
    raise ValueError(f"in_features={n} has no Hadamard transform here: it must be m * 2^k (m in 1, 12, 20, 28, 40, "
                     f"172) or a product of two such sizes (e.g. 576 = 12 * 48); QWHA needs H of order in_features")


def adapter_hadamard(x: torch.Tensor, scale: float = 1.0, transpose: bool = False, fn=None) -> torch.Tensor:
    """``x @ H_n * scale`` along the last dim with H_n of :func:`adapter_hadamard_factors` (``H_nᵀ`` when
    ``transpose``). ``fn(x, scale, transpose)`` is the 1-D transform (default ``lowbit.hadamard``'s op;
    the init passes the float64 reference). For H_{n1} ⊗ H_{n2}: the last dim viewed as (n1, n2), the
    WHT of size n2 on each row (a dense product for n2 < 256), then the small n1 × n1 mix as a batched matmul (n1 is the smaller
    factor, ≤ 172: what the m × m stage of the m·2^k transform does); (A ⊗ B)ᵀ = Aᵀ ⊗ Bᵀ."""
    fn = fn or _hadamard_op
    n = x.shape[-1]
    f = adapter_hadamard_factors(n)
    if len(f) == 1:
        return fn(x, scale, transpose)
    n1, n2 = f
    lead = x.shape[:-1]
    y = x.reshape(*lead, n1, n2)
    if n2 >= 256:
        y = fn(y, scale, transpose)                       # (..., n1, n2)
    else:  # small n2: a dense (n2, n2) product beats the per-row transform (0.08 vs 0.63 ms for
        # 6144 rows of 48 here) and costs n2 MACs per element, a few % of the base GEMM's N
        h2 = _dense_h(n2, y.dtype, y.device)
        y = torch.matmul(y, h2.T if transpose else h2) * scale
    h1 = _dense_h(n1, y.dtype, y.device)
    # out[a', b] = Σ_a y[a, b] · H1[a, a']  ->  H1ᵀ @ y   (H1ᵀᵀ = H1 for the transpose)
    return torch.matmul(h1 if transpose else h1.T, y).reshape(*lead, n)


@functools.lru_cache(maxsize=None)
def _dense_h(m: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return ref.hadamard_matrix(m, dtype).to(device)


def _hadamard_op(x, scale, transpose):
    # the registered op itself (autograd included): sizes were validated once by adapter_hadamard_factors
    # and x is fp32 here, so lowbit.hadamard's per-call checks (~20 µs at M = 1) are skipped
    return hadamard_op(x.contiguous(), float(scale), bool(transpose))


# ---------------------------------------------------------------------- sparse product (the op)
# y = scale · z · Fᵀ for F (N, K) in CSR (crow (N+1), cols (nnz), values (nnz)). The backward also needs
# the CSR of Fᵀ: its row pointers ``ccol`` (K+1), column indices ``rows_t`` and the permutation ``perm``
# taking F's value order to Fᵀ's — fixed with the support, so the module computes them once. Index
# arrays are int32: at M = 1 the product streams nnz × (index + value) bytes, int32 makes that 8 B.
def _csr(crow, cols, values, shape):
    return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def _cpu_kernel(z: torch.Tensor) -> bool:
    """The hand-written CSR kernels run for fp32 on the "cpu" backend; other backends and fp64 (the
    tests' spec) take torch's sparse products."""
    return z.dtype == torch.float32 and backend_for(z) == "cpu" and has_kernel("cpu", "qwha_spmm")


def _check_spmm_args(z, values, crow, cols, n_out) -> None:
    """Shapes and dtypes of the CSR operands (the kernel checks crow's order and the column range)."""
    if z.dim() != 2 or z.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"z must be a 2-D fp32/fp64 tensor, got {tuple(z.shape)} {z.dtype}")
    if values.dtype != z.dtype or values.dim() != 1:
        raise ValueError(f"values must be 1-D of z's dtype {z.dtype}, got {tuple(values.shape)} {values.dtype}")
    for name, t in (("crow", crow), ("cols", cols)):
        if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D int32 tensor, got {tuple(t.shape)} {t.dtype}")
    if not isinstance(n_out, int) or n_out < 0 or crow.numel() != n_out + 1:
        raise ValueError(f"crow must have n_out + 1 = {n_out + 1} entries, got {crow.numel()}")
    if cols.numel() != values.numel() or int(crow[-1]) != values.numel():
        raise ValueError(f"cols ({cols.numel()}), values ({values.numel()}) and crow[-1] ({int(crow[-1])}) must "
                         "all count the nonzeros")


@torch.library.custom_op("lowbit::qwha_spmm", mutates_args=())
def qwha_spmm(z: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor, ccol: torch.Tensor,
              rows_t: torch.Tensor, perm: torch.Tensor, n_out: int, scale: float) -> torch.Tensor:
    """``scale · z (M, K) · Fᵀ -> (M, N)``, F the CSR matrix (crow, cols, values) of shape (n_out, K); z
    and values share one dtype (fp32 / fp64). ``ccol, rows_t, perm`` describe Fᵀ (for the backward)."""
    _check_spmm_args(z, values, crow, cols, n_out)
    if _cpu_kernel(z):  # csrc/cpu/qwha.cpp: threads split the nonzeros, fixed summation order
        z, values = z.contiguous(), values.contiguous()  # named: alive through the call
        y = z.new_empty((z.shape[0], n_out))
        call("cpu", "qwha_spmm", z.data_ptr(), values.data_ptr(), crow.data_ptr(), cols.data_ptr(),
                 z.shape[0], z.shape[1], n_out, float(scale), y.data_ptr())
        return y
    f = _csr(crow, cols, values, (n_out, z.shape[1]))
    y = torch.sparse.mm(f, z.T).T.contiguous()
    return y.mul_(scale) if scale != 1.0 else y


@qwha_spmm.register_fake
def _(z, values, crow, cols, ccol, rows_t, perm, n_out, scale):
    return z.new_empty((z.shape[0], n_out))


def _qwha_spmm_setup(ctx, inputs, output):
    z, values, crow, cols, ccol, rows_t, perm, n_out, scale = inputs
    ctx.save_for_backward(z, values, crow, cols, ccol, rows_t, perm)
    ctx.scale = scale


@torch.library.custom_op("lowbit::qwha_spmm_backward", mutates_args=())
def qwha_spmm_backward(gy: torch.Tensor, z: torch.Tensor, values: torch.Tensor, crow: torch.Tensor,
                       cols: torch.Tensor, ccol: torch.Tensor, rows_t: torch.Tensor, perm: torch.Tensor,
                       need_z: bool, need_values: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gy · F, (gyᵀ · z) at the support)``; a gradient not needed is returned empty."""
    n, k = gy.shape[1], z.shape[1]
    gy = gy.contiguous()
    gz, gvals = z.new_empty(0), values.new_empty(0)
    if _cpu_kernel(z) and gy.dtype == z.dtype:
        _check_spmm_args(z, values, crow, cols, n)
        _check_spmm_args(gy, values, ccol, rows_t, k)
        z = z.contiguous()
        if need_z:  # gz = gy · F: the forward kernel on Fᵀ's CSR
            gz, vt = z.new_empty((gy.shape[0], k)), values[perm].contiguous()  # vt: held through the call
            call("cpu", "qwha_spmm", gy.data_ptr(), vt.data_ptr(), ccol.data_ptr(),
                     rows_t.data_ptr(), gy.shape[0], n, k, 1.0, gz.data_ptr())
        if need_values:
            gvals = values.new_empty(values.shape)
            call("cpu", "qwha_sddmm", gy.data_ptr(), z.data_ptr(), crow.data_ptr(), cols.data_ptr(),
                     gy.shape[0], k, n, gvals.data_ptr())
        return gz, gvals
    if need_z:  # gz = gy · F = (Fᵀ · gyᵀ)ᵀ: Fᵀ in CSR, the same values permuted
        gz = torch.sparse.mm(_csr(ccol, rows_t, values[perm], (k, n)), gy.T).T.contiguous()
    if need_values:  # dF = gyᵀ · z sampled at the support only (never the dense N × K)
        pattern = _csr(crow, cols, torch.zeros_like(values), (n, k))
        gvals = torch.sparse.sampled_addmm(pattern, gy.T.contiguous(), z, beta=0.0).values().clone()
    return gz, gvals


@qwha_spmm_backward.register_fake
def _(gy, z, values, crow, cols, ccol, rows_t, perm, need_z, need_values):
    return (z.new_empty(z.shape if need_z else (0,)), values.new_empty(values.shape if need_values else (0,)))


def _qwha_spmm_backward(ctx, gy):
    z, values, crow, cols, ccol, rows_t, perm = ctx.saved_tensors
    need_z, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gy = gy * ctx.scale if ctx.scale != 1.0 else gy  # (M, N): cheaper than scaling either gradient
    gz, gvals = qwha_spmm_backward(gy, z, values, crow, cols, ccol, rows_t, perm, need_z, need_values)
    return (gz if need_z else None), (gvals if need_values else None), None, None, None, None, None, None, None


torch.library.register_autograd("lowbit::qwha_spmm", _qwha_spmm_backward, setup_context=_qwha_spmm_setup)


def qwha_inference(x: torch.Tensor, y: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor,
                   n_out: int, scale: float) -> bool:
    """Decode entry point: ``y += scale · (x · H / K) · Fᵀ`` in place, as two kernel calls (the WHT, then
    the sparse product accumulating into y) — the kernels of the op path without three custom-op
    dispatches and an add (≈ 30 µs at M = 1, a tenth of a 4096² nf4 GEMV).

    For callers with no autograd graph to record and a single-factor H (``len(adapter_hadamard_factors(K))
    == 1``). Returns False, touching nothing, unless x, y and values are fp32 on the "cpu" backend and y
    is contiguous (M, n_out): the caller then takes the op path."""
    if (x.dtype != torch.float32 or y.dtype != torch.float32 or values.dtype != torch.float32
            or not y.is_contiguous() or torch.compiler.is_compiling() or x.device.type != "cpu"
            or backend_for(x) != "cpu" or not has_kernel("cpu", "qwha_spmm")):
        return False
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    # the kernel door (issue 14, finding 1): the CSR operands are read as dense arrays of these lengths
    values = dense("values", values, dtype=torch.float32, device=x.device)
    crow = dense("crow", crow, dtype=torch.int32, numel=n_out + 1, device=x.device)
    cols = dense("cols", cols, dtype=torch.int32, numel=values.numel(), device=x.device)
    y = dense_out("y", y, dtype=torch.float32, numel=x2.shape[0] * n_out, device=x.device)
    z = torch.empty_like(x2)
    call("cpu", "hadamard", x2.data_ptr(), z.data_ptr(), DTYPE_ID[torch.float32], x2.shape[0], k, 1.0 / k, False)
    call("cpu", "qwha_spmm", z.data_ptr(), values.data_ptr(), crow.data_ptr(), cols.data_ptr(),
         x2.shape[0], k, n_out, float(scale), y.data_ptr(), True)
    return True
