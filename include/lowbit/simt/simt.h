// lowbit/simt/simt.h — simt, a CPU simulator of the CUDA execution model (g++ side).
//
// Kernels never include this file: they include lowbit/simt/compat.cuh, which picks real CUDA under
// nvcc and this header under g++. See docs/simt.md for what is modelled and what is not.
//
// Model: one fiber per CUDA thread; one OS thread runs all fibers of one block, cooperatively,
// until every fiber has exited; blocks are spread over SIMT_THREADS OS threads. Fibers switch
// only at synchronisation points (__syncthreads, warp collectives, __syncwarp, __nanosleep), so
// everything between two such points runs atomically with respect to the rest of the block.
//
// This header is kept small (it is parsed by every kernel TU); the scheduler, fibers, context
// switch and collective semantics live in csrc/simt/*.cpp.
#pragma once
#if defined(__CUDACC__)
#error "simt.h is the g++ side of compat.cuh; nvcc must not include it"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------ CUDA keywords under g++
// __global__ functions must keep their own symbol: the simulator names a failing kernel by
// looking its address up in the module's symbol table.
#define __global__ __attribute__((noinline))
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared memory: one copy per OS thread, and an OS thread runs one block at a time.
// Consequences (docs/simt.md): no initialisers, contents survive from the previous block. The
// launch still counts the kernel's static shared memory: it reads the sizes of the kernel's
// function-local TLS objects from the module's symbol table.
#define __shared__ thread_local

// ------------------------------------------------------------------ vector types and indices
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
#define SIMT_VEC2(T, N, A) struct alignas(A) N { T x, y; };
#define SIMT_VEC4(T, N, A) struct alignas(A) N { T x, y, z, w; };
SIMT_VEC2(float, float2, 8) SIMT_VEC4(float, float4, 16)
SIMT_VEC2(int, int2, 8) SIMT_VEC4(int, int4, 16)
SIMT_VEC2(unsigned, uint2, 8) SIMT_VEC4(unsigned, uint4, 16)
SIMT_VEC2(short, short2, 4) SIMT_VEC2(unsigned short, ushort2, 4)
SIMT_VEC4(signed char, char4, 4) SIMT_VEC4(unsigned char, uchar4, 4)
SIMT_VEC2(double, double2, 16)
#undef SIMT_VEC2
#undef SIMT_VEC4
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uchar4 make_uchar4(unsigned char x, unsigned char y, unsigned char z, unsigned char w) { return {x, y, z, w}; }

namespace simt {

// Error codes returned by simt::launch (the cudaError_t values of the same meaning).
enum Error : int {
  kSuccess = 0,
  kErrorInvalidValue = 1,          // cudaErrorInvalidValue (e.g. dynamic smem over the limit)
  kErrorInvalidConfiguration = 9,  // cudaErrorInvalidConfiguration (block/grid dims)
};

// A fault inside a kernel (__trap, assert, deadlock, divergent barrier, ...): thrown out of
// simt::launch; pybind11 turns it into RuntimeError. The message names kernel, block, thread.
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
// Per OS thread: indices of the fiber that is running now (written by the scheduler on every
// switch), so threadIdx & co. are one TLS load. Trivial type: no TLS wrapper call.
struct ThreadState {
  uint3 thread_idx, block_idx, block_dim, grid_dim;
  unsigned lane, warp;  // lane = linear thread index % 32, warp = linear / 32
  unsigned char* dyn_smem;
};
extern thread_local ThreadState t_state;

[[noreturn]] void fail(const char* file, int line, const std::string& what);
void syncthreads(const char* file, int line);
int syncthreads_op(int op, int pred, const char* file, int line);  // op 0 count, 1 and, 2 or
void nanosleep_yield();

// Warp collectives: every lane publishes `in` words; the last lane of `mask` to arrive computes
// all results (csrc/simt/warp.cpp) and releases the others.
enum class Op : int {
  shfl_idx, shfl_up, shfl_down, shfl_bfly, ballot, any, all, reduce_add, syncwarp,
  mma_f16, mma_bf16, mma_s8, ldmatrix, ldmatrix_trans,
};
struct Collective {
  Op op;
  unsigned mask;
  int nwords;            // payload words for shfl; matrices for ldmatrix
  uint32_t in[10];
  const void* addr;      // ldmatrix row address
  uint32_t out[4];
};
void warp_collective(Collective& c, const char* file, int line);

struct LaunchSpec {
  dim3 grid, block;
  size_t smem;
  const void* kernel;          // address, for the name in error messages
  void (*entry)(void* ctx);    // runs the kernel body for the current fiber
  void* ctx;
};
int launch(const LaunchSpec& spec);
}  // namespace detail

