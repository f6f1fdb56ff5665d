// csrc/cpu/gemm_gemv_i8.h — the gemm family's small-M forward kernel under the `medium` precision
// policy, gemv_i8 (with the lowrank family's branch fused in): int8 activations and `vpdpbusd`,
// llama.cpp's way. Built only into gemm_gemv_i8_avx512.cpp (AVX-512 F/BW/VL/VNNI flags, 256-bit
// vectors like the int16 VNNI GEMV), called by gemv_passes (gemm_avx2.cpp) when
//   matmul_precision() == medium  &&  x is fp32  &&  use_avx512()  &&  W is int4 / int2 (gemv_i8_applies;
//   nf4 too with LOWBIT_GEMV_I8_NF4=1: see "nf4 is opt-in" below).
// It reuses the int16 GEMV's machinery (cpu/gemm_gemv_i16.h, included first with LOWBIT_GEMV_VNNI):
// the double-quant scale tables, the chunk-scale broadcasts, the low-rank down-projection, its
// publication protocol and deferred epilogue. Everything here has internal linkage too.
//
// Who does not come here, and why:
//  * bf16 activations: they compute as torch's bf16 matmul (bf16 products, fp32 accumulation): the
//    policy does not govern them, they stay on the int16 GEMV (error ~1e-5, far below bf16's own).
//  * fp16 activations: the policy promises fp16-level error (2^-11 ≈ 5e-4) at worst; int8 x is ~5e-3,
//    so they stay on the int16 GEMV too.
//  * fp4 weights: its values are multiples of 1/192 (T·192 ∈ {0, ±1, ±32, ±48, ±64, ±96, ±128, ±192}):
//    no byte image with a scale ≤ 127 holds the ±1/192 codes within 34% (120 is exact for every other
//    code and gives them 1/120: measured 2.3e-2 max |err| / max |ref| on blocks with an outlier, over
//    the policy's 1e-2). The exact alternative, the positive and negative parts of T·192 against x and
//    −x (two vpshufb + two vpdpbusd per 32 weights), was built and measured as slow as the int16 GEMV
//    (1 thread, 1024×2048 in L2, M = 1: 0.068 vs 0.070 ms; nf4 here 0.054): no gain, so fp4 stays there.
//  * nf4 weights, unless LOWBIT_GEMV_I8_NF4=1: the kernel below handles them (table image round(T·112)
//    + 128) and is tested, but its error, ≈ 0.6% rms per weight from the image on top of the int8
//    activations' ≈ 0.5%, measures 0.5–1.24e-2 max |err| / max |ref| (over the policy's 1e-2 at block
//    256 on weights with outlier columns; docs/kernels.md, session 9: the image dominates there, and
//    neither finer x groups nor another table scale bring it under). Exact alternatives (the table's
//    positive and negative parts, or |T|·253 with vpsignb on x) cost two more ops per 32 weights and
//    run as slow as the int16 GEMV (fp4's measurement above), so nf4 keeps the int16 GEMV; the opt-in
//    stays for measurements only.
//  * AVX2-only CPUs (no VNNI): they keep the int16 GEMV under `medium`. `vpmaddubsw` saturates its
//    int16 pair sums: with the +128 offset table image below (bytes up to 240) times x up to 127 a pair
//    reaches 2·240·127 > 32767, so nf4 would need the `vpsignb` trick (two more ops per 32
//    weights and row of x), plus a widening `vpmaddwd` per register on the same two FMA pipes; the
//    measured int16 numbers on Zen 3 (docs/kernels.md) left too little to gain for the extra path.
//
// ============================================================================ arithmetic
//   activations: per group of 32 along k (as ggml's q8_0), xq = round(x / max|x|_g · 127) ∈ [-127, 127]
//                (never -128), x̂ = dx_g · xq with dx_g = max|x|_g / (127 · S).
//   weights:     vpdpbusd multiplies UNSIGNED bytes (first operand) by SIGNED bytes (second): the weight
//                side is the unsigned one, so that every correction depends on x only.
//                int4 / int2: the code q ∈ [0, 15] / [0, 3] itself, S = 1, w = s · (q − z) with the zero
//                  point folded in once per block as in the int16 GEMV: −s·z·Σ_{g∈b} dx_g Σ xq.
//                nf4: an unsigned image of the table, U[c] = round(T[c] · 112) + 128 ∈ [16, 240],
//                  w = s · (U − 128) / 112. The −128 is an integer per lane, so it goes into the int32
//                  sum exactly: each lane's accumulator starts at C = −128 · Σ (its 8 xq) (precomputed
//                  per row of x and chunk; loading it costs what zeroing would). S = 112 minimises the
//                  worst RELATIVE error of a code (≤ 1.9%, rms 0.84% over the 15 nonzero codes; ≤ 3.9e-3
//                  of the block absmax): the small codes ±0.08, ±0.09 are where blocks with an outlier
//                  put most of their weights (S = 127 gives 3.8% on them, measured 1.4e-2 max |err| /
//                  max |ref| on such weights vs 8.8e-3 at 112).
//   per chunk of 64 weights (4-bit; int2 128) = 32 code bytes of one row: 2 (int2 4) ymm of u8, one
//   vpdpbusd each against the matching int8 activations into one int32 accumulator, then
//   acc += float(int32) · (dx · s) in fp32 once per chunk (int32 lane j holds the products of one
//   group: 4-bit lanes 0-3 ↔ elements 0-31, 4-7 ↔ 32-63; int2 lanes 2j, 2j+1 ↔ group j).
//
// No int32 overflow, for any input: vpdpbusd adds its four u8·s8 products to the lane without
// saturation or intermediate rounding; a lane sums per chunk 8 products (nf4, int4: 2 registers × 4)
// or 16 (int2: 4 × 4 of codes ≤ 3): |Σ| ≤ 8 · 240 · 127 = 243840, plus nf4's |C| ≤ 128 · 8 · 127 =
// 130048: < 2^19, nowhere near 2^31, and the int32 → fp32 conversion is exact (< 2^24).
//
// Error vs x @ dequant(W).T (documented in docs/kernels.md, bounded in tests/test_gemm_medium.py):
// x̂ is off by ≤ 0.5/127 = 3.9e-3 of its group max per element (rms ≈ 1.1e-3 of it); nf4 weights by the
// table image above; fp32 accumulation (~1e-7) otherwise. Gaussian x: max |err| / max |ref| ≈ 4-6e-3
// (the activations' part alone is ≈ 4.5e-3 at K = 4096): bf16-rounding level, under the policy's 1e-2.
//
// Roofline (per 64 weights = 32 B of codes, per row of x): int4 load + 3 (nibble split) + 2 vpdpbusd +
// cvt + mul + fma ≈ 9 ops (0.14 / weight), nf4 + 2 vpshufb ≈ 11 (0.17); int2 per 128 weights
// load + 7 + 4 vpdpbusd + 3 ≈ 15 (0.12). The int16 GEMV needs 17-22 per 64 (0.27-0.34). x is 1 B per
// k (in L1/L2); the scale and prefetch logic is the int16 GEMV's.
#pragma once
#include "cpu/gemm_gemv_i16.h"

