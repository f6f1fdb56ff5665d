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
#include <cmath>
#include <type_traits>

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

// ---- small M: the dot form (route gemv_bf16) --------------------------------------------------------
// At small M the engine above is bound by its panel decode (codes → bf16 → 16 × 16 transposes into the
// tile layout, ≈ 11 cycles per 32 weights on Zen 4), not by vdpbf16ps. Here every lane of an
// accumulator sums one k-pair position instead: acc[m][r] += vdpbf16ps(x[m][k0, k0 + 32),
// W[j + r][k0, k0 + 32)) — W's 32 codes go through the block's 16-entry bf16 table (LutDecode: exactly
// dequantize(bf16)) straight into one register in k order, x is read as it lies (bf16 pairs), and one
// horizontal sum per output ends it. No panel, no transpose: ≈ 6 instructions of decode per 32 weights
// and row of W, then MM vdpbf16ps. Arithmetic: the engine's (bf16 products, fp32 sums, in another order).

// Scales of blocks [b0, b0 + cnt) → out: weight_scale's fp32 operations, 16 blocks at a time (double
// quant: the code table's value, then multiply and add, as dq_scale).
// The code table's 256 values for 16 codes q (0..255) from registers: vpermi2ps picks within each 32-entry
// eighth by bits 0-4, bits 5-7 select the eighth. On Zen 5 ≈ 1.3 cycles per 16 codes against ≈ 20 for a
// vgatherdps (measured: a gather had been 16% of the dot form's time at M = 4).
inline __m512 dynamic_code16(__m512i q, const __m512 (&t)[16]) {
  __m512 e[8];
  for (int i = 0; i < 8; ++i) e[i] = _mm512_permutex2var_ps(t[2 * i], q, t[2 * i + 1]);
  const __mmask16 b5 = _mm512_test_epi32_mask(q, _mm512_set1_epi32(32));
  const __mmask16 b6 = _mm512_test_epi32_mask(q, _mm512_set1_epi32(64));
  const __mmask16 b7 = _mm512_test_epi32_mask(q, _mm512_set1_epi32(128));
  for (int i = 0; i < 8; i += 2) e[i] = _mm512_mask_mov_ps(e[i], b5, e[i + 1]);
  e[0] = _mm512_mask_mov_ps(e[0], b6, e[2]);
  e[4] = _mm512_mask_mov_ps(e[4], b6, e[6]);
  return _mm512_mask_mov_ps(e[0], b7, e[4]);
}

inline void block_scales(const GemmWeight& w, int64_t b0, int64_t cnt, float* out) {
  if (!w.scale_q) {
    std::memcpy(out, w.scale + b0, sizeof(float) * size_t(cnt));
    return;
  }
  const __m512 off = _mm512_set1_ps(w.scale_offset);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 tab[16];
  for (int i = 0; i < 16; ++i) tab[i] = _mm512_loadu_ps(kDynamicSigned + 16 * i);
  int64_t i = 0;
  for (; i + 16 <= cnt; i += 16) {
    const int64_t b = b0 + i, nb = nested_block_of(b);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scale_q + b)));
    const __m512 code = dynamic_code16(q, tab);
    // lanes past the nested block's end (at most one boundary in 16 blocks) take the next one's absmax
    const __mmask16 next = _mm512_cmpge_epi32_mask(lane, _mm512_set1_epi32(int((nb + 1) * kNestedBlock - b)));
    __m512 ns = _mm512_set1_ps(w.scale_nested[nb]);
    if (next) ns = _mm512_mask_mov_ps(ns, next, _mm512_set1_ps(w.scale_nested[nb + 1]));
    _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_mul_ps(code, ns), off));
  }
  for (; i < cnt; ++i) out[i] = weight_scale(w, b0 + i);
}