// ------------------------------------------------------------------ launch
// The one launch path (nvcc: kernel<<<grid, block, smem, stream>>>(args...)). Streams are
// ignored: the simulator runs the grid to completion before returning. Arguments are converted
// to the kernel's parameter types once and every simulated thread gets its own copy.
template <class... P, class... A>
int launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, intptr_t stream, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "simt::launch: wrong number of kernel arguments");
  (void)stream;
  using Params = std::tuple<std::decay_t<P>...>;
  struct Ctx { void (*k)(P...); Params params; };
  Ctx ctx{kernel, Params(std::forward<A>(args)...)};
  auto entry = [](void* c) {
    Ctx* x = static_cast<Ctx*>(c);
    std::apply(x->k, x->params);  // copies each parameter: a private copy per thread
  };
  return detail::launch({grid, block, smem_bytes, reinterpret_cast<const void*>(kernel), +entry, &ctx});
}
// Opt in to more than 48 KiB of shared memory (cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
// under nvcc): the kernel's dynamic shared memory may then reach `bytes`, provided its static
// shared memory + `bytes` is within the per-block opt-in maximum. Without it, static + dynamic
// shared memory is at most 48 KiB (the static part: the kernel's `__shared__` declarations).
int set_max_dynamic_smem_impl(const void* kernel, int bytes);
template <class... P>
int set_max_dynamic_smem(void (*kernel)(P...), int bytes) {
  return set_max_dynamic_smem_impl(reinterpret_cast<const void*>(kernel), bytes);
}

// Stack of every simulated thread (fiber), in KiB, in [16, 65536]: 64 by default (256 under ASan),
// SIMT_STACK_KB at the first launch. A thread that overflows it raises KernelError (guard page +
// SIGSEGV handler, x86-64 Linux) naming the kernel and the size. std::invalid_argument when out of range.
void set_stack_kb(int kb);
int stack_kb();

// Runtime configuration (also from Python: _sim.configure). schedule: "forward", "reverse" or
// "random:<seed>"; threads: OS threads for blocks (0 = SIMT_THREADS or the core count).
void configure(const std::string& schedule, int threads);
// The calling OS thread's own configuration, over the process-wide one for the launches this
// thread makes: schedule "" and threads -1 take the process-wide value (both: no override).
// lowbit.use_backend("sim", schedule=, threads=) sets it around each call, so its settings belong
// to the `with` block (per thread and per context) and nothing process-wide changes.
// std::invalid_argument for a bad schedule or thread count, like configure.
void configure_thread(const std::string& schedule, int threads);
std::string schedule();
int threads();             // OS threads a launch uses now
int configured_threads();  // as given to configure (0 = default)
struct Stats { double launches, blocks, threads, warp_ops, barriers, seconds; };
Stats stats();
void reset_stats();
const char* error_string(int code);
std::string last_launch_error();  // details of the last nonzero launch() return
// (demangled name, bytes) of every function of the module with static __shared__ in its body: the
// figures the launch check uses (tests compare them with ptxas' "bytes smem").
std::vector<std::pair<std::string, size_t>> static_smem_table();

}  // namespace simt

// ------------------------------------------------------------------ built-in variables
#define threadIdx (static_cast<const uint3&>(::simt::detail::t_state.thread_idx))
#define blockIdx (static_cast<const uint3&>(::simt::detail::t_state.block_idx))
#define blockDim (static_cast<const uint3&>(::simt::detail::t_state.block_dim))
#define gridDim (static_cast<const uint3&>(::simt::detail::t_state.grid_dim))
constexpr int warpSize = 32;

