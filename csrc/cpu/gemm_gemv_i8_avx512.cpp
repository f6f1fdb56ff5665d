// csrc/cpu/gemm_gemv_i8_avx512.cpp — the `medium`-precision small-M GEMV (int8 activations,
// vpdpbusd; design, overflow proof and error at the top of cpu/gemm_gemv_i8.h). Compiled with the
// AVX-512 F/BW/VL/VNNI flags of every *_avx512.cpp file (256-bit vectors only); called by gemv_passes
// (gemm_avx2.cpp) when gemv_i8_applies: use_avx512(), the policy is `medium`, x is fp32, W is not fp4.
#define LOWBIT_GEMV_VNNI 1
// the int16 GEMV's header comes along for its helpers; its entry point is unused here
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "cpu/gemm_gemv_i8.h"
#pragma GCC diagnostic pop

namespace lowbit::cpu {

// The policy's door to this kernel: fp32 x under `medium` on the 'avx512' path, every format but fp4
// (why not fp4, bf16 or fp16 x: the top of cpu/gemm_gemv_i8.h).
bool gemv_i8_applies(const GemmParams& p) {
  return use_avx512() && p.dtype == DType::f32 && p.w.fmt != Fmt::fp4 && matmul_precision() == Precision::medium;
}

void gemv_i8_avx512(const GemmParams& p, const LowrankParams* lr) { gemv_i8(p, lr); }

}  // namespace lowbit::cpu
