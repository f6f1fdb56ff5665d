// csrc/cpu/gemm_bf16.h — the gemm family's bf16 matrix-engine kernels: gemm, gemm_t and the lowrank
// forward on bf16 products with fp32 accumulation, as torch computes a bf16 matmul. One driver, three
// engines, each a translation unit that includes this header with its own ISA flags (everything here
// has internal linkage, as in gemm_internal.h):
//
//   gemm_avx512bf16.cpp     vdpbf16ps (AVX-512 BF16; Zen 4, Cooper Lake and later)     'avx512bf16'
//   gemm_amx.cpp            tdpbf16ps through cpu/tile.h's intrinsics (AMX-TILE/BF16)  'amx'
//   gemm_amx_emu_avx2.cpp   the same AMX engine over cpu/tile.h's emulator             'amx-emulated'
//
// The driver below uses AVX2 only (the emulated engine must run on any AVX2 CPU).
//
// Operands. Every product is C (M × cols) = X (M × Kc) · B (Kc × cols), fp32 C:
//   gemm:    X = x, Kc = K, B[k][n] = Ŵ[n][k]        (cols = N)
//   gemm_t:  X = gy, Kc = N, B[n][k] = Ŵ[n][k]       (cols = K)
//   lowrank: first xa = x · Aᵀ (B[k][j] = A[j][k]), then the base product plus one more term
//            (s·xa) · Bᵀ over j, accumulated into the same C (the up-projection at engine rate).
// Ŵ is the weight decoded exactly as cpu::dequantize does in fp32, then rounded to bf16 (RNE): bit for
// bit what qt.dequantize(torch.bfloat16) returns. X is x rounded to bf16 (RNE; exact for bf16 x).
//
// Layouts. X: row-major bf16, rows padded to the engine's kMR, K to a multiple of 32 (zeros). B: a
// panel of kKC × kNC decoded per (column block, k block), in tiles of 16 k-pairs × 16 columns
// (1 KiB: the AMX B-tile layout, pairs along k, "VNNI"), tile (ks, cg) at (ks · kNC/16 + cg) · 1 KiB.
// vdpbf16ps reads the same tile rows as 16 fp32 lanes × a pair. C: row-major fp32 [rows][kNC].
//
// Loops: per block of kMC rows of x: pack X (threads share it); threads take column blocks of kNC
// dynamically (shared cores), the last ones cut into row slices (Tasks); per column block, per k
// block of kKC: decode the panel (L1/L2), then the engine's micro-kernel over all rows of the block.
// The panel is decoded once per kMC rows of x: ≈ 0.4 cycle per weight (Zen 4) against 2·kMC flops per
// weight.
// Each output element is computed by one thread in a fixed order: results do not depend on the
// number of threads. A non-finite x element reaches only its own row of C.
#pragma once
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "cpu/gemm_internal.h"
#include "cpu/simd_avx2.h"

namespace lowbit::cpu {
namespace {

using simd::load8;
using simd::to_bf16x8;
using simd::unpack8;

// Rows of the B operand's source: a packed weight (decoded) or a dense matrix (converted).
struct RowSrc {
  const GemmWeight* w = nullptr;  // quantized rows (w->n × w->k), or
  const void* a = nullptr;        // dense rows in dtype dt, row stride ld elements
  DType dt = DType::f32;
  int64_t ld = 0;
  int64_t rows = 0, cols = 0;  // outside this extent the source reads as zeros
};

#if defined(__AVX512BW__)
// 16 fp32 → 16 bf16 (RNE, NaN stays NaN: the rule of float_to_bf16 / to_bf16x8).
inline __m256i to_bf16x16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

constexpr int64_t kPrefetchRows = 16;  // rows of codes fetched ahead of their decode

// The AVX-512 decode of quantized rows: per block, the 16 (int2: 4) values a code can take are
// computed once with the fp32 operations of cpu::dequantize and rounded to bf16 — a table of 16 bf16 —
// then vpermw maps 32 codes to their bf16 values at once. Templated on the format's shape so the loops
// carry no per-run branches.
template <int kBits, bool kTable>
struct LutDecode {
  static constexpr int kCodeBits = kBits;
  static constexpr bool kIsTable = kTable;
  // Block b's table (bf16, the low 16 words), exactly as dequantize(bf16) makes the values.
  static __m512i table(const GemmWeight& w, int64_t b) { return table_of(w, weight_scale(w, b), b); }
  // The same from the block's scale s (weight_scale) and, int formats, its zero w.zero[b].
  static __m512i table_of(const GemmWeight& w, float s, int64_t b) {
    const __m512 sc = _mm512_set1_ps(s);
    __m512 v;
    if constexpr (kTable) {
      v = _mm512_mul_ps(_mm512_loadu_ps(w.fmt == Fmt::nf4 ? kNF4 : kFP4), sc);
    } else {
      const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      v = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(w.zero[b])), sc);
    }
#if defined(__AVX512BF16__)
    // vcvtneps2bf16 rounds as to_bf16x16 does (NaN quieted the same way) except that it reads a
    // denormal input as zero: used when no value is denormal (checked; 5 instructions fewer per table)
    const __m512i u = _mm512_castps_si512(v);
    if (!_mm512_kandn(_mm512_test_epi32_mask(u, _mm512_set1_epi32(0x7f800000)), _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x7fffffff))))
      return _mm512_castsi256_si512(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#endif
    return _mm512_castsi256_si512(to_bf16x16(v));
  }
  // tile_rows' 16 tables, rows r = 0..15 at blocks b + r·bpr: the 16 scales first (the scalar chains
  // side by side), then, when no product can be denormal (checked for all 16 at once: nf4 / fp4 values
  // are 0 or ≥ 2^-7.6 in magnitude, so |s| ≥ 2^-118 suffices; int formats below), one multiply and one
  // vcvtneps2bf16 per table — the per-table path had been about half of the decode's instructions.
  static void tables16(const GemmWeight& w, int64_t b, int64_t bpr, __m512i* lut) {
    alignas(64) float sc[16];
    for (int r = 0; r < 16; ++r) sc[r] = weight_scale(w, b + r * bpr);
#if defined(__AVX512BF16__)
    const __m512 a = _mm512_abs_ps(_mm512_load_ps(sc));
    if constexpr (kTable) {
      if (!_mm512_cmp_ps_mask(a, _mm512_set1_ps(0x1p-118f), _CMP_LT_OQ)) {  // NaN scales pass: NaN stays NaN
        const __m512 tab = _mm512_loadu_ps(w.fmt == Fmt::nf4 ? kNF4 : kFP4);
        for (int r = 0; r < 16; ++r)
          lut[r] = _mm512_castsi256_si512(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(tab, _mm512_set1_ps(sc[r])))));
        return;
      }
    } else {  // (q - z)·s: no product is denormal when |s| ≥ 2^-100 and every zero z lies on an integer
      // or at least 2^-26 from one (|q - z| is then 0 or ≥ 2^-26 for every code q)
      alignas(64) float zs[16];
      for (int r = 0; r < 16; ++r) zs[r] = w.zero[b + r * bpr];
      const __m512 z = _mm512_load_ps(zs);
      const __m512 frac = _mm512_abs_ps(_mm512_sub_ps(z, _mm512_roundscale_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
      const __mmask16 near = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(frac, _mm512_setzero_ps(), _CMP_NEQ_OQ), frac,
                                                     _mm512_set1_ps(0x1p-26f), _CMP_LT_OQ);
      if (!near && !_mm512_cmp_ps_mask(a, _mm512_set1_ps(0x1p-100f), _CMP_LT_OQ)) {
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (int r = 0; r < 16; ++r) {
          const __m512 v = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(zs[r])), _mm512_set1_ps(sc[r]));
          lut[r] = _mm512_castsi256_si512(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
        }
        return;
      }
    }