// The 32 4-bit codes at src → vpermw indices in element order with 3 operations (LutDecode::index takes
// 4): dword j = byte j = (hi, lo) nibbles of elements 2j, 2j + 1; word 0 = hi, word 1 = the whole byte,
// whose bit 4 (hi's lowest bit) vpermw also reads — the 16-entry table is therefore repeated in both
// halves of the register.
inline __m512i index4(const uint8_t* src) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  return _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16));
}

// Lane L of the result: the sum of the 16 lanes of v[(L % 4) · 4 + L / 4] (callers permute their inputs).
inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // 8 lanes per source: the two halves of each quad pair added
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 4 lanes (one quad) per source
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // 2 lanes per source
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x44), _mm512_shuffle_ps(c[0], c[1], 0xEE));
}

// x's row of K bf16 values → dst with every whole chunk of 64 stored as its 32 even elements, then its
// 32 odd ones (the order of dot_rows' 4-bit step); a last half chunk (K % 64 == 32) copied as it lies.
inline void deinterleave64(const uint16_t* src, int64_t K, uint16_t* dst) {
  const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24, 22,
                                        20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    const __m512i a = _mm512_loadu_si512(src + k), b = _mm512_loadu_si512(src + k + 32);
    _mm512_storeu_si512(dst + k, _mm512_permutex2var_epi16(a, even, b));
    _mm512_storeu_si512(dst + k + 32, _mm512_permutex2var_epi16(a, odd, b));
  }
  if (k < K) std::memcpy(dst + k, src + k, sizeof(uint16_t) * size_t(K - k));
}

// The same for int2's chunks of 128: the four phases (elements 4j + p, p = 0..3) one after another; a last
// partial chunk (K % 128 = 32, 64 or 96) copied as it lies.
inline void deinterleave128(const uint16_t* src, int64_t K, uint16_t* dst) {
  alignas(64) static const uint16_t idx_tab[4][32] = {
      {0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60},
      {1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61},
      {2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 58, 62, 2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 58, 62},
      {3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55, 59, 63, 3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55, 59, 63}};
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {
    const __m512i a0 = _mm512_loadu_si512(src + k), a1 = _mm512_loadu_si512(src + k + 32);
    const __m512i a2 = _mm512_loadu_si512(src + k + 64), a3 = _mm512_loadu_si512(src + k + 96);
    for (int p = 0; p < 4; ++p) {
      const __m512i idx = _mm512_load_si512(idx_tab[p]);
      const __m512i lo = _mm512_permutex2var_epi16(a0, idx, a1), hi = _mm512_permutex2var_epi16(a2, idx, a3);
      _mm512_storeu_si512(dst + k + 32 * p, _mm512_inserti64x4(lo, _mm512_castsi512_si256(hi), 1));
    }
  }
  if (k < K) std::memcpy(dst + k, src + k, sizeof(uint16_t) * size_t(K - k));
}

