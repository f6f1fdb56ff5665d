// csrc/kernels/quant.cuh — the quant family on CUDA: blockwise quantize / dequantize (nf4, fp4,
// int4, int2) and the blockwise 8-bit dynamic quantizer (double quant). Bit-exact with
// python/lowbit/reference.py and csrc/cpu/quant*.cpp: the same sequence of IEEE fp32 operations,
// written with __f*_rn intrinsics wherever nvcc could otherwise contract a*b+c into an FMA.
//
// Roofline (A100-40GB: ~1.5 TB/s HBM, ~19.5 T fp32 lane-ops/s; H100 SXM: ~3.3 TB/s):
//   quantize (bf16 in, 4-bit out) moves 2 + 0.5 B/weight (+8 B per quant block) and reads the
//   input twice — pass 2 re-reads a block the same warp just read, from L1/L2, so DRAM sees it once;
//   16 M weights = 40 MB -> ~27 us at 1.5 TB/s. Its arithmetic is ~30-40 lane-ops/weight (15
//   compares against register-resident midpoints for nf4/fp4) -> ~30 us: both limits are close,
//   which is why the midpoints live in registers and the search is branch-free.
//   dequantize moves 0.5 B in + 2 B (bf16) or 4 B (fp32) out per weight with ~4 lane-ops/weight:
//   purely bandwidth-bound; 16-byte stores per thread keep it at full sector efficiency.
//   The 8-bit quantizer runs on n/256 scales only (double quant): negligible either way.
#pragma once
#include "kernels/common.cuh"
#include "lowbit/quant.h"