#endif
    for (int r = 0; r < 16; ++r) lut[r] = table_of(w, sc[r], b + r * bpr);
  }
  // The 32 codes at src → 16 dwords of int16 table indices in element order (2p low, 2p + 1 high).
  static __m512i index(const uint8_t* src) {
    if constexpr (kBits == 4) {  // byte j: element 2j in the high nibble
      const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      return _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(_mm512_and_si512(d, _mm512_set1_epi32(0xf)), 16));
    } else {  // byte j: elements 4j..4j+3 in bits 7-6, 5-4, 3-2, 1-0; pair p from byte p / 2
      const __m512i sh_a = _mm512_setr_epi32(6, 2, 6, 2, 6, 2, 6, 2, 6, 2, 6, 2, 6, 2, 6, 2);
      const __m512i sh_b = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
      const __m512i m2 = _mm512_set1_epi32(0x3);
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
      const __m512i d = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(q, q));
      return _mm512_or_si512(_mm512_and_si512(_mm512_srlv_epi32(d, sh_a), m2),
                             _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(d, sh_b), m2), 16));
    }
  }
  // Codes are read in short runs far apart in memory (a row's kKC columns in panel_rows, 96 columns
  // of consecutive rows in panel_cols), which the hardware prefetchers do not follow: fetch the run
  // kPrefetchRows rows down, decoded a few hundred cycles later (measured, 1 thread, M = 32 / 128 / 512,
  // forward: 0.88 / 0.93 / 0.99 → 0.95 / 0.96 / 1.00 of torch dense bf16; gemm_t M = 512: 0.93 → 1.03;
  // fetching the row's next k run into L2 instead had left every row's first run to a demand miss).
  // Always inlined: as a function of its own GCC found it free of side effects (prefetches are not
  // side effects to it) and deleted every call.
  [[gnu::always_inline]] static void prefetch(const GemmWeight& w, int64_t row, int64_t c0, int cv) {
    if (row + kPrefetchRows >= w.n) return;
    const int64_t next = (row + kPrefetchRows) * w.k + c0;
    for (int o = 0; o < cv * kBits / 8; o += 64) _mm_prefetch(reinterpret_cast<const char*>(w.codes + next * kBits / 8 + o), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w.codes + (next + cv) * kBits / 8 - 1), _MM_HINT_T0);  // a run may straddle a line
    // and the run's block statistics (int4/int2: an fp32 scale and zero per block, 25% of the code
    // bytes at block 64, had missed as the codes did; double quant: one byte per block)
    const int64_t nb = next >> __builtin_ctz(w.block);
    if (w.scale_q) _mm_prefetch(reinterpret_cast<const char*>(w.scale_q + nb), _MM_HINT_T0);
    else _mm_prefetch(reinterpret_cast<const char*>(w.scale + nb), _MM_HINT_T0);
    if (!kTable) _mm_prefetch(reinterpret_cast<const char*>(w.zero + nb), _MM_HINT_T0);
  }

  // Row `row`, columns [c0, c0 + cv) → out (bf16). Runs of 32 never straddle a block (block % 32 == 0,
  // c0 % 32 == 0): the block index once per call, then it advances by counting.
  [[gnu::noinline, gnu::aligned(64)]] static void row(const GemmWeight& wr, int64_t row, int64_t c0, int cv, uint16_t* out) {
    const GemmWeight w = wr;  // the stores below may alias anything: through wr each field was reloaded per run
    prefetch(w, row, c0, cv);
    const int64_t e = row * w.k + c0;
    int64_t b = e >> __builtin_ctz(w.block);  // blocks are powers of two (gemm_block_ok)
    int left = int((b + 1) * w.block - e);    // elements of block b from e on
    __m512i lut = table(w, b);
    const uint8_t* src = w.codes + e * kBits / 8;
    for (int i = 0; i < cv; i += 32, src += 4 * kBits, left -= 32) {
      if (left == 0) lut = table(w, ++b), left = w.block;
      _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(index(src), lut));
    }
  }

  // The 16 tiles' worth of panel_rows for rows [n0, n0 + 16) (all < w.n), columns [k0, k0 + kc) (all
  // < w.k): per 32 columns, each row's 16 k-pairs decoded into a register, the 16 registers transposed
  // into the tile's 16 rows of pairs and stored — no round trip through a row buffer (which, with the
  // per-run branches, had been half of the decode's time; see docs/kernels.md).
  [[gnu::noinline, gnu::aligned(64)]] static void tile_rows(const GemmWeight& wr, int64_t n0, int64_t k0, int kc, int32_t* tiles, int64_t tile_stride) {
    const GemmWeight w = wr;
    for (int r = 0; r < 16; ++r) prefetch(w, n0 + r, k0, kc);
    const int64_t e = n0 * w.k + k0, bpr = w.k >> __builtin_ctz(w.block);  // blocks per row (k % block == 0)
    int64_t b = e >> __builtin_ctz(w.block);
    int left = int((b + 1) * w.block - e);
    __m512i lut[16];
    tables16(w, b, bpr, lut);
    const uint8_t* src = w.codes + e * kBits / 8;
    const int64_t row_bytes = w.k * kBits / 8;
    for (int ks = 0; ks < kc / 32; ++ks, src += 4 * kBits, left -= 32, tiles += tile_stride) {
      if (left == 0) {
        ++b, left = w.block;
        tables16(w, b, bpr, lut);
      }
      __m512i d[16];
      for (int r = 0; r < 16; ++r) d[r] = _mm512_permutexvar_epi16(index(src + r * row_bytes), lut[r]);
      transpose16x16(d);
      for (int t = 0; t < 16; ++t) _mm512_store_si512(tiles + 16 * t, d[t]);
    }
  }

  // panel_cols' rows of k-pairs for the np source-row pairs from r0 (all < w.n), columns [j0, j0 + nc)
  // (all < w.k, nc % 32 == 0, nc ≤ 96): both rows of a pair decoded into registers and interleaved
  // there. Eight pairs (16 rows) at a time share their tables, built by tables16 (≤ 3 column blocks).
  [[gnu::noinline, gnu::aligned(64)]] static void pair_rows(const GemmWeight& w, int64_t r0, int np, int64_t j0, int nc, int32_t* panel, int ncg) {
    const int sh = __builtin_ctz(w.block);
    const int64_t bpr = w.k >> sh, cb0 = j0 >> sh;  // blocks per row; the column block of j0
    const int ncb = int(((j0 + nc - 1) >> sh) - cb0 + 1);
    __m512i lut[3][16];
    for (int p0 = 0; p0 < np; p0 += 8) {
      const int pn = std::min(8, np - p0);
      const int64_t ra0 = r0 + 2 * p0;
      const bool grouped = pn == 8;  // 16 whole rows: the tables of all of them, together
      if (grouped)
        for (int cb = 0; cb < ncb; ++cb) tables16(w, ra0 * bpr + cb0 + cb, bpr, lut[cb]);
      for (int pr = p0; pr < p0 + pn; ++pr) {
        const int64_t ra = r0 + 2 * pr;
        prefetch(w, ra, j0, nc);
        prefetch(w, ra + 1, j0, nc);
        const uint8_t* sa = w.codes + (ra * w.k + j0) * kBits / 8;
        int32_t* row = panel + int64_t(pr / 16) * ncg * 256 + (pr % 16) * 16;
        const int la = 2 * (pr - p0);
        if (!grouped)  // the last pairs: tables one by one
          for (int cb = 0; cb < ncb; ++cb) lut[cb][0] = table(w, ra * bpr + cb0 + cb), lut[cb][1] = table(w, (ra + 1) * bpr + cb0 + cb);
        const int lr = grouped ? la : 0;
        for (int c = 0; c < nc; c += 32) {  // a run of 32 lies in one block (block % 32 == 0, j0 % 32 == 0)
          const int cb = int(((j0 + c) >> sh) - cb0);
          store_pairs(_mm512_permutexvar_epi16(index(sa + c * kBits / 8), lut[cb][lr]),
                      _mm512_permutexvar_epi16(index(sa + w.k * kBits / 8 + c * kBits / 8), lut[cb][lr + 1]), row + (c / 16) * 256);
        }
      }
    }
  }
  // Rows a and b of a pair, 32 columns each → two tile rows of 16 (a, b) pairs, the second 256 dwords on.
  static void store_pairs(__m512i za, __m512i zb, int32_t* out) {
    // per 128-bit lane L: lo = pairs of columns 8L..8L+3, hi = 8L+4..8L+7; q0 / q1 put them in order
    const __m512i q0 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), q1 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    const __m512i lo = _mm512_unpacklo_epi16(za, zb), hi = _mm512_unpackhi_epi16(za, zb);
    _mm512_store_si512(out, _mm512_permutex2var_epi64(lo, q0, hi));
    _mm512_store_si512(out + 256, _mm512_permutex2var_epi64(lo, q1, hi));
  }

  // d[r][c] (dwords) → d[c][r].
  static void transpose16x16(__m512i* d) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {  // within each 128-bit lane: rows interleaved by dword
      t[i] = _mm512_unpacklo_epi32(d[i], d[i + 1]);
      t[i + 1] = _mm512_unpackhi_epi32(d[i], d[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // d[i + j], lane L: rows i..i+3 at column 4L + j
      d[i + 0] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
      d[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
      d[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
      d[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int j = 0; j < 4; ++j) {  // lanes gathered: column 4L + j from groups 0, 4, 8, 12
      const __m512i s0 = _mm512_shuffle_i32x4(d[j], d[4 + j], 0x88), s1 = _mm512_shuffle_i32x4(d[j], d[4 + j], 0xdd);
      const __m512i s2 = _mm512_shuffle_i32x4(d[8 + j], d[12 + j], 0x88), s3 = _mm512_shuffle_i32x4(d[8 + j], d[12 + j], 0xdd);
      t[0 + j] = _mm512_shuffle_i32x4(s0, s2, 0x88);
      t[8 + j] = _mm512_shuffle_i32x4(s0, s2, 0xdd);
      t[4 + j] = _mm512_shuffle_i32x4(s1, s3, 0x88);
      t[12 + j] = _mm512_shuffle_i32x4(s1, s3, 0xdd);
    }
    for (int i = 0; i < 16; ++i) d[i] = t[i];
  }
};

inline void row_bf16_lut(const GemmWeight& w, int64_t row, int64_t c0, int cv, uint16_t* out) {
  switch (w.fmt) {
    case Fmt::nf4:
    case Fmt::fp4: LutDecode<4, true>::row(w, row, c0, cv, out); break;
    case Fmt::int4: LutDecode<4, false>::row(w, row, c0, cv, out); break;
    case Fmt::int2: LutDecode<2, false>::row(w, row, c0, cv, out); break;
  }
}

// panel_cols' leading pairs of source rows that lie inside a quantized weight, with all nc columns
// inside it: the number of pairs written (0 for a dense source or a partial column block).
inline int pair_rows_lut(const RowSrc& s, int64_t r0, int np, int64_t j0, int nc, int32_t* panel, int ncg) {
  if (!s.w || j0 + nc > s.cols || nc > 96) return 0;  // pair_rows holds tables for 3 column blocks
  np = int(std::clamp<int64_t>((s.rows - r0) / 2, 0, np));
  switch (s.w->fmt) {
    case Fmt::nf4:
    case Fmt::fp4: LutDecode<4, true>::pair_rows(*s.w, r0, np, j0, nc, panel, ncg); break;
    case Fmt::int4: LutDecode<4, false>::pair_rows(*s.w, r0, np, j0, nc, panel, ncg); break;
    case Fmt::int2: LutDecode<2, false>::pair_rows(*s.w, r0, np, j0, nc, panel, ncg); break;
  }
  return np;
}

// panel_rows' 16 rows [n0, n0 + 16) of a quantized weight when all lie inside it; false otherwise.
inline bool tile_rows_lut(const RowSrc& s, int64_t n0, int64_t k0, int kc, int32_t* tiles, int64_t tile_stride) {
  if (!s.w || n0 + 16 > s.rows || k0 + kc > s.cols) return false;
  switch (s.w->fmt) {
    case Fmt::nf4:
    case Fmt::fp4: LutDecode<4, true>::tile_rows(*s.w, n0, k0, kc, tiles, tile_stride); break;
    case Fmt::int4: LutDecode<4, false>::tile_rows(*s.w, n0, k0, kc, tiles, tile_stride); break;
    case Fmt::int2: LutDecode<2, false>::tile_rows(*s.w, n0, k0, kc, tiles, tile_stride); break;
  }
  return true;
}
#endif

// Row `row`, columns [c0, c0 + cn) of src → bf16; c0 and cn multiples of 32.
inline void src_row_bf16(const RowSrc& s, int64_t row, int64_t c0, int cn, uint16_t* out) {
  const int cv = row < s.rows ? int(std::clamp<int64_t>(s.cols - c0, 0, cn)) : 0;
#if defined(__AVX512BW__)
  if (s.w && cv > 0) {
    row_bf16_lut(*s.w, row, c0, cv, out);
    std::memset(out + cv, 0, sizeof(uint16_t) * size_t(cn - cv));
    return;
  }
#endif
  if (s.w && cv > 0) {  // cv is a multiple of 32 (k % block == 0): each run of 32 lies in one block
    const GemmWeight& w = *s.w;
    const int bits = fmt_bits(w.fmt), per_byte = 8 / bits;
    const bool is_table = fmt_is_table(w.fmt);
    const float* table = w.fmt == Fmt::nf4 ? kNF4 : kFP4;
    const __m256 t_lo = _mm256_loadu_ps(table), t_hi = _mm256_loadu_ps(table + 8);
    for (int i = 0; i < cv; i += 32) {
      const int64_t e0 = row * w.k + c0 + i, b = e0 / w.block;
      const __m256 sc = _mm256_set1_ps(weight_scale(w, b));
      const __m256 z = _mm256_set1_ps(is_table ? 0.0f : w.zero[b]);
      const uint8_t* src = w.codes + e0 / per_byte;
      for (int j = 0; j < 32; j += 8) {
        const __m256 v = decode8_f32(unpack8(src + j / per_byte, bits), is_table, t_lo, t_hi, sc, z);  // then RNE
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + j), to_bf16x8(v));
      }
    }
  } else if (cv > 0 && s.dt == DType::bf16) {  // already bf16 (x, gy, A, B of a bf16 model): a copy
    std::memcpy(out, static_cast<const uint16_t*>(s.a) + row * s.ld + c0, sizeof(uint16_t) * size_t(cv));
  } else if (cv > 0) {
    int i = 0;
    for (; i + 8 <= cv; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), to_bf16x8(load8(s.a, s.dt, row * s.ld + c0 + i)));
    for (; i < cv; ++i) out[i] = float_to_bf16(load_as_float(s.a, s.dt, row * s.ld + c0 + i));
  }
  std::memset(out + cv, 0, sizeof(uint16_t) * size_t(cn - cv));
}