#if !LOWBIT_GEMV_VNNI
#error "gemm_gemv_i8.h needs the VNNI build (include it from an *_avx512.cpp file only)"
#endif

namespace lowbit::cpu {
namespace {

constexpr int kQ8 = 127;       // int8 activation scale: xq ∈ [-127, 127]
constexpr int kTabOff = 128;   // nf4: the unsigned table image is round(T·112) + 128 ∈ [16, 240]
constexpr float kNF4S = 112.0f;
// How a format's codes become the unsigned operand (see the top): nf4 an offset table image, int4 /
// int2 the codes themselves.
enum class W8 { nf4, int4, int2 };
constexpr Dec dec_of(W8 f) { return f == W8::int2 ? Dec::int2 : (f == W8::int4 ? Dec::int4 : Dec::tab4); }
template <W8 F> constexpr int kChunk8 = kChunk<dec_of(F)>;          // weights per 32 code bytes
template <W8 F> constexpr int kNReg8 = F == W8::int2 ? 4 : 2;       // u8 ymm per chunk
template <W8 F> constexpr int kXBytes = kChunk8<F>;                 // x bytes per chunk (one per weight)
inline float tab8_scale(Fmt f) { return f == Fmt::nf4 ? kNF4S : 1.0f; }
static_assert(kTabOff + int(kNF4S) <= 255 && kTabOff - int(kNF4S) >= 0, "nf4 image must fit an unsigned byte");
static_assert(8 * 240 * kQ8 + kTabOff * 8 * kQ8 < (1 << 24), "int32 lane sums stay exact in fp32");

// Slot s of the decoded chunk (register s / 32, byte s % 32) holds element elem_of8(s) of the chunk;
// the activations are stored in this order. 4-bit: register 0 = high nibbles (element 2i at byte i),
// register 1 = low nibbles (2i + 1). int2: register r = bits 2r..2r+1, byte i = element 4i + 3 − r.
template <W8 F>
int elem_of8(int s) {
  const int r = s / 32, i = s % 32;
  if constexpr (F == W8::int2) return 4 * i + 3 - r;
  return 2 * i + r;
}

template <W8 F>
const int* slot_table8() {
  static const auto t = [] {
    std::vector<int> v(kChunk8<F>);
    for (int s = 0; s < kChunk8<F>; ++s) v[s] = elem_of8<F>(s);
    return v;
  }();
  return t.data();
}

struct GemvX8 {  // the int8 activations, shared by the threads
  const int8_t* xq;   // (mm, nchunk * chunk) in slot order, zero past k
  const float* dx;    // (mm, nchunk * 8): dx of the group behind each int32 lane, 0 past k
  const int32_t* xc;  // nf4: (mm, nchunk * 8) −128 · Σ of each lane's xq (the accumulators' start)
  const float* xs;    // int formats: (mm, k / block) Σ_{groups g in block} dx_g · Σ xq
  int64_t ldq, ldd, ldb;
  GemvX lr;  // the low-rank fields only (xas, b, r, rp8, ybase): the int16 GEMV's helpers take it
};

inline GemvX& lr_fields(GemvX8& x) { return x.lr; }
inline const GemvX& lr_fields(const GemvX8& x) { return x.lr; }

// 32 code bytes → kNReg8 ymm of unsigned bytes (the codes, or nf4's offset table image through vpshufb).
template <W8 F>
__attribute__((always_inline)) inline void decode_u8(const uint8_t* src, __m256i* w, __m256i tab) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  if constexpr (F == W8::int2) {
    const __m256i m = _mm256_set1_epi8(0x03);
    w[0] = _mm256_and_si256(v, m);
    w[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), m);
    w[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    w[3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), m);
  } else {
    const __m256i m = _mm256_set1_epi8(0x0f);
    w[0] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    w[1] = _mm256_and_si256(v, m);
    if constexpr (F == W8::nf4) {
      w[0] = _mm256_shuffle_epi8(tab, w[0]);
      w[1] = _mm256_shuffle_epi8(tab, w[1]);
    }
  }
}

