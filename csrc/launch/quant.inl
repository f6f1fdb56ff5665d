// csrc/launch/quant.inl — host launchers of the quant family (lowbit::kernels::quantize & co.,
// declared in include/lowbit/quant.h). Included by csrc/cuda/quant.cu in both builds.
//
// Instantiated kernels, one switch each (STYLE 11): quantize and dequantize for every
// (format, weight dtype) pair the Python layer accepts = 4 x 3 each; quantize8 / dequantize8 once
// (signed/unsigned map chosen at run time: it is a pointer, not a code path).
#pragma once
#include "kernels/quant.cuh"
#include "lowbit/check.h"

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
// The launchers' own argument checks (include/lowbit/check.h, ValueError): the same rules as the CPU
// entry points, so a call the ops would never make raises instead of launching out of bounds.
static void check_weight_args(const char* who, Fmt fmt, DType dtype, int block, int64_t numel) {
  const std::string w(who);
  LOWBIT_CHECK(fmt_valid(fmt), w + ": " + show("fmt", int32_t(fmt)) + " is not a format id (0..3)");
  LOWBIT_CHECK(dtype_valid(dtype), w + ": " + show("dtype", int32_t(dtype)) + " is not a dtype id (0..2)");
  LOWBIT_CHECK(quant_block_ok(fmt, block), w + ": " + show("block", block) + " is not a block size of this format");
  LOWBIT_CHECK(numel >= 0 && numel % block == 0,
               w + ": " + show("numel", numel) + " is not a whole number of blocks of " + show("block", block));
}
static void check8(const char* who, int block, int64_t numel, bool buffers) {
  const std::string w(who);
  LOWBIT_CHECK(block > 0, w + ": " + show("block", block) + " must be > 0");
  LOWBIT_CHECK(numel >= 0, w + ": " + show("numel", numel) + " must be >= 0");
  LOWBIT_CHECK(numel == 0 || buffers, w + ": a buffer is missing (null)");
}

int quantize(const QuantizeParams& p, intptr_t stream) {
  check_weight_args("quantize", p.fmt, p.w_dtype, p.block, p.numel);
  if (p.numel == 0) return 0;
  LOWBIT_CHECK(p.w && p.codes && p.scale && (fmt_is_table(p.fmt) || p.zero),
               "quantize: w, codes, scale (and zero for int formats) are required");
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
  check_weight_args("dequantize", p.fmt, p.out_dtype, p.block, p.numel);
  if (p.numel == 0) return 0;
  LOWBIT_CHECK(p.codes && p.out && (p.scale || (p.scale_q && p.scale_nested)) && (fmt_is_table(p.fmt) || p.zero),
               "dequantize: codes, out, scale (or scale_q and scale_nested) and zero for int formats are required");
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
  check8("quantize8", p.block, p.numel, p.x && p.q && p.absmax);
  if (p.numel == 0) return 0;
  const unsigned grid = grid_stride_ctas((p.numel + p.block - 1) / p.block, 1);
  return simt::launch(quantize8_kernel, dim3(grid), dim3(kQuantThreads), 0, stream, p);
}

int dequantize8(const Dequantize8Params& p, intptr_t stream) {
  check8("dequantize8", p.block, p.numel, p.q && p.absmax && p.out);
  if (p.numel == 0) return 0;
  return simt::launch(dequantize8_kernel, dim3(grid_stride_ctas(p.numel, kQuantThreads)), dim3(kQuantThreads), 0, stream, p);
}

}  // namespace lowbit::kernels
