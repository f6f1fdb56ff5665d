// csrc/cpu/svdquant_amx.h — the svdquant W4A4 GEMM on AMX-INT8, written once against cpu/tile.h and built
// twice: svdquant_amx.cpp (the intrinsics; 'amx' on a CPU with AMX-INT8) and svdquant_amx_emu_avx2.cpp
// (the tile emulator; 'amx-emulated', so every machine runs and tests this very code).
//
// One 64-wide K step of tdpbsud is one quantization group: A = 16 rows × 64 qx bytes (s8, the rows of x
// as they lie, stride K), B = the panel of cpu/svdquant_simd.h — [k-quad 16][32 columns][4 bytes] of
// qw + 8 (u8) per group, i.e. two B tiles of 16 columns at stride 128 bytes — so each instruction yields
// the group's exact int32 sums for a 16 × 16 block, Σ qx·(qw + 8). Micro-kernel: 32 rows × 32 columns =
// 2 × 2 C tiles (0-3), A tiles 4-5, B tiles 6-7; per group: zero C, 4 tile loads, 4 tdpbsud, 4 tile stores,
// then the fp32 scaling per (row, group) with AVX-512: y += float(acc − 8·Σqx) · sw[n,g] · sx[m,g].
// The up-projection and the bias are the panel epilogue shared with the VNNI path.
//
// Roofline (the Xeon of DESIGN.md, not measured here: no AMX on the project machine): tdpbsud is 16 × 16
// × 64 MACs in ~16 cycles, so 4 per group are ~64 cycles; the per-group scaling of the 32 × 32 block is
// 64 zmm rows × (load, add, cvt, mul, fma, store) ≈ 6 · 64 / 2 ≈ 190 cycles on two vector ports — the
// epilogue, not the tile unit, bounds this kernel (~4 × the VNNI path's MACs/cycle, ~1/4 of AMX's peak).
// Summing groups in int32 before scaling would remove it but breaks the contract's per-group scales.
#pragma once
#include "cpu/svdquant_simd.h"
#include "cpu/tile.h"

namespace lowbit::cpu {
namespace {

constexpr int kAmxRows = 32, kAmxCols = 32;
static_assert(kAmxCols % V::L == 0, "the AMX panel is whole vectors wide");

void gemm_amx(const SvdquantGemmParams& p) {
  const int64_t k = p.k, groups = k / kSvdqGroup, panels = (p.n + kAmxCols - 1) / kAmxCols;
  std::vector<int32_t> corr(size_t(p.m * groups));
  x_corrections(p.qx, p.m, k, corr.data());
  const int threads = int(std::min<int64_t>(num_threads(), panels));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    tile::configure();
    Panel<kAmxCols> pn;
    std::vector<int8_t> xpad(size_t(kAmxRows * k));
    alignas(64) int32_t cbuf[kAmxRows * kAmxCols];
    alignas(64) float ybuf[kAmxRows * kAmxCols];
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < panels; ++b) {
      const int64_t n0 = b * kAmxCols;
      const int cols = int(std::min<int64_t>(kAmxCols, p.n - n0));
      decode_panel<kAmxCols>(p, n0, cols, pn);
      for (int64_t i0 = 0; i0 < p.m; i0 += kAmxRows) {
        const int rows = int(std::min<int64_t>(kAmxRows, p.m - i0));
        const int8_t* xa = p.qx + i0 * k;
        if (rows < kAmxRows) {  // the tiles are always 16 rows: a short strip is copied into zeros
          std::memcpy(xpad.data(), xa, size_t(rows * k));
          std::memset(xpad.data() + rows * k, 0, size_t((kAmxRows - rows) * k));
          xa = xpad.data();
        }
        std::memset(ybuf, 0, sizeof ybuf);
        for (int64_t g = 0; g < groups; ++g) {
          const uint8_t* wg = pn.w.data() + g * kQuads * kAmxCols * 4;
          tile::zero<0>(), tile::zero<1>(), tile::zero<2>(), tile::zero<3>();
          tile::load<4>(xa + g * kSvdqGroup, k);
          tile::load<5>(xa + 16 * k + g * kSvdqGroup, k);
          tile::load<6>(wg, kAmxCols * 4);
          tile::load<7>(wg + 64, kAmxCols * 4);
          tile::dpbsud<0, 4, 6>();
          tile::dpbsud<1, 4, 7>();
          tile::dpbsud<2, 5, 6>();
          tile::dpbsud<3, 5, 7>();
          tile::store<0>(cbuf, kAmxCols * 4), tile::store<1>(cbuf + 16, kAmxCols * 4);
          tile::store<2>(cbuf + 16 * kAmxCols, kAmxCols * 4), tile::store<3>(cbuf + 16 * kAmxCols + 16, kAmxCols * 4);
          for (int i = 0; i < rows; ++i) {
            const typename V::I c = V::set1_i(corr[(i0 + i) * groups + g]);
            const typename V::F sxi = V::set1_f(p.sx[(i0 + i) * groups + g]);
            for (int v = 0; v < kAmxCols / V::L; ++v) {
              float* y = ybuf + i * kAmxCols + v * V::L;
              const typename V::I acc = V::add_i(V::load_i(cbuf + i * kAmxCols + v * V::L), c);
              const typename V::F swv = V::load_f(pn.sw.data() + g * kAmxCols + v * V::L);
              V::store_f(y, V::fma(V::mul(V::cvt(acc), swv), sxi, V::load_f(y)));
            }
          }
        }
        panel_epilogue<kAmxCols>(p, pn, i0, rows, n0, cols, ybuf);
      }
    }
    tile::release();
  }
}

}  // namespace
}  // namespace lowbit::cpu
