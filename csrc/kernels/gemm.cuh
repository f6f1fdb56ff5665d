// csrc/kernels/gemm.cuh — the gemm family on CUDA: y = x · dequant(W)ᵀ (+ bias) and
// gx = gy · dequant(W), W (N, K) in the canonical layout of include/lowbit/quant.h (no repack).
// Launchers (path choice, grids): csrc/launch/gemm.inl. Spec: python/lowbit/reference.py::gemm_ref.
//
// Three kernels:
//   gemv_kernel     small M (and every fp32 x): SIMT, 16-byte code loads, table by warp shuffle
//   gemm_mma_kernel M > 8, bf16/fp16 x: mma.m16n8k16 with weights decoded in registers
//   gemm_t_kernel   the backward product, SIMT
//
// Numbers below use H100 SXM (3.35 TB/s HBM3, 132 SMs, 1.98 GHz boost; dense bf16 mma ≈ 990
// TFLOP/s, fp32 FMA ≈ 67 TFLOP/s) for a 4096×4096 weight with block 64: nf4 codes 8.39 MB +
// fp32 absmax 1 MB (double quant: 0.26 MB of uint8 + nested) — ≈ 0.56 B/weight with fp32 scales,
// 0.52 B with double quant; int4 adds the fp32 zero (0.63 B/weight); int2 0.38 B/weight. Estimates,
// not measurements: there is no GPU here, and no GPU timing is claimed anywhere in this project.
#pragma once
#include <cstring>
#include <type_traits>

#include "lowbit/gemm.h"
#include "lowbit/simt/compat.cuh"

