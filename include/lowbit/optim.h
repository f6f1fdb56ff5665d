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
// (resp. |v|) over the block, re-quantize t = clamp(x * (1 / max(absmax, 1e-38)), -1, 1) by the
// rounding rule below, except that v > 0 never gets code 0 (it gets 1, the smallest nonzero entry:
// a v rounded to 0 under a nonzero m would make the step m / eps). Fresh state: codes of 0.0 (127
// signed, 0 unsigned) with absmax 0.
//
// The Python layer guarantees contiguous buffers of numel elements, dtypes as declared, numel > 0.
// Re-quantization rule (AdamW8Params::rounding; every rule is "code = number of boundaries strictly
// below t" for a non-decreasing table of 255 fp32 boundaries, see optim_boundary):
//   kOptimRoundBitsandbytes (default) — bitsandbytes 0.50.2's CPU rule: t is first snapped to the
//     uniform grid of 65536 points over [-1, 1] (index trunc(fma((t + 1) * 0.5, 65535, 0.5)), fp32),
//     then the grid point (-1 + 2i / 65535, fp32) takes its nearest code (ties to the lower index).
//     No grid point is 0, so a zero state is stored as the code nearest +1.5e-5 (x absmax).
//   kOptimRoundNearest — the exact nearest entry to t (ties to the lower index): the boundaries are
//     the midpoints (map[j] + map[j+1]) / 2.
// In both rules a positive v never gets code 0 (under the bitsandbytes rule it cannot anyway).
//
// Non-finite gradients are not checked (as in torch): they poison the element (32-bit) or its
// whole block (8-bit), never memory safety.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "lowbit/formats.h"

namespace lowbit {

constexpr int kOptimBlock = 256;  // 8-bit state block (bitsandbytes' optimizer blocksize)

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
  int32_t rounding;     // kOptimRoundBitsandbytes / kOptimRoundNearest
};

constexpr int32_t kOptimRoundBitsandbytes = 0;
constexpr int32_t kOptimRoundNearest = 1;

// ---- the re-quantization boundaries (host and device; no FMA contraction is possible below
// except the explicit fmaf, which is bitsandbytes' compiled `x * 65535 + 0.5`).
// bitsandbytes' grid index of t in [-1, 1] and the value of grid point i.
LOWBIT_HD int optim_bnb_grid_index(float t) { return int(fmaf((t + 1.0f) * 0.5f, 65535.0f, 0.5f)); }
LOWBIT_HD float optim_bnb_grid_value(int i) { return float(2 * i) / 65535.0f - 1.0f; }
// Bit casts (memcpy of 4 bytes: a register move on the host and in device code alike).
template <class To, class From>
LOWBIT_HD To optim_bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "optim_bit_cast: sizes differ");
  To y;
  memcpy(&y, &x, sizeof(To));
  return y;
}
LOWBIT_HD int32_t optim_f2i(float x) { return optim_bit_cast<int32_t>(x); }
LOWBIT_HD float optim_i2f(int32_t i) { return optim_bit_cast<float>(i); }
// A float of [-1, 1] <-> an int of the same order (-0 and +0 both 0).
LOWBIT_HD int32_t optim_float_order(float x) {
  const int32_t b = optim_f2i(x);
  return b >= 0 ? b : -(b & 0x7fffffff);
}
LOWBIT_HD float optim_order_float(int32_t k) { return k >= 0 ? optim_i2f(k) : -optim_i2f(-k); }
// Boundary j (0..254) of `map` (sorted, 256 entries) under `rounding`: the code of t is the number
// of boundaries strictly below t. Under the bitsandbytes rule: T_j = the smallest fp32 t in [-1, 1]
// whose grid point lies above the midpoint j (so its code exceeds j); the boundary is the float
// just below T_j (or +inf when no grid point passes the midpoint).
LOWBIT_HD float optim_boundary(const float* map, int j, int32_t rounding) {
  const float mid = (map[j] + map[j + 1]) * 0.5f;
  if (rounding == kOptimRoundNearest) return mid;
  int lo = 0, hi = 65536;  // first grid index whose value exceeds mid
  while (lo < hi) {
    const int m = (lo + hi) >> 1;
    if (optim_bnb_grid_value(m) > mid) hi = m; else lo = m + 1;
  }
  if (lo == 65536) return optim_i2f(0x7f800000);  // +inf
  int32_t a = optim_float_order(-1.0f), b = optim_float_order(1.0f) + 1;  // first t with index >= lo
  while (a < b) {
    const int32_t m = a + (b - a) / 2;
    if (optim_bnb_grid_index(optim_order_float(m)) >= lo) b = m; else a = m + 1;
  }
  if (a > optim_float_order(1.0f)) return optim_i2f(0x7f800000);
  return optim_order_float(a - 1);  // the float just below T_j (k - 1 of -0/+0 is the smallest negative)
}

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
