// csrc/cpu/hadamard_avx2.cpp — AVX2/FMA/F16C row kernel of the hadamard family (this file alone
// is compiled with -mavx2 -mfma -mf16c; hadamard.cpp calls it only when the CPU has them).
//
// A sub-row of l = 2^k floats is V = l / 8 ymm vectors. Butterflies:
//   bits 0-2   inside a vector: permute + FMA by a ±1 vector (v·(±1) is exact, so each stage is
//              one rounding, like an add/sub);
//   bits 3-5   across 8 vectors held in registers, fused with bits 0-2 in the first pass, which
//              also converts the input dtype;
//   bits 6+    passes of radix 8 (8 registers loaded at a stride, 3 stages, stored back) over the
//              scratch row, which stays in L1 (l ≤ 4096) or L2 (l ≤ 32768): "cache-blocked".
// The last pass (or the H_m mix for m > 1) applies the scale and converts to the output dtype.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu/common.h"
#include "cpu/simd_avx2.h"
#include "lowbit/hadamard.h"

namespace lowbit::cpu {

namespace {

template <DType T>
inline __m256 load8(const void* p, int64_t i) {
  if constexpr (T == DType::f32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else if constexpr (T == DType::bf16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  }
}

// Round to nearest even; NaN stays NaN (quieted), like torch's .to().
template <DType T>
inline void store8(void* p, int64_t i, __m256 v) {
  if constexpr (T == DType::f32) {
    _mm256_storeu_ps(static_cast<float*>(p) + i, v);
  } else if constexpr (T == DType::bf16) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // packus works within 128-bit lanes: [a0..a3 a0..a3 | a4..a7 a4..a7] -> fix the order
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), _mm256_castsi256_si128(packed));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// Bits 0-2 of the index, inside one vector.
inline __m256 wht8(__m256 v) {
  v = _mm256_fmadd_ps(v, _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1), _mm256_permute_ps(v, 0xB1));
  v = _mm256_fmadd_ps(v, _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1), _mm256_permute_ps(v, 0x4E));
  return _mm256_fmadd_ps(v, _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1), _mm256_permute2f128_ps(v, v, 1));
}

// log2(R) butterfly stages across R registers (fully unrolled: R is a constant).
template <int R>
inline void wht_regs(__m256* v) {
#pragma GCC unroll 8
  for (int h = 1; h < R; h *= 2)
#pragma GCC unroll 8
    for (int i = 0; i < R; i += 2 * h)
#pragma GCC unroll 8
      for (int j = i; j < i + h; ++j) {
        const __m256 a = v[j], b = v[j + h];
        v[j] = _mm256_add_ps(a, b);
        v[j + h] = _mm256_sub_ps(a, b);
      }
}

// First pass over one sub-row: vectors [g, g + G) hold bits 0..2 + log2(G) of the index.
template <int G, DType TI, class St>
inline void pass_first(const void* src, int64_t src_off, int64_t nvec, St&& st) {
  for (int64_t g = 0; g < nvec; g += G) {
    __m256 v[G];
#pragma GCC unroll 8
    for (int t = 0; t < G; ++t) v[t] = wht8(load8<TI>(src, src_off + (g + t) * 8));
    wht_regs<G>(v);
#pragma GCC unroll 8
    for (int t = 0; t < G; ++t) st(g + t, v[t]);
  }
}

// A radix-R pass: vectors j, j + s, ..., j + (R-1)s for every j with (j / s) % R == 0.
template <int R, class St>
inline void pass_radix(const float* src, int64_t nvec, int64_t s, St&& st) {
  for (int64_t blk = 0; blk < nvec; blk += R * s)
    for (int64_t j = blk; j < blk + s; ++j) {
      __m256 v[R];
#pragma GCC unroll 8
      for (int t = 0; t < R; ++t) v[t] = _mm256_load_ps(src + (j + t * s) * 8);
      wht_regs<R>(v);
#pragma GCC unroll 8
      for (int t = 0; t < R; ++t) st(j + t * s, v[t]);
    }
}

template <class St>
inline void pass_radix_any(int r, const float* src, int64_t nvec, int64_t s, St&& st) {
  switch (r) {
    case 1: return pass_radix<2>(src, nvec, s, st);
    case 2: return pass_radix<4>(src, nvec, s, st);
    default: return pass_radix<8>(src, nvec, s, st);
  }
}

