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
    "svdquant_quantize_ref",
    "svdquant_pack_ref",
    "svdquant_unpack_ref",
    "svdquant_act_ref",
    "svdquant_gemm_ref",
    "svdquant_linear_ref",
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
    * int4 / int2: ``min`` with -0 made +0, ``s = (max - min) / qmax`` (1 if below 1e-30), ``inv = 1 / s``,
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
    mn = mn + 0.0  # -0 -> +0, so the zero point does not depend on which zero a reduction returns
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
    scaled, absmax = _block_scaled(x, block)
    q = _nearest(scaled, dynamic_map(signed).to(x.device)).to(torch.uint8)
    return q, absmax


def _block_scaled(x: torch.Tensor, block: int):
    """Flat fp32 x -> (``clamp(x * (1 / max(absmax, 1e-38)), -1, 1)``, absmax per block of ``block``)."""
    n = x.numel()
    pad = (-n) % block
    xb = torch.cat([x, x.new_zeros(pad)]).reshape(-1, block)  # zeros never raise an absmax
    absmax = xb.abs().amax(dim=1)
    inv = 1.0 / absmax.clamp(min=ABSMAX_FLOOR)
    return (xb * inv[:, None]).clamp(-1.0, 1.0).reshape(-1)[:n], absmax


def dequantize8_ref(q: torch.Tensor, absmax: torch.Tensor, block: int, signed: bool = True,
                    offset: float = 0.0) -> torch.Tensor:
    """``map[q] * absmax[i // block] + offset`` (multiply, round, add, round) in fp32."""
    n = q.numel()
    idx = torch.arange(n, device=q.device) // block
    v = dynamic_map(signed).to(q.device)[q.reshape(-1).long()] * absmax[idx]
    return v + torch.tensor(offset, dtype=torch.float32)


def double_quant_ref(scale: torch.Tensor, quantize8=quantize8_ref):
    """The double-quant scale rule (its one home): compress per-block fp32 scales with
    ``offset = mean(scale)`` (torch's fp32 mean, as bitsandbytes), then signed 8-bit dynamic
    quantization of ``scale - offset`` in nested blocks of 256.
    Returns ``(scale_q uint8, scale_nested fp32, scale_offset 0-d fp32)``. ``quantize8(x, block, signed,
    offset) -> (q, absmax)`` is the 8-bit quantizer: the reference's by default; ``lowbit.quantize``
    passes the kernels' (bit-exact with it)."""
    offset = scale.mean()
    q, nested = quantize8(scale, NESTED_BLOCK, True, float(offset))
    return q, nested, offset.reshape(())


def block_scales_ref(qt, dequantize8=dequantize8_ref) -> torch.Tensor:
    """Per-block fp32 scales of a QuantizedTensor, rebuilt from double quant if needed:
    ``code[scale_q] * scale_nested[b // 256] + scale_offset`` (the inverse of :func:`double_quant_ref`;
    ``dequantize8`` as there)."""
    if not qt.double_quant:
        return qt.scale
    return dequantize8(qt.scale_q, qt.scale_nested, NESTED_BLOCK, True, float(qt.scale_offset))