namespace lowbit::kernels {
namespace gemm_k {

// Code tables (static: one private copy per translation unit in both builds).
static __constant__ float c_nf4[16] = {LOWBIT_NF4_TABLE};
static __constant__ float c_fp4[16] = {LOWBIT_FP4_TABLE};
static __constant__ float c_dyn[256] = {LOWBIT_DYNAMIC_SIGNED_TABLE};

// Elements of one code load of the SIMT kernels: 32 codes = 16 bytes (4-bit) or 8 bytes (2-bit).
// Blocks are multiples of 32 and start at multiples of 32, so such a chunk has ONE scale.
constexpr int kChunk = 32;

// ---------------------------------------------------------------------------- element I/O
SIMT_DEVICE float to_f32(float x) { return x; }
SIMT_DEVICE float to_f32(__half x) { return __half2float(x); }
SIMT_DEVICE float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
SIMT_DEVICE T from_f32(float x) {  // round to nearest even
  if constexpr (std::is_same<T, float>::value) return x;
  else if constexpr (std::is_same<T, __half>::value) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}
template <class T>
SIMT_DEVICE float b16_to_f32(uint32_t u) {  // low 16 bits of u as T
  if constexpr (std::is_same<T, __half>::value) return __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
  else return __uint_as_float(u << 16);
}
template <class T>
SIMT_DEVICE uint32_t f32_to_b16(float x) {
  if constexpr (std::is_same<T, __half>::value) return __half_as_ushort(__float2half_rn(x));
  else return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// Eight consecutive elements as fp32; vec: one (bf16/fp16) or two (fp32) 16-byte loads.
template <class T>
SIMT_DEVICE void load8(const T* __restrict__ p, bool vec, float (&x)[8]) {
  if (vec) {
    if constexpr (std::is_same<T, float>::value) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(p));
      const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
      x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
      x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    } else {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
      const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        x[2 * i] = b16_to_f32<T>(u[i]);
        x[2 * i + 1] = b16_to_f32<T>(u[i] >> 16);
      }
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] = to_f32(p[i]);
}

// The fp32 scale of quant block b, rebuilt from double quant in the kernel (formats.md: multiply,
// round, add, round — the same bits as `dequantize`).
SIMT_DEVICE float block_scale(const GemmWeight& w, int64_t b) {
  if (w.scale_q)
    return __fadd_rn(__fmul_rn(c_dyn[__ldg(w.scale_q + b)], __ldg(w.scale_nested + b / kNestedBlock)), w.scale_offset);
  return __ldg(w.scale + b);
}

// Optional low-rank branch of the lowrank family (csrc/launch/lowrank.inl):
//   y += s · xa (M, r) · Bᵀ,  B (N, r) in x's dtype, xa = x · Aᵀ in fp32, either
//   * already computed (xa set, a null): the up-projection runs in the epilogue; r = 0: no branch
//     (the plain gemm) — a run-time field, one branch in the epilogue, no extra instantiations; or
//   * fused (a set, xa null; gemm_mma_kernel<F, T, RP> with r ≤ RP only): the down-projection
//     x · Aᵀ runs inside the mma main loop from the x tile already in shared memory, and the CTAs
//     of the first N tile store it, rounded to x's dtype, into xa_out (M, r).
struct LrEpi {
  const float* xa;        // (M, r) fp32, rows aligned with this launch's x
  const void* b;          // (N, r)
  int r;
  float s;
  const void* a = nullptr;  // (r, K), fused down-projection
  void* xa_out = nullptr;   // (M, r) in x's dtype, rows aligned with this launch's x
};

// ============================================================================ small M: gemv_kernel
// One warp per (output column n, K-slice); kw warps of a CTA split one column's K (intra-CTA
// split-K, reduced through shared memory in warp order: deterministic, no atomics), 8 / kw columns
// per CTA, MR rows of x per CTA (blockIdx.y walks M in steps of MR). Lane L of split ks takes the
// 32-element chunks c = (it·kw + ks)·32 + L: a warp's 32 lanes read 32 consecutive 16-byte pieces
// of one weight row (512 contiguous bytes: fully coalesced). Per chunk, one scale (and zero);
// products are summed per chunk and scaled once: Σ_chunks s·Σ x·v, v = table[q] (nf4/fp4: a
// 16-float table in shared memory, one per bank, so a warp's 32 lookups are conflict-free — the same
// issue rate as a register table read with __shfl_sync, without its warp synchronisation, which the
// simulator charges ~35 ns per lane and made this kernel 10x slower to test) or v = q − z in fp32
// (int: the same rounding as `dequantize` before its · s).
// Accumulation: fp32 with explicit FMAs (__fmaf_rn, so the simulator and nvcc round alike).
//
// Roofline at M = 1 (4096×4096 nf4, 0.56 B/weight = 9.4 MB): 2.8 µs at 3.35 TB/s. Work per weight
// ≈ 1 table load + 2 integer ops (shift, and) + M FMAs: 16.8 M weights ≈ 16.8 M LDS / (132 SMs ×
// 32 lanes/clk × 1.98 GHz) ≈ 2.0 µs, integer ops ≈ 2.0 µs on the 64-lane/clk INT pipe, in parallel
// with the loads: estimated ≈ 75-85% of HBM bandwidth at M = 1 (int4: 2 ops/weight for q − z
// instead of the table load, same class). M = 4..8 (MR = 4/8): FMAs grow to M per weight; at M = 8,
// 8 FMA/weight ≈ 4.3 µs on the 128-lane FP32 pipe — about 60-65% of bandwidth, which is why M > 8
// goes to the tensor-core kernel. x (M·K·2 B = 64 KB at M = 8) is re-read per column from L1/L2,
// never from HBM more than once. fp32 x with M > 8 also runs here (blockIdx.y > 0): the weight is
// then re-read ⌈M/8⌉ times, from L2 when it fits (50 MB), and the kernel is FMA-bound
// (≈ 67 TFLOP/s peak, 2·M·N·K flops) — the accurate path, not the fast one.
// __launch_bounds__(256, 2): without the minimum-CTA hint ptxas (CUDA 13) capped the MR = 4/8
// instances at 64 registers and spilled; with it they use ≈ 70-80 registers (≤ 128 allowed).
constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;

template <Fmt F, class T, int MR>
__global__ void __launch_bounds__(kGemvThreads, 2) gemv_kernel(GemmParams p, int kw, int x_vec, int codes_vec, LrEpi lr) {
  constexpr bool kTable = fmt_is_table(F);
  constexpr int kBits = fmt_bits(F);
  __shared__ float s_red[kGemvWarps][MR];
  __shared__ float s_tab[16];
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const int cols = kGemvWarps / kw, col = warp / kw, ks = warp % kw;
  const int64_t N = p.w.n, K = p.w.k;
  const int64_t n = int64_t(blockIdx.x) * cols + col;
  const int64_t m0 = int64_t(blockIdx.y) * MR;
  const int rows = p.m - m0 < MR ? int(p.m - m0) : MR;
  const T* __restrict__ x = static_cast<const T*>(p.x) + m0 * K;
  const bool xv = x_vec != 0;
  if (kTable && threadIdx.x < 16) s_tab[threadIdx.x] = (F == Fmt::nf4 ? c_nf4 : c_fp4)[threadIdx.x];
  __syncthreads();
  float acc[MR];
#pragma unroll
  for (int r = 0; r < MR; ++r) acc[r] = 0.0f;

  if (n < N) {  // warp-uniform: the reduction shuffles below see full warps
    const int64_t n_chunks = K / kChunk, bpr = K / p.w.block;
    const int cpb = p.w.block / kChunk;
    const uint8_t* __restrict__ row = p.w.codes + n * (K * kBits / 8);
    const int64_t iters = (n_chunks + 32 * kw - 1) / (32 * kw);
    for (int64_t it = 0; it < iters; ++it) {
      const int64_t c = (it * kw + ks) * 32 + lane;
      const bool active = c < n_chunks;
      uint32_t wd[4] = {0u, 0u, 0u, 0u};  // the chunk's codes, little-endian words
      float s = 0.0f, z = 0.0f;
      if (active) {
        constexpr int kBytes = kChunk * kBits / 8;  // 16 or 8
        const uint8_t* src = row + c * kBytes;
        if (codes_vec) {
          if constexpr (kBits == 4) {
            const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
            wd[0] = v.x; wd[1] = v.y; wd[2] = v.z; wd[3] = v.w;
          } else {
            const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
            wd[0] = v.x; wd[1] = v.y;
          }
        } else {
#pragma unroll
          for (int i = 0; i < kBytes; ++i) wd[i / 4] |= uint32_t(__ldg(src + i)) << (8 * (i % 4));
        }
        const int64_t b = n * bpr + c / cpb;
        s = block_scale(p.w, b);
        if constexpr (!kTable) z = __ldg(p.w.zero + b);
      }
      float part[MR];
#pragma unroll
      for (int r = 0; r < MR; ++r) part[r] = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // 8 elements at a time: one 16-byte x load per row
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          uint32_t q;  // element 8j + e of the chunk; the first element of a byte is its high bits
          if constexpr (kBits == 4) q = (wd[j] >> (8 * (e / 2) + ((e & 1) ? 0 : 4))) & 15u;
          else q = (wd[j >> 1] >> (8 * ((2 * j + e / 4) & 3) + 6 - 2 * (e & 3))) & 3u;
          if constexpr (kTable) v[e] = s_tab[q];
          else v[e] = __fsub_rn(float(q), z);
        }
        if (active) {
#pragma unroll
          for (int r = 0; r < MR; ++r) {
            if (r < rows) {
              float xs[8];
              load8(x + r * K + c * kChunk + 8 * j, xv, xs);
#pragma unroll
              for (int e = 0; e < 8; ++e) part[r] = __fmaf_rn(xs[e], v[e], part[r]);
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < MR; ++r) acc[r] = __fmaf_rn(s, part[r], acc[r]);
    }
    if (lr.r > 0 && ks == 0) {  // low-rank up-projection: lanes split r, the warp sum below adds it
      const T* __restrict__ bn = static_cast<const T*>(lr.b) + n * lr.r;
#pragma unroll
      for (int r = 0; r < MR; ++r) {
        if (r < rows) {
          float part = 0.0f;
          for (int j = lane; j < lr.r; j += 32) part = __fmaf_rn(__ldg(lr.xa + (m0 + r) * lr.r + j), to_f32(bn[j]), part);
          acc[r] = __fmaf_rn(lr.s, part, acc[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < MR; ++r)
      for (int o = 16; o > 0; o /= 2) acc[r] = __fadd_rn(acc[r], __shfl_xor_sync(0xffffffffu, acc[r], o));
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < MR; ++r) s_red[warp][r] = acc[r];
    }
  }
  __syncthreads();
  if (int(threadIdx.x) < cols * MR) {
    const int cl = int(threadIdx.x) / MR, r = int(threadIdx.x) % MR;
    const int64_t nn = int64_t(blockIdx.x) * cols + cl;
    if (nn < N && r < rows) {
      float sum = s_red[cl * kw][r];
      for (int i = 1; i < kw; ++i) sum = __fadd_rn(sum, s_red[cl * kw + i][r]);  // fixed order
      if (p.bias) sum = __fadd_rn(sum, to_f32(static_cast<const T*>(p.bias)[nn]));
      static_cast<T*>(p.y)[(m0 + r) * N + nn] = from_f32<T>(sum);
    }
  }
}

// ============================================================================ large M: gemm_mma_kernel
// CTA tile 64 (M) × 64 (N) × 64 (K), 4 warps as 2 × 2, warp tile 32 × 32 = 2 m16 × 4 n8 mma tiles.
// 3-stage cp.async pipeline (cp.async.cg: x and codes are streamed, L1 is of no use) holding per
// stage: the x tile (8 KB, 16-byte chunks XOR-swizzled by row so that ldmatrix.x4 reads 8 rows of
// a 128-byte-stride tile without bank conflicts), the codes of 64 rows × 64 k (2 KB 4-bit, 1 KB
// 2-bit) in the canonical layout, and the 64 × 2 decoded per-32-group scales and zeros (the double
// quant decode happens here, once per (n, 32-group), not per weight).
//
// Weight decode in registers, exact: the mma's B operand holds *unscaled* code values, and the
// fp32 scale multiplies a per-32-group fp32 partial accumulator (so no scale is ever rounded to 16
// bits; the error is that of fp32 accumulation, as the tests demand):
//   int4/int2  B = q: the 0x6400 magic-number trick — one lop3 puts the two nibbles (crumbs) of a
//              byte into the mantissas of a half2 1024 + q (bf16: 0x4300, 128 + q), one __hadd2
//              of −1024 (−128) leaves q exactly. The zero point is applied as y += s·(x·q − z·Σx),
//              Σx per row and group coming from one extra mma with B = 1 per m16 tile (shared by
//              the 4 n8 tiles: +12.5% tensor work for int formats).
//   fp4        B = 12·v ∈ {0, .0625, 2, 3, 4, 6, 8, 12}: exact in bf16/fp16; the 1/12 is folded
//              into the fp32 scale.
//   nf4        B = table value, not representable in 16 bits: split into planes that sum to it
//              exactly — bf16: 3 planes (8+8+8 bits), fp16: 2 planes of 1024·v (11+11 bits, the
//              1024 keeps the low plane out of fp16 subnormals; 2^-10 goes into the scale). Each
//              plane is one more mma: nf4 costs 3× (bf16) / 2× (fp16) the tensor work of int4.
//   Table formats decode a whole byte (two codes) with one 32-bit shared-memory load from a
//   256-entry pair table per plane (≤ 3 KB), the register pair exactly as the B fragment wants it.
// Fused low-rank down-projection (RP > 0, lowrank family): each stage also holds RP rows of A
//   (RP·128 B, swizzled like x; rows ≥ r zero-filled); per k16 step the two warps of a row half
//   each take RP/2 columns of xa = x · Aᵀ, with A's rows as the B operand (one ldmatrix per two n8
//   tiles, no decode) and the x fragments already loaded: RP/8 extra mma per warp and k16 step
//   against 8·planes (+2) for the weight — r/64 of a one-plane main loop. After the loop the halves
//   meet in the freed stage memory as a 64 × RP fp32 tile, which feeds the up-projection; the CTA
//   of column tile 0 stores it (rounded) as the xa output. Each CTA of a row block computes the
//   same xa (same instructions, same data): redundant tensor work instead of a second launch or
//   atomics. Registers: RP/2 more fp32 accumulators; RP = 64 uses 244-254 of the 255 (no spills),
//   hence r ≤ 64. Smem per stage + RP·128 B: RP = 64 needs the opt-in (57 KB with 3 stages).
// B fragment from the canonical layout: lane (g = lane/4, t = lane%4) needs W[n0+g][k0+2t, 2t+1]
// and [k0+2t+8, 2t+9] = two bytes of the row (4-bit), i.e. the canonical layout already puts each
// register's pair in one byte; a fragment-order repack would only turn two byte loads into one
// 32-bit load per 4 k16 steps (shared-memory instruction count, not bandwidth).
//
// Roofline (4096×4096, block 64): tensor work 2·M·N·K; weight bytes 9.4 MB once per 64-row M tile
// (from L2 after the first), x bytes M·K·2 per 64-column N tile (from L2).
//   M = 16: 0.54 GFLOP; HBM 9.4 MB → 2.8 µs; mma at ≈ 990 TFLOP/s → 0.5 µs (×4 for the M padding to
//           64 rows, ×3 for nf4-bf16 planes: 6 µs!). int4/fp4: ≈ 2-2.5 µs tensor, ≈ 70-80% of HBM
//           bandwidth expected; nf4-bf16 is tensor-bound (≈ 45% of bandwidth); nf4-fp16 ≈ 60%.
//   M = 64: tile fully used; int4/fp4 ≈ 2.2 GFLOP → 2.2 µs tensor vs 2.8 µs HBM: balanced, ≈ 70%
//           of bandwidth expected if the pipeline hides latency; nf4-bf16 ≈ 6.6 µs (≈ 40%).
//   Large M (≥ 1024): compute-bound. Per k16 step a warp issues 8 mma (×planes, +2 for int) against
//           2 ldmatrix.x4, 8 byte loads + 8 decode (lop3 + hadd2, or 1 lds per plane), and every 2
//           steps 32 FMAs of scale application. Expected tensor-pipe utilisation ≈ 40-55% of the
//           990 TFLOP/s (int4/fp4), the SIMT decode and the per-group scale FMAs being the limit; a
//           128×128 CTA tile with fragment-order weights (Marlin) is the next step, not done here.
constexpr int kMmaThreads = 128;
constexpr int kBM = 64, kBN = 64, kBK = 64, kStages = 3;
constexpr int kGroupsPerTile = kBK / 32;
static_assert(kBN * kGroupsPerTile == kMmaThreads, "one thread stages one (n, 32-group) scale per k-tile");

// RP: width of the fused down-projection (r padded to 16, 32 or 64), 0 without (see LrEpi).
template <Fmt F, class T, int RP = 0>
struct MmaCfg {
  static constexpr int kBits = fmt_bits(F);
  static constexpr bool kInt = !fmt_is_table(F);
  static constexpr int kPlanes = F == Fmt::nf4 ? (std::is_same<T, __nv_bfloat16>::value ? 3 : 2) : 1;
  // Table values are scaled by kPre before the 16-bit split; the scale gets 1 / kPre.
  static constexpr float kPre = F == Fmt::fp4 ? 12.0f : (F == Fmt::nf4 && kPlanes == 2 ? 1024.0f : 1.0f);
  static constexpr int kRowBytes = kBK * kBits / 8;           // codes of one row per k-tile: 32 / 16
  static constexpr int kABytes = kBM * kBK * 2;               // 8192
  static constexpr int kBBytes = kBN * kRowBytes;             // 2048 / 1024
  static constexpr int kSBytes = 2 * kBN * kGroupsPerTile * 4;  // scales + zeros: 1024
  static constexpr int kLBytes = RP * kBK * 2;                // rows of A (fused down-projection): 0 / 2 / 4 / 8 KB
  static constexpr int kStageBytes = kABytes + kBBytes + kSBytes + kLBytes;
  static constexpr int kXaLd = RP + 4;                        // fp32 xa tile after the main loop (reuses the stages)
  static constexpr int kSmem = kStages * kStageBytes > kBM * kXaLd * 4 ? kStages * kStageBytes : kBM * kXaLd * 4;
  // the kernel's static __shared__ (s_lut: one 256-entry table per decode plane) counts against the same
  // per-block limit as the dynamic kSmem (48 KiB without the opt-in)
  static constexpr int kStaticSmem = (kInt ? 1 : kPlanes) * 256 * 4;
  // 16-bit images of 1.0 and of the magic bias
  static constexpr uint32_t kOne = std::is_same<T, __half>::value ? 0x3C003C00u : 0x3F803F80u;
  static constexpr uint32_t kMagic = std::is_same<T, __half>::value ? 0x64006400u : 0x43004300u;   // 1024 | 128
  static constexpr uint32_t kNegMagic = std::is_same<T, __half>::value ? 0xE400E400u : 0xC300C300u;  // −1024 | −128
};

template <class T>
SIMT_DEVICE uint32_t hadd2_bits(uint32_t a, uint32_t b) {
  if constexpr (std::is_same<T, __half>::value) {
    __half2 x, y, r;
    memcpy(&x, &a, 4); memcpy(&y, &b, 4);
    r = __hadd2(x, y);
    uint32_t u; memcpy(&u, &r, 4);
    return u;
  } else {
    __nv_bfloat162 x, y, r;
    memcpy(&x, &a, 4); memcpy(&y, &b, 4);
    r = __hadd2(x, y);
    uint32_t u; memcpy(&u, &r, 4);
    return u;
  }
}

// Two codes (`pair`: 4-bit formats a byte, int2 a nibble; the first element in the high bits) →
// B register {first, second} as two 16-bit q, exactly, via the magic-number trick.
template <Fmt F, class T>
SIMT_DEVICE uint32_t decode_int_pair(uint32_t pair) {
  using C = MmaCfg<F, T>;
  constexpr int kB = fmt_bits(F);
  constexpr uint32_t kMask = kB == 4 ? 0x000F000Fu : 0x00030003u;
  const uint32_t w = (pair >> kB) | (pair << 16);               // first code in bits 0.., second in 16..
  const uint32_t biased = simt::lop3<(0xF0 & 0xCC) | 0xAA>(w, kMask, C::kMagic);  // (w & mask) | magic
  return hadd2_bits<T>(biased, C::kNegMagic);
}

template <Fmt F, class T, int RP>
__global__ void __launch_bounds__(kMmaThreads, 2) gemm_mma_kernel(GemmParams p, LrEpi lr) {
  using C = MmaCfg<F, T, RP>;
  static_assert(RP == 0 || RP == 16 || RP == 32 || RP == 64, "fused down-projection width");
  constexpr int kNd = RP / 16;  // n8 tiles of xa per warp: warps wn = 0 / 1 take j < RP/2 / ≥ RP/2
  constexpr int kLutPlanes = C::kInt ? 1 : C::kPlanes;
  __shared__ uint32_t s_lut[kLutPlanes][256];
  static_assert(sizeof(s_lut) == C::kStaticSmem, "MmaCfg::kStaticSmem counts s_lut for the launch check");
  SIMT_DYNAMIC_SHARED(unsigned char, smem);

  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, t = lane & 3;
  const int64_t M = p.m, N = p.w.n, K = p.w.k;
  const int64_t m_base = int64_t(blockIdx.y) * kBM, n_base = int64_t(blockIdx.x) * kBN;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const uint8_t* __restrict__ codes = p.w.codes;
  const int64_t row_bytes = K * C::kBits / 8, bpr = K / p.w.block;
  const float post = 1.0f / C::kPre;  // exact for 1 and 1024; fl(1/12) for fp4

  if constexpr (!C::kInt) {  // pair tables: entry b = {plane(value of b >> 4), plane(value of b & 15)}
    for (int i = tid; i < 256; i += kMmaThreads) {
      float r0 = __fmul_rn((F == Fmt::nf4 ? c_nf4 : c_fp4)[i >> 4], C::kPre);
      float r1 = __fmul_rn((F == Fmt::nf4 ? c_nf4 : c_fp4)[i & 15], C::kPre);
#pragma unroll
      for (int pl = 0; pl < C::kPlanes; ++pl) {
        const uint32_t h0 = f32_to_b16<T>(r0), h1 = f32_to_b16<T>(r1);
        s_lut[pl][i] = h0 | (h1 << 16);
        r0 = __fsub_rn(r0, b16_to_f32<T>(h0));  // exact: the residual of a round-to-nearest
        r1 = __fsub_rn(r1, b16_to_f32<T>(h1));
      }
    }
  }  // published by the first __syncthreads of the main loop

  auto stage_a = [&](int st) { return smem + st * C::kStageBytes; };
  auto stage_b = [&](int st) { return smem + st * C::kStageBytes + C::kABytes; };
  auto stage_s = [&](int st) { return reinterpret_cast<float*>(smem + st * C::kStageBytes + C::kABytes + C::kBBytes); };
  auto stage_l = [&](int st) { return smem + st * C::kStageBytes + C::kABytes + C::kBBytes + C::kSBytes; };

  auto load_stage = [&](int st, int64_t kt) {
    const int64_t k0 = kt * kBK;
    unsigned char* as = stage_a(st);
    for (int i = tid; i < kBM * (kBK / 8); i += kMmaThreads) {  // x: 64 rows × 8 chunks of 16 B
      const int r = i >> 3, ch = i & 7;
      const int64_t m = m_base + r, kk = k0 + ch * 8;
      const bool ok = m < M && kk < K;
      simt::cp_async16_zfill(as + r * (kBK * 2) + ((ch ^ (r & 7)) << 4), ok ? x + m * K + kk : x, ok ? 16 : 0);
    }
    unsigned char* bs = stage_b(st);
    constexpr int kCh = C::kRowBytes / 16;  // 16-byte chunks per row: 2 (4-bit) / 1 (2-bit)
    for (int i = tid; i < kBN * kCh; i += kMmaThreads) {
      const int r = i / kCh, ch = i % kCh;
      const int64_t n = n_base + r;
      const bool ok = n < N && k0 + ch * (128 / C::kBits) < K;
      simt::cp_async16_zfill(bs + r * C::kRowBytes + ch * 16,
                             ok ? codes + n * row_bytes + k0 * C::kBits / 8 + ch * 16 : codes, ok ? 16 : 0);
    }
    {  // decoded scale (and zero) of (row tid / 2, 32-group tid % 2)
      const int r = tid >> 1, gi = tid & 1;
      const int64_t n = n_base + r, kg = k0 + 32 * gi;
      float s = 0.0f, z = 0.0f;
      if (n < N && kg < K) {
        const int64_t b = n * bpr + kg / p.w.block;
        s = __fmul_rn(block_scale(p.w, b), post);
        if constexpr (C::kInt) z = __ldg(p.w.zero + b);
      }
      float* ss = stage_s(st);
      ss[r * kGroupsPerTile + gi] = s;
      ss[kBN * kGroupsPerTile + r * kGroupsPerTile + gi] = z;
    }
    if constexpr (RP > 0) {  // A: RP rows × 8 chunks of 16 B, swizzled like x; rows ≥ r are zeros
      const T* __restrict__ am = static_cast<const T*>(lr.a);
      unsigned char* ls = stage_l(st);
      for (int i = tid; i < RP * (kBK / 8); i += kMmaThreads) {
        const int j = i >> 3, ch = i & 7;
        const int64_t kk = k0 + ch * 8;
        const bool ok = j < lr.r && kk < K;
        simt::cp_async16_zfill(ls + j * (kBK * 2) + ((ch ^ (j & 7)) << 4), ok ? am + j * K + kk : am, ok ? 16 : 0);
      }
    }
  };

  float acc[2][4][4], cb[2][4][4], rs[2][4];
  float xd[2][kNd > 0 ? kNd : 1][4];  // fused down-projection: rows of this warp × its n8 tiles of j
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = cb[mi][ni][e] = 0.0f;
#pragma unroll
    for (int e = 0; e < 4; ++e) rs[mi][e] = 0.0f;
#pragma unroll
    for (int jt = 0; jt < (kNd > 0 ? kNd : 1); ++jt)
#pragma unroll
      for (int e = 0; e < 4; ++e) xd[mi][jt][e] = 0.0f;
  }
  const uint32_t ones[2] = {C::kOne, C::kOne};

  const int64_t KT = (K + kBK - 1) / kBK;
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < KT) load_stage(st, st);
    simt::cp_async_commit();
  }
  for (int64_t kt = 0; kt < KT; ++kt) {
    simt::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed for every thread; stage kt - 1 is free for the prefetch
    if (kt + kStages - 1 < KT) load_stage(int((kt + kStages - 1) % kStages), kt + kStages - 1);
    simt::cp_async_commit();

    const int st = int(kt % kStages);
    const unsigned char* as = stage_a(st);
    const unsigned char* bs = stage_b(st);
    const float* ss = stage_s(st);
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      uint32_t a[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {  // ldmatrix.x4: matrices (rows 0-7 | 8-15) × (k 0-7 | 8-15)
        const int r = wm * 32 + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int ch = ks * 2 + (lane >> 4);
        simt::ldmatrix<4>(a[mi], as + r * (kBK * 2) + ((ch ^ (r & 7)) << 4));
      }
      if constexpr (RP > 0) {  // xa += x · Aᵀ: A rows are the B operand (k-contiguous, as ldmatrix gives it)
        const unsigned char* ls = stage_l(st);
        const int ch = ks * 2 + ((lane >> 3) & 1);
        if constexpr (kNd == 1) {
          uint32_t bl[2];
          const int j = wn * (RP / 2) + (lane & 7);
          simt::ldmatrix<2>(bl, ls + j * (kBK * 2) + ((ch ^ (j & 7)) << 4));
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) simt::mma_m16n8k16<T>(xd[mi][0], a[mi], bl, xd[mi][0]);
        } else {
#pragma unroll
          for (int jt = 0; jt < kNd; jt += 2) {  // x4: (j tile jt | jt + 1) × (k 0-7 | 8-15)
            uint32_t bl[4];
            const int j = wn * (RP / 2) + jt * 8 + ((lane >> 4) << 3) + (lane & 7);
            simt::ldmatrix<4>(bl, ls + j * (kBK * 2) + ((ch ^ (j & 7)) << 4));
            const uint32_t b0[2] = {bl[0], bl[1]}, b1[2] = {bl[2], bl[3]};
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
              simt::mma_m16n8k16<T>(xd[mi][jt], a[mi], b0, xd[mi][jt]);
              simt::mma_m16n8k16<T>(xd[mi][jt + 1], a[mi], b1, xd[mi][jt + 1]);
            }
          }
        }
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const unsigned char* cr = bs + (wn * 32 + ni * 8 + g) * C::kRowBytes;
        uint32_t p0, p1;  // codes of k = 2t, 2t+1 and 2t+8, 2t+9 of this k16 step
        if constexpr (C::kBits == 4) {
          p0 = cr[ks * 8 + t];
          p1 = cr[ks * 8 + t + 4];
        } else {
          const int sh = (t & 1) ? 0 : 4;
          p0 = (uint32_t(cr[ks * 4 + (t >> 1)]) >> sh) & 15u;
          p1 = (uint32_t(cr[ks * 4 + 2 + (t >> 1)]) >> sh) & 15u;
        }
#pragma unroll
        for (int pl = 0; pl < C::kPlanes; ++pl) {
          uint32_t b[2];
          if constexpr (C::kInt) {
            b[0] = decode_int_pair<F, T>(p0);
            b[1] = decode_int_pair<F, T>(p1);
          } else {
            b[0] = s_lut[pl][p0];
            b[1] = s_lut[pl][p1];
          }
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) simt::mma_m16n8k16<T>(cb[mi][ni], a[mi], b, cb[mi][ni]);
        }
      }
      if constexpr (C::kInt) {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) simt::mma_m16n8k16<T>(rs[mi], a[mi], ones, rs[mi]);  // Σx per row
      }
      if (ks & 1) {  // a 32-group is complete: acc += s · (Σ x·q − z · Σ x), per column
        const int gi = ks >> 1;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int col = wn * 32 + ni * 8 + 2 * t;
          const float s0 = ss[col * kGroupsPerTile + gi], s1 = ss[(col + 1) * kGroupsPerTile + gi];
          float z0 = 0.0f, z1 = 0.0f;
          if constexpr (C::kInt) {
            z0 = ss[kBN * kGroupsPerTile + col * kGroupsPerTile + gi];
            z1 = ss[kBN * kGroupsPerTile + (col + 1) * kGroupsPerTile + gi];
          }
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float s = (e & 1) ? s1 : s0;
              float v = cb[mi][ni][e];
              if constexpr (C::kInt) v = __fmaf_rn(-((e & 1) ? z1 : z0), rs[mi][e], v);
              acc[mi][ni][e] = __fmaf_rn(s, v, acc[mi][ni][e]);
              cb[mi][ni][e] = 0.0f;
            }
          }
        }
        if constexpr (C::kInt) {
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int e = 0; e < 4; ++e) rs[mi][e] = 0.0f;
        }
      }
    }
  }
  simt::cp_async_wait_all();

  // Fused down-projection: the two warps of a row half hold xa for half of j each; swap through
  // shared memory (the pipeline's, now free) as a 64 × RP fp32 tile; rows ≥ M and j ≥ r are zeros.
  float* s_xa = reinterpret_cast<float*>(smem);
  if constexpr (RP > 0) {
    __syncthreads();  // every warp is done with the last stage
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int jt = 0; jt < kNd; ++jt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s_xa[(wm * 32 + mi * 16 + g + 8 * (e >> 1)) * C::kXaLd + wn * (RP / 2) + jt * 8 + 2 * t + (e & 1)] = xd[mi][jt][e];
    __syncthreads();
    if (blockIdx.x == 0) {  // one CTA per row block stores xa (every CTA of the row computed the same bits)
      T* __restrict__ xo = static_cast<T*>(lr.xa_out);
      for (int i = tid; i < kBM * lr.r; i += kMmaThreads) {
        const int rl = i / lr.r, j = i % lr.r;
        if (m_base + rl < M) xo[(m_base + rl) * lr.r + j] = from_f32<T>(s_xa[rl * C::kXaLd + j]);
      }
    }
  }

  if (lr.r > 0) {  // low-rank up-projection on the tensor cores: cb (all zero here) += xa · Bᵀ
    // xa is fp32: split into 3 planes of T that sum to it (exact for bf16; fp16 to ~2^-33 relative
    // unless |xa| leaves the fp16 range), so the branch adds only fp32-accumulation error.
    const T* __restrict__ bm = static_cast<const T*>(lr.b);
    auto xa_at = [&](int64_t m, int j) {
      if constexpr (RP > 0) return s_xa[(m - m_base) * C::kXaLd + j];  // j < RP; zero for j ≥ r
      else return (m < M && j < lr.r) ? __ldg(lr.xa + m * lr.r + j) : 0.0f;
    };
    auto b_bits = [&](int64_t n, int j) -> uint32_t {
      if (n >= N || j >= lr.r) return 0u;
      T v = bm[n * lr.r + j];
      unsigned short u; memcpy(&u, &v, 2);
      return u;
    };
    for (int j0 = 0; j0 < lr.r; j0 += 16) {
      uint32_t a[2][3][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int64_t m_lo = m_base + wm * 32 + mi * 16 + g;
#pragma unroll
        for (int q = 0; q < 4; ++q) {  // a[q]: rows g (+8 for odd q), k pair 2t (+8 for q >= 2)
          const int64_t m = m_lo + 8 * (q & 1);
          const int j = j0 + 2 * t + 8 * (q >> 1);
          float v0 = xa_at(m, j), v1 = xa_at(m, j + 1);
#pragma unroll
          for (int pl = 0; pl < 3; ++pl) {
            const uint32_t h0 = f32_to_b16<T>(v0), h1 = f32_to_b16<T>(v1);
            a[mi][pl][q] = h0 | (h1 << 16);
            v0 = __fsub_rn(v0, b16_to_f32<T>(h0));
            v1 = __fsub_rn(v1, b16_to_f32<T>(h1));
          }
        }
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int64_t n = n_base + wn * 32 + ni * 8 + g;
        const int j = j0 + 2 * t;
        const uint32_t b[2] = {b_bits(n, j) | (b_bits(n, j + 1) << 16), b_bits(n, j + 8) | (b_bits(n, j + 9) << 16)};
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int pl = 0; pl < 3; ++pl) simt::mma_m16n8k16<T>(cb[mi][ni], a[mi][pl], b, cb[mi][ni]);
      }
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] = __fmaf_rn(lr.s, cb[mi][ni][e], acc[mi][ni][e]);
  }

  // Epilogue: C fragment rows g, g + 8, columns 2t, 2t + 1 of each tile; bias in fp32; one rounding.
  T* __restrict__ y = static_cast<T*>(p.y);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m_base + wm * 32 + mi * 16 + g + 8 * h;
        const int64_t n = n_base + wn * 32 + ni * 8 + 2 * t;
        if (m >= M) continue;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (n + e >= N) continue;
          float v = acc[mi][ni][2 * h + e];
          if (bias) v = __fadd_rn(v, to_f32(bias[n + e]));
          y[m * N + n + e] = from_f32<T>(v);
        }
      }
}

