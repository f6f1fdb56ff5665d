// csrc/cpu/simd_avx2.h — AVX2/F16C helpers shared by the *_avx2.cpp translation units (include it
// only from files compiled with -mavx2 -mfma -mf16c).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "lowbit/formats.h"

namespace lowbit::cpu::simd {

// Always inlined: an out-of-line copy is one symbol per program, which the linker may take from a
// translation unit built for another ISA, and a call per 8 elements cost 3% of the bf16 engine's time
// (its output conversion) when gcc declined to inline.
#define LOWBIT_SIMD [[gnu::always_inline]] inline

// 8 consecutive elements of any dtype -> fp32 (exact).
LOWBIT_SIMD __m256 load8(const void* p, DType t, int64_t i) {
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

// 8 fp32 -> 8 bf16, round to nearest even (as torch's .to()); NaN stays NaN (quiet bit set).
LOWBIT_SIMD __m128i to_bf16x8(__m256 v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

// fp32 -> dtype, round to nearest even (as torch's .to()); bf16 NaN stays NaN (quiet bit set).
LOWBIT_SIMD void store8(void* p, DType t, int64_t i, __m256 v) {
  switch (t) {
    case DType::f32: _mm256_storeu_ps(static_cast<float*>(p) + i, v); break;
    case DType::bf16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), to_bf16x8(v));
      break;
    default:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

LOWBIT_SIMD float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
LOWBIT_SIMD float hmin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

LOWBIT_SIMD float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Codes of 8 consecutive elements of a packed stream (first element in the most significant bits),
// as int32 lanes in element order. 4-bit: 4 bytes, element 2j the high nibble of byte j;
// 2-bit: 2 bytes, element 4j in bits 7..6 of byte j.
LOWBIT_SIMD __m256i unpack8(const uint8_t* src, int bits) {
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

}  // namespace lowbit::cpu::simd
