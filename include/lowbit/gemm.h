// lowbit/gemm.h — the `gemm` family contract: products with a packed low-bit weight, never
// materialising the dense weight.
//
//   gemm:    y (m, n)  = x (m, k) · dequant(W)ᵀ (+ bias)      forward of QuantLinear
//   gemm_t:  gx (m, k) = gy (m, n) · dequant(W)               backward to the input
//
// W is (n, k) in the canonical layout of quant.h (flat row-major codes, first element in the most
// significant bits, one fp32 scale (+ zero) per block of `block` consecutive elements along k,
// optionally double-quantized scales decoded inside the kernel). Activations and outputs share one
// dtype (fp32 / bf16 / fp16); accumulation is fp32. The spec is python/lowbit/reference.py::gemm_ref:
// equal to x @ dequantize_ref(W).T up to fp32 accumulation error (documented per path in
// docs/kernels.md).
#pragma once
#include <cstdint>
#include <string>

#include "lowbit/formats.h"

namespace lowbit {

// The precision policy for fp32 activations (python: lowbit.set_matmul_precision; bounds in
// docs/kernels.md): highest = fp32 accumulation error only; high = ≤ 2e-4 relative (int16 images);
// medium = bf16 rounding (x may be rounded to bf16 and run on a bf16 matrix engine). bf16 activations
// always compute as torch's bf16 matmul does; fp16 activations never drop below fp16-level error.
enum class Precision : int32_t { highest = 0, high = 1, medium = 2 };

struct GemmWeight {
  const uint8_t* codes;       // (n, k * bits / 8)
  const float* scale;         // (n * k / block,) or null when scale_q is given
  const float* zero;          // int formats only
  const uint8_t* scale_q;     // double quant: (n * k / block,) uint8, or null
  const float* scale_nested;  // (ceil(n * k / block / kNestedBlock),)
  float scale_offset;
  int64_t n, k;
  int32_t block;
  Fmt fmt;
};

struct GemmParams {
  GemmWeight w;
  const void* x;     // gemm: (m, k); gemm_t: gy (m, n)
  void* y;           // gemm: (m, n); gemm_t: gx (m, k)
  const void* bias;  // gemm only: (n,) in dtype, or null
  DType dtype;
  int64_t m;
};

namespace cpu {  // csrc/cpu/gemm.cpp (+ gemm_avx2.cpp, gemm_avx512.cpp)
void gemm(const GemmParams& p);
void gemm_t(const GemmParams& p);
// The kernel gemm (transposed: gemm_t) runs for m rows of activations in dt, of a weight in format fmt,
// under the current path and precision policy: "gemv_i16", "tile_f32", "tile_f32_bf16w", "tile_i16",
// "avx512bf16", "amx", "amx_emulated" or "portable" (docs/kernels.md describes each).
std::string gemm_route_name(DType dt, int64_t m, bool transposed, Fmt fmt);
}  // namespace cpu
namespace kernels {  // csrc/launch/gemm.inl (CUDA; nvcc and simt)
int gemm(const GemmParams& p, intptr_t stream);
int gemm_t(const GemmParams& p, intptr_t stream);
}  // namespace kernels

}  // namespace lowbit
