// csrc/cpu/gemm_gemv_i16.h — the gemm family's small-M (M ≤ 8) forward kernel, gemv_i16 (with the
// lowrank family's branch fused in). Included by gemm_avx2.cpp (AVX2 + FMA + F16C) and by
// gemm_avx512.cpp (the same plus AVX-512 VL/BW/VNNI, LOWBIT_GEMV_VNNI = 1), each compiled with its
// own ISA flags: everything here has internal linkage (an anonymous namespace), so each file gets
// its own instantiation and the two never meet. With LOWBIT_GEMV_VNNI the int16 dot products are
// vpdpwssd (multiply, add pairs and accumulate in one instruction) and nf4/fp4 codes become int16
// table values with one vpermw per 16 codes; the arithmetic is otherwise the same.
#pragma once
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/gemm_internal.h"
#include "cpu/simd_avx2.h"

#ifndef LOWBIT_GEMV_VNNI
#define LOWBIT_GEMV_VNNI 0
#endif

namespace lowbit::cpu {
namespace {

using simd::hmax;
using simd::hsum;
using simd::load8;
using simd::unpack8;

// ============================================================================ small-M path
// y (M ≤ kGemvMaxM = 8, N) = x · Wᵀ with W streamed from memory once (M = 5..8 run as 8 with
// zero rows: measured 2x faster than the tile path at M = 8, even at M ≈ 16). Integer dot products:
//
//   activations: per group of 32 along k, x ≈ dx_g · xq, xq = round(x / max|x|_g · QX) ∈ int16
//   weights:     nf4 / fp4 as an int16 image of the table, T16 = round(T · S) (fp4: S = 3072 is
//                exact, every fp4 value is a multiple of 1/192; nf4: S = 16384, |T16 − T·S| ≤ 0.42,
//                i.e. 2.6e-5 of the block absmax); int4 / int2: the code q itself, exact;
//                w = s · T16 / S  or  s · (q − z)  (the zero term is folded in once per block:
//                Σ x̂ s (q − z) = s·Σ dx_g Σ xq q − s·z·Σ_g dx_g Σ xq).
//   per chunk of 64 weights (4-bit; 128 for int2) = 32 code bytes of one row: decode to 4 (8)
//   ymm of int16, vpmaddwd against the matching int16 activations, add the int32 results, then
//   once per chunk acc += float(int32) · (dx · s) in fp32.
//
// No overflow: an int32 lane sums 8 (int2: 16) products per chunk: nf4 8·16383·16384 < 2^31,
// fp4 8·32767·3072, int4 8·32767·15, int2 16·32767·3 — all < 2^31 for any input.
//
// Error vs x @ dequant(W).T (documented in docs/kernels.md): the activation rounding, |x̂ − x| ≤
// 0.5/QX · max|x|_g per element (int4/int2/fp4: 1.5e-5, nf4: 3.1e-5 of the group max), plus for nf4
// the table image (≤ 2.6e-5 of the block absmax per weight), plus fp32 accumulation. Random
// signs: ≈ 1e-5 · ||x_g∘w||₂ per output, i.e. ~1e-5 relative, 300× below bf16 rounding.
//
// Roofline (per 64 weights = 32 B of codes, per row of x): nf4/fp4 1 load + 3 (nibble split)
// + 4 vpshufb + 4 vpunpck + 4 vpmaddwd + 3 vpaddd + cvt/mul/fma 3 ≈ 22 instr (0.34/weight);
// int4 ≈ 17 (6 shift/and instead of the 8 shuffles); int2 per 128 weights ≈ 33 (0.26/weight).
// At ~2.5-3 instr/cycle this is 7-9 weights/cycle/core, i.e. 25-30 GB/s of 4-bit codes per core
// at 3.5 GHz: above the ~18 GB/s a core gets when both stream, so the kernel is memory-bound
// (plus scales: 4 B per block, 1 B with double quant). x (int16, 2 B/k) stays in L2.
constexpr int kGemvMaxM = 8;
constexpr int kXGroup = 32;
// Software prefetch of each row's codes, this many bytes ahead (once per 64-byte line): the
// hardware prefetcher alone left a core's DRAM stream ~10% short with 4 rows in flight (measured
// 1 thread, 8192x28672-class rows: nf4+dq 23.4 -> 25.8, int4 24.4 -> 26.6 G weights/s; 256-1024
// all similar). Scale rows are prefetched once per 16 blocks (and the int formats' zero rows, read
// in the epilogue): int2, whose scales + zeros are a third of its bytes, +9%; prefetching them
// every chunk made int4 slower.
constexpr int kPrefetch = 512;

enum class Dec { tab4, int4, int2 };

template <Dec D> constexpr int kChunk = D == Dec::int2 ? 128 : 64;  // weights per 32 code bytes
template <Dec D> constexpr int kNReg = kChunk<D> / 16;               // int16 ymm per chunk

// Slot s of the decoded chunk (register s / 16, int16 lane s % 16) holds element elem_of(s) of the
// chunk. The activations are stored in this order, so no weight repacking is needed.
template <Dec D>
int elem_of(int s) {
  const int r = s / 16, l = s % 16;
  if (D == Dec::tab4 && !LOWBIT_GEMV_VNNI) {  // unpack{lo,hi}_epi8 of the high-nibble (r 0,1) / low-nibble (r 2,3) bytes
    const int byte = (l < 8 ? l : 16 + l - 8) + ((r & 1) ? 8 : 0);
    return 2 * byte + (r >= 2 ? 1 : 0);
  }
  if (D != Dec::int2) {  // int16 lane l = bytes 2l, 2l+1 = elements 4l..4l+3; r = nibble 0..3 from the LSB
                         // (int4; nf4/fp4 too under VNNI, where vpermw maps each nibble lane to its value)
    static const int off[4] = {1, 0, 3, 2};
    return 4 * l + off[r];
  }
  // int2: int16 lane l = elements 8l..8l+7; r = crumb 0..7 from the LSB
  return r < 4 ? 8 * l + 3 - r : 8 * l + 11 - r;
}

template <Dec D>
const int* slot_table() {
  static const auto t = [] {
    std::vector<int> v(kChunk<D>);
    for (int s = 0; s < kChunk<D>; ++s) v[s] = elem_of<D>(s);
    return v;
  }();
  return t.data();
}

// First element of the chunk covered by int32 lane j of a vpmaddwd result (all registers agree):
// 4-bit lanes 0-3 ↔ elements 0-31, 4-7 ↔ 32-63 (shuffles stay in 128-bit halves); int2 16j.
template <Dec D> constexpr int lane_elem(int j) { return D == Dec::int2 ? 16 * j : (j / 4) * 32; }

struct GemvX {  // the quantized activations, shared by the threads
  const int16_t* xq;  // (mm, nchunk * chunk) in slot order, zero past k
  const float* dx;    // (mm, nchunk * 8): dx of the group behind each int32 lane, 0 past k
  const float* xs;    // (mm, k / block): Σ_{groups g in block} dx_g · Σ xq  (int formats)
  int64_t nchunk, ldq, ldd, ldb;
  // low-rank branch (null xas: plain gemm): y[m, n] += Σ_j xas[m, j] · B[n, j]
  const float* xas = nullptr;  // (mm, rp8) s · x·Aᵀ in fp32, zero past r and for padded rows
  const void* b = nullptr;     // (n, r) in the activation dtype
  int r = 0, rp8 = 0;
  // deferred epilogue (xa not complete yet): the base value of y[m, n] goes to ybase[m·n_total + n]
  // in fp32, and lr_finish adds the branch and the bias later (same operations, same order)
  float* ybase = nullptr;
};

// Row n of B in fp32, zero-padded to rp8 (≤ 256).
inline void lr_brow(const GemvX& gx, DType t, int64_t n, float* brow) {
  int j = 0;
  for (; j + 8 <= gx.r; j += 8) _mm256_store_ps(brow + j, load8(gx.b, t, n * gx.r + j));
  for (; j < gx.rp8; ++j) brow[j] = j < gx.r ? load_as_float(gx.b, t, n * gx.r + j) : 0.0f;
}

// s · xa[m] · B[n]ᵀ: one rp8-long fp32 dot.
inline float lr_dot(const float* xas_m, const float* brow, int rp8) {
  __m256 d = _mm256_setzero_ps();
  for (int j = 0; j < rp8; j += 8) d = _mm256_fmadd_ps(_mm256_load_ps(xas_m + j), _mm256_load_ps(brow + j), d);
  return hsum(d);
}

template <Dec D>
__attribute__((always_inline)) inline void decode_i16(const uint8_t* src, __m256i* w, __m256i tlo, __m256i thi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
#if LOWBIT_GEMV_VNNI
  if constexpr (D == Dec::tab4) {  // the int4 split, then tlo = the 16 int16 table values, one vpermw each
    (void)thi;
    const __m256i m = _mm256_set1_epi16(0x000f);
    w[0] = _mm256_permutexvar_epi16(_mm256_and_si256(v, m), tlo);
    w[1] = _mm256_permutexvar_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), tlo);
    w[2] = _mm256_permutexvar_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 8), m), tlo);
    w[3] = _mm256_permutexvar_epi16(_mm256_srli_epi16(v, 12), tlo);
    return;
  }