// init + Σ over the chunk's registers of vpdpbusd(w, x): int32 lanes (exact, see the top).
template <W8 F>
__attribute__((always_inline)) inline __m256i dot8(const __m256i* w, const int8_t* x, __m256i init) {
  auto xv = [&](int i) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(x + 32 * i)); };
  __m256i a = init;
#pragma GCC unroll 4
  for (int i = 0; i < kNReg8<F>; ++i) a = _mm256_dpbusd_epi32(a, w[i], xv(i));
  return a;
}

// R rows of W [n0, n0 + R) against MM rows of x (the int16 GEMV's gemv_rows with the int8 products;
// DQ, s_rows and tab as there).
template <W8 F, int MM, int R, int SPC, bool DQ = false>
void gemv8_rows(const GemmParams& p, const GemvX8& gx, int64_t n0, const float* const* s_rows, const float* tab = nullptr) {
  constexpr Dec D = dec_of(F);
  constexpr int CH = kChunk8<F>, NREG = kNReg8<F>, XB = kXBytes<F>, BYTES = 32;
  constexpr bool kTab = D == Dec::tab4, kOff = F == W8::nf4;
  const GemmWeight& w = p.w;
  const int64_t K = w.k, nfull = K / CH, row_bytes = K * fmt_bits(w.fmt) / 8;
  const int block = w.block;
  __m256i tabv = _mm256_setzero_si256();
  if constexpr (kTab) {  // nf4: round(T·112) + 128 in both 128-bit halves, for vpshufb
    alignas(32) uint8_t t8[32];
    for (int i = 0; i < 32; ++i) t8[i] = uint8_t(int(std::nearbyint(kNF4[i % 16] * kNF4S)) + kTabOff);
    tabv = _mm256_load_si256(reinterpret_cast<const __m256i*>(t8));
  }
  const __m256i zero = _mm256_setzero_si256();

  __m256 acc[MM][R];
#pragma GCC unroll 16
  for (int i = 0; i < MM * R; ++i) acc[i / R][i % R] = _mm256_setzero_ps();
  const uint8_t* src[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) src[r] = w.codes + (n0 + r) * row_bytes;
  const int cshift = SPC == 1 ? __builtin_ctz(unsigned(block / CH)) : 0;

  const int64_t nbr = K / block, nb0 = nested_block_of(n0 * nbr);
  const float* tp[R];
  const uint8_t* qp[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) qp[r] = DQ ? w.scale_q + (n0 + r) * nbr : nullptr;
  for (int64_t ch = 0; ch < nfull;) {
    int64_t seg_end = nfull;
    if constexpr (DQ) {
      const int64_t bi = ch >> cshift;
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int64_t flat = (n0 + r) * nbr + bi, nb = nested_block_of(flat);
        tp[r] = tab + (nb - nb0) * 256;
        seg_end = std::min(seg_end, ((nb + 1) * kNestedBlock - (n0 + r) * nbr) << cshift);
      }
    }
    // one chunk of the R rows; pf: prefetch the rows' codes (once per 64-byte line: every other chunk)
    auto step = [&](int64_t ch, bool pf) __attribute__((always_inline)) {
      const int8_t* xq = gx.xq + ch * XB;
      __m256 dxv[MM];
      __m256i c0[MM];
#pragma GCC unroll 8
      for (int m = 0; m < MM; ++m) {
        dxv[m] = _mm256_load_ps(gx.dx + m * gx.ldd + ch * 8);
        c0[m] = kOff ? _mm256_load_si256(reinterpret_cast<const __m256i*>(gx.xc + m * gx.ldd + ch * 8)) : zero;
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        __m256i wv[NREG];
        if (pf) _mm_prefetch(reinterpret_cast<const char*>(src[r] + ch * BYTES + kPrefetch), _MM_HINT_T0);
        if constexpr (!DQ) {
          const int64_t bi = (ch * CH) / block;
          if ((bi & 15) == 0 && (ch * CH) % block == 0) {
            _mm_prefetch(reinterpret_cast<const char*>(s_rows[r] + bi + 16), _MM_HINT_T0);
            if constexpr (!kTab) _mm_prefetch(reinterpret_cast<const char*>(w.zero + (n0 + r) * nbr + bi), _MM_HINT_T0);
          }
        }
        decode_u8<F>(src[r] + ch * BYTES, wv, tabv);
        const __m256 sv = DQ ? _mm256_broadcast_ss(tp[r] + qp[r][ch >> cshift])
                             : SPC == 1 ? _mm256_broadcast_ss(s_rows[r] + (ch >> cshift)) : chunk_scales<D, SPC>(s_rows[r], ch);
#pragma GCC unroll 8
        for (int m = 0; m < MM; ++m)
          acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot8<F>(wv, xq + m * gx.ldq, c0[m])), _mm256_mul_ps(dxv[m], sv), acc[m][r]);
      }
    };
    for (; ch + 1 < seg_end; ch += 2) {
      step(ch, true);
      step(ch + 1, false);
    }
    if (ch < seg_end) step(ch++, true);
  }
  if (nfull * CH < K) {  // tail chunk: zero-padded copies of the last codes and scales (x is 0 there)
    const int rem = int(K - nfull * CH);
    const int8_t* xq = gx.xq + nfull * XB;
#pragma GCC unroll 4
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
      decode_u8<F>(tail, wv, tabv);  // padded codes (0) meet xq = 0 (and C = 0) past k
      const __m256 sv = chunk_scales<D, SPC>(ts, 0);
      for (int m = 0; m < MM; ++m) {
        const __m256 dxv = _mm256_load_ps(gx.dx + m * gx.ldd + nfull * 8);
        const __m256i c = kOff ? _mm256_load_si256(reinterpret_cast<const __m256i*>(gx.xc + m * gx.ldd + nfull * 8)) : zero;
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot8<F>(wv, xq + m * gx.ldq, c)), _mm256_mul_ps(dxv, sv), acc[m][r]);
      }
    }
  }