// dst[c][r] = src[r][c] for an 8 × 8 block of 32-bit elements.
inline void transpose8x8(const int32_t* src, int64_t lds, int32_t* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * lds)));
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  __m256 u[8];
  for (int h = 0; h < 8; h += 4) {
    u[h + 0] = _mm256_shuffle_ps(t[h + 0], t[h + 2], 0x44);
    u[h + 1] = _mm256_shuffle_ps(t[h + 0], t[h + 2], 0xee);
    u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
    u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * ldd), _mm256_castps_si256(r[i]));
}

// The panel for C columns [j0, j0 + nc) × contraction [k0, k0 + kc) when B[k][j] = src[j][k]
// (gemm, the lowrank branch): 16 source rows at a time into tmp (16 × kc bf16), then each 16 × 16
// block of k-pairs transposed into its tile.
// Only the first nf column groups are filled (the tiles keep the stride of nc / 16 groups).
inline void panel_rows(const RowSrc& s, int64_t j0, int nc, int nf, int64_t k0, int kc, uint16_t* tmp, int32_t* panel) {
  const int ncg = nc / 16;
  for (int cg = 0; cg < nf; ++cg) {
#if defined(__AVX512BW__)
    if (tile_rows_lut(s, j0 + cg * 16, k0, kc, panel + int64_t(cg) * 256, int64_t(ncg) * 256)) continue;
#endif
    for (int r = 0; r < 16; ++r) src_row_bf16(s, j0 + cg * 16 + r, k0, kc, tmp + r * kc);
    const int32_t* t32 = reinterpret_cast<const int32_t*>(tmp);  // [16 columns][kc / 2 pairs]
    for (int ks = 0; ks < kc / 32; ++ks) {
      int32_t* tile = panel + (int64_t(ks) * ncg + cg) * 256;  // [16 pairs][16 columns]
      for (int tb = 0; tb < 2; ++tb)
        for (int cb = 0; cb < 2; ++cb)
          transpose8x8(t32 + cb * 8 * (kc / 2) + ks * 16 + tb * 8, kc / 2, tile + tb * 8 * 16 + cb * 8, 16);
    }
  }
}

