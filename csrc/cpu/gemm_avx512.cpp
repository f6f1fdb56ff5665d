// csrc/cpu/gemm_avx512.cpp — gemv_i16 (the gemm family's M ≤ 8 forward kernel, cpu/gemv_i16.h) built
// for CPUs with AVX-512 VL + BW + VNNI (Zen 4, Ice Lake and later): this file alone is compiled with
// those flags, and gemm_avx2.cpp calls it only when use_avx512() (runtime check, or
// _C.set_cpu_path("avx512")). Same data layout and int32 sums as the AVX2 build; per 64 4-bit
// weights and row of x it issues 4 vpdpwssd where AVX2 needs 4 vpmaddwd + 3 vpaddd, and nf4/fp4
// decode with the int4 nibble split + 4 vpermw instead of 3 + 4 vpshufb + 4 vpunpck.
#define LOWBIT_GEMV_VNNI 1
#include "cpu/gemv_i16.h"

namespace lowbit::cpu {

void gemv_avx512(const GemmParams& p, const LowrankParams* lr) { gemv_i16(p, lr); }

}  // namespace lowbit::cpu