#endif
  if constexpr (D == Dec::tab4) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), lo = _mm256_and_si256(v, m4);
    const __m256i hl = _mm256_shuffle_epi8(tlo, hi), hh = _mm256_shuffle_epi8(thi, hi);
    const __m256i ll = _mm256_shuffle_epi8(tlo, lo), lh = _mm256_shuffle_epi8(thi, lo);
    w[0] = _mm256_unpacklo_epi8(hl, hh);
    w[1] = _mm256_unpackhi_epi8(hl, hh);
    w[2] = _mm256_unpacklo_epi8(ll, lh);
    w[3] = _mm256_unpackhi_epi8(ll, lh);
  } else if constexpr (D == Dec::int4) {
    const __m256i m = _mm256_set1_epi16(0x000f);
    w[0] = _mm256_and_si256(v, m);
    w[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    w[2] = _mm256_and_si256(_mm256_srli_epi16(v, 8), m);
    w[3] = _mm256_srli_epi16(v, 12);
  } else {
    const __m256i m = _mm256_set1_epi16(0x0003);
    w[0] = _mm256_and_si256(v, m);
    w[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), m);
    w[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    w[3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), m);
    w[4] = _mm256_and_si256(_mm256_srli_epi16(v, 8), m);
    w[5] = _mm256_and_si256(_mm256_srli_epi16(v, 10), m);
    w[6] = _mm256_and_si256(_mm256_srli_epi16(v, 12), m);
    w[7] = _mm256_srli_epi16(v, 14);
  }
}

