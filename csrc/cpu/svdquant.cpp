// csrc/cpu/svdquant.cpp — svdquant family on the CPU (include/lowbit/svdquant.h): the activation pass
// (smoothing, 4-bit quantization and the low-rank down-projection in one pass over x) and the W4A4
// GEMM with the up-projection and bias in its epilogue.
//
// This file holds the portable path: scalar, OpenMP over rows of x (act) and over (row block,
// column block) tiles of y (gemm). The integer group sums are exact int32 (|acc| ≤ 64·49); the
// fp32 scaling and the branch follow the header's formula term by term. It is the simplest correct
// kernel and stays selectable (_C.set_cpu_path("portable")).
//
// The fast kernels (cpu/svdquant_simd.h: design and roofline) are chosen here at run time by the path:
//   'avx512', 'avx512bf16'       svdquant_avx512.cpp (vpdpbusd; panel path, GEMV path for M ≤ 4)
//   'amx'                        the GEMM on AMX-INT8 tiles (svdquant_amx.cpp) for M ≥ 16 when the CPU has
//                                AMX-INT8 (CPUID.7.0:EDX bit 25), else as 'avx512'; the activation pass as 'avx512'
//   'avx2'                       svdquant_avx2.cpp (vpmaddubsw + vpmaddwd)
//   'amx-emulated'               the AMX GEMM on the tile emulator (every M: it exists to test that code),
//                                the activation pass as 'avx2'
#include <omp.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/common.h"
#include "lowbit/check.h"
#include "lowbit/svdquant.h"

namespace lowbit::cpu {

#if LOWBIT_HAVE_AVX2_TU
void svdquant_act_avx2(const SvdquantActParams& p);
void svdquant_gemm_avx2(const SvdquantGemmParams& p);
void svdquant_act_avx512(const SvdquantActParams& p);
void svdquant_gemm_avx512(const SvdquantGemmParams& p);
void svdquant_gemm_amx(const SvdquantGemmParams& p);
void svdquant_gemm_amx_emu(const SvdquantGemmParams& p);
#endif

namespace {

// AMX-INT8 beside the AMX-TILE/BF16 that the 'amx' path already checked (CPUID.7.0:EDX bit 25).
bool cpu_has_amx_int8() {
#if LOWBIT_HAVE_AVX2_TU && defined(__x86_64__)
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 25));
#else
  return false;
#endif
}

constexpr int64_t kAmxMinRows = 16;  // below one A tile of rows the VNNI GEMV / panel path serves

void svdquant_act_portable(const SvdquantActParams& p) {
  LOWBIT_CHECK(p.m >= 0 && p.k > 0 && p.k % kSvdqGroup == 0, "svdquant_act: bad shape m=" + std::to_string(p.m) +
                                                                 " k=" + std::to_string(p.k));
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

void svdquant_gemm_portable(const SvdquantGemmParams& p) {
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

}  // namespace

void svdquant_act(const SvdquantActParams& p) {
  LOWBIT_CHECK(p.m >= 0 && p.k > 0 && p.k % kSvdqGroup == 0, "svdquant_act: bad shape m=" + std::to_string(p.m) +
                                                                 " k=" + std::to_string(p.k));
  LOWBIT_CHECK(p.r >= 0 && p.r <= kSvdqMaxRank, "svdquant_act: r=" + std::to_string(p.r) + " out of range");
  if (p.m == 0) return;
  LOWBIT_CHECK(p.r == 0 || (p.l2 && p.down), "svdquant_act: r=" + std::to_string(p.r) + " needs l2 and down");
#if LOWBIT_HAVE_AVX2_TU
  if (use_avx512()) return svdquant_act_avx512(p);
  if (use_avx2()) return svdquant_act_avx2(p);
#endif
  svdquant_act_portable(p);
}

void svdquant_gemm(const SvdquantGemmParams& p) {
  LOWBIT_CHECK(p.m >= 0 && p.n > 0 && p.k > 0 && p.k % kSvdqGroup == 0,
               "svdquant_gemm: bad shape m=" + std::to_string(p.m) + " n=" + std::to_string(p.n) +
                   " k=" + std::to_string(p.k));
  LOWBIT_CHECK(p.r >= 0 && p.r <= kSvdqMaxRank, "svdquant_gemm: r=" + std::to_string(p.r) + " out of range");
  if (p.m == 0) return;
  LOWBIT_CHECK(p.r == 0 || (p.l1 && p.down), "svdquant_gemm: r=" + std::to_string(p.r) + " needs l1 and down");
#if LOWBIT_HAVE_AVX2_TU
  const Engine e = bf16_engine();
  if (e == Engine::amx_emulated) return svdquant_gemm_amx_emu(p);
  if (e == Engine::amx && p.m >= kAmxMinRows && cpu_has_amx_int8()) return svdquant_gemm_amx(p);
  if (use_avx512()) return svdquant_gemm_avx512(p);
  if (use_avx2()) return svdquant_gemm_avx2(p);
#endif
  svdquant_gemm_portable(p);
}

}  // namespace lowbit::cpu
