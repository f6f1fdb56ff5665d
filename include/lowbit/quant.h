// lowbit/quant.h — the `quant` family contract: blockwise quantize / dequantize of a weight into
// nf4 / fp4 / int4 / int2 codes, and the blockwise 8-bit dynamic quantizer used for double quant.
//
// The spec is python/lowbit/reference.py (quantize_ref / dequantize_ref / quantize8_ref); every
// implementation (csrc/cpu/quant*.cpp, csrc/kernels/quant.cuh) is bit-exact with it.
//
// Elements are taken in flat row-major order; block b covers elements [b*block, (b+1)*block).
// The Python layer guarantees numel % block == 0, finite input, contiguous buffers.
#pragma once
#include <cstdint>

#include "lowbit/formats.h"

namespace lowbit {

struct QuantizeParams {
  const void* w;      // (numel,) in w_dtype
  DType w_dtype;
  int64_t numel;
  int32_t block;
  Fmt fmt;
  uint8_t* codes;     // (numel * bits / 8,)
  float* scale;       // (numel / block,) absmax for nf4/fp4; step s for int formats
  float* zero;        // (numel / block,) int formats only (zero point in code units, fp32), else null
};

// w_hat[i] = table[q] * scale[b]                (nf4, fp4)
// w_hat[i] = (float(q) - zero[b]) * scale[b]    (int4, int2)
// With double quant (scale_q != null) scale[b] is first rebuilt by the rule of formats.h:
//   dq_scale(kDynamicSigned[scale_q[b]], scale_nested[nested_block_of(b)], scale_offset)
struct DequantizeParams {
  const uint8_t* codes;
  const float* scale;         // null when scale_q is given
  const float* zero;          // int formats only
  const uint8_t* scale_q;     // (n_blocks,) or null
  const float* scale_nested;  // (ceil(n_blocks / kNestedBlock),)
  float scale_offset;
  void* out;                  // (numel,) in out_dtype, rounded to nearest even from fp32
  DType out_dtype;
  int64_t numel;
  int32_t block;
  Fmt fmt;
};

// Blockwise 8-bit quantization with a dynamic map (signed or unsigned):
//   absmax[b] = max |x - offset| over the block;  inv = 1 / max(absmax[b], 1e-38)
//   q = nearest entry of the map to clamp((x - offset) * inv, -1, 1), exact ties to the lower index.
// Used with block kNestedBlock for double quant (x = scale, offset = mean(scale)) and by the 8-bit
// optimizers.
struct Quantize8Params {
  const float* x;  // (numel,)
  int64_t numel;   // need not be a multiple of block: the last block is partial
  int32_t block;
  bool is_signed;
  float offset;
  uint8_t* q;      // (numel,)
  float* absmax;   // (ceil(numel / block),)
};

struct Dequantize8Params {
  const uint8_t* q;
  const float* absmax;
  int64_t numel;
  int32_t block;
  bool is_signed;
  float offset;  // out = dq_scale(map[q], absmax[b], offset): double quant's rule (formats.h)
  float* out;
};

}  // namespace lowbit

namespace lowbit {
namespace cpu {  // csrc/cpu/quant.cpp (OpenMP; AVX2 inner loops from quant_avx2.cpp when supported)
void quantize(const QuantizeParams& p);
void dequantize(const DequantizeParams& p);
void quantize8(const Quantize8Params& p);
void dequantize8(const Dequantize8Params& p);
}  // namespace cpu
namespace kernels {  // csrc/launch/quant.inl: the CUDA kernels, built by nvcc (_cuda) and on simt (_sim).
// Return a cudaError_t value (0 = success); the simulator throws on a fault inside a kernel.
int quantize(const QuantizeParams& p, intptr_t stream);
int dequantize(const DequantizeParams& p, intptr_t stream);
int quantize8(const Quantize8Params& p, intptr_t stream);
int dequantize8(const Dequantize8Params& p, intptr_t stream);
}  // namespace kernels
}  // namespace lowbit