// Rows [j0, j0 + R) of W decoded 32 weights at a time into registers, each slab handed to use(pos, wv):
// wv[r] = row r's 32 values (bf16, exactly dequantize(bf16)) at positions [pos, pos + 32) of the *step
// order* — every whole chunk of 64 (4-bit formats; 128 for int2) as deinterleave64 (deinterleave128) stores
// x, a last partial chunk in k order. The dot form pairs them with x in that order; the AMX rows form
// (decode_rows_avx512bf16) stores them as its A tiles. kPair32: blocks of 32 (a 64-weight step spans two).
// Columns [kb, ke) only (kb a multiple of 128, ke = K or a multiple of 128: the rows form's chunks; the dot
// form takes all of K). sc: room for R · K / block floats (the rows' scales, decoded up front, at
// sc[r · K / block + block index]).
template <class L, int R, bool kPair32, class Use>
[[gnu::always_inline]] inline void decode_steps(const GemmWeight& w, int64_t j0, float* sc, Use&& use, int64_t kb = 0,
                                                int64_t ke = -1) {
  const int64_t K = ke < 0 ? w.k : ke, nbr = w.k / w.block;
  const int sh = __builtin_ctz(unsigned(w.block));
  constexpr bool kTab = L::kIsTable;
  // the range's blocks, row by row: [b0, b0 + nbc) of each row (all of them in one run when the range is the row)
  const int64_t b0 = kb >> sh, nbc = ((K - kb) + w.block - 1) >> sh;
  const bool whole = kb == 0 && K == w.k;
  const int runs = whole ? 1 : R;
  const int64_t run_len = whole ? R * nbr : nbc;
  auto run_at = [&](int i) { return whole ? int64_t(0) : i * nbr + b0; };  // offset of run i in sc (and its rows' blocks)
  for (int i = 0; i < runs; ++i) block_scales(w, j0 * nbr + run_at(i), run_len, sc + run_at(i));
  // one vcvtneps2bf16 per table when no value can be denormal (LutDecode::tables16's conditions, here
  // over all R rows at once); else the table_of path, which rounds denormals as dequantize does
  bool fast = true;
  for (int ri = 0; ri < runs; ++ri) {
    const float* scr = sc + run_at(ri);
    __m512 lo = _mm512_set1_ps(kTab ? 0x1p-118f : 0x1p-100f);
    __mmask16 bad = 0;
    int64_t i = 0;
    for (; i + 16 <= run_len; i += 16) bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(scr + i)), lo, _CMP_LT_OQ);
    for (; i < run_len; ++i) bad |= std::fabs(scr[i]) < (kTab ? 0x1p-118f : 0x1p-100f);
    fast = fast && !bad;
    if (!kTab && fast) {  // (q − z)·s: every zero on an integer, or ≥ 2^-26 from one
      const float* z = w.zero + j0 * nbr + run_at(ri);
      for (i = 0; i + 16 <= run_len; i += 16) {
        const __m512 zv = _mm512_loadu_ps(z + i);
        const __m512 f = _mm512_abs_ps(_mm512_sub_ps(zv, _mm512_roundscale_ps(zv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
        bad |= _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(f, _mm512_setzero_ps(), _CMP_NEQ_OQ), f, _mm512_set1_ps(0x1p-26f),
                                       _CMP_LT_OQ);
      }
      for (; i < run_len; ++i) {
        const float f = std::fabs(z[i] - std::nearbyint(z[i]));
        bad |= f != 0.0f && f < 0x1p-26f;
      }
      fast = !bad;
    }
  }
  const __m512 tabv = kTab ? _mm512_loadu_ps(w.fmt == Fmt::nf4 ? kNF4 : kFP4)
                           : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // Row r's tables of blocks b0 (low 16 words) and b1 (high 16 words; b1 = b0 repeats the table, as the
  // index of index4 and of the paired step need).
  auto value = [&](int r, int64_t kb) {
    const float s = sc[r * nbr + kb];
    return kTab ? _mm512_mul_ps(tabv, _mm512_set1_ps(s))
                : _mm512_mul_ps(_mm512_sub_ps(tabv, _mm512_set1_ps(w.zero[(j0 + r) * nbr + kb])), _mm512_set1_ps(s));
  };
  auto table2 = [&](int r, int64_t b0, int64_t b1) {
    if (fast) {
      const __m512 v0 = value(r, b0);
      return (__m512i)_mm512_cvtne2ps_pbh(b1 == b0 ? v0 : value(r, b1), v0);
    }
    const __m512i t0 = L::table_of(w, sc[r * nbr + b0], (j0 + r) * nbr + b0);
    const __m512i t1 = b1 == b0 ? t0 : L::table_of(w, sc[r * nbr + b1], (j0 + r) * nbr + b1);
    return _mm512_inserti64x4(t0, _mm512_castsi512_si256(t1), 1);
  };
  const uint8_t* src[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) src[r] = w.codes + (j0 + r) * w.k * L::kCodeBits / 8;
  __m512i lut[R];
  // 32 weights in k order (index4 / L::index): a last partial chunk
  auto step = [&](int64_t k0) {
    __m512bh wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint8_t* c = src[r] + k0 * L::kCodeBits / 8;
      wv[r] = (__m512bh)_mm512_permutexvar_epi16(L::kCodeBits == 4 ? index4(c) : L::index(c), lut[r]);
    }
    use(k0, wv);
  };
  if constexpr (L::kCodeBits == 4) {
    // 64 weights per step, 4 instructions of decode per row: the 32 code bytes widened to words (word j =
    // byte j = the codes of elements 2j (high nibble) and 2j + 1), shifted for the even elements, taken
    // as they are for the odd ones (vpermw reads 5 bits: bit 4, the high nibble's lowest, picks the
    // table's upper half, a copy), two vpermw. x's chunk of 64 is stored the same way (deinterleave64).
    // Blocks of 32: the step spans two blocks, the table holds both (words 16-31: the second) and the
    // indices of words 16-31 get bit 4 set, the low nibble masked (one vpternlogd).
    const __m512i hi16 = kPair32 ? _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1) : _mm512_setzero_si512();
    auto step64 = [&](int64_t k0) {
      __m512bh we[R], wo[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m512i z = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[r] + k0 / 2)));
        __m512i ie = _mm512_srli_epi16(z, 4), io = z;
        if constexpr (kPair32) {
          ie = _mm512_or_si512(ie, hi16);
          io = _mm512_ternarylogic_epi32(z, _mm512_set1_epi16(0x0f), hi16, 0xEA);  // (z & 0x0f) | hi16
        }
        we[r] = (__m512bh)_mm512_permutexvar_epi16(ie, lut[r]);
        wo[r] = (__m512bh)_mm512_permutexvar_epi16(io, lut[r]);
      }
      use(k0, we);
      use(k0 + 32, wo);
    };
    int64_t k0 = kb;
    if constexpr (kPair32) {
      for (; k0 + 64 <= K; k0 += 64) {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) lut[r] = table2(r, k0 >> 5, (k0 >> 5) + 1);
        step64(k0);
      }
    } else {
      for (int64_t c = kb; c < K; c += w.block) {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) lut[r] = table2(r, c >> sh, c >> sh);
        for (k0 = c; k0 < c + w.block; k0 += 64) step64(k0);
      }
    }
    if (k0 < K) {  // K % 64 == 32 (blocks of 32): the last block in k order
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) lut[r] = table2(r, k0 >> 5, k0 >> 5);
      step(k0);
    }
  } else {
    // int2: 128 weights per step. Byte j holds elements 4j..4j+3 (bits 7-6 first); widened to words, the
    // elements 4j + p have index ((word >> (6 - 2p)) & 3) | 4·(j's block within the step): one shift and
    // one vpternlogd, then vpermw, per 32 weights — against x's chunk of 128 stored as its four phases
    // (deinterleave128). The step's table holds the 4 entries of each block it spans (blocks of 32: 4, of
    // 64: 2, longer: 1) in words 4b..4b+3.
    const int bpc = w.block >= 128 ? 1 : int(128 / w.block);  // blocks per step
    const __m512i blk = bpc == 4 ? _mm512_set_epi64(0x000c000c000c000cLL, 0x000c000c000c000cLL, 0x0008000800080008LL,
                                                    0x0008000800080008LL, 0x0004000400040004LL, 0x0004000400040004LL, 0, 0)
                        : bpc == 2 ? _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1)
                                   : _mm512_setzero_si512();
    const __m512i lane_blk = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512 iota4 = _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
    auto table_step = [&](int r, int64_t b0) {  // row r's table for the step whose first block is b0
      const int nb = std::min<int64_t>(bpc, nbr - b0);
      if (fast) {
        const __mmask16 k = __mmask16((1u << nb) - 1);
        const __m512 sv = _mm512_permutexvar_ps(lane_blk, _mm512_maskz_loadu_ps(k, sc + r * nbr + b0));
        const __m512 zv = _mm512_permutexvar_ps(lane_blk, _mm512_maskz_loadu_ps(k, w.zero + (j0 + r) * nbr + b0));
        const __m512 v = _mm512_mul_ps(_mm512_sub_ps(iota4, zv), sv);
        return (__m512i)_mm512_cvtne2ps_pbh(v, v);
      }
      alignas(64) uint16_t t[32] = {};
      for (int b = 0; b < nb; ++b) {
        alignas(64) uint16_t tb[32];
        _mm512_store_si512(tb, L::table_of(w, sc[r * nbr + b0 + b], (j0 + r) * nbr + b0 + b));
        for (int c = 0; c < 4; ++c) t[4 * b + c] = t[16 + 4 * b + c] = tb[c];
      }
      return _mm512_load_si512(t);
    };
    auto step128 = [&](int64_t k0) {
      __m512i z[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        z[r] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[r] + k0 / 4)));
