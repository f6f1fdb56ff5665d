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

// The policy's door to this kernel: fp32 x under `medium` on the 'avx512' path, int4 and int2 (why not
// fp4, bf16 or fp16 x: the top of cpu/gemm_gemv_i8.h). nf4 only with LOWBIT_GEMV_I8_NF4=1 in the
// environment (read per call, ≈ 0.1 µs; the tests and bench_gemm set it): its int8 table image puts
// max |err| / max |ref| at 0.5–1.24e-2, over the policy's 1e-2 at block 256 (docs/kernels.md): never the default.
bool gemv_i8_applies(DType dt, Fmt fmt) {
  if (!use_avx512() || dt != DType::f32 || matmul_precision() != Precision::medium) return false;
  if (fmt == Fmt::int4 || fmt == Fmt::int2) return true;
  if (fmt != Fmt::nf4) return false;
  const char* e = std::getenv("LOWBIT_GEMV_I8_NF4");
  return e && e[0] == '1';
}

void gemv_i8_avx512(const GemmParams& p, const LowrankParams* lr) { gemv_i8(p, lr); }

}  // namespace lowbit::cpu