namespace lowbit::kernels {

constexpr int kQuantThreads = 256;
constexpr int kChunk = 8;  // elements per thread and step: load8 / store8 (common.cuh)

// FP4 codes in value order, one nibble each (nibble i = code of the i-th smallest value): the
// sorted-index -> code map becomes a shift of an immediate instead of a table lookup.
constexpr uint64_t fp4_sorted_packed() {
  constexpr uint8_t codes[16] = {LOWBIT_FP4_SORTED_CODES};
  uint64_t r = 0;
  for (int i = 0; i < 16; ++i) r |= uint64_t(codes[i]) << (4 * i);
  return r;
}
constexpr uint64_t kFP4SortedPacked = fp4_sorted_packed();

template <Fmt F>
__device__ __forceinline__ float sorted_table(int i) {
  if constexpr (F == Fmt::nf4) return c_nf4[i];
  else return c_fp4[int((kFP4SortedPacked >> (4 * i)) & 0xf)];
}

// ---------------------------------------------------------------------------- quantize
// A group of G lanes (G = min(32, block / 8), a power of two dividing 32) owns one quant block;
// lane s of the group handles chunks s, s + G, ... (consecutive lanes read consecutive 16-byte
// pieces: coalesced). Pass 1 reduces absmax (or min and max) over the group with xor-shuffles of
// width G; pass 2 re-reads the block (L1/L2 hit) and writes 4 (4-bit) or 2 (2-bit) bytes of codes
// per chunk. Grid-stride over quant blocks.
template <Fmt F, class T>
__global__ void __launch_bounds__(kQuantThreads) quantize_kernel(QuantizeParams p, int group, int vec_flag) {
  constexpr bool kTable = F == Fmt::nf4 || F == Fmt::fp4;
  constexpr int kBits = fmt_bits(F), kQmax = fmt_qmax(F);
  __shared__ float s_mid[16];
  if (kTable && threadIdx.x < 15)  // midpoints (a + b) / 2 in fp32, as the reference computes them
    s_mid[threadIdx.x] = __fmul_rn(__fadd_rn(sorted_table<F>(threadIdx.x), sorted_table<F>(threadIdx.x + 1)), 0.5f);
  __syncthreads();
  float mid[15];
  if constexpr (kTable) {
#pragma unroll
    for (int k = 0; k < 15; ++k) mid[k] = s_mid[k];
  }
  const bool vec = vec_flag != 0;
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const int lane = int(threadIdx.x) & 31, sub = int(threadIdx.x) % group;
  const unsigned gmask = (group == 32 ? 0xffffffffu : ((1u << group) - 1u) << (lane & ~(group - 1)));
  const int chunks = p.block / kChunk;
  const int64_t n_blocks = p.numel / p.block;
  const int groups_per_cta = kQuantThreads / group;
  for (int64_t b = int64_t(blockIdx.x) * groups_per_cta + threadIdx.x / group; b < n_blocks;
       b += int64_t(gridDim.x) * groups_per_cta) {
    const int64_t base = b * p.block;
    // ---- pass 1: block statistics
    float amax = 0.0f, mn = 0.0f, mx = 0.0f;
    if constexpr (!kTable) {
      mn = __int_as_float(0x7f800000);   // +inf
      mx = __int_as_float(int(0xff800000u));  // -inf
    }
    for (int c = sub; c < chunks; c += group) {
      float x[kChunk];
      load8(w + base + int64_t(c) * kChunk, vec, x);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        if constexpr (kTable) amax = fmaxf(amax, fabsf(x[k]));
        else { mn = fminf(mn, x[k]); mx = fmaxf(mx, x[k]); }
      }
    }
    for (int o = group / 2; o > 0; o /= 2) {
      if constexpr (kTable) {
        amax = fmaxf(amax, __shfl_xor_sync(gmask, amax, o, group));
      } else {
        mn = fminf(mn, __shfl_xor_sync(gmask, mn, o, group));
        mx = fmaxf(mx, __shfl_xor_sync(gmask, mx, o, group));
      }
    }
    float inv, zero = 0.0f;
    if constexpr (kTable) {
      inv = __fdiv_rn(1.0f, fmaxf(amax, kAbsmaxFloor));
      if (sub == 0) p.scale[b] = amax;
    } else {
      mn = __fadd_rn(mn, 0.0f);  // -0 -> +0: the sign of a zero minimum is not a rule (formats.md)
      float s = __fdiv_rn(__fsub_rn(mx, mn), float(kQmax));
      if (!(s >= kMinIntStep)) s = 1.0f;  // constant block: codes 0, w_hat = min exactly
      inv = __fdiv_rn(1.0f, s);
      zero = -__fmul_rn(mn, inv);
      if (sub == 0) {
        p.scale[b] = s;
        p.zero[b] = zero;
      }
    }
    // ---- pass 2: codes
    for (int c = sub; c < chunks; c += group) {
      float x[kChunk];
      const int64_t e = base + int64_t(c) * kChunk;
      load8(w + e, vec, x);
      uint32_t packed = 0;
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        uint32_t q;
        if constexpr (kTable) {
          const float v = fminf(fmaxf(__fmul_rn(x[k], inv), -1.0f), 1.0f);
          int idx = 0;  // number of midpoints strictly below v: nearest code, ties to the lower
#pragma unroll
          for (int m = 0; m < 15; ++m) idx += mid[m] < v;
          q = F == Fmt::nf4 ? uint32_t(idx) : uint32_t((kFP4SortedPacked >> (4 * idx)) & 0xf);
        } else {
          const float t = rintf(__fadd_rn(__fmul_rn(x[k], inv), zero));  // half to even
          q = uint32_t(fminf(fmaxf(t, 0.0f), float(kQmax)));
        }
        // first element in the most significant bits of its byte; bytes little-endian in `packed`
        constexpr int per_byte = 8 / kBits;
        packed |= q << (8 * (k / per_byte) + (8 - kBits * (k % per_byte + 1)));
      }
      if constexpr (kBits == 4) {
        uint8_t* dst = p.codes + e / 2;
        if (vec) *reinterpret_cast<uint32_t*>(dst) = packed;
        else for (int k = 0; k < 4; ++k) dst[k] = uint8_t(packed >> (8 * k));
      } else {
        uint8_t* dst = p.codes + e / 4;
        if (vec) *reinterpret_cast<uint16_t*>(dst) = uint16_t(packed);
        else { dst[0] = uint8_t(packed); dst[1] = uint8_t(packed >> 8); }
      }
    }
  }
}