// The panel when B[k][j] = src[k][j] (gemm_t: the contraction runs over W's rows): source rows k0 + 2p
// and k0 + 2p + 1 interleaved into row p % 16 of the tiles of step p / 16.
inline void panel_cols(const RowSrc& s, int64_t j0, int nc, int64_t k0, int kc, uint16_t* tmp, int32_t* panel) {
  const int ncg = nc / 16;
  int pr = 0;
#if defined(__AVX512BW__)
  pr = pair_rows_lut(s, k0, kc / 2, j0, nc, panel, ncg);
#endif
  // A bf16 dense source whose nc columns all lie inside it (the lowrank backward's x and gy): pairs of
  // its rows interleaved straight from where they lie, no copy into tmp.
  const bool direct = !s.w && s.dt == DType::bf16 && j0 + nc <= s.cols;
  for (; pr < kc / 2; ++pr) {
    const uint16_t *ra = tmp, *rb = tmp + nc;
    if (direct && k0 + 2 * pr + 1 < s.rows) {
      ra = static_cast<const uint16_t*>(s.a) + (k0 + 2 * pr) * s.ld + j0;
      rb = ra + s.ld;
    } else {
      src_row_bf16(s, k0 + 2 * pr, j0, nc, tmp);
      src_row_bf16(s, k0 + 2 * pr + 1, j0, nc, tmp + nc);
    }
    int32_t* row = panel + int64_t(pr / 16) * ncg * 256 + (pr % 16) * 16;
    for (int cg = 0; cg < ncg; ++cg) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ra + cg * 16));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + cg * 16));
      const __m256i lo = _mm256_unpacklo_epi16(a, b), hi = _mm256_unpackhi_epi16(a, b);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + cg * 256), _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + cg * 256 + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
  }
}

