// csrc/cpu/svdquant_amx.cpp — the svdquant W4A4 GEMM on AMX-INT8 tiles (cpu/svdquant_amx.h, intrinsics
// body of cpu/tile.h): the 'amx' path where the CPU also has AMX-INT8 (svdquant.cpp checks).
// the VNNI kernels of cpu/svdquant_simd.h come along for the panel decode and epilogue; unused here
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "cpu/svdquant_amx.h"
#pragma GCC diagnostic pop

namespace lowbit::cpu {

void svdquant_gemm_amx(const SvdquantGemmParams& p) { gemm_amx(p); }

}  // namespace lowbit::cpu
