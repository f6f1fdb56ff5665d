// csrc/cpu/svdquant.cpp — svdquant family on the CPU (include/lowbit/svdquant.h): the activation pass
// (smoothing, 4-bit quantization and the low-rank down-projection in one pass over x) and the W4A4
// GEMM with the up-projection and bias in its epilogue.
//
// This file holds the portable path: scalar, OpenMP over rows of x (act) and over (row block,
// column block) tiles of y (gemm). The integer group sums are exact int32 (|acc| ≤ 64·49); the
// fp32 scaling and the branch follow the header's formula term by term.
#include <omp.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/common.h"
#include "lowbit/check.h"
#include "lowbit/svdquant.h"

namespace lowbit::cpu {

void svdquant_act(const SvdquantActParams& p) {
  LOWBIT_CHECK(p.m >= 0 && p.k > 0 && p.k % kSvdqGroup == 0, "svdquant_act: bad shape m=" + std::to_string(p.m) +
                                                                 " k=" + std::to_string(p.k));
  LOWBIT_CHECK(p.r >= 0 && p.r <= kSvdqMaxRank, "svdquant_act: r=" + std::to_string(p.r) + " out of range");
  if (p.m == 0) return;
  const int64_t groups = p.k / kSvdqGroup;
  const int threads = int(std::min<int64_t>(num_threads(), std::max<int64_t>(1, p.m * p.k / 16384)));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> xs(size_t(p.k));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.m; ++i) {
      for (int64_t c = 0; c < p.k; ++c) {
        const float v = load_as_float(p.x, p.dtype, i * p.k + c);
        xs[c] = p.inv_smooth ? v * p.inv_smooth[c] : v;
      }
      for (int64_t g = 0; g < groups; ++g)
        p.sx[i * groups + g] = svdq_quantize_group(xs.data() + g * kSvdqGroup, p.qx + i * p.k + g * kSvdqGroup);
      for (int j = 0; j < p.r; ++j) {
        float acc = 0.0f;
        for (int64_t c = 0; c < p.k; ++c) acc += xs[c] * load_as_float(p.l2, p.dtype, int64_t(j) * p.k + c);
        p.down[i * p.r + j] = acc;
      }
    }
  }
}

void svdquant_gemm(const SvdquantGemmParams& p) {
  LOWBIT_CHECK(p.m >= 0 && p.n > 0 && p.k > 0 && p.k % kSvdqGroup == 0,
               "svdquant_gemm: bad shape m=" + std::to_string(p.m) + " n=" + std::to_string(p.n) +
                   " k=" + std::to_string(p.k));
  LOWBIT_CHECK(p.r >= 0 && p.r <= kSvdqMaxRank, "svdquant_gemm: r=" + std::to_string(p.r) + " out of range");
  if (p.m == 0) return;
  const int64_t groups = p.k / kSvdqGroup;
  constexpr int64_t kRows = 8, kCols = 64;
  const int64_t rb = (p.m + kRows - 1) / kRows, cb = (p.n + kCols - 1) / kCols;
  const int threads = int(std::min<int64_t>(num_threads(), std::max<int64_t>(1, p.m * p.n * p.k / 262144)));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<int8_t> wrow(size_t(p.k));
#pragma omp for schedule(static) collapse(2)
    for (int64_t bi = 0; bi < rb; ++bi)
      for (int64_t bj = 0; bj < cb; ++bj)
        for (int64_t j = bj * kCols; j < std::min(p.n, (bj + 1) * kCols); ++j) {
          const uint8_t* packed = p.qw + j * (p.k / 2);
          for (int64_t c = 0; c < p.k; ++c) wrow[c] = int8_t(svdq_nibble(packed, c));
          for (int64_t i = bi * kRows; i < std::min(p.m, (bi + 1) * kRows); ++i) {
            const int8_t* xq = p.qx + i * p.k;
            float y = 0.0f;
            for (int64_t g = 0; g < groups; ++g) {
              int32_t acc = 0;
              for (int c = 0; c < kSvdqGroup; ++c) acc += int32_t(xq[g * kSvdqGroup + c]) * wrow[g * kSvdqGroup + c];
              y += p.sx[i * groups + g] * p.sw[j * groups + g] * float(acc);
            }
            for (int t = 0; t < p.r; ++t) y += p.down[i * p.r + t] * load_as_float(p.l1, p.dtype, j * p.r + t);
            if (p.bias) y += load_as_float(p.bias, p.dtype, j);
            store_from_float(p.y, p.dtype, i * p.n + j, y);
          }
        }
  }
}

}  // namespace lowbit::cpu
