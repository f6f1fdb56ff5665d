// csrc/kernels/hadamard.cuh — the hadamard family on CUDA: out = x · H_n · scale per row
// (H_nᵀ when transposed), n = m · L, L = 2^k, H_n = H_m ⊗ H_L (include/lowbit/hadamard.h).
//
// One row per CTA (or R rows for small n: blockDim = (n / EPT, R)); thread (a, u) of a row owns
// EPT contiguous elements of sub-row a, i.e. element index bits of a sub-row are
//     [0, e) in-thread (EPT = 2^e)  |  [e, e+5) lane  |  [e+5, e+5+w) warp within the sub-row
// and the WHT of a sub-row is: e butterfly stages in registers, min(5, log2(L/EPT)) warp-shuffle
// stages, then (w > 0 only, L > 32·EPT) one shared-memory transpose that brings the warp bits into
// registers (w ≤ e by the choice of EPT), w stages there, and the transpose back. For m > 1 the
// sub-rows meet in shared memory for the dense H_m mix: each thread sums m signed values per
// output (signs from a __constant__ bit table, warp-uniform when L ≥ 32·EPT).
//
// Shared memory holds fp32 at position i + i / 32 (a pad word per 32): every 4-byte access of this
// kernel is conflict-free — in each instruction the 32 lanes differ in the 5 index bits [e, e+5)
// (e ≤ 5), and lane t's word lands in bank (t · 2^e + t · 2^e / 32 + const) mod 32, all distinct.
//
// Roofline (A100-40GB: ~1.5 TB/s HBM, ~19.5 T fp32 lane-op/s; H100 SXM ~3.3 TB/s, ~60 T):
//   bytes: read + write each element once, 2·sizeof(T)·n per row (bf16: 4 B/element).
//   lane-ops per element: log2(L) add/sub + ~2 per shuffle stage + (m > 1) m adds of the mix.
//   bf16, m = 1, n = 4096: 12 + 10 + conversions ≈ 30 ops/element against 4 B/element ->
//   7.5 ops/B vs the A100 balance of ~13 ops/B: memory-bound (same for fp32, 2x fewer ops/B).
//   m = 28: +28 ops/element -> ~15 ops/B: at the balance point; m = 172 is compute-bound (~50 ops/B).
#pragma once
#include "kernels/common.cuh"
#include "lowbit/hadamard.h"