// Row m of a dtype matrix (cols valid, row stride ld) → bf16, zero-padded to kp.
inline void pack_row_bf16(const void* x, DType dt, int64_t ld, int64_t m, int64_t cols, int64_t kp, uint16_t* out) {
  if (dt == DType::bf16) {  // already the engine's operand: a copy (converting cost 2.7% at M = 512)
    std::memcpy(out, static_cast<const uint16_t*>(x) + m * ld, sizeof(uint16_t) * size_t(cols));
    std::memset(out + cols, 0, sizeof(uint16_t) * size_t(kp - cols));
    return;
  }
  int64_t i = 0;
  for (; i + 8 <= cols; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), to_bf16x8(load8(x, dt, m * ld + i)));
  for (; i < cols; ++i) out[i] = float_to_bf16(load_as_float(x, dt, m * ld + i));
  std::memset(out + cols, 0, sizeof(uint16_t) * size_t(kp - cols));
}

// C (+)= X · B for one term of a product: X bf16 (kp columns, zero past the data), B from src. Row i of
// X: x + i·ldx for i < mt (x packed, or a bf16 input read in place), then the packed tail rows xt +
// (i − mt)·ldxt (a block of kMR rows lies wholly on one side: mt is a multiple of kMR).
struct Term {
  const uint16_t* x;
  int64_t ldx, kp;
  RowSrc src;
  bool cols;  // B[k][j] = src[k][j] (panel_cols) instead of src[j][k] (panel_rows)
  const uint16_t* xt = nullptr;
  int64_t ldxt = 0, mt = INT64_MAX;
  const uint16_t* row(int64_t i, int64_t& ld) const {
    ld = i < mt ? ldx : ldxt;
    return i < mt ? x + i * ldx : xt + (i - mt) * ldxt;
  }
};

template <class E>
struct Scratch {  // per thread
  AlignedBufT<int32_t> panel_buf;
  AlignedBufT<uint16_t> tmp_buf;
  AlignedBuf c_buf;
};

// One column block [j0, j0 + kNC) of C for rows [0, mp): the terms' k blocks in order. Only the
// first nv columns are computed (the micro-kernels skip whole 16/32-column groups past them; the panel
// is filled to the next 32 columns, the widest group a micro-kernel reads).
template <class E>
void column_block(const Term* terms, int nterms, int64_t mp, int64_t j0, int nv, Scratch<E>& sc, float* c) {
  int32_t* panel = sc.panel_buf.get(size_t(E::kKC) * E::kNC / 2);
  uint16_t* tmp = sc.tmp_buf.get(size_t(16) * std::max(E::kKC, E::kNC));
  const int nf = std::min(E::kNC, (nv + 31) / 32 * 32) / 16;
  bool first = true;
  for (int t = 0; t < nterms; ++t) {
    const Term& T = terms[t];
    for (int64_t k0 = 0; k0 < T.kp; k0 += E::kKC) {
      const int kc = int(std::min<int64_t>(E::kKC, T.kp - k0));
      if (T.cols) panel_cols(T.src, j0, E::kNC, k0, kc, tmp, panel);
      else panel_rows(T.src, j0, E::kNC, nf, k0, kc, tmp, panel);
      for (int64_t m0 = 0; m0 < mp; m0 += E::kMR) {
        int64_t ld;
        const uint16_t* xr = T.row(m0, ld);
        E::micro(first, xr + k0, ld, panel, kc, c + m0 * E::kNC, E::kNC, nv);
      }
      first = false;
    }
  }
}

// Rows [0, mv) × columns [j0, j0 + nv) of C (+ bias) → out (row stride ld, dtype dt).
[[gnu::noinline]] inline void store_rows(const float* c, int64_t ldc, int64_t mv, int nv, const void* bias, DType dt, void* out,
                       int64_t ld, int64_t j0) {
#if defined(__AVX512BW__)
  if (dt == DType::bf16) {  // the common case, 16 at a time without a dtype switch per 8 (≈ 1% at M = 512)
    const uint16_t* b16 = static_cast<const uint16_t*>(bias);
    uint16_t* o16 = static_cast<uint16_t*>(out);
    for (int64_t m = 0; m < mv; ++m) {
      const float* cm = c + m * ldc;
      int j = 0;
      for (; j + 16 <= nv; j += 16) {
        __m512 v = _mm512_loadu_ps(cm + j);
        if (b16) v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(
                                          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b16 + j0 + j))), 16)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o16 + m * ld + j0 + j), to_bf16x16(v));
      }
      for (; j < nv; ++j) o16[m * ld + j0 + j] = float_to_bf16(cm[j] + (b16 ? load_as_float(bias, dt, j0 + j) : 0.0f));
    }
    return;
  }
#endif
  for (int64_t m = 0; m < mv; ++m) {
    const float* cm = c + m * ldc;
    int j = 0;
    for (; j + 8 <= nv; j += 8) {
      __m256 v = _mm256_loadu_ps(cm + j);
      if (bias) v = _mm256_add_ps(v, load8(bias, dt, j0 + j));
      simd::store8(out, dt, m * ld + j0 + j, v);
    }
    for (; j < nv; ++j) store_from_float(out, dt, m * ld + j0 + j, cm[j] + (bias ? load_as_float(bias, dt, j0 + j) : 0.0f));
  }
}

