"""HadamardAdapterLinear: the QWHA adapter (Walsh–Hadamard adaptation) on a quantized base.

From "QWHA: Quantization-Aware Walsh-Hadamard Adaptation": the update is ΔW = s · F · H⁻¹ with
F a sparse (out_features, in_features) coefficient matrix on a fixed support and H the ±1 Hadamard
matrix of order K = in_features (H Hᵀ = K·I, so H⁻¹ = Hᵀ / K):

    y = base(x) + s · (x · H / K) · Fᵀ

computed as one WHT of each token (``lowbit.hadamard``), then a sparse-dense product with F's
nonzeros (CSR). Neither ΔW nor a dense F exists in the forward or the backward: the backward is a
sampled product for dF (only at the support) and the transposed sparse product followed by the
inverse transform (``g · Hᵀ / K``) for dx. F's values are the only trainable parameters;
``nnz = r · (K + N)`` matches the parameter count of a rank-r LoRA.

K must have a Hadamard matrix here: a size ``lowbit.hadamard`` supports (m·2^k, m ∈ {1, 12, 20, 28,
40, 172}) or a product K = K₁·K₂ of two such sizes, for which H = H_{K₁} ⊗ H_{K₂} (two WHT passes;
e.g. 576 = 12·48, the hidden size of SmolLM2, has no m·2^k form). The initialisation from the
quantization error is :func:`lowbit.init.qwha_init`; :func:`add_adapters` wires both into a model.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch
from torch import nn

from .. import ops
from .. import reference as ref
from ..formats import DTYPE_ID
from .quant_linear import QuantLinear

__all__ = ["HadamardAdapterLinear", "add_adapters", "qwha_layers", "adapter_hadamard_factors",
           "adapter_hadamard"]


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
    return ops.hadamard_op(x.contiguous(), float(scale), bool(transpose))


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
    return z.dtype == torch.float32 and ops.backend_for(z) == "cpu" and ops._has_kernel("cpu", "qwha_spmm")


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
    if _cpu_kernel(z):  # csrc/cpu/hadamard.cpp: threads split the nonzeros, fixed summation order
        z, values = z.contiguous(), values.contiguous()  # named: alive through the call
        y = z.new_empty((z.shape[0], n_out))
        ops.call("cpu", "qwha_spmm", z.data_ptr(), values.data_ptr(), crow.data_ptr(), cols.data_ptr(),
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
            ops.call("cpu", "qwha_spmm", gy.data_ptr(), vt.data_ptr(), ccol.data_ptr(),
                     rows_t.data_ptr(), gy.shape[0], n, k, 1.0, gz.data_ptr())
        if need_values:
            gvals = values.new_empty(values.shape)
            ops.call("cpu", "qwha_sddmm", gy.data_ptr(), z.data_ptr(), crow.data_ptr(), cols.data_ptr(),
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


# --------------------------------------------------------------------------------- the module
def _check_support(support, n: int, k: int) -> torch.Tensor:
    if not isinstance(support, torch.Tensor) or support.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"support must be an int64/int32 tensor (2, nnz) of (row, col) indices, "
                        f"got {type(support).__name__} {getattr(support, 'dtype', '')}")
    if support.dim() != 2 or support.shape[0] != 2 or support.shape[1] < 1:
        raise ValueError(f"support must have shape (2, nnz) with nnz >= 1, got {tuple(support.shape)}")
    s = support.to(torch.int64)
    r, c = s[0], s[1]
    if int(r.min()) < 0 or int(r.max()) >= n or int(c.min()) < 0 or int(c.max()) >= k:
        raise ValueError(f"support indices out of range: rows in [{int(r.min())}, {int(r.max())}] (out_features={n}), "
                         f"cols in [{int(c.min())}, {int(c.max())}] (in_features={k})")
    if torch.unique(r * k + c).numel() != s.shape[1]:
        raise ValueError(f"support has {s.shape[1] - torch.unique(r * k + c).numel()} duplicate (row, col) entries")
    return s


class HadamardAdapterLinear(nn.Module):
    """``y = base(x) + scale · (x · H / K) · Fᵀ``: a QWHA adapter on a ``QuantLinear`` (or ``nn.Linear``).

    ``support`` (2, nnz) int (row, col) indices of F's nonzeros (any order, no duplicates) and
    ``values`` (nnz,) their initial values in the same order (default zeros: the layer starts as its
    base). Without ``support``, each row gets ≈ nnz / N seeded-random columns with
    ``nnz = r · (in_features + out_features)``; the useful support comes from the quantization error
    (:func:`lowbit.init.qwha_init`, :func:`add_adapters`). Stored row-major sorted: buffer ``support``,
    parameter ``values`` (fp32) — the state dict holds both.
    """

    def __init__(self, base: Union[QuantLinear, nn.Linear], r: int = 16, scale: float = 1.0,
                 support: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None, seed: int = 0):
        super().__init__()
        if not isinstance(base, (QuantLinear, nn.Linear)):
            raise TypeError(f"base must be a lowbit.nn.QuantLinear or nn.Linear, got {type(base).__name__}")
        n, k = base.out_features, base.in_features
        self.factors = adapter_hadamard_factors(k)  # ValueError for K without a Hadamard matrix
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(float(scale)) < float("inf"):
            raise ValueError(f"scale={scale!r} must be a finite real number")
        self.base, self.in_features, self.out_features, self.scale = base, k, n, float(scale)
        for p in base.parameters():
            p.requires_grad_(False)
        dev = base.weight.device
        if support is None:
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r * (n + k) <= n * k:
                raise ValueError(f"r={r!r} must be an int >= 1 with r * (in_features + out_features) <= "
                                 f"in_features * out_features ({k} * {n})")
            support = _random_support(n, k, r * (n + k), seed)
            if values is not None:
                raise ValueError("values= needs the support= they belong to")
        support = _check_support(support, n, k)
        if values is None:
            values = torch.zeros(support.shape[1])
        if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.shape != (support.shape[1],):
            raise ValueError(f"values must be a float tensor of shape ({support.shape[1]},) (one per support entry), "
                             f"got {getattr(values, 'shape', type(values).__name__)}")
        order = torch.argsort(support[0] * k + support[1])
        self.register_buffer("support", support[:, order].contiguous().to(dev))
        self.values = nn.Parameter(values.detach()[order].to(dev, torch.float32).clone())
        self._build_index()

    @property
    def nnz(self) -> int:
        return self.support.shape[1]

    @property
    def r(self) -> float:
        """The rank of a LoRA with the same number of trainable parameters."""
        return self.nnz / (self.in_features + self.out_features)

    def _build_index(self) -> None:
        """CSR of F and of Fᵀ from the (row-major sorted) support; non-persistent, rebuilt on load."""
        n, k = self.out_features, self.in_features
        rows, cols = self.support[0], self.support[1]
        if self.nnz >= 2**31:
            raise ValueError(f"nnz={self.nnz} does not fit the int32 CSR indices")
        crow = torch.zeros(n + 1, dtype=torch.int64, device=rows.device)
        crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
        perm = torch.argsort(cols * n + rows)
        ccol = torch.zeros(k + 1, dtype=torch.int64, device=rows.device)
        ccol[1:] = torch.bincount(cols, minlength=k).cumsum(0)
        i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
        for name, t in (("crow", i32(crow)), ("cols", i32(cols)), ("ccol", i32(ccol)),
                        ("rows_t", i32(rows[perm])), ("perm", perm)):
            self.register_buffer(name, t, persistent=False)

    # ---- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != k:
            raise ValueError(f"x must be a tensor (..., in_features={k}), got {tuple(getattr(x, 'shape', ()))}")
        y = self.base(x)
        if self._forward_inference(x, y):
            return y
        # The adapter branch runs in fp32 (bf16/fp16 x is widened first: a z rounded to bf16 would add
        # eps_bf16 · Σ|z||F| of error for nothing; the cast is M·K elements, the GEMV reads N·K).
        cd = torch.float64 if torch.float64 in (x.dtype, self.values.dtype) else torch.float32
        if cd == torch.float64:  # lowbit.hadamard is fp32/bf16/fp16; fp64 (tests) goes through the spec
            z = adapter_hadamard(x.to(cd), 1.0 / k, fn=_hadamard_ref_autograd)
        else:
            z = adapter_hadamard(x.to(cd), 1.0 / k)  # x · H / K, one WHT per token
        a = qwha_spmm(z.reshape(-1, k), self.values.to(cd), self.crow, self.cols, self.ccol, self.rows_t, self.perm,
                      self.out_features, self.scale)
        return y + a.reshape(*x.shape[:-1], self.out_features).to(y.dtype)

    def _forward_inference(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Decode fast path: with no gradient to record, fp32 on the "cpu" backend and a single-factor
        H, run the WHT and the sparse product as two raw kernel calls, the product accumulating into
        the base output y in place — the same kernels as the op path, without three custom-op
        dispatches and an add (≈ 30 µs at M = 1, a tenth of a 4096² nf4 GEMV). Returns False to
        take the op path."""
        if torch.is_grad_enabled() and (x.requires_grad or self.values.requires_grad):
            return False
        if (x.dtype != torch.float32 or y.dtype != torch.float32 or self.values.dtype != torch.float32
                or len(self.factors) != 1 or not y.is_contiguous() or torch.compiler.is_compiling()
                or x.device.type != "cpu" or ops.backend_for(x) != "cpu" or not ops._has_kernel("cpu", "qwha_spmm")):
            return False
        k, n = self.in_features, self.out_features
        x2 = x.reshape(-1, k).contiguous()
        z = torch.empty_like(x2)
        ops.call("cpu", "hadamard", x2.data_ptr(), z.data_ptr(), DTYPE_ID[torch.float32], x2.shape[0], k, 1.0 / k,
                 False)
        ops.call("cpu", "qwha_spmm", z.data_ptr(), self.values.data_ptr(), self.crow.data_ptr(), self.cols.data_ptr(),
                 x2.shape[0], k, n, float(self.scale), y.data_ptr(), True)
        return True

    # ---- merge
    def coefficients(self) -> torch.Tensor:
        """Dense F (out_features, in_features) fp32 — for inspection and merging only."""
        f = torch.zeros(self.out_features, self.in_features, device=self.values.device)
        f[self.support[0], self.support[1]] = self.values.detach().float()
        return f

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · F · Hᵀ / K, (out_features, in_features) fp32 (materialised: merging only)."""
        return adapter_hadamard(self.coefficients(), self.scale / self.in_features, transpose=True)

    @torch.no_grad()
    def merge(self, dense: bool = False):
        """The base weight plus ΔW: ``dense=True`` gives the fp32 (N, K) tensor; otherwise
        ``(QuantizedTensor, rel_error)`` — W_Q + ΔW re-quantized in the base's format and the error
        that adds, ‖deq(new) − (deq(W_Q) + ΔW)‖ / ‖deq(W_Q) + ΔW‖. The module is not modified."""
        base_w = self.base.weight
        target = (base_w.dequantize(torch.float32) if isinstance(self.base, QuantLinear) else base_w.float())
        target = target + self.delta_weight()
        if dense:
            return target
        if not isinstance(self.base, QuantLinear):
            raise ValueError("the base is a dense nn.Linear: there is no quantized weight to merge into; "
                             "use merge(dense=True)")
        new = ops.quantize(target.to(base_w.dtype), base_w.spec)
        err = (new.dequantize(torch.float32) - target).norm() / target.norm().clamp_min(1e-30)
        return new, float(err)

    # ---- state dict: the support may have another nnz than this module was built with
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        s = state_dict.get(prefix + "support")
        if isinstance(s, torch.Tensor) and s.shape != self.support.shape:
            try:
                s = _check_support(s, self.out_features, self.in_features)
            except (TypeError, ValueError) as e:
                error_msgs.append(f"{prefix}support: {e}")
                return
            self.support = torch.empty_like(s, device=self.support.device)
            self.values = nn.Parameter(torch.empty(s.shape[1], device=self.values.device, dtype=self.values.dtype),
                                       requires_grad=self.values.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not (torch.all(self.support[0, 1:] * self.in_features + self.support[1, 1:]
                          > self.support[0, :-1] * self.in_features + self.support[1, :-1])):
            error_msgs.append(f"{prefix}support is not sorted row-major without duplicates")
            return
        self._build_index()

    def extra_repr(self) -> str:
        h = " ⊗ ".join(f"H_{f}" for f in self.factors)
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz} "
                f"(LoRA-equivalent r={self.r:g}), scale={self.scale:g}, H={h}")


def _hadamard_ref_autograd(x, scale, transpose):
    """The float64 reference transform, differentiable (plain torch ops)."""
    return ref.hadamard_ref(x, scale, transpose)


def _random_support(n: int, k: int, nnz: int, seed: int) -> torch.Tensor:
    """≈ nnz / n distinct seeded-random columns per row (the first nnz % n rows get one more)."""
    g = torch.Generator().manual_seed(seed)
    per = torch.full((n,), nnz // n, dtype=torch.int64)
    per[: nnz % n] += 1
    kmax = int(per.max())
    cols = torch.rand(n, k, generator=g).topk(kmax, dim=1).indices
    keep = torch.arange(kmax)[None, :] < per[:, None]
    rows = torch.arange(n)[:, None].expand(n, kmax)
    return torch.stack([rows[keep], cols[keep]])


def qwha_layers(model: nn.Module) -> dict[str, HadamardAdapterLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, HadamardAdapterLinear)}


# ------------------------------------------------------------------------------ add_adapters
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_adapters(model: nn.Module, kind: str = "qwha", r: int = 16, target_modules=TARGETS, calib=None, *,
                 fmt: Optional[str] = "nf4", block_size: int = 64, double_quant: bool = False, scale: float = 1.0,
                 alpha: float = 1.0, lora_alpha: float = 32, skip=("lm_head",)) -> list[str]:
    """Wrap the target layers of ``model`` in adapters and freeze every other parameter; returns the
    wrapped module names. A module matches when the last component of its name is in ``target_modules``.

    ``nn.Linear`` targets are first quantized to ``fmt`` (``fmt=None`` keeps them dense);
    ``QuantLinear`` targets are used as they are.

    * ``kind="qwha"``: :class:`HadamardAdapterLinear`. A target that was an ``nn.Linear`` still has its
      dense weight W here, so its adapter is initialised by :func:`lowbit.init.qwha_init` from the
      quantization error W − deq(W_Q) — weighted by the activations of ``calib`` (token ids (B, T) or
      a dict of model kwargs, one forward pass) when given — with budgets ∝ ‖·‖^alpha. A target that
      was already a QuantLinear (W unknown) gets a zero adapter on a random support.
    * ``kind="lora"``: :func:`lowbit.nn.add_lora` (``lora_alpha``; ``calib`` is not used).
    """
    from ..init import calibration_covariances, qwha_init
    from .lora import add_lora

    if kind not in ("qwha", "lora"):
        raise ValueError(f"kind={kind!r} must be 'qwha' or 'lora'")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    names = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, nn.Linear))
             and n.rpartition(".")[2] in targets and not any(n == s or n.endswith("." + s) for s in skip)]
    if not names:
        raise ValueError(f"no Linear/QuantLinear module of the model matches target_modules={targets}")
    if kind == "qwha":
        for n in names:  # validate every layer before changing any
            try:
                adapter_hadamard_factors(model.get_submodule(n).in_features)
            except ValueError as e:
                raise ValueError(f"{n}: {e}") from None
    dense = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
    covs = calibration_covariances(model, calib, dense) if (kind == "qwha" and calib is not None and dense) else {}
    for n in names:
        m = model.get_submodule(n)
        w = m.weight.detach() if isinstance(m, nn.Linear) else None
        if w is not None and fmt is not None:
            m = QuantLinear.from_linear(m, fmt, block_size, double_quant)
        if kind == "qwha":
            if w is not None and isinstance(m, QuantLinear):
                support, values = qwha_init(w, m.weight, r, cov=covs.pop(n, None), alpha=alpha)
                m = HadamardAdapterLinear(m, r, scale, support=support, values=values / scale)
            else:
                m = HadamardAdapterLinear(m, r, scale)
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m)
    if kind == "lora":
        return add_lora(model, r=r, alpha=lora_alpha, target_modules=targets)
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.endswith(".values") and isinstance(model.get_submodule(pname.rpartition(".")[0]),
                                                                  HadamardAdapterLinear))
    return names
