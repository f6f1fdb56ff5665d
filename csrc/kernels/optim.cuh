// csrc/kernels/optim.cuh — the optim family on CUDA: fused AdamW step with fp32 state and with
// 8-bit blockwise state. Bit-exact with python/lowbit/reference.py and csrc/cpu/optim*.cpp: the
// op sequence of include/lowbit/optim.h written with __f*_rn intrinsics (nvcc would otherwise
// contract a*b+c into an FMA); sqrtf and __fdiv_rn are IEEE (no --use_fast_math).
//
// Roofline (A100-40GB ~1.5 TB/s, H100 SXM ~3.3 TB/s): the fp32 step moves 28 B/param (16 in,
// 12 out) with ~15 lane-ops -> bandwidth-bound, ~0.9 ms per 50 M params on an A100. The 8-bit step
// moves 14 B/param + 16 B per 256; per element it adds two table reads (dequantize, __constant__ ->
// broadcast-free random access, served from L1) and two 8-step binary searches over 255 boundaries in
// shared memory (~16 shared loads): ~60 lane-ops/param, still under the bandwidth line on both
// GPUs (A100: 50 M x 60 / 19.5 T = 0.15 ms vs 0.47 ms of traffic).
//
// 8-bit layout: one CTA of 256 threads per state block of 256 elements (bitsandbytes' optimizer
// block), grid-stride over blocks; the new absmax of m and of v is a warp-shuffle max then a
// max over the 8 warp results in shared memory, identical in every thread.
#pragma once
#include "kernels/common.cuh"
#include "lowbit/optim.h"

namespace lowbit::kernels {

constexpr int kOptimThreads = 256;
static_assert(kOptimThreads == kOptimBlock, "adamw8_kernel maps one thread to one element of a state block");

namespace optim_detail {

// optim.h's op sequence; m, v in/out, returns the new p.
__device__ __forceinline__ float adamw_elem(float p, float g, float& m, float& v, const AdamWScalars& s) {
  p = __fmul_rn(p, s.decay);
  m = __fadd_rn(__fmul_rn(m, s.beta1), __fmul_rn(g, s.one_minus_beta1));
  v = __fadd_rn(__fmul_rn(v, s.beta2), __fmul_rn(__fmul_rn(g, s.one_minus_beta2), g));
  const float d = __fadd_rn(__fmul_rn(sqrtf(v), s.inv_bc2_sqrt), s.eps);
  return __fadd_rn(p, __fmul_rn(s.neg_step_size, __fdiv_rn(m, d)));
}

// Max over the CTA (256 threads = 8 warps); every thread gets the same value. `red` holds 8 floats
// and is free again after the trailing barrier.
__device__ __forceinline__ float block_max(float x, float* red) {
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < kOptimThreads / 32; ++w) r = fmaxf(r, red[w]);
  __syncthreads();
  return r;
}

// The 8-bit re-quantization of optim.h: the number of boundaries strictly below
// clamp(x * (1 / max(absmax, 1e-38)), -1, 1) (binary search over the 255 boundaries).
__device__ __forceinline__ uint8_t code8(const float (&mid)[255], float x, float inv) {
  const float t = fminf(fmaxf(__fmul_rn(x, inv), -1.0f), 1.0f);
  return uint8_t(nearest_sorted(mid, t));
}

}  // namespace optim_detail

template <class TP, class TG>
__global__ void __launch_bounds__(kOptimThreads) adamw32_kernel(AdamW32Params p) {
  const TP* P = static_cast<const TP*>(p.p);
  const TG* G = static_cast<const TG*>(p.g);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel; i += stride) {
    float m = p.m[i], v = p.v[i];
    const float pn = optim_detail::adamw_elem(to_f32(P[i]), to_f32(G[i]), m, v, p.s);
    static_cast<TP*>(p.p)[i] = from_f32<TP>(pn);
    p.m[i] = m;
    p.v[i] = v;
  }
}

template <class TP, class TG>
__global__ void __launch_bounds__(kOptimThreads) adamw8_kernel(AdamW8Params p) {
  __shared__ float s_mid_m[255];  // re-quantization boundaries of the signed map (m)
  __shared__ float s_mid_v[255];  // of the unsigned map (v)
  __shared__ float s_red[kOptimThreads / 32];
  const int t = threadIdx.x;
  if (t < 255) {  // optim.h optim_boundary: ~50 scalar steps per thread, once per CTA
    s_mid_m[t] = optim_boundary(c_dyn_signed, t, p.rounding);
    s_mid_v[t] = optim_boundary(c_dyn_unsigned, t, p.rounding);
  }
  __syncthreads();
  const TP* P = static_cast<const TP*>(p.p);
  const TG* G = static_cast<const TG*>(p.g);
  const int64_t n_blocks = (p.numel + kOptimBlock - 1) / kOptimBlock;
  for (int64_t b = blockIdx.x; b < n_blocks; b += gridDim.x) {
    const int64_t i = b * kOptimBlock + t;
    const bool valid = i < p.numel;
    float m = 0.0f, v = 0.0f;  // lanes past the end hold 0: they never raise an absmax
    if (valid) {
      m = __fmul_rn(c_dyn_signed[p.qm[i]], p.absmax_m[b]);
      v = __fmul_rn(c_dyn_unsigned[p.qv[i]], p.absmax_v[b]);
      const float pn = optim_detail::adamw_elem(to_f32(P[i]), to_f32(G[i]), m, v, p.s);
      static_cast<TP*>(p.p)[i] = from_f32<TP>(pn);
    }
    // Every thread has read absmax_*[b] above; block_max's barriers order those reads before
    // thread 0's writes below.
    const float am = optim_detail::block_max(fabsf(m), s_red);
    const float av = optim_detail::block_max(fabsf(v), s_red);
    if (t == 0) {
      p.absmax_m[b] = am;
      p.absmax_v[b] = av;
    }
    if (valid) {
      p.qm[i] = optim_detail::code8(s_mid_m, m, __fdiv_rn(1.0f, fmaxf(am, kAbsmaxFloor)));
      const uint8_t cv = optim_detail::code8(s_mid_v, v, __fdiv_rn(1.0f, fmaxf(av, kAbsmaxFloor)));
      p.qv[i] = (cv == 0 && v > 0.0f) ? uint8_t(1) : cv;  // v > 0 never becomes 0 (optim.h)
    }
  }
}

}  // namespace lowbit::kernels
