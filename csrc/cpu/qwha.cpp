// csrc/cpu/qwha.cpp — qwha family on the CPU: QWHA's sparse products (include/lowbit/qwha.h),
//   qwha_spmm:  y = scale · z · Fᵀ (forward; with Fᵀ's CSR also gz = gy · F)
//   qwha_sddmm: dF at the support (backward).
// The M < 8 row kernel (vgatherdps) is in qwha_avx2.cpp; this file holds the dispatch and the rest.
//
// Roofline (M = 1, the decode case; F 4096 × 4096 at r = 16: nnz = 131072): the product streams
// nnz × (4 B value + 4 B column) = 1 MiB of CSR — L2/L3-resident after the first call — and
// gathers z (16 KiB, L1), so it is bound by ~1 cycle per nonzero of load + FMA issue: ≈ 20 µs per
// core, ≈ 10 µs on two (torch's CSR product: ≈ 120 µs, one thread). Threads get equal shares of
// nonzeros (whole rows, cut by binary search on crow). Each output is one fp32 sum in a fixed
// order, whatever the thread count: results are deterministic.
// M ≥ 8: z is repacked per call into 8-row panels, column-major inside a panel (zp[panel][c][8]),
// so each nonzero costs one 8-wide multiply-add over a contiguous 32-byte vector of z; a panel is
// k × 32 B (128 KiB at k = 4096: L2) and the loop runs panel by panel.
#include <omp.h>

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/common.h"
#include "lowbit/qwha.h"

namespace lowbit::cpu {

#if LOWBIT_HAVE_AVX2_TU
// qwha_avx2.cpp: y[r] for the CSR rows [r0, r1) of F and one row z (M < 8).
void qwha_rows_avx2(const float* values, const int32_t* cols, const int32_t* crow, int32_t r0, int32_t r1,
                    const float* z, int32_t k, float scale, float* y, bool accumulate, int* bad);
#endif

namespace {

constexpr int kPanel = 8;

// Validate the CSR cheaply (O(n_out)); columns are checked inside the loops (one predictable branch).
void check_csr(const int32_t* crow, int32_t n_out, const char* who) {
  if (crow[0] != 0) throw std::invalid_argument(std::string(who) + ": crow[0] must be 0");
  for (int32_t r = 0; r < n_out; ++r)
    if (crow[r + 1] < crow[r]) throw std::invalid_argument(std::string(who) + ": crow must be non-decreasing");
}

// Row ranges with ~equal nonzeros: rows [bounds[t], bounds[t + 1]) go to part t.
std::vector<int32_t> split_rows(const int32_t* crow, int32_t n_out, int parts) {
  std::vector<int32_t> b(parts + 1, n_out);
  b[0] = 0;
  const int64_t nnz = crow[n_out];
  for (int t = 1; t < parts; ++t)
    b[t] = int32_t(std::lower_bound(crow, crow + n_out + 1, int32_t(nnz * t / parts)) - crow);
  for (int t = 1; t <= parts; ++t) b[t] = std::max(b[t], b[t - 1]);
  return b;
}

int spmm_threads(int64_t work) {
  return int(std::max<int64_t>(1, std::min<int64_t>(num_threads(), work / 16384)));
}

// zp[panel][c][lane] = z[panel · 8 + lane, c] (0 past the last row), for panels [p0, p1).
void pack_panels(const float* z, int64_t m, int32_t k, int64_t p0, int64_t p1, float* zp) {
  for (int64_t pn = p0; pn < p1; ++pn) {
    float* dst = zp + pn * int64_t(k) * kPanel;
    for (int lane = 0; lane < kPanel; ++lane) {
      const int64_t row = pn * kPanel + lane;
      if (row < m) {
        const float* src = z + row * int64_t(k);
        for (int32_t c = 0; c < k; ++c) dst[int64_t(c) * kPanel + lane] = src[c];
      } else {
        for (int32_t c = 0; c < k; ++c) dst[int64_t(c) * kPanel + lane] = 0.0f;
      }
    }
  }
}

}  // namespace

void qwha_spmm(const QwhaSpmmParams& p) {
  LOWBIT_CHECK(p.m >= 0 && p.k > 0 && p.n_out >= 0, "qwha_spmm: bad sizes");
  if (p.m == 0 || p.n_out == 0) return;
  check_csr(p.crow, p.n_out, "qwha_spmm");
  const int64_t nnz = p.crow[p.n_out];
  const int64_t panels = p.m >= kPanel ? (p.m + kPanel - 1) / kPanel : 0;
  const int threads = spmm_threads(nnz * std::max<int64_t>(p.m, 1));
  const std::vector<int32_t> rows = split_rows(p.crow, p.n_out, threads);
  std::unique_ptr<float[]> zp(panels ? new float[size_t(panels) * p.k * kPanel] : nullptr);
  const bool avx2 = use_avx2();
  (void)avx2;
  int bad = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : bad)
  {
    const int t = omp_get_thread_num();
    const int32_t r0 = rows[t], r1 = rows[t + 1];
    const uint32_t k = uint32_t(p.k);
    if (panels == 0) {  // M < 8: gather straight from z, 4 partial sums per output
      for (int64_t i = 0; i < p.m; ++i) {
        const float* zi = p.z + i * p.k;
        float* yi = p.y + i * p.n_out;
#if LOWBIT_HAVE_AVX2_TU
        if (avx2) {
          qwha_rows_avx2(p.values, p.cols, p.crow, r0, r1, zi, p.k, p.scale, yi, p.accumulate, &bad);
          continue;
        }
#endif
        for (int32_t r = r0; r < r1; ++r) {
          float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          int32_t j = p.crow[r];
          const int32_t e = p.crow[r + 1];
          for (; j + 4 <= e; j += 4)
            for (int u = 0; u < 4; ++u) {
              const uint32_t c = uint32_t(p.cols[j + u]);
              bad |= c >= k;
              s[u] += p.values[j + u] * zi[c < k ? c : 0];
            }
          for (; j < e; ++j) {
            const uint32_t c = uint32_t(p.cols[j]);
            bad |= c >= k;
            s[0] += p.values[j] * zi[c < k ? c : 0];
          }
          const float v = ((s[0] + s[1]) + (s[2] + s[3])) * p.scale;
          yi[r] = p.accumulate ? yi[r] + v : v;
        }
      }
    } else {
#pragma omp for schedule(static)
      for (int64_t pn = 0; pn < panels; ++pn) pack_panels(p.z, p.m, p.k, pn, pn + 1, zp.get());
      for (int64_t pn = 0; pn < panels; ++pn) {
        const float* zpn = zp.get() + pn * int64_t(p.k) * kPanel;
        const int lanes = int(std::min<int64_t>(kPanel, p.m - pn * kPanel));
        for (int32_t r = r0; r < r1; ++r) {
          float acc[kPanel] = {};
          for (int32_t j = p.crow[r]; j < p.crow[r + 1]; ++j) {
            const uint32_t c = uint32_t(p.cols[j]);
            bad |= c >= k;
            const float v = p.values[j], *zc = zpn + int64_t(c < k ? c : 0) * kPanel;
            for (int lane = 0; lane < kPanel; ++lane) acc[lane] += v * zc[lane];
          }
          for (int lane = 0; lane < lanes; ++lane) {
            float& o = p.y[(pn * kPanel + lane) * p.n_out + r];
            o = p.accumulate ? o + acc[lane] * p.scale : acc[lane] * p.scale;
          }
        }
      }
    }
  }
  if (bad) throw std::invalid_argument("qwha_spmm: a column index is outside [0, k)");
}