// Dynamic shared memory (extern __shared__ cannot be emulated): `SIMT_DYNAMIC_SHARED(float, buf);`
// Filled with 0xff bytes (NaN as f32/f16/bf16, -1 as int) at the start of every block.
#define SIMT_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::simt::detail::t_state.dyn_smem)

// ------------------------------------------------------------------ synchronisation
// Source locations come from __builtin_FILE/__builtin_LINE default arguments, evaluated at the
// call site: barrier divergence and deadlock reports name the kernel's lines.
inline void __syncthreads(const char* f = __builtin_FILE(), int l = __builtin_LINE()) { simt::detail::syncthreads(f, l); }
inline int __syncthreads_count(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) { return simt::detail::syncthreads_op(0, p, f, l); }
inline int __syncthreads_and(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) { return simt::detail::syncthreads_op(1, p, f, l); }
inline int __syncthreads_or(int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) { return simt::detail::syncthreads_op(2, p, f, l); }
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  simt::detail::Collective c{simt::detail::Op::syncwarp, mask, 0, {}, nullptr, {}};
  simt::detail::warp_collective(c, f, l);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) { simt::detail::nanosleep_yield(); }
[[noreturn]] inline void __trap(const char* f = __builtin_FILE(), int l = __builtin_LINE()) { simt::detail::fail(f, l, "__trap()"); }
// Device assert: always checked in the simulator (NDEBUG does not remove it); raises, not aborts.
// Kernels must not include <cassert> after compat.cuh.
#ifdef assert
#undef assert
#endif
#define assert(e) ((e) ? (void)0 : ::simt::detail::fail(__FILE__, __LINE__, "assertion failed: " #e))

// ------------------------------------------------------------------ warp collectives
namespace simt::detail {
template <class T>
inline T shfl(Op op, unsigned mask, T v, int b, int width, const char* f, int l) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "shfl: type too large");
  Collective c{op, mask, int((sizeof(T) + 3) / 4), {}, nullptr, {}};
  std::memcpy(c.in, &v, sizeof(T));
  c.in[4] = uint32_t(b);
  // c operand of shfl.sync as CUDA builds it: segment mask (32 - width) << 8, clamp width - 1
  // (0 for .up) — PTX ISA, "Data Movement and Conversion Instructions: shfl.sync".
  c.in[5] = uint32_t(((32 - width) << 8) | (op == Op::shfl_up ? 0 : 0x1f));
  c.in[6] = uint32_t(width);
  warp_collective(c, f, l);
  T r;
  std::memcpy(&r, c.out, sizeof(T));
  return r;
}
}  // namespace simt::detail

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return simt::detail::shfl(simt::detail::Op::shfl_idx, mask, v, src, width, f, l);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return simt::detail::shfl(simt::detail::Op::shfl_up, mask, v, int(d), width, f, l);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return simt::detail::shfl(simt::detail::Op::shfl_down, mask, v, int(d), width, f, l);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return simt::detail::shfl(simt::detail::Op::shfl_bfly, mask, v, m, width, f, l);
}
namespace simt::detail {
inline uint32_t vote(Op op, unsigned mask, uint32_t v, const char* f, int l) {
  Collective c{op, mask, 1, {v}, nullptr, {}};
  warp_collective(c, f, l);
  return c.out[0];
}
}  // namespace simt::detail
inline unsigned __ballot_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return simt::detail::vote(simt::detail::Op::ballot, mask, p != 0, f, l);
}
inline int __any_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return int(simt::detail::vote(simt::detail::Op::any, mask, p != 0, f, l));
}
inline int __all_sync(unsigned mask, int p, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return int(simt::detail::vote(simt::detail::Op::all, mask, p != 0, f, l));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return simt::detail::vote(simt::detail::Op::reduce_add, mask, v, f, l);
}
inline int __reduce_add_sync(unsigned mask, int v, const char* f = __builtin_FILE(), int l = __builtin_LINE()) {
  return int(simt::detail::vote(simt::detail::Op::reduce_add, mask, uint32_t(v), f, l));
}