// Scale of each int32 lane for chunk ch of a row; SPC = scales per chunk (1, 2 or 4).
template <Dec D, int SPC>
inline __m256 chunk_scales(const float* s_row, int64_t ch) {
  if constexpr (SPC == 1) {
    return _mm256_broadcast_ss(s_row);  // caller passes the block's scale
  } else if constexpr (SPC == 2) {
    const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s_row + ch * 2)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  } else {
    const __m128 four = _mm_loadu_ps(s_row + ch * 4);
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(four), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  }
}

// Σ over the chunk's NREG registers of vpmaddwd(w, x): int32 lanes (see lane_elem).
template <Dec D>
__attribute__((always_inline)) inline __m256i dot_chunk(const __m256i* w, const int16_t* x) {
#if LOWBIT_GEMV_VNNI  // vpdpwssd accumulates: the same exact int32 sums (no overflow, see above),
  // in two chains (half the registers each) so the dependent-accumulate latency stays hidden
  auto xv = [&](int i) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(x + 16 * i)); };
  constexpr int H = kNReg<D> / 2;
  __m256i c0 = _mm256_madd_epi16(w[0], xv(0)), c1 = _mm256_madd_epi16(w[H], xv(H));
#pragma GCC unroll 4
  for (int i = 1; i < H; ++i) {
    c0 = _mm256_dpwssd_epi32(c0, w[i], xv(i));
    c1 = _mm256_dpwssd_epi32(c1, w[H + i], xv(H + i));
  }
  return _mm256_add_epi32(c0, c1);
#else
  auto md = [&](int i) { return _mm256_madd_epi16(w[i], _mm256_load_si256(reinterpret_cast<const __m256i*>(x + 16 * i))); };
  const __m256i a = _mm256_add_epi32(_mm256_add_epi32(md(0), md(1)), _mm256_add_epi32(md(2), md(3)));
  if constexpr (kNReg<D> == 4) {
    return a;
  } else {
    const __m256i b = _mm256_add_epi32(_mm256_add_epi32(md(4), md(5)), _mm256_add_epi32(md(6), md(7)));
    return _mm256_add_epi32(a, b);
  }
#endif
}



// The 256 possible double-quant scales of each nested block touching blocks [b0, b0 + cnt) →
// tab[(nb − b0 / 256) · 256 + q] (32 vector mul + add per nested block: a vector image of dq_scale,
// formats.h — the same fp32 operations, bit-identical). Returns the number of tables (≤ cnt / 256 + 2).
int64_t dq_tables(const GemmWeight& w, int64_t b0, int64_t cnt, float* tab) {
  const int64_t nb0 = nested_block_of(b0), ntab = nested_block_of(b0 + cnt - 1) - nb0 + 1;
  const __m256 voff = _mm256_set1_ps(w.scale_offset);
  for (int64_t t = 0; t < ntab; ++t) {
    const __m256 vns = _mm256_set1_ps(w.scale_nested[nb0 + t]);
    for (int q = 0; q < 256; q += 8)
      _mm256_storeu_ps(tab + t * 256 + q, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(kDynamicSigned + q), vns), voff));
  }
  return ntab;
}

// The dq_tables a thread holds: tables of nested blocks [first, end) in tab. Row groups that follow
// one another share them — at K = 576 a group of 4 rows is 36 blocks and a nested block 256, so the
// tables are built about once per nested block instead of once per group (which had kept the inline
// double-quant path to groups of ≥ 64 blocks; short rows paid a scalar decode per group: nf4 + dq ran
// at 0.78 of nf4's rate at K = 576). clear() after anything else writes tab.
struct DqTableCache {
  float* tab;
  int64_t first = 0, end = 0;
  // tables from the nested block of b0 on, covering blocks [b0, b0 + cnt)
  const float* get(const GemmWeight& w, int64_t b0, int64_t cnt) {
    const int64_t nb0 = nested_block_of(b0), nb1 = nested_block_of(b0 + cnt - 1) + 1;
    if (nb0 < first || nb1 > end) {
      dq_tables(w, b0, cnt, tab);
      first = nb0;
      end = nb1;
    }
    return tab + (nb0 - first) * 256;
  }
  void clear() { first = end = 0; }
};

// Double-quant scales of blocks [b0, b0 + cnt) → out; same fp32 operations as weight_scale
// (multiply, round, add, round): bit-identical. Long runs go through dq_tables (tab: room for
// (cnt / 256 + 2) · 256 floats, or null): table loads instead of a scalar mul/add per block.
void decode_scales_dq(const GemmWeight& w, int64_t b0, int64_t cnt, float* out, float* tab = nullptr) {
  const float off = w.scale_offset;
  const int64_t nb0 = nested_block_of(b0);
  if (tab && cnt >= 64) {
    dq_tables(w, b0, cnt, tab);
    const uint8_t* q = w.scale_q + b0;
    for (int64_t i = 0; i < cnt;) {
      const int64_t nb = nested_block_of(b0 + i), end = std::min(cnt, (nb + 1) * kNestedBlock - b0);
      const float* t = tab + (nb - nb0) * 256;
      for (; i < end; ++i) out[i] = t[q[i]];
    }
    return;
  }
  for (int64_t i = 0; i < cnt;) {
    const int64_t nb = nested_block_of(b0 + i), end = std::min(cnt, (nb + 1) * kNestedBlock - b0);
    const float ns = w.scale_nested[nb];
    const uint8_t* q = w.scale_q + b0;
    for (; i < end; ++i) out[i] = dq_scale(kDynamicSigned[q[i]], ns, off);
  }
}

