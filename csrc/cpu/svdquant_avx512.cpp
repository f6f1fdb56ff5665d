// csrc/cpu/svdquant_avx512.cpp — the svdquant kernels of cpu/svdquant_simd.h on 512-bit vectors with
// AVX-512 VNNI (vpdpbusd): the 'avx512' path and up. Flags: every *_avx512.cpp file's (CMakeLists.txt).
#include "cpu/svdquant_simd.h"

namespace lowbit::cpu {

void svdquant_act_avx512(const SvdquantActParams& p) { act(p); }
void svdquant_gemm_avx512(const SvdquantGemmParams& p) { gemm(p); }

}  // namespace lowbit::cpu
