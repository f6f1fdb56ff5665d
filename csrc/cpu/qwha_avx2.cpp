// csrc/cpu/qwha_avx2.cpp — AVX2/FMA kernel of the qwha family (this file alone is compiled with
// -mavx2 -mfma -mf16c; qwha.cpp calls it only when use_avx2()).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace lowbit::cpu {

// qwha_spmm's row kernel (qwha.cpp, M < 8): y[r] = scale · Σ_j values[j] · z[cols[j]] for the CSR
// rows [r0, r1) and one row z. 8 nonzeros per vgatherdps (the row's last partial group masked: no scalar tail);
// 8 rows are reduced together (hadd tree + one 128-bit lane swap) and stored as one vector, so the
// per-row cost is ~2 instructions besides the gathers (rows hold ~r·(1 + K/N) ≈ 32 nonzeros).
// A column outside [0, k) sets *bad and reads z[0] instead.
namespace {
inline __m256 qwha_row_acc(const float* values, const int32_t* cols, int32_t j, int32_t e, const float* z,
                           __m256i kmax, __m256i& out) {
  const __m256i zero = _mm256_setzero_si256(), lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= e; j += 8) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cols + j));
    const __m256i o = _mm256_or_si256(_mm256_cmpgt_epi32(c, kmax), _mm256_cmpgt_epi32(zero, c));
    out = _mm256_or_si256(out, o);
    const __m256 zc = _mm256_i32gather_ps(z, _mm256_andnot_si256(o, c), 4);
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(values + j), zc, acc);
  }
  if (j < e) {  // 1..7 left: masked loads read nothing past e (the lanes are 0)
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(e - j), lane);
    const __m256i c = _mm256_maskload_epi32(cols + j, m);
    const __m256i o = _mm256_or_si256(_mm256_cmpgt_epi32(c, kmax), _mm256_cmpgt_epi32(zero, c));
    out = _mm256_or_si256(out, o);
    const __m256 zc = _mm256_i32gather_ps(z, _mm256_andnot_si256(o, c), 4);
    acc = _mm256_fmadd_ps(_mm256_maskload_ps(values + j, m), zc, acc);
  }
  return acc;
}
}  // namespace

void qwha_rows_avx2(const float* values, const int32_t* cols, const int32_t* crow, int32_t r0, int32_t r1,
                    const float* z, int32_t k, float scale, float* y, bool accumulate, int* bad) {
  const __m256i kmax = _mm256_set1_epi32(k - 1);
  const __m256 vs = _mm256_set1_ps(scale);
  __m256i out = _mm256_setzero_si256();
  for (int32_t r = r0; r < r1; r += 8) {
    const int nr = std::min<int32_t>(8, r1 - r);
    __m256 a[8];
    for (int i = 0; i < 8; ++i)
      a[i] = i < nr ? qwha_row_acc(values, cols, crow[r + i], crow[r + i + 1], z, kmax, out) : _mm256_setzero_ps();
    const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 lo = _mm256_hadd_ps(s01, s23), hi = _mm256_hadd_ps(s45, s67);  // rows 0-3 | 4-7, per half
    const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
    const __m256 res = _mm256_mul_ps(sum, vs);
    if (nr == 8) {
      _mm256_storeu_ps(y + r, accumulate ? _mm256_add_ps(_mm256_loadu_ps(y + r), res) : res);
    } else {
      alignas(32) float t[8];
      _mm256_store_ps(t, res);
      for (int i = 0; i < nr; ++i) y[r + i] = accumulate ? y[r + i] + t[i] : t[i];
    }
  }
  *bad |= !_mm256_testz_si256(out, out);
}

}  // namespace lowbit::cpu
