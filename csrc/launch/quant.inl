// csrc/launch/quant.inl — host launchers of the quant family (lowbit::kernels::quantize & co.,
// declared in include/lowbit/quant.h). Included by csrc/cuda/quant.cu in both builds.
//
// Instantiated kernels, one switch each (STYLE 11): quantize and dequantize for every
// (format, weight dtype) pair the Python layer accepts = 4 x 3 each; quantize8 / dequantize8 once
// (signed/unsigned map chosen at run time: it is a pointer, not a code path).
#pragma once
#include "kernels/quant.cuh"

namespace lowbit::kernels {

namespace {
template <class T>
int quantize_as(const QuantizeParams& p, unsigned grid, int group, int vec, intptr_t stream) {
  switch (p.fmt) {
    case Fmt::nf4: return simt::launch(quantize_kernel<Fmt::nf4, T>, dim3(grid), dim3(kQuantThreads), 0, stream, p, group, vec);
    case Fmt::fp4: return simt::launch(quantize_kernel<Fmt::fp4, T>, dim3(grid), dim3(kQuantThreads), 0, stream, p, group, vec);
    case Fmt::int4: return simt::launch(quantize_kernel<Fmt::int4, T>, dim3(grid), dim3(kQuantThreads), 0, stream, p, group, vec);
    case Fmt::int2: return simt::launch(quantize_kernel<Fmt::int2, T>, dim3(grid), dim3(kQuantThreads), 0, stream, p, group, vec);
  }
  return kErrInvalidValue;
}
template <class T>
int dequantize_as(const DequantizeParams& p, unsigned grid, int vec, intptr_t stream) {
  switch (p.fmt) {
    case Fmt::nf4: return simt::launch(dequantize_kernel<Fmt::nf4, T>, dim3(grid), dim3(kQuantThreads), 0, stream, p, vec);
    case Fmt::fp4: return simt::launch(dequantize_kernel<Fmt::fp4, T>, dim3(grid), dim3(kQuantThreads), 0, stream, p, vec);
    case Fmt::int4: return simt::launch(dequantize_kernel<Fmt::int4, T>, dim3(grid), dim3(kQuantThreads), 0, stream, p, vec);
    case Fmt::int2: return simt::launch(dequantize_kernel<Fmt::int2, T>, dim3(grid), dim3(kQuantThreads), 0, stream, p, vec);
  }
  return kErrInvalidValue;
}
}  // namespace

// Block sizes: formats.h's rule (quant_block_ok), as the CPU kernels and ops.py. Every allowed block
// is a multiple of kChunk, so a chunk never straddles two blocks and codes of two blocks never
// share a byte.
static_assert(kMinBlock % kChunk == 0, "the smallest block is whole chunks");
int quantize(const QuantizeParams& p, intptr_t stream) {
  if (!quant_block_ok(p.fmt, p.block) || p.numel < 0 || p.numel % p.block) return kErrInvalidValue;
  if (p.numel == 0) return 0;
  int group = 1;  // lanes per quant block: largest power of two <= min(32, chunks)
  while (group * 2 <= 32 && group * 2 <= p.block / kChunk) group *= 2;
  const unsigned grid = grid_stride_ctas(p.numel / p.block, kQuantThreads / group);
  const bool vec = aligned(p.w, 16) && aligned(p.codes, fmt_bits(p.fmt) == 4 ? 4 : 2);
  switch (p.w_dtype) {
    case DType::f32: return quantize_as<float>(p, grid, group, vec, stream);
    case DType::bf16: return quantize_as<__nv_bfloat16>(p, grid, group, vec, stream);
    case DType::f16: return quantize_as<__half>(p, grid, group, vec, stream);
  }
  return kErrInvalidValue;
}

int dequantize(const DequantizeParams& p, intptr_t stream) {
  if (!quant_block_ok(p.fmt, p.block) || p.numel < 0 || p.numel % p.block) return kErrInvalidValue;
  if (p.numel == 0) return 0;
  const unsigned grid = grid_stride_ctas(p.numel / kChunk, kQuantThreads);
  const bool vec = aligned(p.out, 16) && aligned(p.codes, fmt_bits(p.fmt) == 4 ? 4 : 2);
  switch (p.out_dtype) {
    case DType::f32: return dequantize_as<float>(p, grid, vec, stream);
    case DType::bf16: return dequantize_as<__nv_bfloat16>(p, grid, vec, stream);
    case DType::f16: return dequantize_as<__half>(p, grid, vec, stream);
  }
  return kErrInvalidValue;
}

int quantize8(const Quantize8Params& p, intptr_t stream) {
  if (p.block <= 0 || p.numel < 0) return kErrInvalidValue;
  if (p.numel == 0) return 0;
  const unsigned grid = grid_stride_ctas((p.numel + p.block - 1) / p.block, 1);
  return simt::launch(quantize8_kernel, dim3(grid), dim3(kQuantThreads), 0, stream, p);
}

int dequantize8(const Dequantize8Params& p, intptr_t stream) {
  if (p.block <= 0 || p.numel < 0) return kErrInvalidValue;
  if (p.numel == 0) return 0;
  return simt::launch(dequantize8_kernel, dim3(grid_stride_ctas(p.numel, kQuantThreads)), dim3(kQuantThreads), 0, stream, p);
}

}  // namespace lowbit::kernels
