// lowbit/simt/compat.cuh — the ONLY header a kernel includes for CUDA facilities.
//
// Under nvcc: the real CUDA headers, plus the wrappers below with inline-PTX bodies.
// Under g++ (LOWBIT_SIM): the simt simulator (simt.h), plus the same wrappers with simulator bodies.
// Kernels contain no raw inline PTX: every PTX instruction a kernel needs gets a wrapper here,
// with both bodies, and a known-answer test in tests/test_simt.py.
//
// Kernel rules that keep one source valid in both builds (docs/simt.md):
//   - launch only through simt::launch(kernel, grid, block, smem_bytes, stream, args...);
//   - dynamic shared memory only through SIMT_DYNAMIC_SHARED(T, name);
//   - no initialisers on __shared__ variables, no __activemask(), no inter-block spin-waits;
//   - intra-block spin-waits call __nanosleep() in the loop (that is where a fiber yields).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
// ============================================================================ nvcc
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>  // device assert (follows NDEBUG under nvcc; always on in the simulator)
#include <type_traits>
#include <utility>

#define SIMT_DEVICE __device__ __forceinline__
#define SIMT_DYNAMIC_SHARED(T, name)                            \
  extern __shared__ __align__(16) unsigned char simt_dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(simt_dyn_smem_)

namespace simt {
// The one launch path; returns the launch's cudaError_t (as int).
template <class... P, class... A>
inline int launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, intptr_t stream, A&&... args) {
  kernel<<<grid, block, smem_bytes, reinterpret_cast<cudaStream_t>(stream)>>>(std::forward<A>(args)...);
  return int(cudaGetLastError());
}
template <class... P>
inline int set_max_dynamic_smem(void (*kernel)(P...), int bytes) {
  return int(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}
}  // namespace simt

#else
// ============================================================================ g++ + simt
#include "lowbit/simt/simt.h"
#define SIMT_DEVICE inline
#endif

namespace simt {

// ---------------------------------------------------------------------------- lop3 / prmt
// lop3.b32 d, a, b, c, LUT: bit i of d is bit ((a_i << 2) | (b_i << 1) | c_i) of LUT, i.e. the LUT
// is F(0xF0, 0xCC, 0xAA) for the boolean function F (PTX ISA, "Logic and Shift Instructions: lop3").
template <int LUT>
SIMT_DEVICE uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  static_assert(LUT >= 0 && LUT <= 255, "lop3: LUT is 8 bits");
#if defined(__CUDACC__)
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
  return d;
#else
  uint32_t d = 0;
  for (int i = 0; i < 8; ++i)
    if (LUT & (1 << i)) d |= ((i & 4) ? a : ~a) & ((i & 2) ? b : ~b) & ((i & 1) ? c : ~c);
  return d;
#endif
}
// prmt.b32 d, a, b, sel (default mode): byte k of d = byte sel[4k+2:4k] of the 8-byte {b, a},
// sign-replicated when sel bit 4k+3 is set (PTX ISA, "Data Movement: prmt"; = __byte_perm).
SIMT_DEVICE uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDACC__)
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
#else
  return __byte_perm(a, b, sel);
#endif
}

// ---------------------------------------------------------------------------- cp.async
// 16-byte global -> shared copy (cp.async.cg: bypasses L1). The simulator copies synchronously,
// so commit/wait are no-ops there; kernels must still wait before reading (nvcc needs it).
SIMT_DEVICE void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDACC__)
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#else
  std::memcpy(smem, gmem, 16);
#endif
}
// Copies src_bytes (0..16) and zero-fills the rest of the 16 bytes (out-of-bounds tiles).
SIMT_DEVICE void cp_async16_zfill(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDACC__)
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#else
  std::memset(smem, 0, 16);
  if (src_bytes > 0) std::memcpy(smem, gmem, size_t(src_bytes > 16 ? 16 : src_bytes));