#pragma GCC unroll 4
      for (int ph = 0; ph < 4; ++ph) {
        __m512bh wv[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m512i q = ph == 3 ? z[r] : _mm512_srli_epi16(z[r], unsigned(6 - 2 * ph));
          wv[r] = (__m512bh)_mm512_permutexvar_epi16(_mm512_ternarylogic_epi32(q, _mm512_set1_epi16(3), blk, 0xEA), lut[r]);
        }
        use(k0 + 32 * ph, wv);
      }
    };
    int64_t k0 = kb;
    if (bpc > 1) {
      for (; k0 + 128 <= K; k0 += 128) {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) lut[r] = table_step(r, k0 >> sh);
        step128(k0);
      }
    } else {
      for (int64_t c = kb; c < K; c += w.block) {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) lut[r] = table_step(r, c >> sh);
        for (k0 = c; k0 < c + w.block; k0 += 128) step128(k0);
      }
    }
    for (; k0 < K; k0 += 32) {  // K % 128 (blocks of 32, 64): the last blocks in k order
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) lut[r] = table2(r, k0 >> sh, k0 >> sh);
      step(k0);
    }
  }
}

// Rows [j0, j0 + R) of W against the MM rows of x: res[m][r] = Σ_k x·Ŵ. xp: x's rows (bf16, row stride ldx)
// in the step order (deinterleave64 for the 4-bit formats, deinterleave128 for int2).
template <class L, int MM, int R, bool kPair32>
[[gnu::noinline]] void dot_rows(const GemmWeight& w, const uint16_t* xp, int64_t ldx, int64_t j0, float* sc,
                                float (&res)[MM][R]) {
  __m512 acc[MM][R];
#pragma GCC unroll 16
  for (int i = 0; i < MM * R; ++i) acc[i / R][i % R] = _mm512_setzero_ps();
  decode_steps<L, R, kPair32>(w, j0, sc, [&](int64_t pos, const __m512bh (&wv)[R]) {
#pragma GCC unroll 8
    for (int m = 0; m < MM; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + m * ldx + pos);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  });
  if constexpr (MM * R == 16) {  // the 16 sums at once (a transpose-add tree: 15 adds, 30 shuffles)
    __m512 v[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      const int s = (i % 4) * 4 + i / 4;  // hsum16 returns the sums 4 × 4-transposed
      v[i] = acc[s / R][s % R];
    }
    _mm512_storeu_ps(&res[0][0], hsum16(v));
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < MM * R; ++i) res[i / R][i % R] = _mm512_reduce_add_ps(acc[i / R][i % R]);
  }
}

