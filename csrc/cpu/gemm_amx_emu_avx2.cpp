// csrc/cpu/gemm_amx_emu_avx2.cpp — the AMX engine (cpu/gemm_amx.h) on the tile emulator of cpu/tile.h:
// the 'amx-emulated' CPU path, which runs the very kernel code of 'amx' on any AVX2 CPU so every
// machine tests it. Slow (scalar tile arithmetic, ~1 GFLOP/s): for tests, not for use.
#define LOWBIT_TILE_EMULATE 1
#include "cpu/gemm_amx.h"

namespace lowbit::cpu {

void gemm_bf16_amx_emu(const GemmParams& p, const LowrankParams* lr) { gemm_bf16<Amx>(p, lr); }
void gemm_t_bf16_amx_emu(const GemmParams& p) { gemm_t_bf16<Amx>(p); }
void lowrank_backward_bf16_amx_emu(const LowrankBackwardParams& p) { lowrank_backward_bf16<Amx>(p); }
void gemm_rows_amx_emu(const GemmParams& p, const LowrankParams* lr) { gemm_rows(p, lr); }

}  // namespace lowbit::cpu