// The int16 image of a 16-entry table (nf4 ×16384, fp4 ×3072): its low and high bytes in both 128-bit
// halves (VNNI: lo holds the 16 int16 values themselves, for vpermw). Built once per process, not per
// call of gemv_rows (48 roundings per 4 rows: ≈ 5% of an M = 1 GEMV at 576 × 576).
struct Tab4Image {
  alignas(32) int8_t lo[32];
  alignas(32) int8_t hi[32];
};

inline Tab4Image make_tab4_image(const float* table, float S) {
  Tab4Image t;
  for (int i = 0; i < 32; ++i) {
    const int v = int(std::nearbyint(table[i % 16] * S));
    t.lo[i] = int8_t(v & 0xff);
    t.hi[i] = int8_t(v >> 8);
  }
  if (LOWBIT_GEMV_VNNI)
    for (int i = 0; i < 16; ++i) {
      const int16_t v = int16_t(std::nearbyint(table[i] * S));
      std::memcpy(t.lo + 2 * i, &v, 2);
    }
  return t;
}

constexpr float tab4_scale(Fmt fmt) { return fmt == Fmt::nf4 ? 16384.0f : 3072.0f; }

inline const Tab4Image& tab4_image(Fmt fmt) {
  static const Tab4Image nf4 = make_tab4_image(kNF4, tab4_scale(Fmt::nf4)), fp4 = make_tab4_image(kFP4, tab4_scale(Fmt::fp4));
  return fmt == Fmt::nf4 ? nf4 : fp4;
}

struct GemvRowScales {  // per thread: the rows' scales (double quant decoded), padded with zeros
  AlignedBuf buf;
  const float* rows[4];
};

// R rows of W [n0, n0 + R) against MM rows of x.
// DQ (nf4/fp4 with double quant, block ≥ 64): s_rows is unused; the chunk's scale is read as
// tab[q] from the dq_tables of the rows (tab: tables from nested block n0·nbr / 256 on), with the
// chunk loop cut where a row enters a new nested block: one byte load + one broadcast load per
// row and chunk, no arithmetic (a separate decode pass cost ~17% of the kernel).
template <Dec D, int MM, int R, int SPC, bool DQ = false>
void gemv_rows(const GemmParams& p, const GemvX& gx, int64_t n0, const float* const* s_rows, const float* tab = nullptr) {
  constexpr int CH = kChunk<D>, NREG = kNReg<D>, BYTES = 32;
  const GemmWeight& w = p.w;
  const int64_t K = w.k, nfull = K / CH, row_bytes = K * fmt_bits(w.fmt) / 8;
  const int block = w.block;
  __m256i tlo = _mm256_setzero_si256(), thi = _mm256_setzero_si256();
  if constexpr (D == Dec::tab4) {
    const Tab4Image& ti = tab4_image(w.fmt);
    tlo = _mm256_load_si256(reinterpret_cast<const __m256i*>(ti.lo));
    thi = _mm256_load_si256(reinterpret_cast<const __m256i*>(ti.hi));
  }

  __m256 acc[MM][R];
#pragma GCC unroll 16
  for (int i = 0; i < MM * R; ++i) acc[i / R][i % R] = _mm256_setzero_ps();
  const uint8_t* src[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) src[r] = w.codes + (n0 + r) * row_bytes;
  // SPC == 1: chunk ch uses the scale of block ch >> cshift (block / CH is a power of two)
  const int cshift = SPC == 1 ? __builtin_ctz(unsigned(block / CH)) : 0;

  const int64_t nbr = K / block, nb0 = nested_block_of(n0 * nbr);
  const float* tp[R];
  const uint8_t* qp[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) qp[r] = DQ ? w.scale_q + (n0 + r) * nbr : nullptr;
  for (int64_t ch = 0; ch < nfull;) {
    int64_t seg_end = nfull;
    if constexpr (DQ) {  // rows' tables for this segment; the segment ends where a row's nested block does
      const int64_t bi = ch >> cshift;
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int64_t flat = (n0 + r) * nbr + bi, nb = nested_block_of(flat);
        tp[r] = tab + (nb - nb0) * 256;
        seg_end = std::min(seg_end, ((nb + 1) * kNestedBlock - (n0 + r) * nbr) << cshift);
      }
    }
    for (; ch < seg_end; ++ch) {
      const int16_t* xq = gx.xq + ch * CH;
      __m256 dxv[MM];
#pragma GCC unroll 4
      for (int m = 0; m < MM; ++m) dxv[m] = _mm256_load_ps(gx.dx + m * gx.ldd + ch * 8);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        __m256i wv[NREG];
        if ((ch & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(src[r] + ch * BYTES + kPrefetch), _MM_HINT_T0);
        if constexpr (!DQ) {  // scale row 16 blocks ahead; int formats: the zero row for the epilogue
          const int64_t bi = (ch * CH) / block;
          if ((bi & 15) == 0 && (ch * CH) % block == 0) {
            _mm_prefetch(reinterpret_cast<const char*>(s_rows[r] + bi + 16), _MM_HINT_T0);
            if constexpr (D != Dec::tab4) _mm_prefetch(reinterpret_cast<const char*>(w.zero + (n0 + r) * nbr + bi), _MM_HINT_T0);
          }
        }
        decode_i16<D>(src[r] + ch * BYTES, wv, tlo, thi);
        const __m256 sv = DQ ? _mm256_broadcast_ss(tp[r] + qp[r][ch >> cshift])
                             : SPC == 1 ? _mm256_broadcast_ss(s_rows[r] + (ch >> cshift)) : chunk_scales<D, SPC>(s_rows[r], ch);
#pragma GCC unroll 4
        for (int m = 0; m < MM; ++m)
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_chunk<D>(wv, xq + m * gx.ldq)), _mm256_mul_ps(dxv[m], sv), acc[m][r]);
      }
    }
  }
  if (nfull * CH < K) {  // tail chunk: zero-padded copies of the last codes and scales
    const int rem = int(K - nfull * CH);
    const int16_t* xq = gx.xq + nfull * CH;
    for (int r = 0; r < R; ++r) {
      alignas(32) uint8_t tail[BYTES] = {};
      alignas(16) float ts[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      std::memcpy(tail, src[r] + nfull * BYTES, size_t(rem) * fmt_bits(w.fmt) / 8);
      if (DQ) {
        ts[0] = weight_scale(w, (n0 + r) * nbr + (nfull * CH) / block);
      } else if (SPC == 1) {
        ts[0] = s_rows[r][(nfull * CH) / block];
      } else {
        for (int i = 0; i < rem / block; ++i) ts[i] = s_rows[r][nfull * SPC + i];
      }
      __m256i wv[NREG];
      decode_i16<D>(tail, wv, tlo, thi);
      const __m256 sv = chunk_scales<D, SPC>(ts, 0);
      for (int m = 0; m < MM; ++m) {
        const __m256 dxv = _mm256_load_ps(gx.dx + m * gx.ldd + nfull * 8);
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_chunk<D>(wv, xq + m * gx.ldq)), _mm256_mul_ps(dxv, sv), acc[m][r]);
      }
    }
  }

  for (int r = 0; r < R; ++r) {
    const int64_t n = n0 + r;
    const float b = p.bias ? load_as_float(p.bias, p.dtype, n) : 0.0f;
    alignas(32) float brow[256];  // row n of B in fp32, zero-padded to rp8: read once for all m
    if (gx.xas) lr_brow(gx, p.dtype, n, brow);
    for (int m = 0; m < MM; ++m) {
      float v = hsum(acc[m][r]);
      if constexpr (D != Dec::tab4) {  // − Σ_b s_b z_b Σ_{g∈b} dx_g X_g
        const int64_t nbr = K / block;
        const float* s = s_rows[r];
        const float* z = w.zero + n * nbr;
        const float* xs = gx.xs + m * gx.ldb;
        __m256 c8 = _mm256_setzero_ps();
        int64_t b8 = 0;
        for (; b8 + 8 <= nbr; b8 += 8)
          c8 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(s + b8), _mm256_loadu_ps(z + b8)), _mm256_loadu_ps(xs + b8), c8);
        float c = hsum(c8);
        for (; b8 < nbr; ++b8) c += s[b8] * z[b8] * xs[b8];
        v -= c;
      }
      if (gx.ybase) {  // deferred low-rank epilogue: lr_finish adds the branch and the bias
        if (m < p.m) gx.ybase[m * w.n + n] = v;
        continue;
      }
      if (gx.xas) v += lr_dot(gx.xas + m * gx.rp8, brow, gx.rp8);  // + s·xa[m]·B[n]ᵀ from registers
      if (m < p.m) store_out(p.y, p.dtype, m * w.n + n, v + b);
    }
  }
}

