// csrc/cpu/gemm_avx512.cpp — the gemm family's AVX-512 VNNI code, for CPUs with AVX-512 F/BW/VL/VNNI
// (Zen 4, Ice Lake and later): this file alone is compiled with those flags (256-bit vectors only, so
// no frequency licence and the AVX2 data layouts), and its functions run only when use_avx512()
// (the CPU has them, or _C.set_cpu_path("avx512")). Two kernels:
//
//  * gemv_avx512: the small-M GEMV (cpu/gemm_gemv_i16.h) built with LOWBIT_GEMV_VNNI. Same data
//    layout and int32 sums as the AVX2 build; per 64 4-bit weights and row of x it issues 4 vpdpwssd
//    where AVX2 needs 4 vpmaddwd + 3 vpaddd, and nf4/fp4 decode with the int4 nibble split + 4 vpermw
//    instead of 3 + 4 vpshufb + 4 vpunpck.
//
//  * the int16 variant of the tile kernels: its pieces below, driven by gemm_tile / gemm_t_tile in
//    gemm_avx2.cpp (which own the loops, buffers and the fp32 parts: the zero-point pass and the
//    low-rank branch).
//
// The int16 tile variant, forward: the tile kernel multiplies int16 images instead of fp32: x is
// quantized per row and group of 32 k, xq = round(x / max|x|_g · QX), W's tile is decoded to
// int16 (int4/int2: the code; fp4: T·3072, exact; nf4: round(T·QW)), and the micro-kernel issues
// one vpdpwssd (16 multiply-adds, 2 per cycle on Zen 4) where the fp32 kernel issues one FMA (8):
// twice the multiply-add rate. Each int32 lane sums the 32 products of one group (16 k pairs), then
// the fp32 accumulator takes cvt(acc) · dx_g · s (one cvt + mul + fma per 16 vpdpwssd).
// No overflow: 32·QX·QW < 2^31 — nf4 32·8191·8192, fp4 32·16383·3072, int4 32·32767·15, int2 less.
// Error (docs/kernels.md): x off by ≤ 0.5/QX of its group max (nf4 6.1e-5, fp4 3.1e-5, int 1.5e-5),
// nf4 weights by ≤ 0.5/8192 = 6.1e-5 of the block absmax; fp32 accumulation otherwise.
// The int formats' zero point: Σ_b s_b z_b X_b (X_b = Σ_{g∈b} dx_g Σ xq) is one more fp32
// micro-kernel pass of depth K / block per output tile.
//
// The int16 tile variant, gemm_t: gx = gy · Ŵ with Ŵ[n, k] = s[n, b] · w16[n, k] (w16: the int16
// image of the tile kernel, scale s including 1 / QW): the scale varies along the contraction (n), so
// it is folded into gy: per k-block b, gy'[m, n] = gy[m, n] · s[n, b] is quantized per row and group
// of 32 n (QX of tile_q), and gx[m, k ∈ b] = Σ_g dq[m, g] Σ_{n∈g} gq'[m, n] w16[n, k] (− Σ_n gy'[m, n] z[n, b] for the int
// formats, in fp32). Per n pair the micro-kernel issues 12 vpdpwssd (6 rows of gy × 16 columns), the
// W pairs interleaved along n in the decoded tile. Costs on top of the products: the quantization of
// gy' once per k-block (≈ 1/block of the multiply-adds' work) and the flush per group of 32 n.

#define LOWBIT_GEMV_VNNI 1
#include "cpu/gemm_gemv_i16.h"