// ============================================================================ gemm_t_kernel
// gx (M, K) = gy (M, N) · dequant(W). A CTA owns a 64-wide K slice and MR rows of gy; lane
// (kl = lane % 8) covers 8 consecutive k, and the 16 lane groups of the CTA (4 per warp) split N
// (n ≡ group mod 16). Each lane group reads 32 contiguous bytes of a weight row per n (one sector),
// decodes them exactly as `dequantize` does (table[q]·s or (q − z)·s, fp32, no FMA), and does
// MR × 8 FMAs with gy[m][n] broadcast. Reduction over the 16 groups: two xor-shuffles inside the
// warp, then the 4 warps in order through shared memory — deterministic.
//
// Roofline: the backward reads the weight once per 8 rows of gy (from L2 after the first), so at
// M ≤ 8 it streams 0.56 B/weight like the forward; the decode is ~4 ops/weight (shift, and, table
// or sub, mul) plus M FMAs: at M = 1 ≈ 50-60% of HBM bandwidth expected (the decode is per weight
// and not shared across a warp's lanes), and FMA-bound for M ≥ 8 (≈ 67 TFLOP/s fp32 at best).
// Correctness first: a tensor-core gemm_t (B = W in the k-major direction of the mma, i.e. two rows
// of W per register) is future work.
constexpr int kTThreads = 128, kTK = 64, kTGroups = kTThreads / 8;