// Quantize rows of x for chunks [c0, c1): int16 in slot order, lane scales, group sums.
template <Dec D>
void gemv_prep_chunks(const GemmParams& p, int mm, int64_t c0, int64_t c1, int16_t* xq, float* dx,
                      float* gsum, int64_t ldq, int64_t ldd, float qx, float table_scale) {
  constexpr int CH = kChunk<D>, G = CH / kXGroup;
  const int64_t K = p.w.k;
  const int* slot = slot_table<D>();
  for (int m = 0; m < mm; ++m) {
    for (int64_t c = c0; c < c1; ++c) {
      alignas(32) float xv[CH];
      alignas(32) int32_t qv[CH];
      float gdx[G];
      for (int g = 0; g < G; ++g) {
        const int64_t e0 = c * CH + g * kXGroup;
        int32_t* q = qv + g * kXGroup;
        float* xf = xv + g * kXGroup;
        if (e0 >= K || m >= p.m) {  // padding: past k, or a padded row of x (M < MM)
          for (int i = 0; i < kXGroup; ++i) q[i] = 0;
          gdx[g] = 0.0f;
          if (gsum && e0 < K) gsum[m * (K / kXGroup) + (e0 / kXGroup)] = 0.0f;
          continue;
        }
        __m256 vmax = _mm256_setzero_ps();
        __m256 vbad = _mm256_setzero_ps();
        const __m256 fmax = _mm256_set1_ps(3.4028235e38f);
        for (int i = 0; i < kXGroup; i += 8) {
          const __m256 v = load8(p.x, p.dtype, m * K + e0 + i);
          _mm256_store_ps(xf + i, v);
          const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
          vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, fmax, _CMP_NLE_UQ));  // inf or NaN
          vmax = _mm256_max_ps(vmax, a);
        }
        const bool finite = _mm256_movemask_ps(vbad) == 0;
        const float amax = hmax(vmax);
        int32_t sum = 0;
        if (!finite) {
          for (int i = 0; i < kXGroup; ++i) q[i] = 0;
          gdx[g] = std::numeric_limits<float>::quiet_NaN();  // the output row becomes NaN
        } else if (amax == 0.0f) {
          for (int i = 0; i < kXGroup; ++i) q[i] = 0;
          gdx[g] = 0.0f;
        } else {
          // x / amax ∈ [-1, 1] (no overflow for tiny amax), then × QX and round half even
          const __m256 inv = _mm256_set1_ps(amax), vq = _mm256_set1_ps(qx);
          for (int i = 0; i < kXGroup; i += 8) {
            __m256 t = _mm256_mul_ps(_mm256_div_ps(_mm256_load_ps(xf + i), inv), vq);
            _mm256_store_si256(reinterpret_cast<__m256i*>(q + i),
                               _mm256_cvtps_epi32(_mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
          }
          for (int i = 0; i < kXGroup; ++i) sum += q[i];
          gdx[g] = amax / (qx * table_scale);
        }
        if (gsum) gsum[m * (K / kXGroup) + (e0 / kXGroup)] = float(sum) * gdx[g];
      }
      int16_t* out = xq + m * ldq + c * CH;
      for (int s = 0; s < CH; ++s) out[s] = int16_t(qv[slot[s]]);
      for (int j = 0; j < 8; ++j) dx[m * ldd + c * 8 + j] = gdx[lane_elem<D>(j) / kXGroup];
    }
  }
}

