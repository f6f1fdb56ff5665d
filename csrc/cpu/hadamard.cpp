// csrc/cpu/hadamard.cpp — hadamard family on the CPU: OpenMP over rows, one row at a time in a
// per-thread fp32 scratch row (≤ 128 KiB: L2-resident on Zen 3, L1-resident for n ≤ 4096).
// The AVX2 row kernel is in hadamard_avx2.cpp; this file holds the dispatch and the portable path.
//
// Roofline: the transform reads and writes each element once (memcpy traffic); the arithmetic is
// log2(l) add/sub per element for the 2^k part plus m multiply-adds per element for the dense H_m
// mix. On two Zen 3 cores (~12 G vector-ops/s vs ~20-36 GB/s) the power-of-two part stays under
// the memory time; the H_m mix is ~m/8 vector FMAs per element and makes m = 172 compute-bound.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/common.h"
#include "lowbit/hadamard.h"

namespace lowbit::cpu {

#if LOWBIT_HAVE_AVX2_TU
// hadamard_avx2.cpp: rows [r0, r1) of p with l = 2^log2_l >= 8; `coef` as in HadamardCoef.
void hadamard_rows_avx2(const HadamardParams& p, int m, int log2_l, const float* coef, int64_t r0, int64_t r1,
                        float* scratch);
#endif

namespace {

// coef[a * m + b] = H_m[a][b] (or H_m[b][a] when transposed): y_b = Σ_a x_a · coef[a][b].
struct HadamardCoef {
  std::vector<float> fwd[173], bwd[173];
  HadamardCoef() {
    for (int m : {12, 20, 28, 40, 172}) {
      fwd[m].resize(size_t(m) * m);
      bwd[m].resize(size_t(m) * m);
      for (int a = 0; a < m; ++a)
        for (int b = 0; b < m; ++b) {
          fwd[m][a * m + b] = float(hadamard_sign(kHadamardSigns.w, m, a, b));
          bwd[m][a * m + b] = float(hadamard_sign(kHadamardSigns.w, m, b, a));
        }
    }
  }
};
const HadamardCoef& coefs() {
  static const HadamardCoef c;
  return c;
}

// One row, scalar: WHT of each sub-row in place in `buf`, then the H_m mix into `out`.
void row_portable(const HadamardParams& p, int m, int l, const float* coef, int64_t r, float* buf) {
  const int64_t base = r * int64_t(p.n);
  for (int i = 0; i < p.n; ++i) buf[i] = load_as_float(p.x, p.dtype, base + i);
  for (int a = 0; a < m; ++a) {
    float* s = buf + int64_t(a) * l;
    for (int h = 1; h < l; h *= 2)
      for (int i = 0; i < l; i += 2 * h)
        for (int j = i; j < i + h; ++j) {
          const float u = s[j], v = s[j + h];
          s[j] = u + v;
          s[j + h] = u - v;
        }
  }
  if (m == 1) {
    for (int i = 0; i < p.n; ++i) store_from_float(p.out, p.dtype, base + i, buf[i] * p.scale);
    return;
  }
  float acc[256];
  for (int c = 0; c < l; c += 256) {
    const int w = std::min(256, l - c);
    for (int b = 0; b < m; ++b) {
      std::fill(acc, acc + w, 0.0f);
      for (int a = 0; a < m; ++a) {
        const float s = coef[a * m + b];
        const float* src = buf + int64_t(a) * l + c;
        for (int j = 0; j < w; ++j) acc[j] += s * src[j];  // s = ±1: exact product, one rounding
      }
      for (int j = 0; j < w; ++j) store_from_float(p.out, p.dtype, base + int64_t(b) * l + c + j, acc[j] * p.scale);
    }
  }
}

struct FreeDeleter {
  void operator()(float* f) const { std::free(f); }
};

}  // namespace

void hadamard(const HadamardParams& p) {
  int log2_l = 0;
  const int m = hadamard_split(p.n, &log2_l);
  LOWBIT_CHECK(m != 0, "hadamard: unsupported n=" + std::to_string(p.n));
  LOWBIT_CHECK(p.rows >= 0, "hadamard: negative rows");
  if (p.rows == 0) return;
  const int l = 1 << log2_l;
  const float* coef = m > 1 ? (p.transpose ? coefs().bwd[m] : coefs().fwd[m]).data() : nullptr;
  if (p.out != p.x) hint_huge_pages(p.out, size_t(p.rows) * p.n * (p.dtype == DType::f32 ? 4 : 2));
  const bool avx2 = use_avx2() && l >= 8;
  // Rows are independent. Below ~32 K elements the fork/join costs more than the work.
  const int64_t total = p.rows * int64_t(p.n);
  const int threads = int(std::min<int64_t>(num_threads(), std::max<int64_t>(1, total / 32768)));
  const int64_t chunks = std::min<int64_t>(p.rows, int64_t(threads) * 8);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    // 64-byte aligned scratch row; allocated per call and thread (≤ 128 KiB: noise next to the row work).
    std::unique_ptr<float, FreeDeleter> scratch(
        static_cast<float*>(std::aligned_alloc(64, (size_t(p.n) * sizeof(float) + 63) / 64 * 64)));
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = p.rows * c / chunks, r1 = p.rows * (c + 1) / chunks;
#if LOWBIT_HAVE_AVX2_TU
      if (avx2) {
        hadamard_rows_avx2(p, m, log2_l, coef, r0, r1, scratch.get());
        continue;
      }
#endif
      (void)avx2;
      for (int64_t r = r0; r < r1; ++r) row_portable(p, m, l, coef, r, scratch.get());
    }
  }
}

}  // namespace lowbit::cpu
