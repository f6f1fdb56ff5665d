// csrc/launch/gemm.inl — host launchers of the gemm family (lowbit::kernels::gemm / gemm_t,
// declared in include/lowbit/gemm.h). Included by csrc/cuda/gemm.cu in both builds.
//
// Path choice (forward):
//   M ≤ kSmallM, or x fp32, or an operand the mma kernel cannot stream (x or codes not 16-byte
//   aligned, 2-bit rows of K/4 bytes not a multiple of 16) → gemv_kernel<F, T, MR>, MR ∈ {1, 4, 8}
//   (MR = 1 for M = 1, 4 for M ≤ 4, else 8 rows per CTA in y);
//   otherwise → gemm_mma_kernel<F, T, RP> (bf16 / fp16); RP > 0 when the lowrank family asks for
//   the fused down-projection (lowrank_fusable: r ≤ 64, RP = r rounded up to 16, 32 or 64).
// Instantiated (STYLE 11): gemv 4 formats × 3 dtypes × 3 MR = 36; mma 4 × 2 × RP ∈ {0, 16, 32, 64}
// = 32; gemm_t 4 × 3 × MR ∈ {1, 8} = 24. Any M ≥ 0, any N ≥ 1, K a multiple of the block; block
// by formats.h's gemm_block_ok (32, 64, 128, 256), the rule of the CPU kernels and ops.py.
#pragma once
#include "kernels/gemm_mma.cuh"  // and, through it, kernels/gemm.cuh

