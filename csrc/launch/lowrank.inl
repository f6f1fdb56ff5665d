// csrc/launch/lowrank.inl — host launcher of the lowrank family (lowbit::kernels::lowrank, declared
// in include/lowbit/lowrank.h). Included by csrc/cuda/lowrank.cu in both builds.
//
// Two launches on one stream: lowrank_down_kernel (xa = x·Aᵀ in fp32 + in x's dtype), then the gemm
// kernels of csrc/launch/gemm.inl (gemm_with, defined in the gemm translation unit) with the
// up-projection y += s·xa·Bᵀ in their epilogue. fp32 x: the fp32 xa is the output buffer itself;
// bf16/fp16: a stream-ordered fp32 workspace of M·r·4 bytes (cudaMallocAsync / cudaFreeAsync;
// plain heap memory in the simulator, whose launches are synchronous).
// Instantiated: lowrank_down_kernel<T, MR> for 3 dtypes × MR ∈ {1, 8} = 6.
#pragma once
#include <cstdlib>

#include "kernels/gemm.cuh"  // LrEpi
#include "kernels/lowrank.cuh"

namespace lowbit::kernels {

int gemm_with(const GemmParams& p, const gemm_k::LrEpi& lr, intptr_t stream);  // csrc/launch/gemm.inl
bool lowrank_fusable(const GemmParams& p, int r, const void* a);                // csrc/launch/gemm.inl

namespace {
template <class T, int MR>
int lowrank_down(const LowrankParams& p, float* xa32, intptr_t stream) {
  const int64_t m = p.g.m, k = p.g.w.k;
  const int vec = aligned(p.g.x, 16) && aligned(p.a, 16);
  constexpr int64_t kMaxY = 65535;
  for (int64_t m0 = 0; m0 < m; m0 += kMaxY * MR) {
    const int64_t mm = m - m0 < kMaxY * MR ? m - m0 : kMaxY * MR;
    const int err = simt::launch(lowrank_k::lowrank_down_kernel<T, MR>, dim3(unsigned(p.r), unsigned((mm + MR - 1) / MR)),
                                 dim3(lowrank_k::kDownThreads), 0, stream,
                                 static_cast<const T*>(p.g.x) + m0 * k, static_cast<const T*>(p.a), xa32 + m0 * p.r,
                                 static_cast<T*>(p.xa) + m0 * p.r, mm, k, int(p.r), vec);
    if (err) return err;
  }
  return 0;
}

template <class T>
int lowrank_as(const LowrankParams& p, intptr_t stream) {
  if (lowrank_fusable(p.g, p.r, p.a))  // one launch: x · Aᵀ inside the mma main loop
    return gemm_with(p.g, gemm_k::LrEpi{nullptr, p.b, p.r, p.s, p.a, p.xa}, stream);
  float* xa32 = nullptr;
  const size_t bytes = size_t(p.g.m) * size_t(p.r) * sizeof(float);
  if constexpr (std::is_same<T, float>::value) {
    xa32 = static_cast<float*>(p.xa);
  } else {
#if defined(__CUDACC__)
    const int err = int(cudaMallocAsync(reinterpret_cast<void**>(&xa32), bytes, reinterpret_cast<cudaStream_t>(stream)));
    if (err) return err;
#else
    xa32 = static_cast<float*>(std::malloc(bytes));
    if (!xa32) return kErrMemoryAllocation;
#endif
  }
  int err = p.g.m == 1 ? lowrank_down<T, 1>(p, xa32, stream) : lowrank_down<T, 8>(p, xa32, stream);
  if (!err) err = gemm_with(p.g, gemm_k::LrEpi{xa32, p.b, p.r, p.s}, stream);
  if constexpr (!std::is_same<T, float>::value) {
#if defined(__CUDACC__)
    const int e2 = int(cudaFreeAsync(xa32, reinterpret_cast<cudaStream_t>(stream)));
    if (!err) err = e2;
#else
    std::free(xa32);
#endif
  }
  return err;
}
}  // namespace

int lowrank(const LowrankParams& p, intptr_t stream) {
  if (p.r < 1 || p.r > 256 || !p.a || !p.b || !p.xa) return p.g.m == 0 ? 0 : kErrInvalidValue;
  // gemm_with checks the rest; the block here too, since lowrank_down runs before it.
  if (p.g.m < 0 || p.g.w.k <= 0 || !gemm_block_ok(p.g.w.block) || p.g.w.k % p.g.w.block) return kErrInvalidValue;
  if (p.g.m == 0) return 0;
  switch (p.g.dtype) {
    case DType::f32: return lowrank_as<float>(p, stream);
    case DType::bf16: return lowrank_as<__nv_bfloat16>(p, stream);
    case DType::f16: return lowrank_as<__half>(p, stream);
  }
  return kErrInvalidValue;
}

}  // namespace lowbit::kernels
