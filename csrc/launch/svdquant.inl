// csrc/launch/svdquant.inl — host launchers of the svdquant family (lowbit::kernels::svdquant_act /
// svdquant_gemm, declared in include/lowbit/svdquant.h). Included by csrc/cuda/svdquant.cu in both
// builds.
//
// Instantiated kernels (STYLE 11): svdq_act_kernel, svdq_down_kernel and svdq_gemm_kernel for T in
// {float, bf16, fp16} (the dtypes of ops.py) = 9.
#pragma once
#include <string>

#include "kernels/svdquant.cuh"
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

template <class T>
int svdq_act_as(const SvdquantActParams& p, intptr_t stream) {
  const int64_t pairs = p.m * (p.k / kSvdqGroup);
  int err = simt::launch(svdq_act_kernel<T>, dim3(grid_stride_ctas(pairs, kSvdqThreads / 32)), dim3(kSvdqThreads), 0,
                         stream, p);
  if (err || p.r == 0) return err;
  return simt::launch(svdq_down_kernel<T>, dim3(grid_stride_ctas(p.m * p.r, kSvdqThreads)), dim3(kSvdqThreads), 0,
                      stream, p);
}

}  // namespace

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
  const dim3 grid(grid_stride_ctas(p.m * p.n, kSvdqThreads)), block(kSvdqThreads);
  switch (p.dtype) {
    case DType::f32: return simt::launch(svdq_gemm_kernel<float>, grid, block, 0, stream, p);
    case DType::bf16: return simt::launch(svdq_gemm_kernel<__nv_bfloat16>, grid, block, 0, stream, p);
    case DType::f16: return simt::launch(svdq_gemm_kernel<__half>, grid, block, 0, stream, p);
  }
  return kErrInvalidValue;
}

}  // namespace lowbit::kernels