namespace lowbit::kernels {

namespace {
// M up to which the SIMT GEMV beats padding the m16 tensor-core tile (see gemv_kernel's roofline).
constexpr int64_t kSmallM = 8;
// CTAs wanted for one launch of the GEMV: 2 waves of an H100 (132 SMs). The simulator cannot tell
// the SM count, and the choice must not depend on the device for the result to be reproducible:
// split-K only changes which warp sums which chunks, and the reduction order is fixed for a given
// (N, K, M) — so a given shape gives the same bits on every device and every simulator schedule.
constexpr int64_t kTargetCtas = 264;
constexpr int64_t kMaxGridY = 65535;

// Runs `launch(sub, m0)` over slices of M so that grid.y stays within its limit.
template <class L>
int over_m_slices(const GemmParams& p, int64_t rows_per_cta, int64_t x_cols, int64_t y_cols, size_t esize, L&& launch) {
  const int64_t max_rows = kMaxGridY * rows_per_cta;
  for (int64_t m0 = 0; m0 < p.m; m0 += max_rows) {
    GemmParams sub = p;
    sub.m = p.m - m0 < max_rows ? p.m - m0 : max_rows;
    sub.x = static_cast<const char*>(p.x) + size_t(m0 * x_cols) * esize;
    sub.y = static_cast<char*>(p.y) + size_t(m0 * y_cols) * esize;
    const int err = launch(sub, m0);
    if (err) return err;
  }
  return 0;
}

// Low-rank epilogue of rows [m0, ...) of a slice (esize: bytes of x's dtype, for xa_out).
gemm_k::LrEpi lr_at(const gemm_k::LrEpi& lr, int64_t m0, size_t esize) {
  gemm_k::LrEpi r = lr;
  if (r.r > 0 && r.xa) r.xa += m0 * r.r;
  if (r.r > 0 && r.xa_out) r.xa_out = static_cast<char*>(r.xa_out) + size_t(m0 * r.r) * esize;
  return r;
}

template <Fmt F, class T, int MR>
int gemv_launch(const GemmParams& p, const gemm_k::LrEpi& lr, intptr_t stream) {
  const int64_t n_chunks = p.w.k / gemm_k::kChunk;
  const int64_t grid_y = (p.m + MR - 1) / MR;
  int kw = 1;  // warps per column: split K inside the CTA while the grid is small and K long enough
  while (kw < gemm_k::kGemvWarps && (p.w.n * kw / gemm_k::kGemvWarps) * grid_y < kTargetCtas &&
         n_chunks >= int64_t(64) * kw)
    kw *= 2;
  const int cols = gemm_k::kGemvWarps / kw;
  const int64_t grid_x = (p.w.n + cols - 1) / cols;
  if (grid_x > 0x7fffffff) return kErrInvalidValue;
  const int codes_vec = aligned(p.w.codes, fmt_bits(F) == 4 ? 16 : 8);
  return over_m_slices(p, MR, p.w.k, p.w.n, sizeof(T), [&](const GemmParams& s, int64_t m0) {
    const int x_vec = aligned(s.x, 16);
    const unsigned gy = unsigned((s.m + MR - 1) / MR);
    return simt::launch(gemm_k::gemv_kernel<F, T, MR>, dim3(unsigned(grid_x), gy), dim3(gemm_k::kGemvThreads), 0,
                        stream, s, kw, x_vec, codes_vec, lr_at(lr, m0, sizeof(T)));
  });
}

template <Fmt F, class T>
int gemv_rows(const GemmParams& p, const gemm_k::LrEpi& lr, intptr_t stream) {
  if (p.m == 1) return gemv_launch<F, T, 1>(p, lr, stream);
  if (p.m <= 4) return gemv_launch<F, T, 4>(p, lr, stream);
  return gemv_launch<F, T, 8>(p, lr, stream);
}

template <Fmt F, class T, int RP>
int mma_launch(const GemmParams& p, const gemm_k::LrEpi& lr, intptr_t stream) {
  using C = gemm_k::MmaCfg<F, T, RP>;
  constexpr int kBlockSmem = C::kSmem + C::kStaticSmem;  // dynamic + static, per block
  static_assert(RP == 64 || kBlockSmem <= 48 * 1024, "only RP = 64 needs the dynamic shared memory opt-in");
  static_assert(kBlockSmem <= 99 * 1024, "within the smallest opt-in maximum of the arch list (sm_86/89)");
  const int64_t grid_x = (p.w.n + gemm_k::kBN - 1) / gemm_k::kBN;
  if (grid_x > 0x7fffffff) return kErrInvalidValue;
  if (kBlockSmem > 48 * 1024) {
    const int err = simt::set_max_dynamic_smem(gemm_k::gemm_mma_kernel<F, T, RP>, C::kSmem);
    if (err) return err;
  }
  return over_m_slices(p, gemm_k::kBM, p.w.k, p.w.n, sizeof(T), [&](const GemmParams& s, int64_t m0) {
    const unsigned gy = unsigned((s.m + gemm_k::kBM - 1) / gemm_k::kBM);
    return simt::launch(gemm_k::gemm_mma_kernel<F, T, RP>, dim3(unsigned(grid_x), gy), dim3(gemm_k::kMmaThreads),
                        size_t(C::kSmem), stream, s, lr_at(lr, m0, sizeof(T)));
  });
}

// The mma kernel streams x and the codes with 16-byte cp.async: both aligned, 2-bit rows of K/4
// bytes a multiple of 16.
template <Fmt F>
bool mma_streamable(const GemmParams& p) {
  return aligned(p.x, 16) && aligned(p.w.codes, 16) && (p.w.k * fmt_bits(F) / 8) % 16 == 0;
}

bool mma_path(const GemmParams& p) {
  if (p.dtype == DType::f32 || p.m <= kSmallM) return false;
  switch (p.w.fmt) {
    case Fmt::nf4: return mma_streamable<Fmt::nf4>(p);
    case Fmt::fp4: return mma_streamable<Fmt::fp4>(p);
    case Fmt::int4: return mma_streamable<Fmt::int4>(p);
    case Fmt::int2: return mma_streamable<Fmt::int2>(p);
  }
  return false;
}

template <Fmt F, class T>
int gemm_fmt(const GemmParams& p, const gemm_k::LrEpi& lr, intptr_t stream) {
  if constexpr (std::is_same<T, float>::value) {
    return gemv_rows<F, T>(p, lr, stream);
  } else {
    if (lr.a) {  // fused down-projection (the caller checked lowrank_fusable)
      if (p.m <= kSmallM || !mma_streamable<F>(p) || lr.r < 1 || lr.r > 64) return kErrInvalidValue;
      if (lr.r <= 16) return mma_launch<F, T, 16>(p, lr, stream);
      if (lr.r <= 32) return mma_launch<F, T, 32>(p, lr, stream);
      return mma_launch<F, T, 64>(p, lr, stream);
    }
    if (p.m <= kSmallM || !mma_streamable<F>(p)) return gemv_rows<F, T>(p, lr, stream);
    return mma_launch<F, T, 0>(p, lr, stream);
  }
}

template <class T>
int gemm_dtype(const GemmParams& p, const gemm_k::LrEpi& lr, intptr_t stream) {
  switch (p.w.fmt) {
    case Fmt::nf4: return gemm_fmt<Fmt::nf4, T>(p, lr, stream);
    case Fmt::fp4: return gemm_fmt<Fmt::fp4, T>(p, lr, stream);
    case Fmt::int4: return gemm_fmt<Fmt::int4, T>(p, lr, stream);
    case Fmt::int2: return gemm_fmt<Fmt::int2, T>(p, lr, stream);
  }
  return kErrInvalidValue;
}

template <Fmt F, class T, int MR>
int gemm_t_launch(const GemmParams& p, intptr_t stream) {
  const int64_t grid_x = (p.w.k + gemm_k::kTK - 1) / gemm_k::kTK;
  if (grid_x > 0x7fffffff) return kErrInvalidValue;
  const int codes_vec = aligned(p.w.codes, fmt_bits(F) == 4 ? 4 : 2);
  return over_m_slices(p, MR, p.w.n, p.w.k, sizeof(T), [&](const GemmParams& s, int64_t) {
    const unsigned gy = unsigned((s.m + MR - 1) / MR);
    return simt::launch(gemm_k::gemm_t_kernel<F, T, MR>, dim3(unsigned(grid_x), gy), dim3(gemm_k::kTThreads), 0,
                        stream, s, codes_vec);
  });
}

template <class T>
int gemm_t_dtype(const GemmParams& p, intptr_t stream) {
  const bool one = p.m == 1;
  switch (p.w.fmt) {
    case Fmt::nf4: return one ? gemm_t_launch<Fmt::nf4, T, 1>(p, stream) : gemm_t_launch<Fmt::nf4, T, 8>(p, stream);
    case Fmt::fp4: return one ? gemm_t_launch<Fmt::fp4, T, 1>(p, stream) : gemm_t_launch<Fmt::fp4, T, 8>(p, stream);
    case Fmt::int4: return one ? gemm_t_launch<Fmt::int4, T, 1>(p, stream) : gemm_t_launch<Fmt::int4, T, 8>(p, stream);
    case Fmt::int2: return one ? gemm_t_launch<Fmt::int2, T, 1>(p, stream) : gemm_t_launch<Fmt::int2, T, 8>(p, stream);
  }
  return kErrInvalidValue;
}

// Shape and pointer checks shared by both products (ops.py validated; these guard the kernels).
bool gemm_valid(const GemmParams& p) {
  const GemmWeight& w = p.w;
  if (p.m < 0 || w.n <= 0 || w.k <= 0 || !gemm_block_ok(w.block) || w.k % w.block) return false;
  if (p.m == 0) return true;  // nothing is read or written (empty tensors may have null pointers)
  if (!p.x || !p.y || !w.codes || (!w.scale && !w.scale_q)) return false;
  if (w.scale_q && !w.scale_nested) return false;
  if (!fmt_is_table(w.fmt) && !w.zero) return false;
  return true;
}
}  // namespace

// Whether gemm_with can take the low-rank branch with the down-projection fused into the mma
// kernel (LrEpi::a): the mma path (bf16 / fp16, M > kSmallM, streamable operands), r ≤ 64 (the
// extra accumulators of RP = 64 are the most that fit without spills), A 16-byte aligned (its
// rows of K·2 bytes then are too: K is a multiple of 32).
bool lowrank_fusable(const GemmParams& p, int r, const void* a) {
  return gemm_valid(p) && mma_path(p) && r >= 1 && r <= 64 && aligned(a, 16);
}

// The forward product, with the optional low-rank epilogue (lowrank.inl).
int gemm_with(const GemmParams& p, const gemm_k::LrEpi& lr, intptr_t stream) {
  if (!gemm_valid(p)) return kErrInvalidValue;
  if (p.m == 0) return 0;
  switch (p.dtype) {
    case DType::f32: return gemm_dtype<float>(p, lr, stream);
    case DType::bf16: return gemm_dtype<__nv_bfloat16>(p, lr, stream);
    case DType::f16: return gemm_dtype<__half>(p, lr, stream);
  }
  return kErrInvalidValue;
}

int gemm(const GemmParams& p, intptr_t stream) { return gemm_with(p, gemm_k::LrEpi{nullptr, nullptr, 0, 0.0f}, stream); }

int gemm_t(const GemmParams& p, intptr_t stream) {
  if (!gemm_valid(p)) return kErrInvalidValue;
  if (p.m == 0) return 0;
  switch (p.dtype) {
    case DType::f32: return gemm_t_dtype<float>(p, stream);
    case DType::bf16: return gemm_t_dtype<__nv_bfloat16>(p, stream);
    case DType::f16: return gemm_t_dtype<__half>(p, stream);
  }
  return kErrInvalidValue;
}

}  // namespace lowbit::kernels