#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {  // the int16 GEMV's epilogue, same operations
    const int64_t n = n0 + r;
    const float b = p.bias ? load_as_float(p.bias, p.dtype, n) : 0.0f;
    alignas(32) float brow[256];
    if (gx.lr.xas) lr_brow(gx.lr, p.dtype, n, brow);
    for (int m = 0; m < MM; ++m) {
      float v = hsum(acc[m][r]);
      if constexpr (!kTab) {  // − Σ_b s_b z_b Σ_{g∈b} dx_g X_g
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
      if (gx.lr.ybase) {
        if (m < p.m) gx.lr.ybase[m * w.n + n] = v;
        continue;
      }
      if (gx.lr.xas) v += lr_dot(gx.lr.xas + m * gx.lr.rp8, brow, gx.lr.rp8);
      if (m < p.m) store_out(p.y, p.dtype, m * w.n + n, v + b);
    }
  }
}

// Quantize rows of x (mm of them, rows ≥ p.m are zero) to int8 for every chunk: slot order, lane
// scales, (tab4) the accumulators' start values, (int formats) group sums dx_g · Σ xq.
template <W8 F>
void gemv8_prep(const GemmParams& p, int mm, int64_t nchunk, int8_t* xq, float* dx, int32_t* xc, float* gsum,
                int64_t ldq, int64_t ldd, float table_scale) {
  constexpr int CH = kChunk8<F>, G = CH / kXGroup, PER_LANE = CH / 8;
  const int64_t K = p.w.k;
  const int* slot = slot_table8<F>();
  const __m256 fmax = _mm256_set1_ps(3.4028235e38f), sign = _mm256_set1_ps(-0.0f), vq = _mm256_set1_ps(float(kQ8));
  for (int m = 0; m < mm; ++m) {
    for (int64_t c = 0; c < nchunk; ++c) {
      alignas(32) int32_t qv[CH];
      float gdx[G];
      for (int g = 0; g < G; ++g) {
        const int64_t e0 = c * CH + g * kXGroup;
        int32_t* q = qv + g * kXGroup;
        if (e0 >= K || m >= p.m) {  // padding: past k, or a padded row of x (M < MM)
          for (int i = 0; i < kXGroup; ++i) q[i] = 0;
          gdx[g] = 0.0f;
          if (gsum && e0 < K) gsum[m * (K / kXGroup) + (e0 / kXGroup)] = 0.0f;
          continue;
        }
        __m256 xf[kXGroup / 8];
        __m256 vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
        for (int i = 0; i < kXGroup / 8; ++i) {
          xf[i] = load8(p.x, p.dtype, m * K + e0 + 8 * i);
          const __m256 a = _mm256_andnot_ps(sign, xf[i]);
          vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, fmax, _CMP_NLE_UQ));  // inf or NaN
          vmax = _mm256_max_ps(vmax, a);
        }
        const float amax = hmax(vmax);
        int32_t sum = 0;
        if (_mm256_movemask_ps(vbad) != 0) {
          for (int i = 0; i < kXGroup; ++i) q[i] = 0;
          gdx[g] = std::numeric_limits<float>::quiet_NaN();  // the output row becomes NaN
        } else if (amax == 0.0f) {
          for (int i = 0; i < kXGroup; ++i) q[i] = 0;
          gdx[g] = 0.0f;
        } else {
          // x / amax ∈ [-1, 1] (no overflow for tiny amax), × 127, round half even: |xq| ≤ 127
          const __m256 va = _mm256_set1_ps(amax);
          __m256i s8 = _mm256_setzero_si256();
          for (int i = 0; i < kXGroup / 8; ++i) {
            const __m256 t = _mm256_mul_ps(_mm256_div_ps(xf[i], va), vq);
            const __m256i qi = _mm256_cvtps_epi32(_mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            _mm256_store_si256(reinterpret_cast<__m256i*>(q + 8 * i), qi);
            s8 = _mm256_add_epi32(s8, qi);
          }
          alignas(32) int32_t s[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(s), s8);
          for (int i = 0; i < 8; ++i) sum += s[i];
          gdx[g] = amax / (float(kQ8) * table_scale);
        }
        if (gsum) gsum[m * (K / kXGroup) + (e0 / kXGroup)] = float(sum) * gdx[g];
      }
      int8_t* out = xq + m * ldq + c * kXBytes<F>;
      for (int s = 0; s < CH; ++s) out[s] = int8_t(qv[slot[s]]);
      for (int j = 0; j < 8; ++j) {
        dx[m * ldd + c * 8 + j] = gdx[j * PER_LANE / kXGroup];
        if (xc) {  // lane j covers elements [j·PER_LANE, (j+1)·PER_LANE) of the chunk
          int32_t t = 0;
          for (int e = j * PER_LANE; e < (j + 1) * PER_LANE; ++e) t += qv[e];
          xc[m * ldd + c * 8 + j] = -kTabOff * t;
        }
      }
    }
  }
}