namespace lowbit::cpu {

void gemv_avx512(const GemmParams& p, const LowrankParams* lr) { gemv_i16(p, lr); }

// One sliver of 16 rows (fp32, k-major [k][16], K a multiple of 32) → xq[k/2][16] (int16 pairs
// (x[2t], x[2t+1]) per int32 lane), dx[g][16] = max|x|_g / QX, gsum[g][16] = dx_g · Σ_{k∈g} xq
// (int formats). A group with a NaN gets dx = NaN, one with an inf dx = inf: the output is NaN.
void pack_x_i16(const float* v, int64_t K, float qx, int32_t* xq, float* dx, float* gsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f), vqx = _mm256_set1_ps(qx), zero = _mm256_setzero_ps();
  const __m256i lo16 = _mm256_set1_epi32(0xffff);
  for (int64_t g = 0; g < K / kG; ++g) {
    const float* vg = v + g * kG * 16;
    for (int h = 0; h < 2; ++h) {
      __m256 mx = zero, bad = zero;
      for (int k = 0; k < kG; ++k) {
        const __m256 a = _mm256_load_ps(vg + k * 16 + 8 * h);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, a));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
      }
      const __m256 pos = _mm256_cmp_ps(mx, zero, _CMP_GT_OQ);
      const __m256 inv = _mm256_and_ps(_mm256_div_ps(vqx, mx), pos);  // 0 for an all-zero group (and inf)
      __m256 d = _mm256_div_ps(mx, vqx);
      d = _mm256_blendv_ps(d, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), bad);
      __m256i sum = _mm256_setzero_si256();
      for (int t = 0; t < kG / 2; ++t) {
        const __m256i e = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(vg + (2 * t) * 16 + 8 * h), inv));
        const __m256i o = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(vg + (2 * t + 1) * 16 + 8 * h), inv));
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(e, o));
        _mm256_store_si256(reinterpret_cast<__m256i*>(xq + (g * (kG / 2) + t) * 16 + 8 * h),
                           _mm256_or_si256(_mm256_and_si256(e, lo16), _mm256_slli_epi32(o, 16)));
      }
      _mm256_store_ps(dx + g * 16 + 8 * h, d);
      if (gsum) _mm256_store_ps(gsum + g * 16 + 8 * h, _mm256_mul_ps(d, _mm256_cvtepi32_ps(sum)));
    }
  }
}

namespace {

// Eight codes of W from element e0 (a multiple of 8) → their int16 images as int32 lanes: the code
// (int4 / int2) or round(T[code] · qw) (nf4 / fp4, through two vpermd and a blend).
struct Decode16 {
  int bits, per_byte;
  bool is_table;
  __m256i t_lo, t_hi;
  Decode16(Fmt f, float qw) : bits(fmt_bits(f)), per_byte(8 / fmt_bits(f)), is_table(fmt_is_table(f)) {
    const float* table = f == Fmt::nf4 ? kNF4 : kFP4;
    alignas(32) int32_t t16[16];
    for (int i = 0; i < 16; ++i) t16[i] = is_table ? int32_t(std::nearbyint(table[i] * qw)) : 0;
    t_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(t16));
    t_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(t16 + 8));
  }
  __m256i operator()(const uint8_t* codes, int64_t e0) const {
    const __m256i idx = unpack8(codes + e0 / per_byte, bits);
    if (!is_table) return idx;
    const __m256i a = _mm256_permutevar8x32_epi32(t_lo, idx), c = _mm256_permutevar8x32_epi32(t_hi, idx);
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(c),
                                                _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))));
  }
};

}  // namespace

// Rows [n0, n0 + rows) × k [k0, k0 + kc) of W → int16 pairs along k, out[r][k / 2] (row stride ld
// pairs), and the scale of each group of 32 → sw[r][i / 32] (nf4/fp4: s / QW; int: s). Rows
// [rows, rows_pad) are zero.
void decode_tile_i16(const GemmWeight& w, int64_t n0, int rows, int rows_pad, int64_t k0, int kc, float qw,
                     int32_t* out, int64_t ld, float* sw, int64_t lds) {
  const Decode16 dec(w.fmt, qw);
  const float inv_qw = 1.0f / qw;
  for (int r = 0; r < rows; ++r) {
    const int64_t row0 = (n0 + r) * w.k;
    for (int i = 0; i < kc; i += kG) {
      const int64_t e0 = row0 + k0 + i;
      const float s = weight_scale(w, e0 / w.block);
      sw[r * lds + i / kG] = dec.is_table ? s * inv_qw : s;
      for (int j = 0; j < kG; j += 8) {
        const __m256i v = dec(w.codes, e0 + j);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r * ld + (i + j) / 2),
                         _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
      }
    }
  }
  for (int r = rows; r < rows_pad; ++r) {
    std::memset(out + r * ld, 0, sizeof(int32_t) * size_t(kc / 2));
    for (int i = 0; i < kc; i += kG) sw[r * lds + i / kG] = 0.0f;
  }
}

