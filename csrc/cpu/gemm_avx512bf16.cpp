// csrc/cpu/gemm_avx512bf16.cpp — the bf16 engine for CPUs with AVX-512 BF16 and no AMX (Zen 4, Cooper
// Lake): the driver of cpu/gemm_bf16.h with a vdpbf16ps micro-kernel. Compiled with the AVX-512
// F/BW/VL/VNNI/BF16 flags alone; runs only when bf16_engine() == Engine::avx512bf16.
//
// Micro-kernel: 8 rows of x × 48 columns (3 zmm of 16 fp32) per pass, two passes per 96-column panel.
// Per k-pair: 3 panel loads (one tile row each), 8 broadcasts of an x pair (embedded {1to16}), 24
// vdpbf16ps (32 bf16 multiply-adds each). 24 accumulators + 3 panel registers of the 32 zmm.
// Roofline (Zen 4: a zmm vdpbf16ps issues once per cycle, 64 flop): measured 234 GFLOP/s per core
// (3.66 GHz, a register-only loop), twice the fp32 FMA rate. This micro-kernel alone, operands in
// L1/L2, runs at 97% of that (kKC = 128) to 98-99% (kKC = 512-1024).
// Blocking (measured on that Zen 4, 1 thread, M = 512, 4096², torch dense bf16 = 1.00):
//   kKC = 128, x rows found in L3 by the broadcasts                              0.90
//   + the x row pointers hoisted (the 8 row offsets had spilled to the stack)    0.95
//   + the next 8 rows' x lines prefetched into L1 one call ahead                 0.95
//   + kKC = 512 (the 96 KiB panel streams from L2; 4× fewer C round trips)       0.97
//   + bf16 x copied, not converted, when packed (gemm_bf16.h)                    0.97-0.99
//   + codes and block statistics fetched 16 rows ahead of the decode             0.99-1.00
// kKC = 1024 measured no better than 512. The panel decode is ≈ 2% of the time at M = 512
// (docs/kernels.md, "Where the avx512bf16 engine's time goes").
// Arithmetic: each lane adds the odd product, then the even one, to its fp32 accumulator, each sum
// rounded to nearest even, denormals flushed (Intel's VDPBF16PS pseudo-code); products of two bf16
// are exact in fp32. Error vs the float64 product of the same bf16 operands: fp32 accumulation only.
#include "cpu/gemm_bf16.h"

namespace lowbit::cpu {
namespace {

struct Avx512Bf16 {
  static constexpr int kMR = 8, kNC = 96, kKC = 512;  // the 96 × 512 panel (96 KiB) stays in L2
  static constexpr int64_t kMC = 1024;
  static void thread_init() {}
  static void thread_done() {}

  // c[0:8][0:nv] (+)= x[0:8][0:kc] · panel (kc / 32 steps of 6 tiles): passes of 48 columns, the last
  // one only as wide as the valid columns need (a partial column block, the lowrank xa of small r).
  static void micro(bool first, const uint16_t* x, int64_t ldx, const int32_t* panel, int kc, float* c, int64_t ldc,
                    int nv) {
    for (int h = 0; h < 2 && 48 * h < nv; ++h) {
      switch (std::min(3, (nv - 48 * h + 15) / 16)) {
        case 1: pass<1>(first, h, x, ldx, panel, kc, c, ldc); break;
        case 2: pass<2>(first, h, x, ldx, panel, kc, c, ldc); break;
        default: pass<3>(first, h, x, ldx, panel, kc, c, ldc); break;
      }
    }
  }

  // Columns [48h, 48h + 16·NJ) of the micro-kernel. 64-byte aligned so that its loops sit at the same
  // offsets in every build: unaligned, builds that differed elsewhere only ran M = 512 up to 3.5% apart.
  template <int NJ>
  [[gnu::aligned(64)]] static void pass(bool first, int h, const uint16_t* x, int64_t ldx, const int32_t* panel, int kc, float* c,
                   int64_t ldc) {
    const int32_t* x32 = reinterpret_cast<const int32_t*>(x);
    const int64_t l = ldx / 2;
    __m512 acc[kMR][NJ];
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i)
#pragma GCC unroll 3
      for (int j = 0; j < NJ; ++j)
        acc[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + 48 * h + 16 * j);
    for (int ks = 0; ks < kc / 32; ++ks) {
      const int32_t* tb = panel + (int64_t(ks) * (kNC / 16) + 3 * h) * 256;
      const int32_t* xs = x32 + ks * 16;
      const int32_t* xr[kMR];  // hoisted: indexing xs[i * l + t] spilled the row offsets
      for (int i = 0; i < kMR; ++i) xr[i] = xs + i * l;
      if (h == 0)  // the next call's rows (x lives in L3; its lines are 8 KiB apart: no hardware stream)
        for (int i = 0; i < kMR; ++i) _mm_prefetch(reinterpret_cast<const char*>(xr[i] + kMR * l), _MM_HINT_T0);
#pragma GCC unroll 2
      for (int t = 0; t < 16; ++t) {
        __m512bh bv[NJ];
#pragma GCC unroll 3
        for (int j = 0; j < NJ; ++j) bv[j] = (__m512bh)_mm512_load_si512(tb + 256 * j + t * 16);
#pragma GCC unroll 8
        for (int i = 0; i < kMR; ++i) {
          const __m512bh a = (__m512bh)_mm512_set1_epi32(xr[i][t]);
#pragma GCC unroll 3
          for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, bv[j]);
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i)
#pragma GCC unroll 3
      for (int j = 0; j < NJ; ++j) _mm512_storeu_ps(c + i * ldc + 48 * h + 16 * j, acc[i][j]);
  }
};

}  // namespace

void gemm_bf16_avx512bf16(const GemmParams& p, const LowrankParams* lr) { gemm_bf16<Avx512Bf16>(p, lr); }
void gemm_t_bf16_avx512bf16(const GemmParams& p) { gemm_t_bf16<Avx512Bf16>(p); }
void lowrank_backward_bf16_avx512bf16(const LowrankBackwardParams& p) { lowrank_backward_bf16<Avx512Bf16>(p); }

}  // namespace lowbit::cpu