// The same against dense bf16 rows (the lowrank branch's A: xa = x·Aᵀ).
template <int MM>
void dot_dense(const uint16_t* xb, int64_t ldx, const uint16_t* a, int64_t K, float (&res)[MM]) {
  __m512 acc[MM];
  for (int m = 0; m < MM; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    const __m512bh av = (__m512bh)_mm512_loadu_si512(a + k0);
    for (int m = 0; m < MM; ++m) acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(xb + m * ldx + k0), av);
  }
  for (int m = 0; m < MM; ++m) res[m] = _mm512_reduce_add_ps(acc[m]);
}

// f(kPair32) with the step kind the weight's block needs, as a std::bool_constant (blocks of 32 pair in the
// 4-bit step; int2 has one kind): the one dispatch of dot_rows and store_steps.
template <class L, class F>
void by_step_kind(const GemmWeight& w, F&& f) {
  if constexpr (L::kCodeBits == 4)
    if (w.block == 32) return f(std::true_type{});
  f(std::false_type{});
}

template <class L, int MM, int R>
void dot_rows_any(const GemmWeight& w, const uint16_t* xp, int64_t j0, float* sc, float (&res)[MM][R]) {
  by_step_kind<L>(w, [&](auto pair) { dot_rows<L, MM, R, decltype(pair)::value>(w, xp, w.k, j0, sc, res); });
}

