// csrc/cpu/gemm.cpp — gemm family on the CPU: argument checks, run-time dispatch to the ISA files
// (gemm_avx2.cpp, which uses gemm_avx512.cpp's VNNI kernels on the 'avx512' path) and the portable
// fp32 path that any x86-64 / ARM build runs.
//
//   gemm:    y (m, n)  = x (m, k) · dequant(W)ᵀ (+ bias)
//   gemm_t:  gx (m, k) = gy (m, n) · dequant(W)
//
// Portable path: each weight row segment is decoded to fp32 exactly as cpu::dequantize does
// (table[q] * s, or (q - z) * s, double-quant scale rebuilt first), then dot products of the fp32
// products summed in fp64 (forward) / fp32 axpys (gemm_t). Error vs x @ dequant(W).T in fp64: the
// forward ≈ one fp32 rounding of each product and of the output; gemm_t fp32 accumulation, ≤ ~k ·
// 2^-24 · Σ|x||w| worst case (sequential sums), typically sqrt(k) · 2^-24 relative. Speed is not the point here (scalar,
// ~1-2 GFLOP/s per core); it is the fallback and the second opinion the tests compare against.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu/gemm_internal.h"

namespace lowbit::cpu {

namespace {

// Row n, elements [k0, k1) (block aligned) -> fp32, bit-identical to cpu::dequantize.
void decode_row(const GemmWeight& w, int64_t n, int64_t k0, int64_t k1, float* out) {
  const int bits = fmt_bits(w.fmt), per_byte = 8 / bits, mask = (1 << bits) - 1;
  const float* table = w.fmt == Fmt::nf4 ? kNF4 : kFP4;
  const int64_t row0 = n * w.k;
  for (int64_t kb = k0; kb < k1; kb += w.block) {
    const int64_t b = (row0 + kb) / w.block;
    const float s = weight_scale(w, b);
    const float z = fmt_is_table(w.fmt) ? 0.0f : w.zero[b];
    for (int i = 0; i < w.block; ++i) {
      const int64_t e = row0 + kb + i;
      const int q = (w.codes[e / per_byte] >> pack_shift(bits, int(e % per_byte))) & mask;
      out[kb - k0 + i] = fmt_is_table(w.fmt) ? table[q] * s : (float(q) - z) * s;
    }
  }
}

}  // namespace

// Shared with lowrank.cpp (the lowrank family runs on these kernels).
void check_gemm(const GemmParams& p, const char* who) {
  const GemmWeight& w = p.w;
  LOWBIT_CHECK(fmt_valid(w.fmt), std::string(who) + ": " + show("fmt", int32_t(w.fmt)) + " is not a format id (0..3)");
  LOWBIT_CHECK(dtype_valid(p.dtype), std::string(who) + ": " + show("dtype", int32_t(p.dtype)) + " is not a dtype id (0..2)");
  LOWBIT_CHECK(gemm_block_ok(w.block), std::string(who) + ": block=" + std::to_string(w.block) +
                                           " is not a power of two in [32, 256]");
  LOWBIT_CHECK(w.n > 0 && w.k > 0 && w.k % w.block == 0, std::string(who) + ": k % block != 0");
  LOWBIT_CHECK(p.m >= 0 && w.codes && (w.scale || (w.scale_q && w.scale_nested)),
               std::string(who) + ": missing weight buffers");
  LOWBIT_CHECK(fmt_is_table(w.fmt) || w.zero, std::string(who) + ": int formats need zero");
}

// y = x · Wᵀ + bias (+ s·xa·Bᵀ when lr is given: lowrank). Threads split n; each thread decodes one
// weight row at a time (fp32, k floats) and dots it with every row of x (converted to fp32 once,
// shared). The branch: xa = x·Aᵀ in fp32 first (M·r dots), then one more dot of length r per output.
void gemm_portable(const GemmParams& p, const LowrankParams* lr) {
  const int64_t M = p.m, N = p.w.n, K = p.w.k, r = lr ? lr->r : 0;
  std::vector<float> xf(static_cast<size_t>(M * K)), xa(static_cast<size_t>(M * r));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < M * K; ++i) xf[i] = load_as_float(p.x, p.dtype, i);
  if (lr) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M * r; ++i) {
      const int64_t m = i / r, j = i % r;
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += xf[m * K + k] * load_as_float(lr->a, p.dtype, j * K + k);
      xa[i] = acc;
      store_from_float(lr->xa, p.dtype, i, acc);
    }
  }
