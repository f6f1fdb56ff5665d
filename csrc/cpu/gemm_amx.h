// csrc/cpu/gemm_amx.h — the AMX engine of cpu/gemm_bf16.h, written once against cpu/tile.h and built
// twice: gemm_amx.cpp (the intrinsics; 'amx') and gemm_amx_emu_avx2.cpp (the emulator; 'amx-emulated').
//
// Micro-kernel: 32 rows of x × 32 columns per pass = 2 × 2 C tiles (tiles 0-3), A tiles 4-5 (16 rows ×
// 32 bf16 of x each, loaded from the packed rows with their stride), B tiles 6-7 (two panel tiles);
// per 32 k: 4 tile loads, 4 tdpbf16ps (16 × 16 × 32 multiply-adds each). Two passes per 64-column
// panel; C tiles stay in registers across the panel's k steps and go through the C buffer between k
// blocks. Roofline (measured on the Xeon of DESIGN.md: one tdpbf16ps per ~4.9 ns per core): ≈ 3.4
// TFLOP/s per core; the panel decode (≈ 2 instr/weight) is then the larger cost below ~2000 rows of
// x, hence kMC = 2048 rows per decode. The 64 × 256 panel (32 KiB) stays in L1.
// Arithmetic: tile.h (the SDM's TDPBF16PS: even product then odd, each sum rounded to nearest even,
// DAZ/FTZ). Error vs the float64 product of the same bf16 operands: fp32 accumulation only.
#pragma once
#include "cpu/gemm_bf16.h"
#include "cpu/tile.h"

namespace lowbit::cpu {
namespace {

struct Amx {
  static constexpr int kMR = 32, kNC = 64, kKC = 256;
  static constexpr int64_t kMC = 2048;
  static void thread_init() { tile::configure(); }
  static void thread_done() { tile::release(); }

  static void micro(bool first, const uint16_t* x, int64_t ldx, const int32_t* panel, int kc, float* c, int64_t ldc,
                    int nv) {
    const int64_t sx = ldx * 2, sc = ldc * 4;
    for (int cp = 0; cp < kNC / 32 && 32 * cp < nv; ++cp) {
      float* c0 = c + cp * 32;
      if (first) {
        tile::zero<0>(), tile::zero<1>(), tile::zero<2>(), tile::zero<3>();
      } else {
        tile::load<0>(c0, sc), tile::load<1>(c0 + 16, sc);
        tile::load<2>(c0 + 16 * ldc, sc), tile::load<3>(c0 + 16 * ldc + 16, sc);
      }
      for (int ks = 0; ks < kc / 32; ++ks) {
        const int32_t* b = panel + (int64_t(ks) * (kNC / 16) + 2 * cp) * 256;
        tile::load<4>(x + ks * 32, sx);
        tile::load<5>(x + 16 * ldx + ks * 32, sx);
        tile::load<6>(b, 64);
        tile::load<7>(b + 256, 64);
        tile::dpbf16ps<0, 4, 6>();
        tile::dpbf16ps<1, 4, 7>();
        tile::dpbf16ps<2, 5, 6>();
        tile::dpbf16ps<3, 5, 7>();
      }
      tile::store<0>(c0, sc), tile::store<1>(c0 + 16, sc);
      tile::store<2>(c0 + 16 * ldc, sc), tile::store<3>(c0 + 16 * ldc + 16, sc);
    }
  }
};

}  // namespace
}  // namespace lowbit::cpu