// Down-projection for the small-M path: xa (mm, r) = x · Aᵀ in fp32 from the exact x (not its
// int16 image). xf: x in fp32 (MM, K), zero rows past mm. Dots j ∈ [j0, j1): A rows read once
// (r·K elements in all, ≤ 3% of the weight bytes at r = 16 in fp32), x rows stay in L1/L2; xa[m, j]
// goes to lr.xa in the dtype and s·xa[m, j] to xas (MM, rp8), which the caller zeroed.
template <int MM>
void gemv_down(const GemmParams& p, const LowrankParams& lr, const float* xf, float* xas, int rp8, int j0, int j1,
               bool write_xa) {
  const int64_t K = p.w.k;
  const int mm = int(p.m), r = lr.r;
  for (int j = j0; j < j1; ++j) {
    __m256 acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {  // K is a multiple of the block (≥ 32)
      const __m256 a = load8(lr.a, p.dtype, j * K + k);
#pragma GCC unroll 8
      for (int m = 0; m < MM; ++m) acc[m] = _mm256_fmadd_ps(_mm256_load_ps(xf + m * K + k), a, acc[m]);
    }
    for (int m = 0; m < mm; ++m) {
      const float v = hsum(acc[m]);
      if (write_xa) store_out(lr.xa, p.dtype, m * r + j, v);
      xas[m * rp8 + j] = lr.s * v;
    }
  }
}

// The down-projection is split into parts of kLrPart dots that the threads of the GEMV's parallel
// region claim first thing (so both cores read A, instead of one while the other waits). A thread
// whose rows come before every part is published defers their epilogue (GemvX::ybase) and finishes
// them in lr_finish, after the region's first barrier — no barrier is added.
constexpr int kLrPart = 4;
constexpr int kLrMaxParts = 256 / kLrPart;
struct LrShare {
  std::atomic<int> next{0};
  std::atomic<int> done[kLrMaxParts];
  int parts = 0;
  bool test_defer = false;  // see lr_test_defer
  bool all_done() const {
    if (test_defer) return false;
    for (int q = 0; q < parts; ++q)
      if (!done[q].load(std::memory_order_acquire)) return false;
    return true;
  }
};

// Test hook (tests/test_lowrank_cpu.py): with LOWBIT_LOWRANK_TEST_DEFER=1 in the environment, every
// row takes the deferred epilogue and lr_finish recomputes all of xa privately — the two paths that
// otherwise run only when a thread is descheduled at the wrong moment. Read per call (≈ 0.1 µs).
inline bool lr_test_defer() {
  const char* e = std::getenv("LOWBIT_LOWRANK_TEST_DEFER");
  return e && e[0] == '1';
}

// Deferred epilogues of rows [n0, n0 + cnt) in `pend`: y = ybase + s·xa·B[n]ᵀ + bias, the same
// operations in the same order as gemv_rows' immediate epilogue (so the bits do not depend on which
// rows were deferred). If some part of xa is still unpublished (only if no barrier preceded this),
// this thread computes it itself into a private copy (same code, same bits; lr.xa is left to its owner).
template <int MM>
void lr_finish(const GemmParams& p, const LowrankParams& lr, const GemvX& gx, const LrShare& sh, const float* xf,
               const float* ybase, const std::vector<int64_t>& pend) {
  const float* xas = gx.xas;
  if (!sh.all_done()) {
    static thread_local AlignedBuf own_buf;
    float* own = own_buf.get(size_t(MM * gx.rp8));
    std::memset(own, 0, sizeof(float) * size_t(MM * gx.rp8));
    for (int q = 0; q < sh.parts; ++q) {
      const int j0 = q * kLrPart, j1 = std::min(lr.r, j0 + kLrPart);
      if (!sh.test_defer && sh.done[q].load(std::memory_order_acquire)) {
        for (int m = 0; m < MM; ++m)
          for (int j = j0; j < j1; ++j) own[m * gx.rp8 + j] = xas[m * gx.rp8 + j];
      } else {
        gemv_down<MM>(p, lr, xf, own, gx.rp8, j0, j1, false);
      }
    }
    xas = own;
  }
  const int64_t N = p.w.n;
  for (size_t i = 0; i < pend.size(); i += 2) {
    for (int64_t n = pend[i]; n < pend[i] + pend[i + 1]; ++n) {
      const float b = p.bias ? load_as_float(p.bias, p.dtype, n) : 0.0f;
      alignas(32) float brow[256];
      lr_brow(gx, p.dtype, n, brow);
      for (int m = 0; m < int(p.m); ++m) {
        float v = ybase[m * N + n];
        v += lr_dot(xas + m * gx.rp8, brow, gx.rp8);
        store_out(p.y, p.dtype, m * N + n, v + b);
      }
    }
  }
}