namespace lowbit::kernels {

constexpr int kHadamardMaxThreads = 1024;
constexpr int kHadamardSmemBytes = 101376;  // 99 KB: the opt-in maximum of sm_86 / sm_89

// The H_m sign bits (bit j of row i set when H_m[i][j] = -1), one private copy per translation unit.
static __constant__ hadamard_detail::SignTable c_hadamard_signs = kHadamardSigns;

// Shared-memory position of row element i: one pad float per 32. For base a multiple of 2^e
// (e ≤ 5) and j < 2^e, base + j stays in one aligned group of 32, so had_pad(base + j) ==
// had_pad(base) + j: one base register and immediate offsets (an XOR swizzle needed one address
// register per element and spilled at the 64 registers of a 1024-thread CTA).
__device__ __forceinline__ int had_pad(int i) { return i + (i >> 5); }

// EPT contiguous elements <-> registers; 16-byte accesses when the launcher found them aligned.
template <class T, int EPT>
__device__ __forceinline__ void had_load(float (&v)[EPT], const T* p, bool vec) {
  constexpr int kPer16 = 16 / sizeof(T);
  if constexpr (EPT % kPer16 == 0) {
    if (vec) {
#pragma unroll
      for (int c = 0; c < EPT / kPer16; ++c) {
        const uint4 q = *reinterpret_cast<const uint4*>(p + c * kPer16);
        const T* e = reinterpret_cast<const T*>(&q);
#pragma unroll
        for (int j = 0; j < kPer16; ++j) v[c * kPer16 + j] = to_f32(e[j]);
      }
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < EPT; ++j) v[j] = to_f32(p[j]);
}
template <class T, int EPT>
__device__ __forceinline__ void had_store(T* p, const float (&v)[EPT], float scale, bool vec) {
  constexpr int kPer16 = 16 / sizeof(T);
  if constexpr (EPT % kPer16 == 0) {
    if (vec) {
#pragma unroll
      for (int c = 0; c < EPT / kPer16; ++c) {
        uint4 q;
        T* e = reinterpret_cast<T*>(&q);
#pragma unroll
        for (int j = 0; j < kPer16; ++j) e[j] = from_f32<T>(v[c * kPer16 + j] * scale);
        *reinterpret_cast<uint4*>(p + c * kPer16) = q;
      }
      return;
    }
  }
#pragma unroll
  for (int j = 0; j < EPT; ++j) p[j] = from_f32<T>(v[j] * scale);
}

// In-register stages over the slot bits h < limit (h, limit powers of two; limit ≤ EPT).
template <int EPT>
__device__ __forceinline__ void had_regs(float (&v)[EPT], int limit) {
#pragma unroll
  for (int h = 1; h < EPT; h *= 2) {
    if (h >= limit) break;
#pragma unroll
    for (int j = 0; j < EPT; ++j)
      if (!(j & h)) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
  }
}

// blockDim = (m · L / EPT, rows per CTA). Shared memory: blockDim.y · had_pad(n / H) floats when
// W > 0 or m > 1, else none. W = log2(L / (32 · EPT)) when positive, else 0. H = 2 (two rounds over
// half rows) when a whole row would not fit kHadamardSmemBytes; it needs EPT = 32 and L ≥ 1024.
template <class T, int EPT, int W, int H>
__global__ void __launch_bounds__(kHadamardMaxThreads)
hadamard_kernel(HadamardParams p, int m, int log2_l, bool vec) {
  static_assert((EPT & (EPT - 1)) == 0 && EPT <= 32, "EPT is a power of two <= 32");
  constexpr int e = EPT >= 32 ? 5 : EPT >= 16 ? 4 : EPT >= 8 ? 3 : EPT >= 4 ? 2 : EPT >= 2 ? 1 : 0;
  const int n = p.n, l = 1 << log2_l;
  const int tl = l / EPT;                        // threads per sub-row
  const int tid = threadIdx.x, a = tid / tl, u = tid % tl;
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = row < p.rows;
  const T* x = static_cast<const T*>(p.x) + (live ? row : 0) * n;
  T* out = static_cast<T*>(p.out) + (live ? row : 0) * n;

  float v[EPT];
  if (live) had_load<T, EPT>(v, x + a * l + u * EPT, vec);
  else
#pragma unroll
    for (int j = 0; j < EPT; ++j) v[j] = 0.0f;

  // 1. bits [0, e): in registers
  had_regs<EPT>(v, EPT);

  // 2. lane bits: butterflies with the partner lane ^ s (tl is a power of two and sub-rows start
  // at multiples of tl, so partners stay in the sub-row). The last warp of a CTA may be partial.
  const int lin = threadIdx.y * blockDim.x + tid, warp_base = lin & ~31;
  const int nthreads = blockDim.x * blockDim.y;
  const unsigned mask = nthreads - warp_base >= 32 ? 0xffffffffu : (1u << (nthreads - warp_base)) - 1u;
  for (int s = 1; s < tl && s < 32; s *= 2) {
    const bool upper = u & s;
#pragma unroll
    for (int j = 0; j < EPT; ++j) {
      const float o = __shfl_xor_sync(mask, v[j], s);
      v[j] = upper ? o - v[j] : v[j] + o;
    }
  }

  // Shared memory holds the row, or (H = 2) half of it at a time: the elements whose index bit
  // e + 4 (lane bit 4, which no exchange below moves) equals the round, positions compacted by
  // dropping that bit. Rounds keep a 32768-float row under the 99 KB of sm_86/sm_89.
  SIMT_DYNAMIC_SHARED(float, smem);
  float* srow = smem + threadIdx.y * had_pad(n / H);
  constexpr int sbit = e + 4;
  auto pos = [&](int i) {
    if constexpr (H == 2) i = (i & ((1 << sbit) - 1)) | ((i >> (sbit + 1)) << sbit);
    return had_pad(i);
  };
  const int half = H == 2 ? (u >> 4) & 1 : 0;  // this thread's round (its index bit e + 4)

  // 3. warp bits (W > 0: L = 2^(e+5+W)): transpose through shared memory so that they become slot
  // bits. Slot j = jw + (jl << W) of thread (wp, ln) holds sub-row element
  // f + (ln << e) + (jw << (e + 5)) with f = wp + (jl << W); W ≤ e, all slot math compile-time.
  if constexpr (W > 0) {
    static_assert(EPT == 32 && W <= e, "W > 0 only with EPT = 32; the warp bits must fit in the slots");
    const int ln = u & 31, wp = u >> 5;
    float* own = srow + pos(a * l + u * EPT);
    // pos(a·l + (ln << 5) + (jw << 10) + f) = tb + jw · kStride + f   (f < 32, l ≥ 2048)
    constexpr int kStride = H == 2 ? 528 : 1056;
    float* tb = srow + pos(a * l + (ln << 5));
#pragma unroll
    for (int r = 0; r < H; ++r) {
      if (half == r) {
#pragma unroll
        for (int j = 0; j < EPT; ++j) own[j] = v[j];
      }
      __syncthreads();
      if (half == r) {
#pragma unroll
        for (int jl = 0; jl < EPT >> W; ++jl) {
          const float* y = tb + wp + (jl << W);
#pragma unroll
          for (int jw = 0; jw < (1 << W); ++jw) v[jw + (jl << W)] = y[jw * kStride];
        }
      }
      __syncthreads();  // everyone has read before anyone overwrites
    }
    had_regs<EPT>(v, 1 << W);
#pragma unroll
    for (int r = 0; r < H; ++r) {
      if (half == r) {
#pragma unroll
        for (int jl = 0; jl < EPT >> W; ++jl) {
          float* y = tb + wp + (jl << W);
#pragma unroll
          for (int jw = 0; jw < (1 << W); ++jw) y[jw * kStride] = v[jw + (jl << W)];
        }
      }
      __syncthreads();
      if (m == 1 && half == r) {  // m > 1 (only with H = 1) keeps the row in smem for the mix
#pragma unroll
        for (int j = 0; j < EPT; ++j) v[j] = own[j];
      }
      if (H == 2) __syncthreads();
    }
  }

  // 4. the dense H_m mix: y[a] = Σ_b x[b] · H[b][a]  (H[a][b] when transposed); with H = 2 in two
  // rounds over the column halves (the mix never mixes columns).
  if (m > 1) {
    const uint32_t* tab = c_hadamard_signs.w + hadamard_detail::table_offset(m);
    const int wpr = hadamard_detail::words_per_row(m);
    const int col = u * EPT;
#pragma unroll
    for (int r = 0; r < H; ++r) {
      if (W == 0) {  // W > 0 left the transformed row in smem already
        if (half == r) {
          float* own = srow + pos(a * l + col);
#pragma unroll
          for (int j = 0; j < EPT; ++j) own[j] = v[j];
        }
        __syncthreads();
      }
      if (half == r) {
#pragma unroll
        for (int j = 0; j < EPT; ++j) v[j] = 0.0f;
        for (int b = 0; b < m; ++b) {
          const uint32_t bit = p.transpose ? (tab[a * wpr + b / 32] >> (b % 32)) & 1u
                                           : (tab[b * wpr + a / 32] >> (a % 32)) & 1u;
          const float* src = srow + pos(b * l + col);
#pragma unroll
          for (int j = 0; j < EPT; ++j) {
            const float xv = src[j];
            v[j] = bit ? v[j] - xv : v[j] + xv;
          }
        }
      }
      if (H == 2) __syncthreads();
    }
  }
  if (live) had_store<T, EPT>(out + a * l + u * EPT, v, p.scale, vec);
}

}  // namespace lowbit::kernels
