// csrc/launch/svdquant.inl — host launchers of the svdquant family (lowbit::kernels::svdquant_act /
// svdquant_gemm, declared in include/lowbit/svdquant.h). Included by csrc/cuda/svdquant.cu in both
// builds.
//
// Path choice: the fast kernels (csrc/kernels/svdquant_mma.cuh) for every shape — svdq_act_fused_kernel
// always, svdq_gemm_mma_kernel when qx and qw are 16-byte aligned (cp.async; ops.py's tensors are) —
// and the simplest correct kernels (csrc/kernels/svdquant.cuh) otherwise, or for every call while
// svdquant_use_reference(1) is in force (the tests' switch: _sim / _cuda .svdquant_kernels("reference")).
// Instantiated kernels (STYLE 11), T in {float, bf16, fp16} (the dtypes of ops.py): reference
// svdq_act_kernel, svdq_down_kernel, svdq_gemm_kernel = 9; fast svdq_act_fused_kernel × JI ∈ {0, 1,
// 2, 4, 8} (r = 0, ≤ 32, ≤ 64, ≤ 128, ≤ 256) = 15 and svdq_gemm_mma_kernel = 3.
#pragma once
#include <atomic>
#include <string>

#include "kernels/svdquant_mma.cuh"
#include "lowbit/check.h"

namespace lowbit::kernels {

namespace {

void check_svdq(const char* who, DType dtype, int64_t m, int64_t n, int64_t k, int32_t r) {
  const std::string w(who);
  LOWBIT_CHECK(dtype_valid(dtype), w + ": " + show("dtype", int32_t(dtype)) + " is not a dtype id (0..2)");
  LOWBIT_CHECK(m >= 0 && n > 0 && k > 0 && k % kSvdqGroup == 0,
               w + ": " + show("m", m) + ", " + show("n", n) + ", " + show("k", k) + " (k a multiple of 64)");
  LOWBIT_CHECK(r >= 0 && r <= kSvdqMaxRank, w + ": " + show("r", r) + " out of 0..256");
}

std::atomic<int> g_use_reference{0};

template <class T, int JI>
int svdq_act_fused_launch(const SvdquantActParams& p, intptr_t stream) {
  const int64_t blocks = (p.m + svdq_k::kActRows - 1) / svdq_k::kActRows;
  return simt::launch(svdq_k::svdq_act_fused_kernel<T, JI>, dim3(grid_stride_ctas(blocks, 1)), dim3(svdq_k::kActThreads),
                      0, stream, p, int(p.r > 0 && aligned(p.l2, 16)));
}

template <class T>
int svdq_act_fast(const SvdquantActParams& p, intptr_t stream) {
  if (p.r == 0) return svdq_act_fused_launch<T, 0>(p, stream);
  if (p.r <= 32) return svdq_act_fused_launch<T, 1>(p, stream);
  if (p.r <= 64) return svdq_act_fused_launch<T, 2>(p, stream);
  if (p.r <= 128) return svdq_act_fused_launch<T, 4>(p, stream);
  return svdq_act_fused_launch<T, 8>(p, stream);
}

// The W4A4 tensor-core GEMM over slices of M that keep grid.y within its limit.
template <class T>
int svdq_gemm_fast(const SvdquantGemmParams& p, intptr_t stream) {
  using namespace svdq_k;
  constexpr int64_t kMaxRows = int64_t(65535) * kBM;
  const unsigned gx = unsigned((p.n + kBN - 1) / kBN);
  for (int64_t m0 = 0; m0 < p.m; m0 += kMaxRows) {
    SvdquantGemmParams s = p;
    s.m = p.m - m0 < kMaxRows ? p.m - m0 : kMaxRows;
    s.qx = p.qx + m0 * p.k;
    s.sx = p.sx + m0 * (p.k / kSvdqGroup);
    if (p.r > 0) s.down = p.down + m0 * p.r;
    s.y = static_cast<char*>(p.y) + size_t(m0 * p.n) * sizeof(T);
    const int err = simt::launch(svdq_gemm_mma_kernel<T>, dim3(gx, unsigned((s.m + kBM - 1) / kBM)), dim3(kThreads),
                                 size_t(kSmem), stream, s);
    if (err) return err;
  }
  return 0;
}

template <class T>
int svdq_act_as(const SvdquantActParams& p, intptr_t stream) {
  if (!g_use_reference.load(std::memory_order_relaxed)) return svdq_act_fast<T>(p, stream);
  const int64_t pairs = p.m * (p.k / kSvdqGroup);
  int err = simt::launch(svdq_act_kernel<T>, dim3(grid_stride_ctas(pairs, kSvdqThreads / 32)), dim3(kSvdqThreads), 0,
                         stream, p);
  if (err || p.r == 0) return err;
  return simt::launch(svdq_down_kernel<T>, dim3(grid_stride_ctas(p.m * p.r, kSvdqThreads)), dim3(kSvdqThreads), 0,
                      stream, p);
}

template <class T>
int svdq_gemm_as(const SvdquantGemmParams& p, intptr_t stream) {
  if (!g_use_reference.load(std::memory_order_relaxed) && aligned(p.qx, 16) && aligned(p.qw, 16))
    return svdq_gemm_fast<T>(p, stream);
  const dim3 grid(grid_stride_ctas(p.m * p.n, kSvdqThreads)), block(kSvdqThreads);
  return simt::launch(svdq_gemm_kernel<T>, grid, block, 0, stream, p);
}

}  // namespace

// The tests' switch: 1 = every svdquant launch runs the simplest correct kernels, 0 = the path choice
// above. Returns the previous setting. Process-wide (bound as svdquant_kernels in csrc/bind/gpu.cpp).
int svdquant_use_reference(int on) { return g_use_reference.exchange(on ? 1 : 0); }

int svdquant_act(const SvdquantActParams& p, intptr_t stream) {
  check_svdq("svdquant_act", p.dtype, p.m, 1, p.k, p.r);
  if (p.m == 0) return 0;
  switch (p.dtype) {
    case DType::f32: return svdq_act_as<float>(p, stream);
    case DType::bf16: return svdq_act_as<__nv_bfloat16>(p, stream);
    case DType::f16: return svdq_act_as<__half>(p, stream);
  }
  return kErrInvalidValue;
}

int svdquant_gemm(const SvdquantGemmParams& p, intptr_t stream) {
  check_svdq("svdquant_gemm", p.dtype, p.m, p.n, p.k, p.r);
  if (p.m == 0) return 0;
  switch (p.dtype) {
    case DType::f32: return svdq_gemm_as<float>(p, stream);
    case DType::bf16: return svdq_gemm_as<__nv_bfloat16>(p, stream);
    case DType::f16: return svdq_gemm_as<__half>(p, stream);
  }
  return kErrInvalidValue;
}

}  // namespace lowbit::kernels