// The int formats' per-block sums of x: xs[m·nbr + b] = Σ_{groups g of block b} gs[m·ngr + g]
// (the zero-point epilogue's Σ_b s_b z_b Σ dx_g X_g reads them).
inline void block_sums(const float* gs, int mm, int64_t nbr, int64_t ngr, int gpb, float* xs) {
  for (int m = 0; m < mm; ++m)
    for (int64_t b = 0; b < nbr; ++b) {
      float t = 0.0f;
      for (int g = 0; g < gpb; ++g) t += gs[m * ngr + b * gpb + g];
      xs[m * nbr + b] = t;
    }
}

// The low-rank branch of one GEMV call (the int16 and int8 drivers alike): x in fp32, s·x·Aᵀ filled
// part by part by the threads (LrShare), and the deferred base values. init() also sets the branch's
// fields of f (the GemvX whose xas / b / r / rp8 the row kernels and lr_finish read).
template <int MM>
struct GemvLr {
  LrShare lsh;
  float* xf = nullptr;
  float* xas = nullptr;
  float* ybase = nullptr;
  void init(const GemmParams& p, const LowrankParams& lr, GemvX& f) {
    static thread_local AlignedBuf xf_buf, xas_buf, yb_buf;
    const int64_t K = p.w.k;
    f.r = lr.r;
    f.rp8 = (lr.r + 7) / 8 * 8;
    f.b = lr.b;
    xas = xas_buf.get(size_t(MM * f.rp8));
    std::memset(xas, 0, sizeof(float) * size_t(MM * f.rp8));
    f.xas = xas;
    xf = xf_buf.get(size_t(MM * K));
    for (int m = 0; m < MM; ++m)
      for (int64_t k = 0; k < K; k += 8)
        _mm256_store_ps(xf + m * K + k, m < p.m ? load8(p.x, p.dtype, m * K + k) : _mm256_setzero_ps());
    ybase = yb_buf.get(size_t(p.m * p.w.n));
    lsh.parts = (lr.r + kLrPart - 1) / kLrPart;
    for (int q = 0; q < lsh.parts; ++q) lsh.done[q].store(0, std::memory_order_relaxed);
    lsh.test_defer = lr_test_defer();
  }
};

// The branch's fields of a driver's activations (the int8 GEMV keeps them in a member, gemm_gemv_i8.h).
inline GemvX& lr_fields(GemvX& x) { return x; }
inline const GemvX& lr_fields(const GemvX& x) { return x; }

// The threads' part of a GEMV, the int16 and int8 drivers alike: W's rows in passes of R, handed out
// dynamically 32 rows a grab (the cores are shared with other jobs: a static split makes the fast thread
// wait for the slow one; 32 rows, ~450 KB at K = 28672, keep the streams long), the N % R remainder rows
// one at a time. run(integral_constant<R'>, x, n0, s_rows) computes rows [n0, n0 + R') from decoded
// scale rows; run_dq(x, n0, s_rows, tab) the R rows of a pass with the double-quant scales read from
// dq_tables in the kernel (kDQ: nf4/fp4 with one scale per chunk). Low-rank (lr): each thread first
// claims parts of the down-projection; until all are published, rows are computed with a deferred
// epilogue and listed for lr_finish.
template <int MM, int R, bool kDQ, class X, class Run, class RunDQ>
void gemv_parallel(const GemmParams& p, const LowrankParams* lr, const X& gx, GemvLr<MM>& st, Run run, RunDQ run_dq) {
  const GemmWeight& w = p.w;
  const int64_t N = w.n, nbr = w.k / w.block;
#pragma omp parallel
  {
    static thread_local AlignedBuf sbuf, tbuf;
    const int64_t groups = N / R;
    float* srow_buf = w.scale_q ? sbuf.get(size_t(R * nbr + 8)) : nullptr;
    float* tab_buf = w.scale_q ? tbuf.get(size_t((R * nbr / kNestedBlock + 2) * 256)) : nullptr;
    DqTableCache dqc{tab_buf};
    auto rows_scales = [&](int64_t n, int cnt, const float** s_rows) {
      if (w.scale_q) {  // the rows are contiguous
        decode_scales_dq(w, n * nbr, cnt * nbr, srow_buf, tab_buf);
        dqc.clear();
      }
      for (int r = 0; r < cnt; ++r) s_rows[r] = w.scale_q ? srow_buf + r * nbr : w.scale + (n + r) * nbr;
    };
    const float* s_rows[4] = {nullptr, nullptr, nullptr, nullptr};
    const bool dq_inline = kDQ && w.scale_q;
    static thread_local std::vector<int64_t> pend;
    pend.clear();
    bool ready = !lr;
    X gd = gx;
    if (lr) {
      lr_fields(gd).xas = nullptr;
      lr_fields(gd).ybase = st.ybase;
      for (int q; (q = st.lsh.next.fetch_add(1, std::memory_order_relaxed)) < st.lsh.parts;) {
        gemv_down<MM>(p, *lr, st.xf, st.xas, lr_fields(gx).rp8, q * kLrPart, std::min(lr->r, (q + 1) * kLrPart), true);
        st.lsh.done[q].store(1, std::memory_order_release);
      }
    }
    auto rows = [&](int64_t n, int cnt, auto f) {
      if (!ready) ready = st.lsh.all_done();
      if (ready) return f(gx);
      f(gd);
      pend.push_back(n);
      pend.push_back(cnt);
    };
#pragma omp for schedule(dynamic, 32 / R) nowait
    for (int64_t g = 0; g < groups; ++g) {
      if constexpr (kDQ) {
        if (dq_inline) {
          const float* tab = dqc.get(w, g * R * nbr, R * nbr);
          rows(g * R, R, [&](const X& x) { run_dq(x, g * R, s_rows, tab); });
          continue;
        }
      }
      rows_scales(g * R, R, s_rows);
      rows(g * R, R, [&](const X& x) { run(std::integral_constant<int, R>{}, x, g * R, s_rows); });
    }
#pragma omp for schedule(static)
    for (int64_t n = groups * R; n < N; ++n) {
      rows_scales(n, 1, s_rows);
      rows(n, 1, [&](const X& x) { run(std::integral_constant<int, 1>{}, x, n, s_rows); });
    }
    // (the loop above ends in a barrier: every claimed part is published by now)
    if (!pend.empty()) lr_finish<MM>(p, *lr, lr_fields(gx), st.lsh, st.xf, st.ybase, pend);
  }
}

