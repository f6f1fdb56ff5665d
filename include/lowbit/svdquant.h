// lowbit/svdquant.h — the `svdquant` family contract: W4A4 with a 16-bit low-rank branch (SVDQuant).
//
// Both operands of the product are 4-bit symmetric integers per group of kSvdqGroup = 64 along K,
// one rule for weights and activations (svdq_quantize_group below; spec:
// python/lowbit/reference.py::svdquant_quantize_ref):
//
//   svdquant_act   (one pass over x)   xs = float(x) · inv_smooth          (fp32 multiply; inv_smooth = 1/λ, optional)
//                                      qx (m, k) int8 in [-7, 7], sx (m, k/64) fp32 = quantize(xs) per row
//                                      down (m, r) fp32 = xs · l2ᵀ          (fp32 accumulation)
//   svdquant_gemm                      acc[m,n,g] = Σ_{k ∈ g} qx[m,k] · qw[n,k]       (exact int32)
//                                      y[m,n] = Σ_g sx[m,g]·sw[n,g]·acc[m,n,g] + Σ_j down[m,j]·l1[n,j] + bias[n]
//
// x, l1, l2, bias and y share one dtype (fp32 / bf16 / fp16); down and the scales are fp32; r = 0
// means no branch (l1, l2, down unused). The weight: qw packed two per byte, (n, k/2) uint8, element
// 2i in the high nibble, two's complement (the nibble is q & 0xF); sw (n, k/64) fp32.
// A group holding a non-finite value gets s = NaN and q = 0, so a non-finite activation poisons its own
// row of y and no other. The sums over groups and over r are in any order (tests bound fp32-level
// error against float64; the integer sums are checked exactly with unit scales).
#pragma once
#include <cmath>
#include <cstdint>

#include "lowbit/formats.h"

namespace lowbit {

constexpr int kSvdqGroup = 64;    // K per scale: one AMX-INT8 / mma k64 step
constexpr int kSvdqMaxRank = 256;

struct SvdquantActParams {
  const void* x;            // (m, k) in dtype
  const float* inv_smooth;  // (k,) or nullptr (= all ones)
  const void* l2;           // (r, k) in dtype, or nullptr when r = 0
  int8_t* qx;               // (m, k)
  float* sx;                // (m, k / 64)
  float* down;              // (m, r) fp32, or nullptr when r = 0
  DType dtype;
  int64_t m;
  int64_t k;                // a multiple of 64
  int32_t r;                // 0 ..= kSvdqMaxRank
};

struct SvdquantGemmParams {
  const int8_t* qx;    // (m, k)
  const float* sx;     // (m, k / 64)
  const uint8_t* qw;   // (n, k / 2) packed
  const float* sw;     // (n, k / 64)
  const float* down;   // (m, r) fp32, or nullptr when r = 0
  const void* l1;      // (n, r) in dtype, or nullptr when r = 0
  const void* bias;    // (n,) in dtype, or nullptr
  void* y;             // (m, n) in dtype
  DType dtype;
  int64_t m;
  int64_t n;
  int64_t k;           // a multiple of 64
  int32_t r;
};

// The quantizer of one group of 64 fp32 values: q[i] and the returned scale, the rule every backend
// reproduces bit for bit (IEEE division, round half to even).
LOWBIT_HD float svdq_quantize_group(const float* v, int8_t* q) {
  float amax = 0.0f;
  bool finite = true;
  for (int i = 0; i < kSvdqGroup; ++i) {
    const float a = fabsf(v[i]);
    finite = finite && a <= 3.4028234663852886e38f;  // false for inf and NaN
    amax = a > amax ? a : amax;
  }
  const float s = finite ? amax / 7.0f : NAN;
  for (int i = 0; i < kSvdqGroup; ++i) {
    float t = (finite && s != 0.0f) ? rintf(v[i] / s) : 0.0f;
    t = t < -7.0f ? -7.0f : (t > 7.0f ? 7.0f : t);
    q[i] = int8_t(t);
  }
  return s;
}

// Two's-complement nibble j of a packed row (element 2i in the high nibble of byte i).
LOWBIT_HD int svdq_nibble(const uint8_t* row, int64_t j) {
  const int u = (row[j >> 1] >> ((j & 1) ? 0 : 4)) & 0xF;
  return u >= 8 ? u - 16 : u;
}

namespace cpu {  // csrc/cpu/svdquant.cpp
void svdquant_act(const SvdquantActParams& p);
void svdquant_gemm(const SvdquantGemmParams& p);
}  // namespace cpu
namespace kernels {  // csrc/launch/svdquant.inl (CUDA; nvcc and simt)
int svdquant_act(const SvdquantActParams& p, intptr_t stream);
int svdquant_gemm(const SvdquantGemmParams& p, intptr_t stream);
}  // namespace kernels

}  // namespace lowbit