#pragma omp parallel
  {
    std::vector<float> wrow(static_cast<size_t>(K));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      decode_row(p.w, n, 0, K, wrow.data());
      const float b = p.bias ? load_as_float(p.bias, p.dtype, n) : 0.0f;
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xf.data() + m * K;
        double dacc = 0.0;  // the second opinion: fp64 sums of the fp32 products (≤ 'highest' at any K)
        for (int64_t k = 0; k < K; ++k) dacc += double(xr[k] * wrow[k]);
        float acc = float(dacc);
        if (lr) {
          float br = 0.0f;
          for (int64_t j = 0; j < r; ++j) br += xa[m * r + j] * load_as_float(lr->b, p.dtype, n * r + j);
          acc += lr->s * br;
        }
        store_from_float(p.y, p.dtype, m * N + n, acc + b);
      }
    }
  }
}

namespace {

// gx = gy · W. Threads split k (in whole blocks, so no two threads write one gx element); each
// thread walks n, decodes its segment of row n and does gx[m, seg] += gy[m, n] · w[seg] for a
// block of rows of gy at a time (fp32 accumulators of kMRows × segment).
void gemm_t_portable(const GemmParams& p) {
  const int64_t M = p.m, N = p.w.n, K = p.w.k, nbk = K / p.w.block;
  constexpr int64_t kMRows = 64;
#pragma omp parallel
  {
    const int T = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t k0 = nbk * t / T * p.w.block, k1 = nbk * (t + 1) / T * p.w.block, ks = k1 - k0;
    if (ks > 0) {
      std::vector<float> wseg(static_cast<size_t>(ks)), acc(static_cast<size_t>(kMRows * ks)), gyf(static_cast<size_t>(kMRows * N));
      for (int64_t m0 = 0; m0 < M; m0 += kMRows) {
        const int64_t mr = std::min(kMRows, M - m0);
        for (int64_t i = 0; i < mr * N; ++i) gyf[i] = load_as_float(p.x, p.dtype, m0 * N + i);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t n = 0; n < N; ++n) {
          decode_row(p.w, n, k0, k1, wseg.data());
          for (int64_t m = 0; m < mr; ++m) {
            const float g = gyf[m * N + n];
            float* a = acc.data() + m * ks;
            for (int64_t k = 0; k < ks; ++k) a[k] += g * wseg[k];
          }
        }
        for (int64_t m = 0; m < mr; ++m)
          for (int64_t k = 0; k < ks; ++k) store_from_float(p.y, p.dtype, (m0 + m) * K + k0 + k, acc[m * ks + k]);
      }
    }
  }
}

}  // namespace

std::string gemm_route_name(DType dt, int64_t m, bool transposed, Fmt fmt) {
  LOWBIT_CHECK(dtype_valid(dt), "gemm_route: " + show("dtype", int32_t(dt)) + " is not a dtype id (0..2)");
  LOWBIT_CHECK(fmt_valid(fmt), "gemm_route: " + show("fmt", int32_t(fmt)) + " is not a format id (0..3)");
#if LOWBIT_HAVE_AVX2_TU
  if (use_avx2()) {
    static const char* names[] = {"gemv_i16", "tile_f32", "tile_f32_bf16w", "tile_i16", "avx512bf16", "amx", "amx_emulated",
                                  "gemv_bf16", "amx_rows", "amx_rows_emulated"};
    return names[int(gemm_route(dt, m, transposed, fmt))];
  }
#endif
  (void)dt, (void)m, (void)transposed, (void)fmt;
  return "portable";
}

void gemm(const GemmParams& p) {
  check_gemm(p, "gemm");
  if (p.m == 0) return;
#if LOWBIT_HAVE_AVX2_TU
  if (use_avx2()) return gemm_avx2(p, nullptr);
#endif
  gemm_portable(p, nullptr);
}

void gemm_t(const GemmParams& p) {
  check_gemm(p, "gemm_t");
  if (p.m == 0) return;
#if LOWBIT_HAVE_AVX2_TU
  if (use_avx2()) return gemm_t_avx2(p);
#endif
  gemm_t_portable(p);
}

}  // namespace lowbit::cpu