template <Dec D, int MM, int SPC>
void gemv_run(const GemmParams& p, const LowrankParams* lr) {
  // Rows of W per pass: 4 row streams at M = 1 measured 2x faster than 1 or 2 (more independent
  // work per chunk, x loaded once for 4 rows); at larger M the x rows supply the parallelism.
  constexpr int R = MM == 1 ? 4 : (MM == 2 ? 2 : 1);
  constexpr int CH = kChunk<D>;
  const GemmWeight& w = p.w;
  const int64_t K = w.k, nchunk = (K + CH - 1) / CH, nbr = K / w.block, ngr = K / kXGroup;
  const bool is_int = D != Dec::tab4;
  const float qx = (w.fmt == Fmt::nf4) ? 16383.0f : 32767.0f;
  const float ts = is_int ? 1.0f : tab4_scale(w.fmt);
  static thread_local AlignedBufT<int16_t> xq_buf;
  static thread_local AlignedBuf dx_buf, gs_buf, xs_buf;
  GemvX gx;
  gx.nchunk = nchunk;
  gx.ldq = nchunk * CH;
  gx.ldd = nchunk * 8;
  gx.ldb = nbr;
  int16_t* xq = xq_buf.get(size_t(MM * gx.ldq));
  float* dx = dx_buf.get(size_t(MM * gx.ldd));
  float* gs = is_int ? gs_buf.get(size_t(MM * ngr)) : nullptr;
  float* xs = is_int ? xs_buf.get(size_t(MM * nbr)) : nullptr;
  gx.xq = xq;
  gx.dx = dx;
  gx.xs = xs;
  // The activations are prepared on the calling thread, before the parallel region: O(M·K), a
  // few % of the kernel, and it leaves the region a single barrier (its end). On these shared
  // cores every barrier can cost a scheduler tick (4 ms) when another job holds one of them.
  gemv_prep_chunks<D>(p, MM, 0, nchunk, xq, dx, gs, gx.ldq, gx.ldd, qx, ts);
  if (is_int) block_sums(gs, MM, nbr, ngr, w.block / kXGroup, xs);
  GemvLr<MM> st;
  if (lr) st.init(p, *lr, gx);
  gemv_parallel<MM, R, D == Dec::tab4 && SPC == 1>(
      p, lr, gx, st,
      [&](auto rows, const GemvX& x, int64_t n0, const float* const* s_rows) {
        gemv_rows<D, MM, decltype(rows)::value, SPC>(p, x, n0, s_rows);
      },
      [&](const auto& x, int64_t n0, const float* const* s_rows, const float* tab) {
        gemv_rows<D, MM, R, SPC, true>(p, x, n0, s_rows, tab);
      });
}

template <Dec D, int MM>
void gemv_spc(const GemmParams& p, const LowrankParams* lr) {
  const int spc = std::max(1, kChunk<D> / p.w.block);
  if (spc == 1) return gemv_run<D, MM, 1>(p, lr);
  if (spc == 2) return gemv_run<D, MM, 2>(p, lr);
  if constexpr (D == Dec::int2) return gemv_run<D, MM, 4>(p, lr);
}

template <Dec D>
void gemv_m(const GemmParams& p, const LowrankParams* lr) {
  switch (p.m) {
    case 1: return gemv_spc<D, 1>(p, lr);
    case 2: return gemv_spc<D, 2>(p, lr);
    case 3: return gemv_spc<D, 3>(p, lr);
    case 4: return gemv_spc<D, 4>(p, lr);
    default: return gemv_spc<D, 8>(p, lr);  // 5..8: rows of x padded with zeros
  }
}

void gemv_i16(const GemmParams& p, const LowrankParams* lr) {
  switch (p.w.fmt) {
    case Fmt::nf4:
    case Fmt::fp4: return gemv_m<Dec::tab4>(p, lr);
    case Fmt::int4: return gemv_m<Dec::int4>(p, lr);
    default: return gemv_m<Dec::int2>(p, lr);
  }
}

}  // namespace
}  // namespace lowbit::cpu