// The 6×16 int16 micro-kernel shared by the forward and gemm_t tiles, over `depth` pairs (a multiple
// of 16, one group of 32 products per int32 flush):
//   c[i][0..15] (+)= Σ_g rs_i[g] · ls_g[0..15] · Σ_{t∈g} <v pair t [0..15], b_i pair t>
// v: 16 int32 pairs per t at v + t · v_step (loaded), b: 6 rows of int32 pairs (stride ldb, broadcast),
// rs: the rows' per-group scales (stride lds), ls: per-lane scales [g][16] or null (all 1).
// Forward: v = x pairs, b = W rows, ls = dx, rs = W's group scales. gemm_t: v = W pairs interleaved
// along n, b = gy' rows, ls = null, rs = gy''s group scales. AVX-512 VL gives 32 ymm registers:
// 12 int32 + 12 fp32 accumulators.
void micro_i16(bool first, int depth, const int32_t* v, int64_t v_step, const int32_t* b, int64_t ldb, const float* ls,
               const float* rs, int64_t lds, float* c, int64_t ldc) {
  __m256 cf[kNR][2];
  for (int i = 0; i < kNR; ++i) cf[i][0] = cf[i][1] = _mm256_setzero_ps();
  const int32_t *b0 = b, *b1 = b + ldb, *b2 = b + 2 * ldb, *b3 = b + 3 * ldb, *b4 = b + 4 * ldb, *b5 = b + 5 * ldb;
  for (int g = 0; g < depth / (kG / 2); ++g) {
    // twelve named accumulators (an array made GCC shuffle them between registers every step)
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
    __m256i a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
#pragma GCC unroll 16
    for (int tt = 0; tt < kG / 2; ++tt) {
      const int t = g * (kG / 2) + tt;
      const __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(v + t * v_step));
      const __m256i x1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(v + t * v_step + 8));
      __m256i w;
      w = _mm256_set1_epi32(b0[t]); a00 = _mm256_dpwssd_epi32(a00, x0, w); a01 = _mm256_dpwssd_epi32(a01, x1, w);
      w = _mm256_set1_epi32(b1[t]); a10 = _mm256_dpwssd_epi32(a10, x0, w); a11 = _mm256_dpwssd_epi32(a11, x1, w);
      w = _mm256_set1_epi32(b2[t]); a20 = _mm256_dpwssd_epi32(a20, x0, w); a21 = _mm256_dpwssd_epi32(a21, x1, w);
      w = _mm256_set1_epi32(b3[t]); a30 = _mm256_dpwssd_epi32(a30, x0, w); a31 = _mm256_dpwssd_epi32(a31, x1, w);
      w = _mm256_set1_epi32(b4[t]); a40 = _mm256_dpwssd_epi32(a40, x0, w); a41 = _mm256_dpwssd_epi32(a41, x1, w);
      w = _mm256_set1_epi32(b5[t]); a50 = _mm256_dpwssd_epi32(a50, x0, w); a51 = _mm256_dpwssd_epi32(a51, x1, w);
    }
    const __m256i acc[kNR][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 l0 = ls ? _mm256_load_ps(ls + g * 16) : one, l1 = ls ? _mm256_load_ps(ls + g * 16 + 8) : one;
#pragma GCC unroll 6
    for (int i = 0; i < kNR; ++i) {
      const __m256 f = _mm256_broadcast_ss(rs + i * lds + g);
      cf[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][0]), _mm256_mul_ps(l0, f), cf[i][0]);
      cf[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][1]), _mm256_mul_ps(l1, f), cf[i][1]);
    }
  }
  store_tile(first, cf, c, ldc);
}