// Packed x rows are kRowPad elements (64 bytes) longer than their data: with K a multiple of 2048
// the rows of a micro-kernel's 8 (32) rows would otherwise all map to the same L1 sets.
constexpr int64_t kRowPad = 32;

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }
inline size_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

// The threads' tasks over a product's column blocks: one task per block of kNC columns × all mp rows,
// except the last `nth` blocks, each cut into nth row slices (multiples of kMR) so the threads finish
// together. Measured (2 threads, N = 4096 = 42⅔ blocks of 96): whole blocks only left one thread up
// to ⅔ of a block (1.5%) longer than the other. A split block's panels are decoded once per slice.
template <class E>
struct Tasks {
  struct Task {
    int64_t j0;
    int nv;
    int64_t ma, mb;  // rows [ma, mb) of the packed x (mb - ma a multiple of kMR; empty when ma == mb)
  };
  int64_t cols, mp, nb, whole, parts;
  Tasks(int64_t cols_, int64_t mp_, int nth) : cols(cols_), mp(mp_), nb((cols_ + E::kNC - 1) / E::kNC) {
    parts = (nth > 1 && mp >= int64_t(2) * nth * E::kMR) ? nth : 1;
    whole = parts > 1 ? std::max<int64_t>(0, nb - nth) : nb;
  }
  int64_t count() const { return whole + (nb - whole) * parts; }
  Task at(int64_t t) const {
    int64_t b = t, ma = 0, mb = mp;
    if (t >= whole) {
      const int64_t u = t - whole, rows = round_up((mp + parts - 1) / parts, E::kMR);
      b = whole + u / parts;
      ma = std::min(mp, (u % parts) * rows);
      mb = std::min(mp, ma + rows);
    }
    return {b * E::kNC, int(std::min<int64_t>(E::kNC, cols - b * E::kNC)), ma, mb};
  }
};

// Whether a product's X rows are read where they lie instead of being packed: bf16 (already the engine's
// operand), a multiple of 32 elements per row (the micro-kernels read whole 32-element steps), and a row
// stride that keeps a micro-kernel's rows in different L1 sets (cols % 1024 != 0: at most 2 of 8 rows
// share a set; a multiple of 2048 would put all of them in one). Packing cost up to 10% of a small
// product (576 × 576, M = 512: 22 µs of 0.21 ms per thread) and a barrier.
inline bool read_in_place(DType dt, int64_t cols) { return dt == DType::bf16 && cols % 32 == 0 && cols % 1024 != 0; }

// X of one block of rows [m0, m0 + mv) (mp: mv rounded up to kMR): rows [0, mfull) read in place from
// the input, the rest (all of them when the input is not read in place) packed in `pk`.
struct XBlock {
  const uint16_t* in;  // the input's row m0 (in place), or null
  int64_t ld;          // its row stride
  uint16_t* pk;        // packed rows, row stride ldp: rows [mfull, mp)
  int64_t ldp, mfull, mv, mp;
  Term term(int64_t ma, int64_t kp, const RowSrc& src, bool cols) const {  // rows from ma (a multiple of kMR)
    Term t{in ? in + ma * ld : pk + ma * ldp, in ? ld : ldp, kp, src, cols};
    if (in) t.xt = pk, t.ldxt = ldp, t.mt = mfull - ma;
    return t;
  }
  // Pack rows [ra, rb) ∩ [mfull, mp) of the input x (dtype dt, row stride ldx_in, cols valid of kp).
  void pack(const void* x, DType dt, int64_t ldx_in, int64_t m0, int64_t cols, int64_t kp, int64_t ra, int64_t rb) const {
    for (int64_t m = std::max(ra, mfull); m < rb; ++m) {
      uint16_t* out = pk + (m - mfull) * ldp;
      if (m < mv) pack_row_bf16(x, dt, ldx_in, m0 + m, cols, kp, out);
      else std::memset(out, 0, sizeof(uint16_t) * size_t(kp));
    }
  }
};

template <class E>
XBlock x_block(const void* x, DType dt, int64_t cols, int64_t m0, int64_t mv, uint16_t* pk, int64_t ldp) {
  const bool in_place = read_in_place(dt, cols);
  return {in_place ? static_cast<const uint16_t*>(x) + m0 * cols : nullptr, cols, pk, ldp,
          in_place ? mv / E::kMR * E::kMR : 0, mv, round_up(mv, E::kMR)};
}

// Row slice t of nth (multiples of kMR) of mp rows.
template <class E>
std::pair<int64_t, int64_t> row_slice(int64_t mp, int t, int nth) {
  const int64_t rows = round_up((mp + nth - 1) / nth, E::kMR), ra = std::min(mp, t * rows);
  return {ra, std::min(mp, ra + rows)};
}