def dequantize_qt_ref(qt, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_ref(qt.codes, block_scales_ref(qt), qt.zero, qt.fmt, qt.block_size, qt.shape, dtype)


def gemm_ref(x: torch.Tensor, qt, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x @ dequantize(W).T (+ bias)`` computed in fp32, returned in ``x.dtype``. x: (..., K)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp64 only for gradcheck
    w = dequantize_qt_ref(qt, torch.float32).to(acc)
    y = x.to(acc) @ w.T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def gemm_t_ref(gy: torch.Tensor, qt) -> torch.Tensor:
    """``gx = gy @ dequantize(W)`` in fp32, returned in ``gy.dtype``. gy: (..., N) -> (..., K)."""
    acc = torch.float64 if gy.dtype == torch.float64 else torch.float32
    w = dequantize_qt_ref(qt, torch.float32).to(acc)
    return (gy.to(acc) @ w).to(gy.dtype)


# ============================================================================================ hadamard
# The Walsh–Hadamard transform. H_n = H_m ⊗ H_{2^k} for n = m · 2^k, m the largest of
# (172, 40, 28, 20, 12, 1) that leaves a power of two; n <= 32768. The H_m are built here from
# their mathematical definitions, independently of the C++ tables (include/lowbit/hadamard.h);
# tests/test_hadamard.py checks that both agree and that H Hᵀ = m I.

__all__ += ["hadamard_ref", "hadamard_matrix", "hadamard_split", "HADAMARD_MAX_N"]

import functools  # noqa: E402  (hadamard section)

HADAMARD_MAX_N = 32768
HADAMARD_ORDERS = (172, 40, 28, 20, 12)

# Williamson matrices of order 43 (symmetric circulants A, B, C, D with A² + B² + C² + D² = 172 I;
# Baumert & Hall, tabulated in Hall, Combinatorial Theory, 1983): first rows, '+' = 1.
WILLIAMSON_43 = (
    "++---++++-+--+--++--------++--+--+-++++---+",
    "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
    "++-++++++----+-+--++-++-++--+-+----++++++-+",
    "+---++--++++-+-+++-++--++-+++-+-++++--++---",
)


def hadamard_split(n: int) -> tuple[int, int]:
    """``(m, l)`` with ``n == m * l``, ``l`` a power of two and ``m`` in (172, 40, 28, 20, 12, 1), or
    ValueError: any other size has no Hadamard transform here (never silently zero-padded)."""
    if isinstance(n, int) and 1 <= n <= HADAMARD_MAX_N:
        for m in HADAMARD_ORDERS + (1,):
            if n % m == 0 and (n // m) & (n // m - 1) == 0:
                return m, n // m
    raise ValueError(f"hadamard: n={n!r} is not a supported size: n must be m * 2^k <= {HADAMARD_MAX_N} "
                     f"with m in {(1,) + HADAMARD_ORDERS[::-1]} (e.g. 4096, 11008 = 172 * 64, "
                     f"14336 = 28 * 512); other sizes are not zero-padded")


def _gf(q: int):
    """Elements 0..q-1 of GF(q) with (sub, mul): Z/q for prime q, GF(9) = GF(3)[i]/(i^2 + 1) with
    a + 3b <-> a + b i."""
    if q != 9:
        return lambda x, y: (x - y) % q, lambda x, y: (x * y) % q

    def sub(x, y):
        return (x % 3 - y % 3) % 3 + 3 * ((x // 3 - y // 3) % 3)

    def mul(x, y):
        a, b, c, d = x % 3, x // 3, y % 3, y // 3
        return (a * c - b * d) % 3 + 3 * ((a * d + b * c) % 3)

    return sub, mul


def _paley2(q: int) -> torch.Tensor:
    """Paley II Hadamard matrix of order 2(q+1), q ≡ 1 (mod 4) a prime power: symmetric.
    H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]], C = [[0, 1ᵀ], [1, Q]], Q[a, b] = χ(a - b)."""
    sub, mul = _gf(q)
    squares = {mul(y, y) for y in range(1, q)}
    chi = torch.tensor([[0 if a == b else (1 if sub(a, b) in squares else -1) for b in range(q)] for a in range(q)])
    c = torch.ones(q + 1, q + 1, dtype=torch.int64)
    c[0, 0] = 0
    c[1:, 1:] = chi
    h2 = torch.tensor([[1, 1], [1, -1]])
    k = torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(c, h2) + torch.kron(torch.eye(q + 1, dtype=torch.int64), k)


def _williamson172() -> torch.Tensor:
    """[[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]: NOT symmetric."""
    idx = (torch.arange(43)[None, :] - torch.arange(43)[:, None]) % 43
    a, b, c, d = (torch.tensor([1 if ch == "+" else -1 for ch in s])[idx] for s in WILLIAMSON_43)
    return torch.cat([torch.cat(r, 1) for r in ([a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a])], 0)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (n, n) ±1 matrix H_n of :func:`hadamard_ref`: ``H_m ⊗ H_l`` for ``(m, l) = hadamard_split(n)``
    (H_l Sylvester; H_12, H_20, H_28 Paley II with q = 5, 9, 13; H_40 = H_2 ⊗ H_20; H_172 Williamson)."""
    m, l = hadamard_split(n)
    return torch.kron(_hadamard_m(m), _sylvester(l)).to(dtype)


@functools.lru_cache(maxsize=None)
def _hadamard_m(m: int) -> torch.Tensor:  # int64, cached: gradcheck calls the reference ~10^3 times
    return {1: lambda: torch.ones(1, 1, dtype=torch.int64), 12: lambda: _paley2(5), 20: lambda: _paley2(9),
            28: lambda: _paley2(13), 40: lambda: torch.kron(_sylvester(2), _paley2(9)), 172: _williamson172}[m]()


def hadamard_ref(x: torch.Tensor, scale: float = 1.0, transpose: bool = False) -> torch.Tensor:
    """``x @ hadamard_matrix(n) * scale`` along the last dim (``H_nᵀ`` when ``transpose``), computed in
    fp32 (fp64 for fp64 input), returned in ``x.dtype``. Structured, not dense: the WHT of each of the
    m sub-rows by log2(l) add/sub stages, then the m × m mix."""
    n = x.shape[-1]
    m, l = hadamard_split(n)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc).reshape(-1, m, l)
    h = 1
    while h < l:  # pairs (j, j + h) inside blocks of 2h: (a, b) -> (a + b, a - b)
        y = y.reshape(-1, m, l // (2 * h), 2, h)
        y = torch.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], dim=-2).reshape(-1, m, l)
        h *= 2
    if m > 1:
        hm = hadamard_matrix(m, acc)
        y = torch.einsum("ral,ab->rbl", y, hm.T if transpose else hm)
    return (y * scale).reshape(x.shape).to(x.dtype)


# ===================================================================================== optim
# AdamW with 32-bit and 8-bit blockwise state; the contract is include/lowbit/optim.h.

__all__ += ["OPTIM_BLOCK", "OPTIM_ROUNDINGS", "adamw_scalars", "adamw_ref", "adamw8bit_ref", "optim_boundaries",
            "requantize8_ref"]

OPTIM_BLOCK = 256  # 8-bit state block (bitsandbytes' optimizer blocksize)


def _round_f32(x: float) -> float:
    import struct

    return struct.unpack("f", struct.pack("f", x))[0]


def adamw_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int):
    """The scalars of AdamW step ``step`` (1-based), computed in double exactly as
    ``torch.optim.AdamW`` computes them, then rounded to fp32:
    ``(beta1, 1 - beta1, beta2, 1 - beta2, eps, 1 - lr * wd, -lr / (1 - beta1**step),
    1 / (1 - beta2**step) ** 0.5)``. Every backend receives these same eight numbers."""
    bc1 = 1 - beta1**step
    inv_bc2_sqrt = 1 / (1 - beta2**step) ** 0.5
    return tuple(_round_f32(x) for x in (beta1, 1 - beta1, beta2, 1 - beta2, eps, 1 - lr * weight_decay,
                                          -(lr / bc1), inv_bc2_sqrt))


def adamw_ref(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, scalars):
    """One AdamW step with fp32 state: returns ``(p_new in p.dtype, m_new, v_new)``.

    In fp32, each op rounded (no FMA): ``p *= decay; m = m*beta1 + g*(1-beta1);
    v = v*beta2 + (g*(1-beta2))*g; p += neg_step * (m / (sqrt(v) * inv_bc2_sqrt + eps))`` — the
    update of ``torch.optim.AdamW`` (decoupled decay, bias correction, eps outside the sqrt), with
    its division by ``sqrt(1 - beta2**step)`` done as a multiplication by the reciprocal.
    """
    b1, omb1, b2, omb2, eps, decay, nstep, ibc2s = (torch.tensor(s, dtype=torch.float32) for s in scalars)
    g32 = g.float()
    p32 = p.float() * decay
    m = m * b1 + g32 * omb1
    v = v * b2 + (g32 * omb2) * g32
    # torch's fp32 sqrt on CPU is not correctly rounded (it differs from IEEE sqrt in ~20% of
    # elements in torch 2.13); sqrt in fp64 rounded once to fp32 is (53 >= 2*24 + 2 bits).
    d = v.double().sqrt().float() * ibc2s + eps
    p32 = p32 + nstep * (m / d)
    return p32.to(p.dtype), m, v


OPTIM_ROUNDINGS = ("bitsandbytes", "nearest")  # index = AdamW8Params::rounding (include/lowbit/optim.h)


def _round_to_f32(q) -> float:
    """A rational ``q`` rounded to the nearest fp32 (ties to even), exactly."""
    import fractions
    import struct

    import numpy as np

    f = np.float32(float(q))  # within one fp32 ulp of the answer (double rounding at worst)
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    best = None
    for c in cands:
        d = abs(fractions.Fraction(float(c)) - q)
        even = struct.unpack("<I", struct.pack("<f", float(c)))[0] % 2 == 0
        key = (d, not even)
        if best is None or key < best[0]:
            best = (key, c)
    return float(best[1])


def _bnb_grid_index(t: float) -> int:
    """bitsandbytes 0.50.2's CPU quantizer (csrc/cpu_ops.cpp ``norm_to_lut_index``, as compiled:
    GCC contracts ``x * 65535 + 0.5`` into one fma): ``trunc(fl32(fma(fl32(t + 1) * 0.5, 65535, 0.5)))``."""
    import fractions

    import numpy as np

    a = (np.float32(t) + np.float32(1.0)) * np.float32(0.5)
    return int(_round_to_f32(fractions.Fraction(float(a)) * 65535 + fractions.Fraction(1, 2)))


def _bnb_grid_value(i: int) -> float:
    import numpy as np

    return float(np.float32(np.float32(2 * i) / np.float32(65535.0)) - np.float32(1.0))


@functools.lru_cache(maxsize=None)
def optim_boundaries(signed: bool, rounding: str = "bitsandbytes") -> torch.Tensor:
    """The 255 fp32 re-quantization boundaries of a dynamic map: the code of ``t`` (already scaled
    and clamped to [-1, 1]) is the number of boundaries strictly below ``t``
    (``torch.bucketize(t, boundaries, right=False)``).

    * ``"nearest"``: the midpoints ``(map[j] + map[j+1]) / 2`` — the exact nearest entry, ties to
      the lower index.
    * ``"bitsandbytes"``: bitsandbytes 0.50.2's CPU quantizer: ``t`` goes to grid point
      ``i = trunc(fma((t + 1) * 0.5, 65535, 0.5))`` of a uniform 65536-point grid over [-1, 1], whose
      value ``-1 + 2i / 65535`` takes the nearest entry (a 64 K lookup table in bitsandbytes). As a
      boundary table: ``T_j`` = the smallest fp32 ``t`` whose grid value exceeds midpoint ``j``; the
      boundary is the float just below ``T_j``. Codes between two grid points are never produced
      (equal boundaries), e.g. nothing between ±2.1e-5 in the signed map: 0 is stored as +2.1e-5.
    """
    import numpy as np

    mp = dynamic_map(signed)
    mid = ((mp[:-1] + mp[1:]) * 0.5).tolist()
    if rounding == "nearest":
        return torch.tensor(mid, dtype=torch.float32)
    if rounding != "bitsandbytes":
        raise ValueError(f"rounding={rounding!r} must be one of {OPTIM_ROUNDINGS}")
    values = np.array([_bnb_grid_value(i) for i in range(65536)], dtype=np.float32)

    def order(x: float) -> int:  # fp32 <-> ints of the same order; -0 and +0 are both 0
        b = int(np.float32(x).view(np.int32))
        return b if b >= 0 else -(b & 0x7FFFFFFF)

    def unorder(k: int) -> float:
        f = float(np.int32(abs(k)).view(np.float32))
        return f if k >= 0 else -f

    out = []
    for m in mid:
        first = int(np.searchsorted(values, np.float32(m), side="right"))  # first grid value > m
        if first == 65536:
            out.append(float("inf"))
            continue
        lo, hi = order(-1.0), order(1.0) + 1  # first t with grid index >= first
        while lo < hi:
            k = (lo + hi) // 2
            if _bnb_grid_index(unorder(k)) >= first:
                hi = k
            else:
                lo = k + 1
        out.append(float("inf") if lo > order(1.0) else unorder(lo - 1))
    return torch.tensor(out, dtype=torch.float32)


def requantize8_ref(x: torch.Tensor, block: int, signed: bool, rounding: str = "bitsandbytes"):
    """The optimizer's blockwise re-quantization: absmax = max |x| per block, ``t = clamp(x * (1 /
    max(absmax, 1e-38)), -1, 1)``, code = number of :func:`optim_boundaries` strictly below ``t``."""
    x = x.reshape(-1).float()
    scaled, absmax = _block_scaled(x, block)
    q = torch.bucketize(scaled, optim_boundaries(signed, rounding).to(x.device), right=False).to(torch.uint8)
    return q, absmax


def adamw8bit_ref(p: torch.Tensor, g: torch.Tensor, qm: torch.Tensor, absmax_m: torch.Tensor,
                  qv: torch.Tensor, absmax_v: torch.Tensor, scalars, rounding: str = "bitsandbytes"):
    """One AdamW step with 8-bit blockwise state (blocks of 256, flat order, last block partial).

    m = signed-map codes ``qm`` times ``absmax_m[block]``, v likewise with the unsigned map; the
    step is :func:`adamw_ref` on these fp32 values (p uses the fp32 m, v); then each state is
    re-quantized against its new block absmax by :func:`requantize8_ref` with ``rounding``
    (``"bitsandbytes"``: bitsandbytes 0.50.2's CPU rule; ``"nearest"``: the exact nearest entry, ties
    to the lower index), except that a positive v never gets code 0.
    Returns ``(p_new, qm, absmax_m, qv, absmax_v)``.
    """
    n = p.numel()
    blk = torch.arange(n, device=p.device) // OPTIM_BLOCK
    m = dynamic_map(True).to(p.device)[qm.reshape(-1).long()] * absmax_m[blk]
    v = dynamic_map(False).to(p.device)[qv.reshape(-1).long()] * absmax_v[blk]
    p_new, m, v = adamw_ref(p.reshape(-1), g.reshape(-1), m, v, scalars)
    qm, absmax_m = requantize8_ref(m, OPTIM_BLOCK, True, rounding)
    qv, absmax_v = requantize8_ref(v, OPTIM_BLOCK, False, rounding)
    # A positive v is never stored as 0 (code 1 instead, the smallest nonzero entry): real gradients
    # span more decades per block than the map, and a v rounded to 0 under a nonzero m turns the
    # step into m / eps (measured on SmolLM2 with the nearest rule: 1.4e-2 from fp32 AdamW after 100
    # steps, 1.7e-3 with it). The bitsandbytes rule never maps v >= 0 to code 0.
    qv = torch.where((v > 0) & (qv == 0), torch.ones_like(qv), qv)
    return p_new.reshape(p.shape), qm, absmax_m, qv, absmax_v


# ============================================================================ lowrank
def lowrank_ref(x: torch.Tensor, qt, a: torch.Tensor, b: torch.Tensor, scale: float,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x · dequant(W)ᵀ + scale · (x · Aᵀ) · Bᵀ (+ bias)`` in fp32, returned in x's dtype.

    x: (..., K); W: (N, K); A: (r, K); B: (N, r).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_qt_ref(qt, torch.float32).to(acc)
    xa = x.to(acc)
    y = xa @ w.T + scale * ((xa @ a.to(acc).T) @ b.to(acc).T)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


# ============================================================================ svdquant (W4A4 + low rank)
SVDQ_GROUP = 64  # K per scale, include/lowbit/svdquant.h::kSvdqGroup


def svdquant_quantize_ref(v: torch.Tensor):
    """The 4-bit symmetric quantizer of svdquant.h, rows of fp32 ``v`` (R, K) in groups of 64 along K:
    ``(q int8 (R, K) in [-7, 7], s fp32 (R, K/64))``. s = amax / 7 (IEEE division); q = clamp(rne(v / s),
    -7, 7); a zero group gives s = 0, q = 0; a group holding a non-finite value gives s = NaN, q = 0."""
    r, k = v.shape
    g = v.to(torch.float32).reshape(r, k // SVDQ_GROUP, SVDQ_GROUP)
    finite = torch.isfinite(g).all(-1)
    amax = torch.where(finite, g.abs().amax(-1), torch.zeros((), dtype=torch.float32))
    s = amax / 7.0
    live = (finite & (s != 0))[..., None]
    q = torch.where(live, torch.round(g / torch.where(live, s[..., None], torch.ones(()))), torch.zeros(()))
    q = q.clamp(-7, 7).to(torch.int8).reshape(r, k)
    return q, torch.where(finite, s, torch.full((), float("nan")))


def svdquant_pack_ref(q: torch.Tensor) -> torch.Tensor:
    """int8 codes (N, K) in [-8, 7] -> (N, K/2) uint8, element 2i in the high nibble, two's complement."""
    return pack((q.to(torch.int16) & 0xF).to(torch.uint8), 4)


def svdquant_unpack_ref(packed: torch.Tensor) -> torch.Tensor:
    u = unpack(packed, 4).to(torch.int16)
    return torch.where(u >= 8, u - 16, u).to(torch.int8)


def svdquant_act_ref(x: torch.Tensor, inv_smooth: Optional[torch.Tensor], l2: Optional[torch.Tensor]):
    """The activation pass: ``(qx, sx, down)`` for x (M, K); down = xs · l2ᵀ in fp32 (None when l2 is)."""
    xs = x.to(torch.float32)
    if inv_smooth is not None:
        xs = xs * inv_smooth.to(torch.float32)
    qx, sx = svdquant_quantize_ref(xs)
    down = None if l2 is None else xs @ l2.to(torch.float32).T
    return qx, sx, down


def svdquant_gemm_ref(qx: torch.Tensor, sx: torch.Tensor, qw_packed: torch.Tensor, sw: torch.Tensor,
                      down: Optional[torch.Tensor] = None, l1: Optional[torch.Tensor] = None,
                      bias: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """y = Σ_g sx·sw·(qx·qwᵀ over group g) + down · l1ᵀ + bias, fp32, returned in ``dtype``. The group sums
    are exact integers (int64 here); the scaling and sums in fp32."""
    m, k = qx.shape
    groups = k // SVDQ_GROUP
    qw = svdquant_unpack_ref(qw_packed)
    acc = torch.einsum("mgc,ngc->mng", qx.to(torch.int64).reshape(m, groups, SVDQ_GROUP),
                       qw.to(torch.int64).reshape(-1, groups, SVDQ_GROUP))
    y = (sx.float()[:, None, :] * sw.float()[None, :, :] * acc.to(torch.float32)).sum(-1)
    if down is not None and down.shape[1] > 0:
        y = y + down.float() @ l1.to(torch.float32).T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(dtype)


def svdquant_linear_ref(x: torch.Tensor, inv_smooth: Optional[torch.Tensor], l2: Optional[torch.Tensor],
                        l1: Optional[torch.Tensor], qw_packed: torch.Tensor, sw: torch.Tensor,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The SVDQuant forward of x (M, K): the activation pass, then the W4A4 GEMM with the branch."""
    qx, sx, down = svdquant_act_ref(x, inv_smooth, l2)
    return svdquant_gemm_ref(qx, sx, qw_packed, sw, down, l1, bias, x.dtype)