// WHT of one sub-row of 8·nvec elements (nvec = 2^vb): read from (src, src_off) in dtype TI, all
// passes but the last into `buf`; the last one goes to `last` (a store functor (vec, value)).
template <DType TI, class St>
void wht_subrow(const void* src, int64_t src_off, int vb, float* buf, St&& last) {
  const int64_t nvec = int64_t(1) << vb;
  auto to_buf = [buf](int64_t j, __m256 v) { _mm256_store_ps(buf + j * 8, v); };
  const int first = vb < 3 ? vb : 3;
  int rest = vb - first;
  auto first_pass = [&](auto&& st) {
    switch (first) {
      case 0: return pass_first<1, TI>(src, src_off, nvec, st);
      case 1: return pass_first<2, TI>(src, src_off, nvec, st);
      case 2: return pass_first<4, TI>(src, src_off, nvec, st);
      default: return pass_first<8, TI>(src, src_off, nvec, st);
    }
  };
  if (rest == 0) return first_pass(last);
  first_pass(to_buf);
  int done = first;
  while (rest > 0) {
    // Split the remaining bits evenly over ceil(rest / 3) passes (4 bits: 2 + 2, not 3 + 1).
    const int passes = (rest + 2) / 3, r = (rest + passes - 1) / passes;
    if (r == rest) return pass_radix_any(r, buf, nvec, int64_t(1) << done, last);
    pass_radix_any(r, buf, nvec, int64_t(1) << done, to_buf);
    done += r;
    rest -= r;
  }
}

// y_b = Σ_a x_a · coef[a·m + b] for the m sub-rows of l = 8·nvec floats in `buf`, scaled, to out.
template <DType TO>
void mix(const float* buf, int m, int64_t nvec, const float* coef, float scale, void* out, int64_t out_off) {
  const int64_t l = nvec * 8;
  const __m256 sc = _mm256_set1_ps(scale);
  if (nvec >= 2) {
    // 4 outputs × 2 column vectors: 8 accumulators; per input row 2 loads + 4 broadcasts + 8 FMAs.
    for (int64_t c = 0; c < l; c += 16)
      for (int b = 0; b < m; b += 4) {
        __m256 acc[4][2];
        for (int t = 0; t < 4; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        for (int a = 0; a < m; ++a) {
          const __m256 x0 = _mm256_load_ps(buf + a * l + c), x1 = _mm256_load_ps(buf + a * l + c + 8);
          const float* cf = coef + a * m + b;
#pragma GCC unroll 4
          for (int t = 0; t < 4; ++t) {
            const __m256 s = _mm256_broadcast_ss(cf + t);
            acc[t][0] = _mm256_fmadd_ps(x0, s, acc[t][0]);
            acc[t][1] = _mm256_fmadd_ps(x1, s, acc[t][1]);
          }
        }
        for (int t = 0; t < 4; ++t) {
          store8<TO>(out, out_off + (b + t) * l + c, _mm256_mul_ps(acc[t][0], sc));
          store8<TO>(out, out_off + (b + t) * l + c + 8, _mm256_mul_ps(acc[t][1], sc));
        }
      }
    return;
  }
  for (int b = 0; b < m; b += 4) {  // l = 8
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int a = 0; a < m; ++a) {
      const __m256 x0 = _mm256_load_ps(buf + a * 8);
      for (int t = 0; t < 4; ++t) acc[t] = _mm256_fmadd_ps(x0, _mm256_broadcast_ss(coef + a * m + b + t), acc[t]);
    }
    for (int t = 0; t < 4; ++t) store8<TO>(out, out_off + (b + t) * 8, _mm256_mul_ps(acc[t], sc));
  }
}

template <DType T>
void rows(const HadamardParams& p, int m, int log2_l, const float* coef, int64_t r0, int64_t r1, float* buf) {
  static_assert(sizeof(float) * 8 == sizeof(__m256), "a vector is 8 floats");
  const int vb = log2_l - 3;
  const int64_t l = int64_t(1) << log2_l, nvec = l / 8;
  const __m256 sc = _mm256_set1_ps(p.scale);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * int64_t(p.n);
    if (m == 1) {
      // Only the last pass touches `out`, after the first pass has read the whole row: in-place safe.
      auto to_out = [&](int64_t j, __m256 v) { store8<T>(p.out, base + j * 8, _mm256_mul_ps(v, sc)); };
      wht_subrow<T>(p.x, base, vb, buf, to_out);
      continue;
    }
    for (int a = 0; a < m; ++a) {
      float* sub = buf + a * l;
      auto to_sub = [sub](int64_t j, __m256 v) { _mm256_store_ps(sub + j * 8, v); };
      wht_subrow<T>(p.x, base + a * l, vb, sub, to_sub);
    }
    (void)nvec;
    mix<T>(buf, m, nvec, coef, p.scale, p.out, base);
  }
}

}  // namespace

void hadamard_rows_avx2(const HadamardParams& p, int m, int log2_l, const float* coef, int64_t r0, int64_t r1,
                        float* scratch) {
  switch (p.dtype) {
    case DType::f32: return rows<DType::f32>(p, m, log2_l, coef, r0, r1, scratch);
    case DType::bf16: return rows<DType::bf16>(p, m, log2_l, coef, r0, r1, scratch);
    default: return rows<DType::f16>(p, m, log2_l, coef, r0, r1, scratch);
  }
}

}  // namespace lowbit::cpu
