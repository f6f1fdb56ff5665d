// csrc/cpu/svdquant_amx_emu_avx2.cpp — the AMX-INT8 svdquant GEMM (cpu/svdquant_amx.h) on the tile
// emulator of cpu/tile.h: the 'amx-emulated' CPU path, the very kernel code of 'amx' on any AVX2 CPU so
// every machine tests it. Slow (scalar tile arithmetic): for tests, not for use.
#define LOWBIT_TILE_EMULATE 1
// the VNNI kernels of cpu/svdquant_simd.h come along for the panel decode and epilogue; unused here
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "cpu/svdquant_amx.h"
#pragma GCC diagnostic pop

namespace lowbit::cpu {

void svdquant_gemm_amx_emu(const SvdquantGemmParams& p) { gemm_amx(p); }

}  // namespace lowbit::cpu
