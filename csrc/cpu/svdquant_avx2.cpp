// csrc/cpu/svdquant_avx2.cpp — the svdquant kernels of cpu/svdquant_simd.h on 256-bit vectors, vpdpbusd
// done as vpmaddubsw + vpmaddwd (exact here: pair sums ≤ 2·15·7): the 'avx2' path (and the activation
// pass of 'amx-emulated'). Flags: every *_avx2.cpp file's (CMakeLists.txt).
#include "cpu/svdquant_simd.h"

namespace lowbit::cpu {

void svdquant_act_avx2(const SvdquantActParams& p) { act(p); }
void svdquant_gemm_avx2(const SvdquantGemmParams& p) { gemm(p); }

}  // namespace lowbit::cpu