void qwha_sddmm(const QwhaSddmmParams& p) {
  LOWBIT_CHECK(p.m >= 0 && p.k > 0 && p.n_out >= 0, "qwha_sddmm: bad sizes");
  if (p.n_out == 0) return;
  check_csr(p.crow, p.n_out, "qwha_sddmm");
  const int64_t nnz = p.crow[p.n_out];
  std::fill(p.gvals, p.gvals + nnz, 0.0f);
  if (p.m == 0) return;
  const int64_t panels = p.m >= kPanel ? (p.m + kPanel - 1) / kPanel : 0;
  const int threads = spmm_threads(nnz * p.m);
  const std::vector<int32_t> rows = split_rows(p.crow, p.n_out, threads);
  // gp: gy in panels like z (gp[panel][row][lane]), so a nonzero is an 8-wide dot of two vectors.
  std::unique_ptr<float[]> zp(panels ? new float[size_t(panels) * p.k * kPanel] : nullptr);
  std::unique_ptr<float[]> gp(panels ? new float[size_t(panels) * p.n_out * kPanel] : nullptr);
  int bad = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : bad)
  {
    const int t = omp_get_thread_num();
    const int32_t r0 = rows[t], r1 = rows[t + 1];
    const uint32_t k = uint32_t(p.k);
    if (panels == 0) {
      for (int32_t r = r0; r < r1; ++r)
        for (int32_t j = p.crow[r]; j < p.crow[r + 1]; ++j) {
          const uint32_t c = uint32_t(p.cols[j]);
          bad |= c >= k;
          float s = 0.0f;
          for (int64_t i = 0; i < p.m; ++i) s += p.gy[i * p.n_out + r] * p.z[i * p.k + (c < k ? c : 0)];
          p.gvals[j] = s;
        }
    } else {
#pragma omp for schedule(static)
      for (int64_t pn = 0; pn < panels; ++pn) {
        pack_panels(p.z, p.m, p.k, pn, pn + 1, zp.get());
        pack_panels(p.gy, p.m, p.n_out, pn, pn + 1, gp.get());
      }
      for (int64_t pn = 0; pn < panels; ++pn) {  // panels in order: a fixed summation order
        const float* zpn = zp.get() + pn * int64_t(p.k) * kPanel;
        const float* gpn = gp.get() + pn * int64_t(p.n_out) * kPanel;
        for (int32_t r = r0; r < r1; ++r) {
          const float* g = gpn + int64_t(r) * kPanel;
          for (int32_t j = p.crow[r]; j < p.crow[r + 1]; ++j) {
            const uint32_t c = uint32_t(p.cols[j]);
            bad |= c >= k;
            const float* zc = zpn + int64_t(c < k ? c : 0) * kPanel;
            float s[kPanel];
            for (int lane = 0; lane < kPanel; ++lane) s[lane] = g[lane] * zc[lane];
            p.gvals[j] += ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
          }
        }
      }
    }
  }
  if (bad) throw std::invalid_argument("qwha_sddmm: a column index is outside [0, k)");
}

}  // namespace lowbit::cpu