// gy' rows [0, mp) for block b: gq[m][N/2] int32 pairs, dq[m][N/32]; zt[m] = Σ_n gy'[m, n] z[n, b]
// (int formats, else untouched). sb[n] = s[n, b] (nf4/fp4: / QW). ≈ 1.5 vector ops per element
// (the products it feeds are ≈ block / 16 vpdpwssd per element).
void pack_gy_i16(const float* gyf, int64_t mp, int64_t N, const float* sb, const float* zb, float qx, int32_t* gq,
                 float* dq, float* zt) {
  const __m256 sign = _mm256_set1_ps(-0.0f), vqx = _mm256_set1_ps(qx), zero = _mm256_setzero_ps();
  for (int64_t m = 0; m < mp; ++m) {
    const float* g = gyf + m * N;
    __m256 zacc = zero;
    for (int64_t g0 = 0; g0 < N; g0 += kG) {
      __m256 v[4];
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_mul_ps(_mm256_load_ps(g + g0 + 8 * j), _mm256_loadu_ps(sb + g0 + 8 * j));
        if (zb) zacc = _mm256_fmadd_ps(v[j], _mm256_loadu_ps(zb + g0 + 8 * j), zacc);
      }
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      mx = _mm256_max_ps(mx, _mm256_permute2f128_ps(mx, mx, 1));
      mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0x4e));
      mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0xb1));  // every lane: the group max
      const __m256 bad = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(v[0], v[0], _CMP_UNORD_Q), _mm256_cmp_ps(v[1], v[1], _CMP_UNORD_Q)),
                                      _mm256_or_ps(_mm256_cmp_ps(v[2], v[2], _CMP_UNORD_Q), _mm256_cmp_ps(v[3], v[3], _CMP_UNORD_Q)));
      const __m256 inv = _mm256_and_ps(_mm256_div_ps(vqx, mx), _mm256_cmp_ps(mx, zero, _CMP_GT_OQ));
      const float d = _mm256_cvtss_f32(mx) / qx;
      dq[m * (N / kG) + g0 / kG] = _mm256_movemask_ps(bad) ? std::numeric_limits<float>::quiet_NaN() : d;
      // int16 in n order: packs interleaves 4-lane halves, permute4x64 puts them back in order
      const __m256i a = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv)), _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv)));
      const __m256i b = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv)), _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv)));
      int32_t* dst = gq + m * (N / 2) + g0 / 2;
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute4x64_epi64(a, 0xd8));
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 8), _mm256_permute4x64_epi64(b, 0xd8));
    }
    if (zb) zt[m] = hsum(zacc);
  }
}

// Rows [n0, n0 + nn) (nn even) × columns [k0, k0 + kw) (one block) of W → int16 pairs along n:
// out[(n / 2) · kw + k] = (w16[n][k], w16[n + 1][k]).
void decode_tile_t_i16(const GemmWeight& w, int64_t n0, int nn, int64_t k0, int kw, float qw, int32_t* out) {
  const Decode16 dec(w.fmt, qw);
  const __m256i lo16 = _mm256_set1_epi32(0xffff);
  for (int r = 0; r < nn; r += 2) {
    const int64_t row0 = (n0 + r) * w.k + k0, row1 = row0 + w.k;
    for (int j = 0; j < kw; j += 8) {
      const __m256i a = dec(w.codes, row0 + j), b = dec(w.codes, row1 + j);
      _mm256_store_si256(reinterpret_cast<__m256i*>(out + (r / 2) * kw + j),
                         _mm256_or_si256(_mm256_and_si256(a, lo16), _mm256_slli_epi32(b, 16)));
    }
  }
}

}  // namespace lowbit::cpu
