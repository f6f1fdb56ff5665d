// csrc/kernels/svdquant.cuh — the svdquant family on CUDA (include/lowbit/svdquant.h): the simplest
// correct kernels, the reference every faster CUDA kernel of this family is checked against.
//
//   svdq_act_kernel    one warp per (row, group of 64): each lane loads two elements, multiplies by
//                      1/λ, the group's amax and finiteness are warp reductions, the lanes write their
//                      two int8 codes and lane 0 the scale — the header's rule, bit for bit (max is
//                      exact, the division is IEEE: __fdiv_rn).
//   svdq_down_kernel   one thread per (row, j): down = xs · l2ᵀ (xs recomputed from x; fp32).
//   svdq_gemm_kernel   one thread per output: exact int32 group sums, then the header's epilogue.
#pragma once
#include "kernels/common.cuh"
#include "lowbit/svdquant.h"

namespace lowbit::kernels {

constexpr int kSvdqThreads = 256;

// The header's group rule (svdq_quantize_group) for one group of 64 held by a warp, two elements per
// lane (v0, v1 = elements 2·lane, 2·lane + 1): amax and finiteness by warp reductions (max is exact;
// the division is IEEE, __fdiv_rn), the lane's two codes to q[0..1]; returns the group's scale (NaN
// for a non-finite group). Every svdquant activation kernel quantizes through this one function.
__device__ __forceinline__ float svdq_quantize_warp(float v0, float v1, int8_t* q) {
  const float a0 = fabsf(v0), a1 = fabsf(v1);
  int finite = a0 <= 3.4028234663852886e38f && a1 <= 3.4028234663852886e38f;
  float amax = fmaxf(a0, a1);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    finite &= __shfl_xor_sync(0xffffffffu, finite, o);
  }
  const float s = finite ? __fdiv_rn(amax, 7.0f) : NAN;
  const bool live = finite && s != 0.0f;
  q[0] = int8_t(live ? fminf(fmaxf(rintf(__fdiv_rn(v0, s)), -7.0f), 7.0f) : 0.0f);
  q[1] = int8_t(live ? fminf(fmaxf(rintf(__fdiv_rn(v1, s)), -7.0f), 7.0f) : 0.0f);
  return s;
}

template <class T>
__global__ void __launch_bounds__(kSvdqThreads) svdq_act_kernel(SvdquantActParams p) {
  const T* X = static_cast<const T*>(p.x);
  const int64_t groups = p.k / kSvdqGroup;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (kSvdqThreads / 32);
  for (int64_t w = int64_t(blockIdx.x) * (kSvdqThreads / 32) + (threadIdx.x >> 5); w < p.m * groups; w += warps) {
    const int64_t row = w / groups, g = w % groups;
    const int64_t c = g * kSvdqGroup + 2 * lane;
    float v0 = to_f32(X[row * p.k + c]), v1 = to_f32(X[row * p.k + c + 1]);
    if (p.inv_smooth) {
      v0 = __fmul_rn(v0, p.inv_smooth[c]);
      v1 = __fmul_rn(v1, p.inv_smooth[c + 1]);
    }
    const float s = svdq_quantize_warp(v0, v1, p.qx + row * p.k + c);
    if (lane == 0) p.sx[row * groups + g] = s;
  }
}

template <class T>
__global__ void __launch_bounds__(kSvdqThreads) svdq_down_kernel(SvdquantActParams p) {
  const T* X = static_cast<const T*>(p.x);
  const T* L2 = static_cast<const T*>(p.l2);
  const int64_t total = p.m * p.r, stride = int64_t(gridDim.x) * kSvdqThreads;
  for (int64_t t = int64_t(blockIdx.x) * kSvdqThreads + threadIdx.x; t < total; t += stride) {
    const int64_t row = t / p.r, j = t % p.r;
    float acc = 0.0f;
    for (int64_t c = 0; c < p.k; ++c) {
      float v = to_f32(X[row * p.k + c]);
      if (p.inv_smooth) v = __fmul_rn(v, p.inv_smooth[c]);
      acc = __fadd_rn(acc, __fmul_rn(v, to_f32(L2[j * p.k + c])));
    }
    p.down[t] = acc;
  }
}

template <class T>
__global__ void __launch_bounds__(kSvdqThreads) svdq_gemm_kernel(SvdquantGemmParams p) {
  const T* L1 = static_cast<const T*>(p.l1);
  const T* B = static_cast<const T*>(p.bias);
  T* Y = static_cast<T*>(p.y);
  const int64_t groups = p.k / kSvdqGroup, total = p.m * p.n, stride = int64_t(gridDim.x) * kSvdqThreads;
  for (int64_t t = int64_t(blockIdx.x) * kSvdqThreads + threadIdx.x; t < total; t += stride) {
    const int64_t i = t / p.n, j = t % p.n;
    const int8_t* xq = p.qx + i * p.k;
    const uint8_t* wq = p.qw + j * (p.k / 2);
    float y = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      int32_t acc = 0;
      for (int c = 0; c < kSvdqGroup; ++c) acc += int32_t(xq[g * kSvdqGroup + c]) * svdq_nibble(wq, g * kSvdqGroup + c);
      y = __fadd_rn(y, __fmul_rn(__fmul_rn(p.sx[i * groups + g], p.sw[j * groups + g]), float(acc)));
    }
    for (int u = 0; u < p.r; ++u) y = __fadd_rn(y, __fmul_rn(p.down[i * p.r + u], to_f32(L1[j * p.r + u])));
    if (B) y = __fadd_rn(y, to_f32(B[j]));
    Y[t] = from_f32<T>(y);
  }
}

}  // namespace lowbit::kernels
