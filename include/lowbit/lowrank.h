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

// The backward of lowrank in one call (CPU, the bf16 matrix engines only: gemm_route(dtype, m, true) is
// 'avx512bf16', 'amx' or 'amx_emulated'), with u = s · gy · B + gxa (M, r):
//
//   gx (m, k) = gy · dequant(W) + bf16(u) · A      (g.x = gy (m, n), g.y = gx in dtype; null: not wanted)
//   ga (r, k) = uᵀ · x                             fp32 (u as bf16 hi + lo: ≈ 16 bits of it)
//   gb (n, r) = s · gyᵀ · xa                       fp32
//
// every product on the engine (bf16 operands, fp32 accumulation). gxa: the gradient of the xa output,
// or null. The spec is python/lowbit/ops/lowrank.py::_lowrank_backward's composition.
struct LowrankBackwardParams {
  GemmParams g;     // x = gy (m, n), y = gx (m, k) or null, no bias; dtype, m and the weight
  const void* x;    // (m, k) the forward's input, dtype
  const void* xa;   // (m, r) the forward's x · Aᵀ, dtype
  const void* gxa;  // (m, r) dtype, or null
  const void* a;    // (r, k) dtype
  const void* b;    // (n, r) dtype
  float* ga;        // (r, k)
  float* gb;        // (n, r)
  int32_t r;
  float s;
};

namespace cpu {  // csrc/cpu/lowrank.cpp (the gemm kernels with the branch fused in)
void lowrank(const LowrankParams& p);
void lowrank_backward(const LowrankBackwardParams& p);
}  // namespace cpu
namespace kernels {  // csrc/launch/lowrank.inl (CUDA; nvcc and simt)
int lowrank(const LowrankParams& p, intptr_t stream);
}  // namespace kernels

}  // namespace lowbit