// Rows of W per pass: at M ≤ 4, 4 rows (16 accumulators); above, 2 (MM · 2 ≤ 16).
template <int MM> constexpr int kDotRows = MM <= 4 ? 4 : 2;

template <class L, int MM>
void gemv_bf16_run(const GemmParams& p, const LowrankParams* lr) {
  const GemmWeight& w = p.w;
  const int64_t N = w.n, K = w.k;
  constexpr int R = kDotRows<MM>;
  // x as bf16 rows: in place when it is bf16, else rounded once (fp32 under `medium`); the dot steps
  // read a deinterleaved copy (dot_rows)
  static thread_local AlignedBufT<uint16_t> x_buf, xp_buf, a_buf;
  static thread_local AlignedBuf xas_buf;
  const uint16_t* xb = static_cast<const uint16_t*>(p.x);
  if (p.dtype != DType::bf16) {
    uint16_t* t = x_buf.get(size_t(MM * K));
    for (int m = 0; m < MM; ++m) pack_row_bf16(p.x, p.dtype, K, m, K, K, t + m * K);
    xb = t;
  }
  uint16_t* xp = xp_buf.get(size_t(MM * K));
  for (int m = 0; m < MM; ++m) (L::kCodeBits == 4 ? deinterleave64 : deinterleave128)(xb + m * K, K, xp + m * K);
  // the branch: xa = x·Aᵀ (the xa output, in dtype) and bf16(s·xa) in fp32 for the epilogue, as the
  // engine rounds it; A rounded to bf16 when it is not
  const int r = lr ? lr->r : 0;
  float* xas = lr ? xas_buf.get(size_t(MM * r)) : nullptr;
  const uint16_t* ab = lr ? static_cast<const uint16_t*>(lr->a) : nullptr;
  if (lr && p.dtype != DType::bf16) {
    uint16_t* t = a_buf.get(size_t(r * K));
    for (int i = 0; i < r; ++i) pack_row_bf16(lr->a, p.dtype, K, i, K, K, t + i * K);
    ab = t;
  }
  // Rows in grabs of 32 (dynamic: the cores are shared with other jobs, as for the GEMV): passes of R rows,
  // the last grab's N % R rows one at a time; then each row of x's 32 outputs at once: + the branch
  // (Σ_i bf16(s·xa)_i · B[j][i] in i order, 32 outputs per vector pair), + bias, rounded, stored 16 at a
  // time (the per-output epilogue had been a quarter of a call at K = 576, the per-output branch more).
  constexpr int kGrab = 32;
  static_assert(kGrab % R == 0, "a grab holds whole passes");
  const int64_t grabs = (N + kGrab - 1) / kGrab;
#pragma omp parallel
  {
    if (lr) {  // xa first, rank by rank across the threads (the loop's barrier publishes it)
#pragma omp for schedule(static)
      for (int i = 0; i < r; ++i) {
        float v[MM];
        dot_dense<MM>(xb, K, ab + int64_t(i) * K, K, v);
        for (int m = 0; m < MM; ++m) {
          store_from_float(lr->xa, p.dtype, m * r + i, v[m]);
          xas[m * r + i] = bf16_to_float(float_to_bf16(lr->s * v[m]));
        }
      }
    }
    static thread_local AlignedBuf sc_buf, bt_buf;
    float* sc = sc_buf.get(size_t(R * (K / w.block)));
    float* bt = lr ? bt_buf.get(size_t(r) * kGrab) : nullptr;  // B's grab rows, transposed: bt[i][jj]
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < grabs; ++c) {
      const int64_t ja = c * kGrab, jb = std::min(N, ja + kGrab);
      alignas(64) float ys[MM][kGrab];
      int64_t j = ja;
      for (; j + R <= jb; j += R) {
        float res[MM][R];
        dot_rows_any<L, MM, R>(w, xp, j, sc, res);
        for (int m = 0; m < MM; ++m)
          for (int rr = 0; rr < R; ++rr) ys[m][j - ja + rr] = res[m][rr];
      }
      for (; j < jb; ++j) {
        float res[MM][1];
        dot_rows_any<L, MM, 1>(w, xp, j, sc, res);
        for (int m = 0; m < MM; ++m) ys[m][j - ja] = res[m][0];
      }
      for (int m = 0; m < MM; ++m)
        for (int64_t jj = jb - ja; jj < kGrab; ++jj) ys[m][jj] = 0.0f;
      if (lr) {
        for (int i = 0; i < r; ++i)
          for (int jj = 0; jj < kGrab; ++jj)
            bt[i * kGrab + jj] = ja + jj < jb ? bf16_to_float(float_to_bf16(load_as_float(lr->b, p.dtype, (ja + jj) * r + i))) : 0.0f;
        for (int m = 0; m < MM; ++m) {
          __m512 lo = _mm512_load_ps(&ys[m][0]), hi = _mm512_load_ps(&ys[m][16]);
          for (int i = 0; i < r; ++i) {  // products of two bf16 values are exact: fma = multiply + add
            const __m512 xv = _mm512_set1_ps(xas[m * r + i]);
            lo = _mm512_fmadd_ps(xv, _mm512_load_ps(bt + i * kGrab), lo);
            hi = _mm512_fmadd_ps(xv, _mm512_load_ps(bt + i * kGrab + 16), hi);
          }
          _mm512_store_ps(&ys[m][0], lo);
          _mm512_store_ps(&ys[m][16], hi);
        }
      }
      for (int m = 0; m < MM; ++m)
        for (int64_t j0 = ja; j0 < jb; j0 += 16) {
          const int nv = int(std::min<int64_t>(16, jb - j0));
          const __mmask16 k = __mmask16((1u << nv) - 1);
          __m512 v = _mm512_maskz_loadu_ps(k, &ys[m][j0 - ja]);
          if (p.dtype == DType::bf16) {
            if (p.bias) {
              const __m256i b = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(p.bias) + j0);
              v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
            }
            _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.y) + m * N + j0, k, to_bf16x16(v));
          } else {  // fp32 (x under `medium`)
            if (p.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, static_cast<const float*>(p.bias) + j0));
            _mm512_mask_storeu_ps(static_cast<float*>(p.y) + m * N + j0, k, v);
          }
        }
    }
  }
}

