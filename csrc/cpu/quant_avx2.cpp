// csrc/cpu/quant_avx2.cpp — AVX2/FMA/F16C inner loops of the quant family (this file alone is
// compiled with -mavx2 -mfma -mf16c; quant.cpp calls it only when the CPU supports them).
// Same fp32 operation sequence as quant_rules.h (no FMA), so the results are bit-exact.
#include <immintrin.h>

#include <cstring>

#include "cpu/quant_rules.h"
#include "cpu/simd_avx2.h"

namespace lowbit::cpu {

namespace {

using simd::hmax;
using simd::hmin;
using simd::load8;
using simd::store8;
using simd::unpack8;

// 16-entry lookup of int32 indices in [0, 16): two vpermps on the table halves + blend on bit 3.
inline __m256 lookup16(__m256 lo, __m256 hi, __m256i idx) {
  __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
inline __m256i lookup16i(__m256i lo, __m256i hi, __m256i idx) {
  return _mm256_castps_si256(lookup16(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi), idx));
}


inline void pack_codes(const int32_t* q, int n, int bits, uint8_t* out) {
  if (bits == 4) {
    for (int i = 0; i < n; i += 2) out[i / 2] = uint8_t((q[i] << 4) | q[i + 1]);
  } else {
    for (int i = 0; i < n; i += 4) out[i / 4] = uint8_t((q[i] << 6) | (q[i + 1] << 4) | (q[i + 2] << 2) | q[i + 3]);
  }
}

}  // namespace

void quantize_blocks_avx2(const QuantizeParams& p, int64_t b0, int64_t b1) {
  const int bits = fmt_bits(p.fmt), qmax = fmt_qmax(p.fmt), per_byte = 8 / bits;
  const Midpoints& mp = midpoints();
  const float* mid = p.fmt == Fmt::nf4 ? mp.nf4 : mp.fp4;
  __m256 mids[15];
  for (int j = 0; j < 15; ++j) mids[j] = _mm256_set1_ps(mid[j]);
  int32_t sorted_codes[16];
  for (int j = 0; j < 16; ++j) sorted_codes[j] = p.fmt == Fmt::fp4 ? kFP4SortedCodes[j] : j;
  const __m256i sc_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sorted_codes));
  const __m256i sc_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sorted_codes + 8));
  const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f), neg_one = _mm256_set1_ps(-1.0f);
  alignas(32) float buf[kMaxTableBlock];
  alignas(32) int32_t q[kMaxTableBlock];

  for (int64_t b = b0; b < b1; ++b) {
    const int64_t base = b * p.block;
    for (int i = 0; i < p.block; i += 8) _mm256_store_ps(buf + i, load8(p.w, p.w_dtype, base + i));
    if (fmt_is_table(p.fmt)) {
      __m256 m = _mm256_setzero_ps();
      for (int i = 0; i < p.block; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_load_ps(buf + i)));
      const float amax = hmax(m);
      p.scale[b] = amax;
      const __m256 inv = _mm256_set1_ps(table_inv(amax));
      for (int i = 0; i < p.block; i += 8) {
        __m256 v = _mm256_mul_ps(_mm256_load_ps(buf + i), inv);
        v = _mm256_min_ps(_mm256_max_ps(v, neg_one), one);
        // index = number of midpoints strictly below v (ties go to the lower code)
        __m256i cnt = _mm256_setzero_si256();
        for (int j = 0; j < 15; ++j)
          cnt = _mm256_sub_epi32(cnt, _mm256_castps_si256(_mm256_cmp_ps(mids[j], v, _CMP_LT_OQ)));
        if (p.fmt == Fmt::fp4) cnt = lookup16i(sc_lo, sc_hi, cnt);
        _mm256_store_si256(reinterpret_cast<__m256i*>(q + i), cnt);
      }
    } else {
      __m256 mn = _mm256_load_ps(buf), mx = mn;
      for (int i = 8; i < p.block; i += 8) {
        __m256 v = _mm256_load_ps(buf + i);
        mn = _mm256_min_ps(mn, v);
        mx = _mm256_max_ps(mx, v);
      }
      const IntBlock ib = int_block(hmin(mn), hmax(mx), qmax);
      p.scale[b] = ib.scale;
      p.zero[b] = ib.zero;
      const __m256 inv = _mm256_set1_ps(ib.inv), zero = _mm256_set1_ps(ib.zero);
      const __m256 hi = _mm256_set1_ps(float(qmax)), lo = _mm256_setzero_ps();
      for (int i = 0; i < p.block; i += 8) {
        __m256 t = _mm256_add_ps(_mm256_mul_ps(_mm256_load_ps(buf + i), inv), zero);
        t = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        t = _mm256_min_ps(_mm256_max_ps(t, lo), hi);
        _mm256_store_si256(reinterpret_cast<__m256i*>(q + i), _mm256_cvttps_epi32(t));
      }
    }
    pack_codes(q, p.block, bits, p.codes + base / per_byte);
  }
}

void dequantize_blocks_avx2(const DequantizeParams& p, int64_t b0, int64_t b1) {
  const int bits = fmt_bits(p.fmt), per_byte = 8 / bits;
  const float* table = p.fmt == Fmt::nf4 ? kNF4 : kFP4;
  const __m256 t_lo = _mm256_loadu_ps(table), t_hi = _mm256_loadu_ps(table + 8);
  const bool is_table = fmt_is_table(p.fmt);
  for (int64_t b = b0; b < b1; ++b) {
    const __m256 s = _mm256_set1_ps(block_scale(p, b));
    const __m256 z = _mm256_set1_ps(is_table ? 0.0f : p.zero[b]);
    const int64_t base = b * p.block;
    const uint8_t* in = p.codes + base / per_byte;
    for (int i = 0; i < p.block; i += 8) {
      __m256i idx = unpack8(in + i / per_byte, bits);
      __m256 v = is_table ? _mm256_mul_ps(lookup16(t_lo, t_hi, idx), s)
                          : _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(idx), z), s);
      store8(p.out, p.out_dtype, base + i, v);
    }
  }
}

}  // namespace lowbit::cpu