template <W8 F, int MM, int SPC>
void gemv8_run(const GemmParams& p, const LowrankParams* lr) {
  constexpr int R = MM == 1 ? 4 : (MM == 2 ? 2 : 1);
  constexpr int CH = kChunk8<F>;
  constexpr bool kTab = dec_of(F) == Dec::tab4, kOff = F == W8::nf4;
  const GemmWeight& w = p.w;
  const int64_t K = w.k, nchunk = (K + CH - 1) / CH, nbr = K / w.block, ngr = K / kXGroup;
  static thread_local AlignedBufT<int8_t> xq_buf;
  static thread_local AlignedBufT<int32_t> xc_buf;
  static thread_local AlignedBuf dx_buf, gs_buf, xs_buf;
  GemvX8 gx;
  gx.ldq = nchunk * kXBytes<F>;
  gx.ldd = nchunk * 8;
  gx.ldb = nbr;
  int8_t* xq = xq_buf.get(size_t(MM * gx.ldq));
  float* dx = dx_buf.get(size_t(MM * gx.ldd));
  int32_t* xc = kOff ? xc_buf.get(size_t(MM * gx.ldd)) : nullptr;
  float* gs = kTab ? nullptr : gs_buf.get(size_t(MM * ngr));
  float* xs = kTab ? nullptr : xs_buf.get(size_t(MM * nbr));
  gx.xq = xq;
  gx.dx = dx;
  gx.xc = xc;
  gx.xs = xs;
  // prepared on the calling thread (O(M·K)), as the int16 GEMV does: the region keeps one barrier
  gemv8_prep<F>(p, MM, nchunk, xq, dx, xc, gs, gx.ldq, gx.ldd, tab8_scale(w.fmt));
  if (!kTab) block_sums(gs, MM, nbr, ngr, w.block / kXGroup, xs);
  // the low-rank branch and the threads' part: the int16 GEMV's, unchanged (gemm_gemv_i16.h)
  GemvLr<MM> st;
  if (lr) st.init(p, *lr, gx.lr);
  gemv_parallel<MM, R, kTab && SPC == 1>(
      p, lr, gx, st,
      [&](auto rows, const GemvX8& x, int64_t n0, const float* const* s_rows) {
        gemv8_rows<F, MM, decltype(rows)::value, SPC>(p, x, n0, s_rows);
      },
      [&](const auto& x, int64_t n0, const float* const* s_rows, const float* tab) {
        gemv8_rows<F, MM, R, SPC, true>(p, x, n0, s_rows, tab);
      });
}

