// csrc/kernels/lowrank.cuh — the separate down-projection of the lowrank family: xa = x · Aᵀ (M, r),
// in fp32 for the up-projection and rounded to x's dtype for the caller. Used where the down-
// projection is not fused into the mma kernel (csrc/launch/lowrank.inl): the GEMV path (M ≤ 8 or
// fp32 x), r > 64, and A not 16-byte aligned. The up-projection y += s · xa · Bᵀ runs in the
// epilogue of the gemm kernels (LrEpi in csrc/kernels/gemm.cuh): on the tensor cores after the mma
// main loop (csrc/kernels/gemm_mma.cuh), or spread over the lanes of the GEMV's warps. The fused
// path (gemm_mma_kernel<F, T, RP>) and the roofline of both are in docs/kernels.md, "CUDA lowrank".
//
// One CTA per (j < r, MR rows of x): 8 warps split K, lanes take 8-element chunks (one 16-byte
// load of A and of each x row), fp32 FMAs, xor-shuffle + shared-memory reduction in warp order
// (deterministic).
//
// Roofline (H100, K = 4096, r = 16, bf16): A is r·K·2 = 128 KB (read once per 8 rows of x, from L2
// after the first), x is M·K·2 bytes read r times (from L1/L2). M = 1: 128 KB + 8 KB ≈ 0.05 µs of
// HBM; the dependent launch and the kernel's latency (≈ 2 µs assumed) dominate: ≈ +60% over a
// 3.5 µs 4096×4096 nf4 GEMV. Large M: M·r·K·2 fp32 FLOPs on the SIMT pipe plus r re-reads of x
// from L2 (M·K·2·r bytes: 268 MB at M = 512, r = 64) — which is why M > 8 fuses it into the mma
// kernel instead.
#pragma once
#include "kernels/common.cuh"
#include "lowbit/lowrank.h"

namespace lowbit::kernels {
namespace lowrank_k {

constexpr int kDownThreads = 256, kDownWarps = kDownThreads / 32;

template <class T, int MR>
__global__ void __launch_bounds__(kDownThreads, 2)
    lowrank_down_kernel(const T* __restrict__ x, const T* __restrict__ a, float* __restrict__ xa32,
                        T* __restrict__ xa, int64_t m, int64_t k, int r, int vec) {
  __shared__ float s_red[kDownWarps][MR];
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  const int j = int(blockIdx.x);
  const int64_t m0 = int64_t(blockIdx.y) * MR;
  const int rows = m - m0 < MR ? int(m - m0) : MR;
  const bool v = vec != 0;
  float acc[MR];
#pragma unroll
  for (int i = 0; i < MR; ++i) acc[i] = 0.0f;
  const int64_t n_chunks = k / 8;
  for (int64_t c = int64_t(warp) * 32 + lane; c < n_chunks; c += kDownThreads) {
    float av[8];
    load8(a + j * k + c * 8, v, av);
#pragma unroll
    for (int i = 0; i < MR; ++i) {
      if (i < rows) {
        float xv[8];
        load8(x + (m0 + i) * k + c * 8, v, xv);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i] = __fmaf_rn(xv[e], av[e], acc[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < MR; ++i)
    for (int o = 16; o > 0; o /= 2) acc[i] = __fadd_rn(acc[i], __shfl_xor_sync(0xffffffffu, acc[i], o));
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < MR; ++i) s_red[warp][i] = acc[i];
  }
  __syncthreads();
  if (int(threadIdx.x) < rows) {
    const int i = int(threadIdx.x);
    float sum = s_red[0][i];
    for (int w = 1; w < kDownWarps; ++w) sum = __fadd_rn(sum, s_red[w][i]);
    xa32[(m0 + i) * r + j] = sum;
    xa[(m0 + i) * r + j] = from_f32<T>(sum);
  }
}

}  // namespace lowrank_k
}  // namespace lowbit::kernels