template <Fmt F, class T, int MR>
__global__ void __launch_bounds__(kTThreads, 2) gemm_t_kernel(GemmParams p, int codes_vec) {
  constexpr bool kTable = fmt_is_table(F);
  constexpr int kBits = fmt_bits(F);
  __shared__ float s_tab[16];
  __shared__ float s_red[kTThreads / 32][MR][kTK];
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int kl = lane & 7, grp = tid >> 3;  // grp = warp * 4 + lane / 8
  const int64_t N = p.w.n, K = p.w.k, bpr = K / p.w.block;
  const int64_t k = int64_t(blockIdx.x) * kTK + kl * 8;
  const int64_t m0 = int64_t(blockIdx.y) * MR;
  const int rows = p.m - m0 < MR ? int(p.m - m0) : MR;
  const T* __restrict__ gy = static_cast<const T*>(p.x) + m0 * N;
  if (kTable && tid < 16) s_tab[tid] = (F == Fmt::nf4 ? c_nf4 : c_fp4)[tid];
  __syncthreads();
  float acc[MR][8];
#pragma unroll
  for (int r = 0; r < MR; ++r)
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.0f;
  if (k < K) {
    for (int64_t n = grp; n < N; n += kTGroups) {
      uint32_t wd;  // 8 codes: 4 bytes (4-bit) or 2 bytes (2-bit), little-endian
      const uint8_t* src = p.w.codes + n * (K * kBits / 8) + k * kBits / 8;
      if (codes_vec) {
        if constexpr (kBits == 4) wd = __ldg(reinterpret_cast<const uint32_t*>(src));
        else wd = uint32_t(__ldg(reinterpret_cast<const uint16_t*>(src)));
      } else {
        wd = 0;
#pragma unroll
        for (int i = 0; i < kBits; ++i) wd |= uint32_t(__ldg(src + i)) << (8 * i);  // 4 or 2 bytes
      }
      const int64_t b = n * bpr + k / p.w.block;
      const float s = block_scale(p.w, b);
      float z = 0.0f;
      if constexpr (!kTable) z = __ldg(p.w.zero + b);
      float w[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        uint32_t q;
        if constexpr (kBits == 4) q = (wd >> (8 * (e / 2) + ((e & 1) ? 0 : 4))) & 15u;
        else q = (wd >> (8 * (e / 4) + 6 - 2 * (e & 3))) & 3u;
        w[e] = kTable ? __fmul_rn(s_tab[q], s) : __fmul_rn(__fsub_rn(float(q), z), s);
      }
#pragma unroll
      for (int r = 0; r < MR; ++r) {
        if (r < rows) {
          const float gv = to_f32(gy[r * N + n]);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[r][e] = __fmaf_rn(gv, w[e], acc[r][e]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < MR; ++r)
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      acc[r][e] = __fadd_rn(acc[r][e], __shfl_xor_sync(0xffffffffu, acc[r][e], 8));
      acc[r][e] = __fadd_rn(acc[r][e], __shfl_xor_sync(0xffffffffu, acc[r][e], 16));
    }
  if (lane < 8) {
#pragma unroll
    for (int r = 0; r < MR; ++r)
#pragma unroll
      for (int e = 0; e < 8; ++e) s_red[warp][r][kl * 8 + e] = acc[r][e];
  }
  __syncthreads();
  T* __restrict__ gx = static_cast<T*>(p.y) + m0 * K;
  for (int i = tid; i < MR * kTK; i += kTThreads) {
    const int r = i / kTK, kk = i % kTK;
    const int64_t kg = int64_t(blockIdx.x) * kTK + kk;
    if (r >= rows || kg >= K) continue;
    float v = s_red[0][r][kk];
    for (int w = 1; w < kTThreads / 32; ++w) v = __fadd_rn(v, s_red[w][r][kk]);
    gx[r * K + kg] = from_f32<T>(v);
  }
}

}  // namespace gemm_k
}  // namespace lowbit::kernels