template <class L>
void gemv_bf16_fmt(const GemmParams& p, const LowrankParams* lr) {
  switch (p.m) {
    case 1: return gemv_bf16_run<L, 1>(p, lr);
    case 2: return gemv_bf16_run<L, 2>(p, lr);
    case 3: return gemv_bf16_run<L, 3>(p, lr);
    case 4: return gemv_bf16_run<L, 4>(p, lr);
    case 5: return gemv_bf16_run<L, 5>(p, lr);
    case 6: return gemv_bf16_run<L, 6>(p, lr);
    case 7: return gemv_bf16_run<L, 7>(p, lr);
    default: return gemv_bf16_run<L, 8>(p, lr);
  }
}

}  // namespace

// M ≤ 8 rows per call (gemm_route keeps it to kGemvBf16MaxM); more rows go in passes of 8 (each pass
// decodes W again: the route stops where the engine's single decode wins).
void gemv_bf16_avx512bf16(const GemmParams& p, const LowrankParams* lr) {
  row_passes(p, lr, 8, [](const GemmParams& q, const LowrankParams* l) {
    switch (q.w.fmt) {
      case Fmt::nf4:
      case Fmt::fp4: gemv_bf16_fmt<LutDecode<4, true>>(q, l); break;
      case Fmt::int4: gemv_bf16_fmt<LutDecode<4, false>>(q, l); break;
      case Fmt::int2: gemv_bf16_fmt<LutDecode<2, false>>(q, l); break;
    }
  });
}

