// csrc/launch/optim.inl — host launchers of the optim family (lowbit::kernels::adamw32 / adamw8,
// declared in include/lowbit/optim.h). Included by csrc/cuda/optim.cu in both builds.
//
// Instantiated kernels (STYLE 11): (param dtype, grad dtype) with grad dtype == param dtype, the
// only pairing torch autograd produces — 3 per state precision; the Python layer rejects others.
#pragma once
#include "kernels/optim.cuh"

namespace lowbit::kernels {

int adamw32(const AdamW32Params& p, intptr_t stream) {
  if (p.numel < 0 || p.p_dtype != p.g_dtype) return kErrInvalidValue;
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
  if (p.numel < 0 || p.p_dtype != p.g_dtype) return kErrInvalidValue;
  if (p.rounding != kOptimRoundBitsandbytes && p.rounding != kOptimRoundNearest) return kErrInvalidValue;
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
