// lowbit/optim.h — the `optim` family contract: one fused AdamW step per state precision.
//
// The spec is python/lowbit/reference.py (adamw_ref / adamw8bit_ref); the CPU kernels
// (csrc/cpu/optim*.cpp) and the CUDA kernels (csrc/kernels/optim.cuh) are bit-exact with it.
//
// One step, per element, every operation an IEEE fp32 operation in this order (no FMA):
//   p = p * decay                              decoupled weight decay, decay = 1 - lr * wd
//   m = m * beta1 + g * one_minus_beta1
//   v = v * beta2 + (g * one_minus_beta2) * g
//   d = sqrt(v) * inv_bc2_sqrt + eps           eps outside the sqrt, as torch.optim.AdamW
//   p = p + neg_step_size * (m / d)            neg_step_size = -lr / (1 - beta1^t)
// The scalars are computed once per step in double on the host (python/lowbit/optim: the
// same arithmetic as torch.optim.AdamW) and rounded to fp32.
//
// 8-bit state (bitsandbytes' blockwise scheme): blocks of kOptimBlock elements, m as codes of the
// signed dynamic map, v of the unsigned one, one fp32 absmax per block and state. Per block:
// dequantize (map[q] * absmax), update as above (p uses the fp32 m and v), new absmax = max |m|
// (resp. |v|) over the block, re-quantize with the exact rule of the quant family
// (Quantize8Params: x * (1 / max(absmax, 1e-38)), clamp to [-1, 1], nearest map entry, ties to the
// lower index), except that v > 0 never gets code 0 (it gets 1, the smallest nonzero entry: a v
// rounded to 0 under a nonzero m would make the step m / eps). Fresh state: codes of 0.0 (127
// signed, 0 unsigned) with absmax 0.
//
// The Python layer guarantees contiguous buffers of numel elements, dtypes as declared, numel > 0.
// Non-finite gradients are not checked (as in torch): they poison the element (32-bit) or its
// whole block (8-bit), never memory safety.
#pragma once
#include <cstdint>

#include "lowbit/formats.h"

namespace lowbit {

constexpr int kOptimBlock = 256;               // 8-bit state block (bitsandbytes' optimizer blocksize)
constexpr uint8_t kZeroCodeSigned = 127;       // kDynamicSigned[127] == 0.0f
constexpr uint8_t kZeroCodeUnsigned = 0;       // kDynamicUnsigned[0] == 0.0f

struct AdamWScalars {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float eps;
  float decay;          // 1 - lr * weight_decay
  float neg_step_size;  // -lr / (1 - beta1^step)
  float inv_bc2_sqrt;   // 1 / sqrt(1 - beta2^step): a multiply where torch divides (one vdivps less)
};

struct AdamW32Params {
  void* p;              // (numel,) in p_dtype, updated in place
  DType p_dtype;
  const void* g;        // (numel,) in g_dtype
  DType g_dtype;
  float* m;             // (numel,) fp32, updated in place
  float* v;             // (numel,) fp32, updated in place
  int64_t numel;
  AdamWScalars s;
};

struct AdamW8Params {
  void* p;
  DType p_dtype;
  const void* g;
  DType g_dtype;
  uint8_t* qm;          // (numel,) codes of kDynamicSigned
  float* absmax_m;      // (ceil(numel / kOptimBlock),)
  uint8_t* qv;          // (numel,) codes of kDynamicUnsigned
  float* absmax_v;      // (ceil(numel / kOptimBlock),)
  int64_t numel;        // the last block may be partial
  AdamWScalars s;
};

}  // namespace lowbit

namespace lowbit {
namespace cpu {  // csrc/cpu/optim.cpp (OpenMP; AVX2 inner loops from optim_avx2.cpp when supported)
void adamw32(const AdamW32Params& p);
void adamw8(const AdamW8Params& p);
}  // namespace cpu
namespace kernels {  // csrc/launch/optim.inl: CUDA kernels, built by nvcc (_cuda) and on simt (_sim)
int adamw32(const AdamW32Params& p, intptr_t stream);
int adamw8(const AdamW8Params& p, intptr_t stream);
// Managed memory for the paged optimizers (csrc/cuda/optim.cu). Under the simulator these are
// host allocations (aligned malloc) and prefetch is a no-op. Return cudaError_t values.
int managed_alloc(intptr_t* ptr, int64_t bytes);
int managed_free(intptr_t ptr);
int managed_prefetch(intptr_t ptr, int64_t bytes, int device, intptr_t stream);  // device -1: host
}  // namespace kernels
}  // namespace lowbit
