// csrc/launch/optim.inl — host launchers of the optim family (lowbit::kernels::adamw32 / adamw8,
// declared in include/lowbit/optim.h). Included by csrc/cuda/optim.cu in both builds.
//
// Instantiated kernels (STYLE 11): (param dtype, grad dtype) with grad dtype == param dtype, the
// only pairing torch autograd produces — 3 per state precision; the Python layer rejects others.
#pragma once
#include "kernels/optim.cuh"
#include "lowbit/check.h"

namespace lowbit::kernels {

// The launchers' own argument checks (include/lowbit/check.h, ValueError), as the CPU entry points';
// the kernels are instantiated for grad dtype == param dtype only.
static void check_adamw(const char* who, DType p_dtype, DType g_dtype, int64_t numel, bool buffers) {
  const std::string w(who);
  LOWBIT_CHECK(dtype_valid(p_dtype) && p_dtype == g_dtype,
               w + ": " + show("p_dtype", int32_t(p_dtype)) + ", " + show("g_dtype", int32_t(g_dtype)) +
                   " must be one dtype id (0..2)");
  LOWBIT_CHECK(numel >= 0, w + ": " + show("numel", numel) + " must be >= 0");
  LOWBIT_CHECK(numel == 0 || buffers, w + ": a buffer is missing (null)");
}

int adamw32(const AdamW32Params& p, intptr_t stream) {
  check_adamw("adamw32", p.p_dtype, p.g_dtype, p.numel, p.p && p.g && p.m && p.v);
  if (p.numel == 0) return 0;
  const dim3 grid(grid_stride_ctas(p.numel, kOptimThreads)), block(kOptimThreads);
  switch (p.p_dtype) {
    case DType::f32: return simt::launch(adamw32_kernel<float, float>, grid, block, 0, stream, p);
    case DType::bf16: return simt::launch(adamw32_kernel<__nv_bfloat16, __nv_bfloat16>, grid, block, 0, stream, p);
    case DType::f16: return simt::launch(adamw32_kernel<__half, __half>, grid, block, 0, stream, p);
  }
  return kErrInvalidValue;
}

int adamw8(const AdamW8Params& p, intptr_t stream) {
  check_adamw("adamw8", p.p_dtype, p.g_dtype, p.numel, p.p && p.g && p.qm && p.qv && p.absmax_m && p.absmax_v);
  LOWBIT_CHECK(p.rounding == kOptimRoundBitsandbytes || p.rounding == kOptimRoundNearest,
               "adamw8: " + show("rounding", p.rounding) + " is not a rounding id");
  if (p.numel == 0) return 0;
  const dim3 grid(grid_stride_ctas(p.numel, kOptimBlock)), block(kOptimThreads);
  switch (p.p_dtype) {
    case DType::f32: return simt::launch(adamw8_kernel<float, float>, grid, block, 0, stream, p);
    case DType::bf16: return simt::launch(adamw8_kernel<__nv_bfloat16, __nv_bfloat16>, grid, block, 0, stream, p);
    case DType::f16: return simt::launch(adamw8_kernel<__half, __half>, grid, block, 0, stream, p);
  }
  return kErrInvalidValue;
}

}  // namespace lowbit::kernels
