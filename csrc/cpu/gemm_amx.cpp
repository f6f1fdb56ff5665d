// csrc/cpu/gemm_amx.cpp — the AMX engine (cpu/gemm_amx.h) on the real tile instructions. Compiled with
// -mamx-tile -mamx-bf16 (and the AVX2 set the driver uses) alone; runs only when the 'amx' path is in
// use (dispatch.cpp checked CPUID, XCR0 and obtained the process's tile permission first).
#define LOWBIT_TILE_EMULATE 0
#include "cpu/gemm_amx.h"

namespace lowbit::cpu {

void gemm_bf16_amx(const GemmParams& p, const LowrankParams* lr) { gemm_bf16<Amx>(p, lr); }
void gemm_t_bf16_amx(const GemmParams& p) { gemm_t_bf16<Amx>(p); }
void lowrank_backward_bf16_amx(const LowrankBackwardParams& p) { lowrank_backward_bf16<Amx>(p); }
void gemm_rows_amx(const GemmParams& p, const LowrankParams* lr) { gemm_rows(p, lr); }

}  // namespace lowbit::cpu