template <W8 F, int MM>
void gemv8_spc(const GemmParams& p, const LowrankParams* lr) {
  const int spc = std::max(1, kChunk8<F> / p.w.block);
  if (spc == 1) return gemv8_run<F, MM, 1>(p, lr);
  if (spc == 2) return gemv8_run<F, MM, 2>(p, lr);
  if constexpr (F == W8::int2) return gemv8_run<F, MM, 4>(p, lr);
}

template <W8 F>
void gemv8_m(const GemmParams& p, const LowrankParams* lr) {
  switch (p.m) {
    case 1: return gemv8_spc<F, 1>(p, lr);
    case 2: return gemv8_spc<F, 2>(p, lr);
    case 3: return gemv8_spc<F, 3>(p, lr);
    case 4: return gemv8_spc<F, 4>(p, lr);
    default: return gemv8_spc<F, 8>(p, lr);  // 5..8: rows of x padded with zeros
  }
}

void gemv_i8(const GemmParams& p, const LowrankParams* lr) {
  switch (p.w.fmt) {
    case Fmt::nf4: return gemv8_m<W8::nf4>(p, lr);
    case Fmt::int4: return gemv8_m<W8::int4>(p, lr);
    case Fmt::int2: return gemv8_m<W8::int2>(p, lr);
    default: LOWBIT_CHECK(false, "gemv_i8: fp4 runs the int16 GEMV (see gemv_i8_applies)");
  }
}

}  // namespace
}  // namespace lowbit::cpu