// gemm / lowrank forward on engine E (lr: the branch, see the top of this file).
template <class E>
void gemm_bf16(const GemmParams& p, const LowrankParams* lr) {
  const int64_t M = p.m, N = p.w.n, K = p.w.k;  // K % 32 == 0 (block ≥ 32)
  const int r = lr ? lr->r : 0;
  const int64_t rp = round_up(r, 32), ldxa = rp + kRowPad;
  const int64_t mc = std::min<int64_t>(E::kMC, round_up(M, E::kMR));
  const int64_t ldx = K + kRowPad;
  static thread_local AlignedBufT<uint16_t> x_buf, xa_buf;
  uint16_t* xb = x_buf.get(size_t((read_in_place(p.dtype, K) ? E::kMR : mc) * ldx));
  uint16_t* xab = lr ? xa_buf.get(size_t(mc * ldxa)) : nullptr;
  RowSrc wsrc;
  wsrc.w = &p.w;
  wsrc.rows = N;
  wsrc.cols = K;
  RowSrc asrc, bsrc;
  if (lr) {
    asrc.a = lr->a, asrc.dt = p.dtype, asrc.ld = K, asrc.rows = r, asrc.cols = K;
    bsrc.a = lr->b, bsrc.dt = p.dtype, bsrc.ld = r, bsrc.rows = N, bsrc.cols = r;
  }
  for (int64_t m0 = 0; m0 < M; m0 += E::kMC) {
    const XBlock X = x_block<E>(p.x, p.dtype, K, m0, std::min<int64_t>(E::kMC, M - m0), xb, ldx);
    const int64_t mv = X.mv, mp = X.mp;
#pragma omp parallel
    {
      static thread_local Scratch<E> sc;
      float* c = sc.c_buf.get(size_t(mp) * E::kNC);
      E::thread_init();
      const int nth = omp_get_num_threads();
      if (X.mfull < mp || lr) {
        // The row phase, a slice of rows per thread: pack them (only a tail of < kMR rows when x is read
        // in place), then xa = x · Aᵀ of the same rows — no barrier between, a thread reads only the rows
        // it packed. The xa output (dtype) and s·xa in bf16, the branch's X.
#pragma omp for schedule(static)
        for (int t = 0; t < nth; ++t) {
          const auto [ra, rb] = row_slice<E>(mp, t, nth);
          X.pack(p.x, p.dtype, K, m0, K, K, ra, rb);
          if (!lr || ra == rb) continue;
          const Term ta = X.term(ra, K, asrc, false);
          for (int64_t j0 = 0; j0 < r; j0 += E::kNC) {
            const int nv = int(std::min<int64_t>(E::kNC, r - j0));
            column_block<E>(&ta, 1, rb - ra, j0, nv, sc, c);
            const __m256 vs = _mm256_set1_ps(lr->s);
            for (int64_t m = ra; m < rb; ++m) {  // rows ≥ mv: zero (their x rows are zero)
              const float* cm = c + (m - ra) * E::kNC;
              uint16_t* xr = xab + m * ldxa + j0;
              int j = 0;
              for (; j + 8 <= nv; j += 8) {
                const __m256 v = _mm256_loadu_ps(cm + j);
                if (m < mv) simd::store8(lr->xa, p.dtype, (m0 + m) * r + j0 + j, v);
                _mm_storeu_si128(reinterpret_cast<__m128i*>(xr + j), to_bf16x8(_mm256_mul_ps(vs, v)));
              }
              for (; j < nv; ++j) {
                if (m < mv) store_from_float(lr->xa, p.dtype, (m0 + m) * r + j0 + j, cm[j]);
                xr[j] = float_to_bf16(lr->s * cm[j]);
              }
            }
          }
          for (int64_t m = ra; m < rb; ++m) std::memset(xab + m * ldxa + r, 0, sizeof(uint16_t) * size_t(rp - r));
        }
      }
      const Tasks<E> tasks(N, mp, nth);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks.count(); ++t) {
        const auto tk = tasks.at(t);
        if (tk.ma == tk.mb) continue;
        const Term terms[2] = {X.term(tk.ma, K, wsrc, false),
                               {lr ? xab + tk.ma * ldxa : nullptr, ldxa, rp, bsrc, false}};
        column_block<E>(terms, lr ? 2 : 1, tk.mb - tk.ma, tk.j0, tk.nv, sc, c);
        store_rows(c, E::kNC, std::max<int64_t>(0, std::min(tk.mb, mv) - tk.ma), tk.nv, p.bias, p.dtype,
                   static_cast<char*>(p.y) + size_t((m0 + tk.ma) * N) * dtype_size(p.dtype), N, tk.j0);
      }
      E::thread_done();
    }
  }
}

// gemm_t on engine E: gx (M, K) = gy (M, N) · Ŵ.
template <class E>
void gemm_t_bf16(const GemmParams& p) {
  const int64_t M = p.m, N = p.w.n, K = p.w.k;
  const int64_t np = round_up(N, 32), ldx = np + kRowPad;
  const int64_t mc = std::min<int64_t>(E::kMC, round_up(M, E::kMR));
  static thread_local AlignedBufT<uint16_t> x_buf;
  uint16_t* xb = x_buf.get(size_t((read_in_place(p.dtype, N) ? E::kMR : mc) * ldx));
  RowSrc wsrc;
  wsrc.w = &p.w;
  wsrc.rows = N;
  wsrc.cols = K;
  for (int64_t m0 = 0; m0 < M; m0 += E::kMC) {
    const XBlock X = x_block<E>(p.x, p.dtype, N, m0, std::min<int64_t>(E::kMC, M - m0), xb, ldx);
    const int64_t mv = X.mv, mp = X.mp;
#pragma omp parallel
    {
      static thread_local Scratch<E> sc;
      float* c = sc.c_buf.get(size_t(mp) * E::kNC);
      E::thread_init();
      const int nth = omp_get_num_threads();
      if (X.mfull < mp) {
#pragma omp for schedule(static)
        for (int t = 0; t < nth; ++t) {
          const auto [ra, rb] = row_slice<E>(mp, t, nth);
          X.pack(p.x, p.dtype, N, m0, N, np, ra, rb);
        }
      }
      const Tasks<E> tasks(K, mp, nth);
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < tasks.count(); ++i) {
        const auto tk = tasks.at(i);
        if (tk.ma == tk.mb) continue;
        const Term t = X.term(tk.ma, np, wsrc, true);
        column_block<E>(&t, 1, tk.mb - tk.ma, tk.j0, tk.nv, sc, c);
        store_rows(c, E::kNC, std::max<int64_t>(0, std::min(tk.mb, mv) - tk.ma), tk.nv, nullptr, p.dtype,
                   static_cast<char*>(p.y) + size_t((m0 + tk.ma) * K) * dtype_size(p.dtype), K, tk.j0);
      }
      E::thread_done();
    }
  }
}

