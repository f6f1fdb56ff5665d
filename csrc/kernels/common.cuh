// csrc/kernels/common.cuh — what every kernel family shares, written once: element I/O (fp32 <->
// bf16 / fp16), the code tables in constant memory, the block scale of a packed weight (formats.h's
// double-quant rule), and the error codes the launchers return.
#pragma once
#include <cstdint>
#include <type_traits>

#include "lowbit/formats.h"
#include "lowbit/simt/compat.cuh"

namespace lowbit::kernels {

// ---------------------------------------------------------------------------- launcher errors
// The cudaError_t values a failed launch returns too: the binding turns every nonzero code into
// one message (csrc/bind), whichever of the launcher or the runtime refused.
constexpr int kErrInvalidValue = 1;      // cudaErrorInvalidValue: a shape, block size or pointer ops.py should have refused
constexpr int kErrMemoryAllocation = 2;  // cudaErrorMemoryAllocation

// ---------------------------------------------------------------------------- launcher helpers (host)
// Vector loads and stores need their address aligned to the vector's size.
inline bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }
// CTAs of a grid-stride kernel: enough for the work, at most 65535 (plenty to fill any GPU; the
// kernel loops over the rest).
inline unsigned grid_stride_ctas(int64_t work, int64_t per_cta) {
  constexpr int64_t kMaxCtas = 65535;
  const int64_t n = (work + per_cta - 1) / per_cta;
  return unsigned(n < 1 ? 1 : (n > kMaxCtas ? kMaxCtas : n));
}

// ---------------------------------------------------------------------------- code tables
// static: one private copy per translation unit in both builds; [[maybe_unused]]: a translation
// unit that reads none of them (hadamard) must not warn under g++.
[[maybe_unused]] static __constant__ float c_nf4[16] = {LOWBIT_NF4_TABLE};
[[maybe_unused]] static __constant__ float c_fp4[16] = {LOWBIT_FP4_TABLE};
[[maybe_unused]] static __constant__ float c_dyn_signed[256] = {LOWBIT_DYNAMIC_SIGNED_TABLE};
[[maybe_unused]] static __constant__ float c_dyn_unsigned[256] = {LOWBIT_DYNAMIC_UNSIGNED_TABLE};

// ---------------------------------------------------------------------------- element I/O
// fp32 is the compute type of every kernel; bf16 / fp16 convert with round to nearest even, the
// rounding torch applies, so a kernel's output equals the reference's `.to(dtype)`.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T>
__device__ __forceinline__ T from_f32(float x) {
  if constexpr (std::is_same<T, float>::value) return x;
  else if constexpr (std::is_same<T, __half>::value) return __float2half_rn(x);
  else return __float2bfloat16_rn(x);
}
// The same conversions on the 16-bit image of a T in the low bits of a register (vector loads and
// stores, mma operands).
template <class T>
__device__ __forceinline__ float b16_to_f32(uint32_t u) {
  if constexpr (std::is_same<T, __half>::value) return __half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu)));
  else return __uint_as_float(u << 16);  // bf16 -> fp32 is exact
}
template <class T>
__device__ __forceinline__ uint32_t f32_to_b16(float x) {
  if constexpr (std::is_same<T, __half>::value) return __half_as_ushort(__float2half_rn(x));
  else return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// Eight consecutive elements as fp32; vec: one (bf16/fp16) or two (fp32) 16-byte loads (the
// launcher checked the alignment).
template <class T>
__device__ __forceinline__ void load8(const T* __restrict__ p, bool vec, float (&x)[8]) {
  if (vec) {
    if constexpr (std::is_same<T, float>::value) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(p));
      const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
      x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
      x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    } else {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
      const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        x[2 * i] = b16_to_f32<T>(u[i]);
        x[2 * i + 1] = b16_to_f32<T>(u[i] >> 16);
      }
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) x[i] = to_f32(p[i]);
}

// Eight fp32 values into consecutive elements of T; vec as for load8.
template <class T>
__device__ __forceinline__ void store8(T* __restrict__ p, bool vec, const float (&y)[8]) {
  if constexpr (std::is_same<T, float>::value) {
    if (vec) {
      reinterpret_cast<float4*>(p)[0] = make_float4(y[0], y[1], y[2], y[3]);
      reinterpret_cast<float4*>(p)[1] = make_float4(y[4], y[5], y[6], y[7]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) p[i] = y[i];
    }
  } else {
    uint32_t u[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) u[i] = f32_to_b16<T>(y[2 * i]) | (f32_to_b16<T>(y[2 * i + 1]) << 16);
    if (vec) {
      *reinterpret_cast<uint4*>(p) = make_uint4(u[0], u[1], u[2], u[3]);
    } else {
      unsigned short* o = reinterpret_cast<unsigned short*>(p);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        o[2 * i] = static_cast<unsigned short>(u[i] & 0xffffu);
        o[2 * i + 1] = static_cast<unsigned short>(u[i] >> 16);
      }
    }
  }
}

// ---------------------------------------------------------------------------- block scale
// The fp32 scale of quant block b of a packed weight: stored, or rebuilt from double quant with
// formats.h's rule (the same bits as `dequantize`). W: a struct with GemmWeight's scale fields
// (include/lowbit/gemm.h); read-only for the kernel's lifetime, hence __ldg.
template <class W>
__device__ __forceinline__ float block_scale(const W& w, int64_t b) {
  if (w.scale_q) return dq_scale(c_dyn_signed[__ldg(w.scale_q + b)], __ldg(w.scale_nested + nested_block_of(b)), w.scale_offset);
  return __ldg(w.scale + b);
}

}  // namespace lowbit::kernels
