// csrc/cpu/lowrank.cpp — lowrank family on the CPU: argument checks and dispatch. The kernels are
// the gemm kernels with the branch fused in, called with the LowrankParams (gemm_avx2.cpp:
// gemm_avx2(p.g, &p), whose GEMV is cpu/gemm_gemv_i16.h; gemm.cpp: gemm_portable(p.g, &p)):
//
//   y (m, n)  = x (m, k) · dequant(W)ᵀ + s · (x · Aᵀ) · Bᵀ (+ bias)     A (r, k), B (n, r)
//   xa (m, r) = x · Aᵀ                                                  (saved for the backward)
//
// M ≤ 24 (int16 GEMV, in passes of ≤ 8 rows): xa is computed in fp32 from the exact x, split into
//   parts of 4 dots that the threads claim at the start of the GEMV's parallel region (A read once,
//   by both cores); s·xa·B[n]ᵀ is added to each output while it is in a register (B row n read
//   once) — or, for the few rows a thread reaches before every part is published, after the
//   region's first barrier from an fp32 copy of the base value (same operations, same order, same
//   bits).
// M > 24 (tile GEMM): xa for each 16-row sliver of x as soon as the sliver is packed (the same
//   6×16 FMA micro-kernel with A as the "weight"), and the up-projection as one more micro-kernel
//   pass of depth r over each output tile while it sits in L2, before it is written to y.
// Neither adds a pass over x or y, nor a barrier.
//
// Roofline (fp32 activations/adapters, nf4 block 64 without double quant: 4.25 bits/weight):
//   bytes  = N·K/2 + N·K/16 (weight) + 4·r·K (A) + 4·N·r (B) + 4·M·K (x) + 4·M·N (y) + 4·M·r (xa)
//   FLOPs  = 2·M·N·K (base) + 2·M·r·(K + N) (branch)
//   M = 1, 4096×4096, r = 16:  weight 8.9 MB, A + B 0.52 MB → the branch adds ≈ 6% of the bytes of a
//     memory-bound GEMV (r = 64: ≈ 24%; with bf16 adapters half of that). Its FLOPs (0.26 M) are
//     noise next to the ~0.15 instr/weight decode.
//   M = 512, same W: compute-bound; the branch adds 2·r·(K + N)/(2·N·K) = r/2048 of the FLOPs
//     (r = 16: 0.8%, r = 64: 3.1%), run by the same FMA micro-kernel at the same GFLOP/s, plus the
//     conversion of A and B to fp32 once per call (r·(K + N) elements).
#include <algorithm>

#include "cpu/gemm_internal.h"

namespace lowbit::cpu {

void lowrank(const LowrankParams& p) {
  check_gemm(p.g, "lowrank");
  LOWBIT_CHECK(p.r >= 1 && p.r <= 256, "lowrank: r=" + std::to_string(p.r) + " is not in [1, 256]");
  if (p.g.m == 0) return;  // empty x: torch may hand null data pointers
  LOWBIT_CHECK(p.a && p.b && p.xa && p.g.x && p.g.y, "lowrank: missing x, y, xa, A or B");
#if LOWBIT_HAVE_AVX2_TU
  if (use_avx2()) return gemm_avx2(p.g, &p);
#endif
  gemm_portable(p.g, &p);
}

// The backward in one call on the bf16 engines (cpu/gemm_bf16.h: lowrank_backward_bf16); elsewhere the
// Python layer composes it from gemm_t and torch products (python/lowbit/ops/lowrank.py).
void lowrank_backward(const LowrankBackwardParams& p) {
  check_gemm(p.g, "lowrank_backward");
  LOWBIT_CHECK(p.r >= 1 && p.r <= 256, "lowrank_backward: r=" + std::to_string(p.r) + " is not in [1, 256]");
  LOWBIT_CHECK(p.g.bias == nullptr, "lowrank_backward: no bias (its gradient is gy.sum(0))");
  if (p.g.m == 0) {  // empty batch: the weight gradients are zero
    std::fill(p.ga, p.ga + int64_t(p.r) * p.g.w.k, 0.0f);
    std::fill(p.gb, p.gb + p.g.w.n * int64_t(p.r), 0.0f);
    return;
  }
  LOWBIT_CHECK(p.g.x && p.x && p.xa && p.a && p.b && p.ga && p.gb, "lowrank_backward: missing gy, x, xa, A, B, ga or gb");
#if LOWBIT_HAVE_AVX2_TU
  if (use_avx2()) {
    switch (gemm_route(p.g.dtype, p.g.m, true, p.g.w.fmt)) {
      case Route::avx512bf16: return lowrank_backward_bf16_avx512bf16(p);
      case Route::amx: return lowrank_backward_bf16_amx(p);
      case Route::amx_emulated: return lowrank_backward_bf16_amx_emu(p);
      default: break;
    }
  }
#endif
  LOWBIT_CHECK(false, "lowrank_backward: runs on the bf16 matrix engines only (gemm_route(dtype, m, True) is '" +
                          gemm_route_name(p.g.dtype, p.g.m, true, p.g.w.fmt) + "')");
}

}  // namespace lowbit::cpu