// The lowrank backward on engine E (include/lowbit/lowrank.h): per block of kMC rows of gy, a row phase
// (pack gy; u = s·gy·B + gxa for the thread's rows, kept as bf16 rows for gx's branch and as bf16 hi + lo
// columns of uᵀ for ga; xa's columns into xaᵀ), then gx's column blocks — gy · Ŵ and bf16(u) · A in the
// same fp32 accumulators, as the forward adds its branch. Then ga = uᵀ · x and gbᵀ = xaᵀ · gy over all
// rows, contraction over M, x and gy read as panel sources: column blocks of both in one task pool.
template <class E>
void lowrank_backward_bf16(const LowrankBackwardParams& q) {
  const GemmParams& p = q.g;
  const int64_t M = p.m, N = p.w.n, K = p.w.k;
  const int r = q.r;
  const int64_t np = round_up(N, 32), ldx = np + kRowPad;
  const int64_t rp = round_up(r, 32), ldu = rp + kRowPad;
  const int64_t kpm = round_up(M, 32), ldt = kpm + kRowPad;  // uᵀ, xaᵀ: contraction over M
  const int64_t rows_u = round_up(2 * r, E::kMR), rows_xa = round_up(r, E::kMR);
  const int64_t mc = std::min<int64_t>(E::kMC, round_up(M, E::kMR));
  static thread_local AlignedBufT<uint16_t> x_buf, u_buf, ut_buf, xat_buf;
  uint16_t* xb = x_buf.get(size_t((read_in_place(p.dtype, N) ? E::kMR : mc) * ldx));
  uint16_t* ub = u_buf.get(size_t(mc * ldu));
  uint16_t* ut = ut_buf.get(size_t(rows_u * ldt));    // rows [0, r): hi, [r, 2r): lo, the rest zero
  uint16_t* xat = xat_buf.get(size_t(rows_xa * ldt));
  RowSrc wsrc, asrc, bsrc, xsrc, gysrc;
  wsrc.w = &p.w, wsrc.rows = N, wsrc.cols = K;
  asrc.a = q.a, asrc.dt = p.dtype, asrc.ld = K, asrc.rows = r, asrc.cols = K;      // B[j][k] = A[j][k]
  bsrc.a = q.b, bsrc.dt = p.dtype, bsrc.ld = r, bsrc.rows = N, bsrc.cols = r;      // B[n][j] = B[n][j]
  xsrc.a = q.x, xsrc.dt = p.dtype, xsrc.ld = K, xsrc.rows = M, xsrc.cols = K;      // B[m][k] = x[m][k]
  gysrc.a = p.x, gysrc.dt = p.dtype, gysrc.ld = N, gysrc.rows = M, gysrc.cols = N;  // B[m][n] = gy[m][n]
  for (int64_t i = 0; i < rows_u; ++i) std::memset(ut + i * ldt, 0, sizeof(uint16_t) * size_t(kpm));
  for (int64_t i = 0; i < rows_xa; ++i) std::memset(xat + i * ldt, 0, sizeof(uint16_t) * size_t(kpm));
  for (int64_t m0 = 0; m0 < M; m0 += E::kMC) {
    const XBlock X = x_block<E>(p.x, p.dtype, N, m0, std::min<int64_t>(E::kMC, M - m0), xb, ldx);
    const int64_t mv = X.mv, mp = X.mp;
#pragma omp parallel
    {
      static thread_local Scratch<E> sc;
      float* c = sc.c_buf.get(size_t(std::max({mp, rows_u, rows_xa})) * E::kNC);
      E::thread_init();
      const int nth = omp_get_num_threads();
#pragma omp for schedule(static)
      for (int t = 0; t < nth; ++t) {
        const auto [ra, rb] = row_slice<E>(mp, t, nth);
        X.pack(p.x, p.dtype, N, m0, N, np, ra, rb);
        if (ra == rb) continue;
        const Term tu = X.term(ra, np, bsrc, true);
        for (int64_t j0 = 0; j0 < r; j0 += E::kNC) {
          const int nv = int(std::min<int64_t>(E::kNC, r - j0));
          column_block<E>(&tu, 1, rb - ra, j0, nv, sc, c);
          for (int64_t m = ra; m < rb; ++m) {
            uint16_t* urow = ub + m * ldu + j0;
            if (m >= mv) {  // padding rows: zero (their gy rows are zero)
              std::memset(urow, 0, sizeof(uint16_t) * size_t(nv));
              continue;
            }
            for (int j = 0; j < nv; ++j) {
              const int64_t jj = j0 + j, mm = m0 + m;
              float v = q.s * c[(m - ra) * E::kNC + j];
              if (q.gxa) v += load_as_float(q.gxa, p.dtype, mm * r + jj);
              const uint16_t hi = float_to_bf16(v);
              urow[j] = hi;
              ut[jj * ldt + mm] = hi;
              ut[(r + jj) * ldt + mm] = float_to_bf16(v - bf16_to_float(hi));
              xat[jj * ldt + mm] = float_to_bf16(load_as_float(q.xa, p.dtype, mm * r + jj));
            }
          }
        }
        for (int64_t m = ra; m < rb; ++m) std::memset(ub + m * ldu + r, 0, sizeof(uint16_t) * size_t(rp - r));
      }
      if (p.y) {
        const Tasks<E> tasks(K, mp, nth);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < tasks.count(); ++i) {
          const auto tk = tasks.at(i);
          if (tk.ma == tk.mb) continue;
          const Term terms[2] = {X.term(tk.ma, np, wsrc, true), {ub + tk.ma * ldu, ldu, rp, asrc, true}};
          column_block<E>(terms, 2, tk.mb - tk.ma, tk.j0, tk.nv, sc, c);
          store_rows(c, E::kNC, std::max<int64_t>(0, std::min(tk.mb, mv) - tk.ma), tk.nv, nullptr, p.dtype,
                     static_cast<char*>(p.y) + size_t((m0 + tk.ma) * K) * dtype_size(p.dtype), K, tk.j0);
        }
      }
      E::thread_done();
    }
  }
  // ga (column blocks over K) and gbᵀ (over N): C = uᵀ · x (2r rows: hi, lo) and xaᵀ · gy.
  const int64_t na = (K + E::kNC - 1) / E::kNC, nb = (N + E::kNC - 1) / E::kNC;
#pragma omp parallel
  {
    static thread_local Scratch<E> sc;
    float* c = sc.c_buf.get(size_t(std::max(rows_u, rows_xa)) * E::kNC);
    E::thread_init();
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < na + nb; ++t) {
      const bool is_a = t < na;
      const int64_t j0 = (is_a ? t : t - na) * E::kNC;
      const int nv = int(std::min<int64_t>(E::kNC, (is_a ? K : N) - j0));
      const Term tt = is_a ? Term{ut, ldt, kpm, xsrc, true} : Term{xat, ldt, kpm, gysrc, true};
      column_block<E>(&tt, 1, is_a ? rows_u : rows_xa, j0, nv, sc, c);
      for (int j = 0; j < r; ++j)
        for (int i = 0; i < nv; ++i) {
          if (is_a) q.ga[j * K + j0 + i] = c[j * E::kNC + i] + c[(r + j) * E::kNC + i];
          else q.gb[(j0 + i) * r + j] = q.s * c[j * E::kNC + i];
        }
    }
    E::thread_done();
  }
}

}  // namespace
}  // namespace lowbit::cpu
