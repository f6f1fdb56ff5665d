// lowbit/lowrank.h — the `lowrank` family contract: a packed low-bit GEMM with a low-rank branch,
//
//   y (m, n)  = x (m, k) · dequant(W)ᵀ + s · (x · Aᵀ) · Bᵀ (+ bias)     A (r, k), B (n, r), 1 ≤ r ≤ 256
//   xa (m, r) = x · Aᵀ                                                  (also returned: the backward needs it)
//
// x, A, B, bias, y and xa share one dtype (fp32 / bf16 / fp16); accumulation is fp32, and the
// up-projection uses xa in fp32 (not rounded to the dtype). The spec is
// python/lowbit/reference.py::lowrank_ref; the weight is a GemmWeight as in gemm.h.
#pragma once
#include <cstdint>

#include "lowbit/gemm.h"

namespace lowbit {

struct LowrankParams {
  GemmParams g;     // x, y, bias, dtype, m and the weight
  void* xa;         // (m, r) in dtype
  const void* a;    // (r, k) in dtype
  const void* b;    // (n, r) in dtype
  int32_t r;
  float s;
};

namespace cpu {  // csrc/cpu/lowrank.cpp (the gemm kernels with the branch fused in)
void lowrank(const LowrankParams& p);
}  // namespace cpu
namespace kernels {  // csrc/launch/lowrank.inl (CUDA; nvcc and simt)
int lowrank(const LowrankParams& p, intptr_t stream);
}  // namespace kernels

}  // namespace lowbit