// ---------------------------------------------------------------------------- dequantize
// One thread per 8-element chunk (grid-stride): 4 or 2 bytes of codes in, 16 or 32 bytes out.
template <Fmt F, class T>
__global__ void __launch_bounds__(kQuantThreads) dequantize_kernel(DequantizeParams p, int vec_flag) {
  constexpr bool kTable = F == Fmt::nf4 || F == Fmt::fp4;
  constexpr int kBits = fmt_bits(F);
  __shared__ float s_table[16];
  if (kTable && threadIdx.x < 16) s_table[threadIdx.x] = F == Fmt::nf4 ? c_nf4[threadIdx.x] : c_fp4[threadIdx.x];
  __syncthreads();
  const bool vec = vec_flag != 0;
  T* __restrict__ out = static_cast<T*>(p.out);
  const int64_t n_chunks = p.numel / kChunk;
  for (int64_t ch = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; ch < n_chunks; ch += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = ch * kChunk, b = e / p.block;
    float s;
    if (p.scale_q) s = dq_scale(c_dyn_signed[p.scale_q[b]], p.scale_nested[nested_block_of(b)], p.scale_offset);
    else s = p.scale[b];
    const float z = kTable ? 0.0f : p.zero[b];
    uint32_t packed;
    if constexpr (kBits == 4) {
      const uint8_t* src = p.codes + e / 2;
      packed = vec ? *reinterpret_cast<const uint32_t*>(src)
                   : uint32_t(src[0]) | (uint32_t(src[1]) << 8) | (uint32_t(src[2]) << 16) | (uint32_t(src[3]) << 24);
    } else {
      const uint8_t* src = p.codes + e / 4;
      packed = vec ? uint32_t(*reinterpret_cast<const uint16_t*>(src)) : uint32_t(src[0]) | (uint32_t(src[1]) << 8);
    }
    float y[kChunk];
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      constexpr int per_byte = 8 / kBits;
      const uint32_t q = (packed >> (8 * (k / per_byte) + (8 - kBits * (k % per_byte + 1)))) & ((1u << kBits) - 1u);
      y[k] = kTable ? __fmul_rn(s_table[q], s) : __fmul_rn(__fsub_rn(float(q), z), s);
    }
    store8(out + e, vec, y);
  }
}

// ---------------------------------------------------------------------------- 8-bit dynamic
// One CTA per 8-bit block (grid-stride); absmax by warp shuffles + shared memory; the 255 midpoints
// of the map in shared memory, binary search per element (formats.h nearest_sorted).
__global__ void __launch_bounds__(kQuantThreads) quantize8_kernel(Quantize8Params p) {
  __shared__ float s_mid[255];
  __shared__ float s_warp[kQuantThreads / 32];
  const float* map = p.is_signed ? c_dyn_signed : c_dyn_unsigned;
  for (int i = threadIdx.x; i < 255; i += blockDim.x) s_mid[i] = __fmul_rn(__fadd_rn(map[i], map[i + 1]), 0.5f);
  const int64_t n_blocks = (p.numel + p.block - 1) / p.block;
  for (int64_t b = blockIdx.x; b < n_blocks; b += gridDim.x) {
    const int64_t i0 = b * p.block, i1 = i0 + p.block < p.numel ? i0 + p.block : p.numel;  // last block partial
    float amax = 0.0f;
    for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) amax = fmaxf(amax, fabsf(__fsub_rn(p.x[i], p.offset)));
    for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x / 32] = amax;
    __syncthreads();  // also publishes s_mid on the first iteration
    amax = s_warp[0];
    for (int k = 1; k < kQuantThreads / 32; ++k) amax = fmaxf(amax, s_warp[k]);
    if (threadIdx.x == 0) p.absmax[b] = amax;
    const float inv = __fdiv_rn(1.0f, fmaxf(amax, kAbsmaxFloor));
    for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
      const float v = fminf(fmaxf(__fmul_rn(__fsub_rn(p.x[i], p.offset), inv), -1.0f), 1.0f);
      p.q[i] = uint8_t(nearest_sorted(s_mid, v));
    }
    __syncthreads();  // s_warp is rewritten by the next block
  }
}

__global__ void __launch_bounds__(kQuantThreads) dequantize8_kernel(Dequantize8Params p) {
  __shared__ float s_map[256];
  const float* map = p.is_signed ? c_dyn_signed : c_dyn_unsigned;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) s_map[i] = map[i];
  __syncthreads();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel; i += int64_t(gridDim.x) * blockDim.x)
    p.out[i] = dq_scale(s_map[p.q[i]], p.absmax[i / p.block], p.offset);  // the double-quant rule, any block
}

}  // namespace lowbit::kernels