// ---- the AMX rows form's decode (gemm_amx.h): W's rows for the A tiles, in the step order ------------
namespace {

template <class L, int R, bool kPair32>
[[gnu::noinline]] void store_steps(const GemmWeight& w, int64_t j0, int64_t k0, int64_t k1, float* sc, uint16_t* out, int64_t ldo) {
  decode_steps<L, R, kPair32>(
      w, j0, sc,
      [&](int64_t pos, const __m512bh (&wv)[R]) {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) _mm512_storeu_si512(out + r * ldo + (pos - k0), (__m512i)wv[r]);
      },
      k0, k1);
}

template <class L, int R>
void store_steps_any(const GemmWeight& w, int64_t j0, int64_t k0, int64_t k1, float* sc, uint16_t* out, int64_t ldo) {
  by_step_kind<L>(w, [&](auto pair) { store_steps<L, R, decltype(pair)::value>(w, j0, k0, k1, sc, out, ldo); });
}

template <class L>
void decode_rows_fmt(const GemmWeight& w, int64_t n0, int nr, int64_t k0, int kc, uint16_t* out, int64_t ldo) {
  static thread_local AlignedBuf sc_buf;
  float* sc = sc_buf.get(size_t(4 * (w.k / w.block)));
  int r = 0;
  for (; r + 4 <= nr; r += 4) store_steps_any<L, 4>(w, n0 + r, k0, k0 + kc, sc, out + r * ldo, ldo);
  for (; r < nr; ++r) store_steps_any<L, 1>(w, n0 + r, k0, k0 + kc, sc, out + r * ldo, ldo);
}

}  // namespace

void decode_rows_avx512bf16(const GemmWeight& w, int64_t n0, int nr, int64_t k0, int kc, uint16_t* out, int64_t ldo) {
  switch (w.fmt) {
    case Fmt::nf4:
    case Fmt::fp4: return decode_rows_fmt<LutDecode<4, true>>(w, n0, nr, k0, kc, out, ldo);
    case Fmt::int4: return decode_rows_fmt<LutDecode<4, false>>(w, n0, nr, k0, kc, out, ldo);
    case Fmt::int2: return decode_rows_fmt<LutDecode<2, false>>(w, n0, nr, k0, kc, out, ldo);
  }
}

void step_order_avx512bf16(Fmt fmt, const uint16_t* src, int64_t k, uint16_t* dst) {
  (fmt == Fmt::int2 ? deinterleave128 : deinterleave64)(src, k, dst);
}

void gemm_bf16_avx512bf16(const GemmParams& p, const LowrankParams* lr) { gemm_bf16<Avx512Bf16>(p, lr); }
void gemm_t_bf16_avx512bf16(const GemmParams& p) { gemm_t_bf16<Avx512Bf16>(p); }
void lowrank_backward_bf16_avx512bf16(const LowrankBackwardParams& p) { lowrank_backward_bf16<Avx512Bf16>(p); }

}  // namespace lowbit::cpu
