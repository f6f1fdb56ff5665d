// csrc/kernels/gemm.cuh — the gemm family on CUDA: y = x · dequant(W)ᵀ (+ bias) and
// gx = gy · dequant(W), W (N, K) in the canonical layout of include/lowbit/quant.h (no repack).
// Launchers (path choice, grids): csrc/launch/gemm.inl. Spec: python/lowbit/reference.py::gemm_ref.
//
// Three kernels:
//   gemv_kernel     small M (and every fp32 x): SIMT, 16-byte code loads, table in shared memory
//   gemm_mma_kernel M > 8, bf16/fp16 x: mma.m16n8k16 with weights decoded in registers
//                   (csrc/kernels/gemm_mma.cuh: sm_80 tensor cores)
//   gemm_t_kernel   the backward product, SIMT
//
// Numbers below use H100 SXM (3.35 TB/s HBM3, 132 SMs, 1.98 GHz boost; dense bf16 mma ≈ 990
// TFLOP/s, fp32 FMA ≈ 67 TFLOP/s) for a 4096×4096 weight with block 64: nf4 codes 8.39 MB +
// fp32 absmax 1 MB (double quant: 0.26 MB of uint8 + nested) — ≈ 0.56 B/weight with fp32 scales,
// 0.52 B with double quant; int4 adds the fp32 zero (0.63 B/weight); int2 0.38 B/weight. Estimates,
// not measurements: there is no GPU here, and no GPU timing is claimed anywhere in this project.
#pragma once
#include "kernels/common.cuh"
#include "lowbit/gemm.h"

namespace lowbit::kernels {
namespace gemm_k {

// Elements of one code load of the SIMT kernels: 32 codes = 16 bytes (4-bit) or 8 bytes (2-bit).
// Blocks (formats.h gemm_block_ok: powers of two from 32) start at multiples of 32, so such a
// chunk has ONE scale.
constexpr int kChunk = 32;

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