#endif
}
SIMT_DEVICE void cp_async_commit() {
#if defined(__CUDACC__)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
SIMT_DEVICE void cp_async_wait() {
#if defined(__CUDACC__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
SIMT_DEVICE void cp_async_wait_all() {
#if defined(__CUDACC__)
  asm volatile("cp.async.wait_all;\n" ::);
#endif
}

// ---------------------------------------------------------------------------- ldmatrix
// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 (PTX ISA, "Warp-level matrix load
// instruction: ldmatrix"). Lane 8*i + r supplies the address of row r of matrix i (16 bytes, 8
// b16 elements; lanes beyond 8*N are ignored). Lane L receives, for matrix i, register r[i] =
// {M_i[L/4][2*(L%4)], M_i[L/4][2*(L%4)+1]} (low half first); with .trans, the same positions of
// the transposed matrix: {M_i[2*(L%4)][L/4], M_i[2*(L%4)+1][L/4]}. All 32 lanes must execute it.
#if defined(__CUDACC__)
template <int N, bool Trans = false>
SIMT_DEVICE void ldmatrix(uint32_t (&r)[N], const void* smem_row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix: x1, x2 or x4");
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  if constexpr (N == 1 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
  else if constexpr (N == 1 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
  else if constexpr (N == 2 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  else if constexpr (N == 2 && Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
  else if constexpr (N == 4 && !Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
#else
template <int N, bool Trans = false>
inline void ldmatrix(uint32_t (&r)[N], const void* smem_row, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix: x1, x2 or x4");
  detail::Collective c{Trans ? detail::Op::ldmatrix_trans : detail::Op::ldmatrix, 0xffffffffu, N, {}, smem_row, {}};
  detail::warp_collective(c, f, l);
  for (int i = 0; i < N; ++i) r[i] = c.out[i];
}
#endif

// ---------------------------------------------------------------------------- mma.sync m16n8k16
// D (16x8 f32) = A (16x16, T) * B (16x8, T) + C (16x8 f32), T = __half or __nv_bfloat16, one warp.
// Fragment layout: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"
// (figures mma-16816-A-f16, mma-16816-B-f16, mma-16816-C), with g = lane >> 2, t = lane % 4:
//   a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]   a[2] = A[g][2t+8..]   a[3] = A[g+8][2t+8..]
//   b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]   (two elements per register, low half first)
//   c[0..1] = C[g][2t..2t+1]                          c[2..3] = C[g+8][2t..2t+1]
// The simulator accumulates in double and rounds once to fp32 (the hardware's internal order and
// truncation are unspecified): compare tensor-core results with a tolerance.
#if defined(__CUDACC__)
template <class T>
SIMT_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "mma: f16 or bf16");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
  __trap();  // mma.m16n8k16 with f32 accumulation needs sm_80
#endif
}
#else
template <class T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                         const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "mma: f16 or bf16");
  detail::Collective x{std::is_same<T, __half>::value ? detail::Op::mma_f16 : detail::Op::mma_bf16,
                       0xffffffffu, 10, {}, nullptr, {}};
  for (int i = 0; i < 4; ++i) x.in[i] = a[i];
  x.in[4] = b[0];
  x.in[5] = b[1];
  for (int i = 0; i < 4; ++i) std::memcpy(&x.in[6 + i], &c[i], 4);
  detail::warp_collective(x, f, l);
  for (int i = 0; i < 4; ++i) std::memcpy(&d[i], &x.out[i], 4);
}
#endif

// ---------------------------------------------------------------------------- mma.sync m16n8k32 s8
// D (16x8 s32) = A (16x32 s8) * B (32x8 s8) + C (16x8 s32), one warp, exact integer arithmetic
// (mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32, without .satfinite; on int32 overflow the
// simulator wraps (two's complement) — callers keep their sums far below 2^31, as svdquant does).
// Fragment layout: PTX ISA, "Matrix Fragments for mma.m16n8k32" (figures mma-16832-A-i8,
// mma-16832-B-i8, mma-16832-C), with g = lane >> 2, t = lane % 4, four s8 per register, the lowest
// k in the low byte:
//   a[0] = A[g][4t..4t+3]   a[1] = A[g+8][4t..4t+3]   a[2] = A[g][4t+16..]   a[3] = A[g+8][4t+16..]
//   b[0] = B[4t..4t+3][g]   b[1] = B[4t+16..4t+19][g]
//   c[0..1] = C[g][2t..2t+1]                          c[2..3] = C[g+8][2t..2t+1]
// i.e. what ldmatrix (b16, non-transposed) gives from row-major A (M x K) and K-major B (N x K)
// tiles of bytes: lane L gets bytes 4(L%4)..+3 of row L/4 of each 8 x 16-byte matrix.
#if defined(__CUDACC__)
SIMT_DEVICE void mma_m16n8k32_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const int32_t (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
                 "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
#else
  __trap();  // mma.m16n8k32 with s8 operands needs sm_80
#endif
}
#else
inline void mma_m16n8k32_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const int32_t (&c)[4],
                            const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  detail::Collective x{detail::Op::mma_s8, 0xffffffffu, 10, {}, nullptr, {}};
  for (int i = 0; i < 4; ++i) x.in[i] = a[i];
  x.in[4] = b[0];
  x.in[5] = b[1];
  for (int i = 0; i < 4; ++i) x.in[6 + i] = uint32_t(c[i]);
  detail::warp_collective(x, f, l);
  for (int i = 0; i < 4; ++i) d[i] = int32_t(x.out[i]);
}
#endif

}  // namespace simt
