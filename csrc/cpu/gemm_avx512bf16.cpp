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
// quant: a gather from the code table, then multiply and add, as dq_scale).
inline void block_scales(const GemmWeight& w, int64_t b0, int64_t cnt, float* out) {
  if (!w.scale_q) {
    std::memcpy(out, w.scale + b0, sizeof(float) * size_t(cnt));
    return;
  }
  const __m512 off = _mm512_set1_ps(w.scale_offset);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t i = 0;
  for (; i + 16 <= cnt; i += 16) {
    const int64_t b = b0 + i, nb = nested_block_of(b);
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scale_q + b)));
    const __m512 code = _mm512_i32gather_ps(q, kDynamicSigned, 4);
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

// Rows [j0, j0 + R) of W against the MM rows of xb (bf16, row stride ldx): res[m][r] = Σ_k x·Ŵ.
// sc: room for R · K / block floats (the rows' scales, decoded up front).
template <class L, int MM, int R>
[[gnu::noinline]] void dot_rows(const GemmWeight& w, const uint16_t* xb, int64_t ldx, int64_t j0, float* sc,
                                float (&res)[MM][R]) {
  const int64_t K = w.k, nbr = K / w.block;
  const int sh = __builtin_ctz(unsigned(w.block));
  constexpr bool kTab = L::kIsTable;
  block_scales(w, j0 * nbr, R * nbr, sc);
  // one vcvtneps2bf16 per table when no value can be denormal (LutDecode::tables16's conditions, here
  // over all R rows at once); else the table_of path, which rounds denormals as dequantize does
  bool fast = true;
  {
    __m512 lo = _mm512_set1_ps(kTab ? 0x1p-118f : 0x1p-100f);
    __mmask16 bad = 0;
    int64_t i = 0;
    for (; i + 16 <= R * nbr; i += 16) bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(sc + i)), lo, _CMP_LT_OQ);
    for (; i < R * nbr; ++i) bad |= std::fabs(sc[i]) < (kTab ? 0x1p-118f : 0x1p-100f);
    fast = !bad;
    if (!kTab && fast) {  // (q − z)·s: every zero on an integer, or ≥ 2^-26 from one
      const float* z = w.zero + j0 * nbr;
      for (i = 0; i + 16 <= R * nbr; i += 16) {
        const __m512 zv = _mm512_loadu_ps(z + i);
        const __m512 f = _mm512_abs_ps(_mm512_sub_ps(zv, _mm512_roundscale_ps(zv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
        bad |= _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(f, _mm512_setzero_ps(), _CMP_NEQ_OQ), f, _mm512_set1_ps(0x1p-26f),
                                       _CMP_LT_OQ);
      }
      for (; i < R * nbr; ++i) {
        const float f = std::fabs(z[i] - std::nearbyint(z[i]));
        bad |= f != 0.0f && f < 0x1p-26f;
      }
      fast = !bad;
    }
  }
  const __m512 tabv = kTab ? _mm512_loadu_ps(w.fmt == Fmt::nf4 ? kNF4 : kFP4)
                           : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  auto table = [&](int r, int64_t kb) {  // row r's block kb, in both halves
    const float s = sc[r * nbr + kb];
    __m256i t;
    if (fast) {
      const __m512 v = kTab ? _mm512_mul_ps(tabv, _mm512_set1_ps(s))
                            : _mm512_mul_ps(_mm512_sub_ps(tabv, _mm512_set1_ps(w.zero[(j0 + r) * nbr + kb])), _mm512_set1_ps(s));
      t = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
    } else {
      t = _mm512_castsi512_si256(L::table_of(w, s, (j0 + r) * nbr + kb));
    }
    return _mm512_broadcast_i64x4(t);
  };
  __m512 acc[MM][R];
#pragma GCC unroll 16
  for (int i = 0; i < MM * R; ++i) acc[i / R][i % R] = _mm512_setzero_ps();
  const uint8_t* src[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) src[r] = w.codes + (j0 + r) * K * L::kCodeBits / 8;
  __m512i lut[R];
  auto step = [&](int64_t k0) {
    __m512bh wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint8_t* c = src[r] + k0 * L::kCodeBits / 8;
      wv[r] = (__m512bh)_mm512_permutexvar_epi16(L::kCodeBits == 4 ? index4(c) : L::index(c), lut[r]);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MM; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + m * ldx + k0);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  };
  for (int64_t kb = 0; kb < K; kb += w.block) {  // per block: the R tables, then its 32-column steps
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) lut[r] = table(r, kb >> sh);
    int64_t k0 = kb;
    for (; k0 + 64 <= kb + w.block; k0 += 64) {  // two steps per iteration (blocks of 32: one)
      step(k0);
      step(k0 + 32);
    }
    if (k0 < kb + w.block) step(k0);
  }
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

// Rows of W per pass: at M ≤ 4, 4 rows (16 accumulators); above, 2 (MM · 2 ≤ 16).
template <int MM> constexpr int kDotRows = MM <= 4 ? 4 : 2;

template <class L, int MM>
void gemv_bf16_run(const GemmParams& p, const LowrankParams* lr) {
  const GemmWeight& w = p.w;
  const int64_t N = w.n, K = w.k;
  constexpr int R = kDotRows<MM>;
  // x as bf16 rows: in place when it is bf16, else rounded once (fp32 under `medium`)
  static thread_local AlignedBufT<uint16_t> x_buf, a_buf;
  static thread_local AlignedBuf xas_buf;
  const uint16_t* xb = static_cast<const uint16_t*>(p.x);
  if (p.dtype != DType::bf16) {
    uint16_t* t = x_buf.get(size_t(MM * K));
    for (int m = 0; m < MM; ++m) pack_row_bf16(p.x, p.dtype, K, m, K, K, t + m * K);
    xb = t;
  }
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
        dot_rows<L, MM, R>(w, xb, K, j, sc, res);
        for (int m = 0; m < MM; ++m)
          for (int rr = 0; rr < R; ++rr) ys[m][j - ja + rr] = res[m][rr];
      }
      for (; j < jb; ++j) {
        float res[MM][1];
        dot_rows<L, MM, 1>(w, xb, K, j, sc, res);
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

void gemm_bf16_avx512bf16(const GemmParams& p, const LowrankParams* lr) { gemm_bf16<Avx512Bf16>(p, lr); }
void gemm_t_bf16_avx512bf16(const GemmParams& p) { gemm_t_bf16<Avx512Bf16>(p); }
void lowrank_backward_bf16_avx512bf16(const LowrankBackwardParams& p) { lowrank_backward_bf16<Avx512Bf16>(p); }

}  // namespace lowbit::cpu