// ------------------------------------------------------------------ memory
template <class T>
inline T __ldg(const T* p) { return *p; }

// Atomics are real atomics (blocks run on several OS threads); they never yield.
#define SIMT_ATOMIC_INT(T)                                                                             \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }                 \
  inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }                 \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }               \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }                 \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }                   \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }                 \
  inline T atomicCAS(T* p, T cmp, T v) {                                                              \
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);               \
    return cmp;                                                                                        \
  }                                                                                                    \
  inline T atomicMax(T* p, T v) {                                                                      \
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                                      \
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {} \
    return old;                                                                                        \
  }                                                                                                    \
  inline T atomicMin(T* p, T v) {                                                                      \
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                                      \
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {} \
    return old;                                                                                        \
  }
SIMT_ATOMIC_INT(int)
SIMT_ATOMIC_INT(unsigned)
SIMT_ATOMIC_INT(unsigned long long)
SIMT_ATOMIC_INT(long long)
#undef SIMT_ATOMIC_INT
namespace simt::detail {
template <class F, class U, class Op>
inline F atomic_float(F* p, F v, Op op) {
  static_assert(sizeof(F) == sizeof(U));
  U* q = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(q, __ATOMIC_SEQ_CST), next;
  F o;
  do {
    std::memcpy(&o, &old, sizeof(F));
    F n = op(o, v);
    std::memcpy(&next, &n, sizeof(F));
  } while (!__atomic_compare_exchange_n(q, &old, next, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return o;
}
}  // namespace simt::detail
inline float atomicAdd(float* p, float v) {
  return simt::detail::atomic_float<float, uint32_t>(p, v, [](float a, float b) { return a + b; });
}
inline double atomicAdd(double* p, double v) {
  return simt::detail::atomic_float<double, uint64_t>(p, v, [](double a, double b) { return a + b; });
}
inline float atomicExch(float* p, float v) {
  return simt::detail::atomic_float<float, uint32_t>(p, v, [](float, float b) { return b; });
}

// ------------------------------------------------------------------ arithmetic intrinsics
// IEEE fp32 ops with explicit rounding: nvcc never contracts these into FMA; g++ compiles the
// simulator with -ffp-contract=off so the plain operators round every step too.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float a) { return a >= 1.0f ? 1.0f : (a > 0.0f ? a : 0.0f); }  // NaN -> 0
inline int __float2int_rn(float a) { return int(std::nearbyint(a)); }
inline int __float2int_rz(float a) { return int(a); }
inline unsigned __float2uint_rn(float a) { return unsigned(std::nearbyint(a)); }
inline float __int2float_rn(int a) { return float(a); }
inline float __uint2float_rn(unsigned a) { return float(a); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
// prmt.b32 default mode (PTX ISA, "prmt"): byte i of the result is byte (s >> 4i) & 7 of {b, a};
// bit 3 of the selector replicates that byte's sign bit.
inline unsigned __byte_perm(unsigned a, unsigned b, unsigned s) {
  uint64_t x = (uint64_t(b) << 32) | a;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) {
    unsigned sel = (s >> (4 * i)) & 0xf;
    unsigned byte = unsigned(x >> (8 * (sel & 7))) & 0xff;
    if (sel & 8) byte = (byte & 0x80) ? 0xff : 0x00;
    r |= byte << (8 * i);
  }
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  s &= 31; return s ? (hi << s) | (lo >> (32 - s)) : hi;
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  s &= 31; return s ? (lo >> s) | (hi << (32 - s)) : lo;
}
// CUDA's device min/max overloads (global namespace).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

// ------------------------------------------------------------------ fp16 / bf16
// Storage types with round-to-nearest-even conversions (as cvt.rn.f16.f32 / cvt.rn.bf16.f32).
// Arithmetic is done in fp32 and rounded once: for + - * / this equals the native f16/bf16
// instruction (fp32 has >= 2p+2 bits of the 11- and 8-bit significands, so double rounding is
// innocuous); fma goes through double.
namespace simt::detail {
inline uint16_t f32_to_f16(float f) {
  uint32_t u = __float_as_uint(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN stays NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);                        // >= 65520 -> inf
  if (a < 0x38800000u) {  // |f| < 2^-14: subnormal; f * 2^24 rounded to an integer (RNE)
    float v = __uint_as_float(a) * 16777216.0f;
    return uint16_t(sign | uint16_t(std::nearbyint(v)));
  }
  uint32_t m = a + 0xfffu + ((a >> 13) & 1u);
  return uint16_t(sign | uint16_t((m - 0x38000000u) >> 13));
}
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return __uint_as_float(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    float v = float(m) * 5.9604644775390625e-08f;  // 2^-24
    return sign ? -v : v;
  }
  return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float bf16_to_f32(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }
}  // namespace simt::detail

#define SIMT_HALF_TYPE(H, TO, FROM)                                                              \
  struct alignas(2) H {                                                                          \
    uint16_t __x;                                                                                \
    H() = default;                                                                               \
    H(float f) : __x(::simt::detail::TO(f)) {}                                                   \
    H(double f) : __x(::simt::detail::TO(float(f))) {}                                           \
    H(int i) : __x(::simt::detail::TO(float(i))) {}                                              \
    operator float() const { return ::simt::detail::FROM(__x); }                                 \
    static H raw(uint16_t r) { H h; h.__x = r; return h; }                                       \
  };                                                                                             \
  inline H operator+(H a, H b) { return H(float(a) + float(b)); }                                \
  inline H operator-(H a, H b) { return H(float(a) - float(b)); }                                \
  inline H operator*(H a, H b) { return H(float(a) * float(b)); }                                \
  inline H operator/(H a, H b) { return H(float(a) / float(b)); }                                \
  inline H operator-(H a) { return H::raw(uint16_t(a.__x ^ 0x8000u)); }                          \
  inline bool operator==(H a, H b) { return float(a) == float(b); }                              \
  inline bool operator!=(H a, H b) { return float(a) != float(b); }                              \
  inline bool operator<(H a, H b) { return float(a) < float(b); }                                \
  inline bool operator>(H a, H b) { return float(a) > float(b); }                                \
  inline bool operator<=(H a, H b) { return float(a) <= float(b); }                              \
  inline bool operator>=(H a, H b) { return float(a) >= float(b); }
SIMT_HALF_TYPE(__half, f32_to_f16, f16_to_f32)
SIMT_HALF_TYPE(__nv_bfloat16, f32_to_bf16, bf16_to_f32)
#undef SIMT_HALF_TYPE
struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
using half = __half;
using half2 = __half2;
using nv_bfloat16 = __nv_bfloat16;
using nv_bfloat162 = __nv_bfloat162;

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __half2 __float2half2_rn(float a) { return {__half(a), __half(a)}; }
inline float2 __half22float2(__half2 h) { return {float(h.x), float(h.y)}; }
inline __half2 __float22half2_rn(float2 f) { return {__half(f.x), __half(f.y)}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half::raw(u); }
inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hsub(__half a, __half b) { return a - b; }
inline __half __hmul(__half a, __half b) { return a * b; }
inline __half __hfma(__half a, __half b, __half c) { return __half(float(std::fma(double(float(a)), double(float(b)), double(float(c))))); }
inline __half __hneg(__half a) { return -a; }
inline __half __hmax(__half a, __half b) { return float(a) >= float(b) ? a : b; }
inline __half __hmin(__half a, __half b) { return float(a) <= float(b) ? a : b; }
inline __half2 __hadd2(__half2 a, __half2 b) { return {a.x + b.x, a.y + b.y}; }
inline __half2 __hmul2(__half2 a, __half2 b) { return {a.x * b.x, a.y * b.y}; }
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) { return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; }

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return {__nv_bfloat16(a), __nv_bfloat16(a)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {float(h.x), float(h.y)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return {__nv_bfloat16(f.x), __nv_bfloat16(f.y)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16::raw(u); }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return a + b; }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return a * b; }
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __nv_bfloat16(float(std::fma(double(float(a)), double(float(b)), double(float(c)))));
}
inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) { return {a.x + b.x, a.y + b.y}; }
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) { return {a.x * b.x, a.y * b.y}; }
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}
