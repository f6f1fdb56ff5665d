// csrc/cpu/quant_avx2.cpp — AVX2/FMA/F16C inner loops of the quant family (this file alone is
// compiled with -mavx2 -mfma -mf16c; quant.cpp calls it only when the CPU supports them).
// Same fp32 operation sequence as quant_rules.h (no FMA), so the results are bit-exact.
#include <immintrin.h>

#include <cstring>

#include "cpu/quant_rules.h"

namespace lowbit::cpu {

namespace {

// 8 consecutive elements of any input dtype -> fp32 (exact).
inline __m256 load8(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::f32: return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    case DType::bf16: {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    default:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  }
}

// fp32 -> any output dtype, round to nearest even (inputs are finite here).
inline void store8(void* p, DType t, int64_t i, __m256 v) {
  switch (t) {
    case DType::f32: _mm256_storeu_ps(static_cast<float*>(p) + i, v); break;
    case DType::bf16: {
      __m256i u = _mm256_castps_si256(v);
      __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
      u = _mm256_srli_epi32(u, 16);
      // packus works within 128-bit lanes: [a0..a3 b0..b3 | a4..a7 b4..b7] -> fix the order
      __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), _mm256_castsi256_si128(packed));
      break;
    }
    default:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
inline float hmin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// 16-entry lookup of int32 indices in [0, 16): two vpermps on the table halves + blend on bit 3.
inline __m256 lookup16(__m256 lo, __m256 hi, __m256i idx) {
  __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
inline __m256i lookup16i(__m256i lo, __m256i hi, __m256i idx) {
  return _mm256_castps_si256(lookup16(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi), idx));
}

// Codes of 8 elements in the packed stream, as int32 lanes in element order.
// 4-bit: 4 bytes; element 2j is the high nibble of byte j. 2-bit: 2 bytes, element 4j in bits 7..6.
inline __m256i unpack8(const uint8_t* src, int bits) {
  uint32_t word = 0;
  if (bits == 4) {
    std::memcpy(&word, src, 4);
    const __m256i sh = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(word)), sh), _mm256_set1_epi32(0xf));
  }
  std::memcpy(&word, src, 2);
  const __m256i sh = _mm256_setr_epi32(6, 4, 2, 0, 14, 12, 10, 8);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(word)), sh), _mm256_set1_epi32(0x3));
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
  alignas(32) float buf[4096];
  alignas(32) int32_t q[4096];

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
