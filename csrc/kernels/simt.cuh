// csrc/kernels/simt.cuh — kernels that exercise the simt simulator (and compile with nvcc,
// so every wrapper's PTX body is checked by ptxas). tests/test_simt.py compares their outputs with
// answers computed independently in Python (CUDA programming guide / PTX ISA semantics, numpy).
#pragma once
#include "lowbit/simt/compat.cuh"

namespace lowbit::simt_tests {

// out[t] = shuffle of value (1000 * warp + lane) with per-thread operand arg[t]; mode 0 idx, 1 up,
// 2 down, 3 xor. wide != 0 shuffles a 64-bit value (two 32-bit shuffles on hardware).
__global__ void shfl_kernel(int mode, int width, int wide, const int* arg, long long* out) {
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int v = 1000 * warp + lane;
  const int a = arg[t];
  long long r = 0;
  if (wide) {
    const long long x = (static_cast<long long>(v) << 32) | 0x5a5a5a5a;
    switch (mode) {
      case 0: r = __shfl_sync(0xffffffffu, x, a, width); break;
      case 1: r = __shfl_up_sync(0xffffffffu, x, unsigned(a), width); break;
      case 2: r = __shfl_down_sync(0xffffffffu, x, unsigned(a), width); break;
      default: r = __shfl_xor_sync(0xffffffffu, x, a, width); break;
    }
  } else {
    switch (mode) {
      case 0: r = __shfl_sync(0xffffffffu, v, a, width); break;
      case 1: r = __shfl_up_sync(0xffffffffu, v, unsigned(a), width); break;
      case 2: r = __shfl_down_sync(0xffffffffu, v, unsigned(a), width); break;
      default: r = __shfl_xor_sync(0xffffffffu, v, a, width); break;
    }
  }
  out[t] = r;
}

// Votes with the full mask and with two half-warp groups, warp reductions, block votes.
// out[9 * t + k]: ballot, any, all, ballot_half, any_half, all_half, reduce_add, reduce_add_half,
// then (per thread) __syncthreads_count / _and / _or of pred packed as count | and << 16 | or << 17.
__global__ void vote_kernel(const int* pred, unsigned* out) {
  const int t = threadIdx.x, lane = t % 32;
  const int p = pred[t];
  unsigned* o = out + 9 * t;
  o[0] = __ballot_sync(0xffffffffu, p);
  o[1] = unsigned(__any_sync(0xffffffffu, p));
  o[2] = unsigned(__all_sync(0xffffffffu, p));
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  o[3] = __ballot_sync(half, p);
  o[4] = unsigned(__any_sync(half, p));
  o[5] = unsigned(__all_sync(half, p));
  o[6] = __reduce_add_sync(0xffffffffu, unsigned(t));
  o[7] = __reduce_add_sync(half, unsigned(t));
  const int cnt = __syncthreads_count(p);
  const int all = __syncthreads_and(p);
  const int any = __syncthreads_or(p);
  o[8] = unsigned(cnt) | (unsigned(all) << 16) | (unsigned(any) << 17);
}

// Every thread of the grid updates the same words: the answers depend only on the set of threads.
__global__ void atomics_kernel(int* i, unsigned* u, unsigned long long* ull, float* f, double* d) {
  const int g = int(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(&i[0], 1);
  atomicMax(&i[1], g);
  atomicMin(&i[2], -g);
  atomicSub(&i[3], 2);
  atomicOr(&u[0], 1u << (g % 32));
  unsigned old = u[1], seen;
  do {  // CAS increment loop
    seen = old;
    old = atomicCAS(&u[1], seen, seen + 3u);
  } while (old != seen);
  atomicAdd(&ull[0], static_cast<unsigned long long>(g));
  atomicMax(&ull[1], static_cast<unsigned long long>(g) << 33);
  atomicExch(&u[2], 77u);
  atomicAdd(&f[0], 1.0f);  // exact while the count stays below 2^24
  atomicAdd(&d[0], 0.5);
}

// One warp: fragments gathered from row-major A (16x16), B (16x8, K x N), C (16x8) with the PTX
// ISA layout (see simt::mma_m16n8k16), D scattered back the same way.
template <class T>
__global__ void mma_kernel(const T* A, const T* B, const float* C, float* D) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  uint32_t a[4], b[2];
  float c[4], d[4];
  auto pack = [](T lo, T hi) {
    uint16_t l, h;
    memcpy(&l, &lo, 2);
    memcpy(&h, &hi, 2);
    return uint32_t(l) | (uint32_t(h) << 16);
  };
  for (int r = 0; r < 4; ++r) {
    const int row = g + ((r & 1) ? 8 : 0), col = 2 * t + ((r & 2) ? 8 : 0);
    a[r] = pack(A[row * 16 + col], A[row * 16 + col + 1]);
  }
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * t + (r ? 8 : 0);
    b[r] = pack(B[k * 8 + g], B[(k + 1) * 8 + g]);
  }
  for (int i = 0; i < 4; ++i) c[i] = C[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)];
  simt::mma_m16n8k16<T>(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = d[i];
}

// The usual tensor-core pairing: A row-major in shared memory through ldmatrix.x4, B (K x N,
// row-major) through ldmatrix.x2.trans; D = A B + 0.
template <class T>
__global__ void mma_ldmatrix_kernel(const T* A, const T* B, float* D) {
  __shared__ __align__(16) T sa[16 * 16];
  __shared__ __align__(16) T sb[16 * 8];
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  for (int i = lane; i < 256; i += 32) sa[i] = A[i];
  for (int i = lane; i < 128; i += 32) sb[i] = B[i];
  __syncwarp();
  uint32_t a[4], b[2];
  simt::ldmatrix<4>(a, &sa[(lane % 16) * 16 + (lane / 16) * 8]);
  simt::ldmatrix<2, true>(b, &sb[(lane % 16) * 8]);
  float c[4] = {0.f, 0.f, 0.f, 0.f}, d[4];
  simt::mma_m16n8k16<T>(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = d[i];
}

// One warp, integer tensor core: fragments gathered from row-major A (16x32 s8), B (32x8 s8, K x N),
// C (16x8 s32) with the PTX ISA layout (see simt::mma_m16n8k32_s8), D scattered back the same way.
__global__ void mma_s8_kernel(const int8_t* A, const int8_t* B, const int32_t* C, int32_t* D) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  uint32_t a[4], b[2];
  int32_t c[4], d[4];
  auto pack = [](const int8_t* p, int stride) {
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r |= uint32_t(uint8_t(p[i * stride])) << (8 * i);
    return r;
  };
  for (int r = 0; r < 4; ++r) a[r] = pack(&A[(g + 8 * (r & 1)) * 32 + 4 * t + 16 * (r >> 1)], 1);
  for (int r = 0; r < 2; ++r) b[r] = pack(&B[(4 * t + 16 * r) * 8 + g], 8);
  for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  simt::mma_m16n8k32_s8(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
}

// The pairing the svdquant kernel uses: A (16x32 bytes, row-major) through ldmatrix.x4 and B given
// K-major (8 rows of n, 32 bytes of k each) through ldmatrix.x2, both in shared memory; D = A Bᵀ + 0.
__global__ void mma_s8_ldmatrix_kernel(const int8_t* A, const int8_t* Bt, int32_t* D) {
  __shared__ __align__(16) int8_t sa[16 * 32];
  __shared__ __align__(16) int8_t sb[8 * 32];
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  for (int i = lane; i < 512; i += 32) sa[i] = A[i];
  for (int i = lane; i < 256; i += 32) sb[i] = Bt[i];
  __syncwarp();
  uint32_t a[4], b[2];
  // x4: matrices (rows 0-7 | 8-15) x (k 0-15 | 16-31); x2: (k 0-15 | 16-31) of rows n 0-7
  simt::ldmatrix<4>(a, &sa[((lane & 7) + 8 * ((lane >> 3) & 1)) * 32 + 16 * (lane >> 4)]);
  simt::ldmatrix<2>(b, &sb[(lane & 7) * 32 + 16 * ((lane >> 3) & 1)]);
  const int32_t c[4] = {0, 0, 0, 0};
  int32_t d[4];
  simt::mma_m16n8k32_s8(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
}

// ldmatrix.xN(.trans) of N row-major 8x8 b16 matrices; out[lane * N + i] = register i of lane.
template <int N, bool Trans>
__global__ void ldmatrix_kernel(const uint16_t* src, uint32_t* out) {
  __shared__ __align__(16) uint16_t s[4 * 64];
  const int lane = threadIdx.x;
  for (int i = lane; i < N * 64; i += 32) s[i] = src[i];
  __syncwarp();
  uint32_t r[N];
  simt::ldmatrix<N, Trans>(r, &s[(lane % (8 * N)) * 8]);
  for (int i = 0; i < N; ++i) out[lane * N + i] = r[i];
}

// ---- faults the simulator must report (each test expects a RuntimeError with a given text)
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}
__global__ void deadlock_shfl_kernel(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0xffffffffu, int(threadIdx.x), 0);
}
__global__ void mismatch_kernel(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0xffffffffu, int(threadIdx.x), 0);
  else out[threadIdx.x] = int(__ballot_sync(0xffffffffu, 1));
}
__global__ void barrier_vs_warp_kernel(int* out) {
  if (threadIdx.x == 5) __syncthreads();
  out[threadIdx.x] = __shfl_sync(0xffffffffu, int(threadIdx.x), 0);
  if (threadIdx.x != 5) __syncthreads();
}
__global__ void trap_kernel(int block, int thread, int use_assert) {
  if (int(blockIdx.x) == block && int(threadIdx.x) == thread) {
    if (use_assert) assert(threadIdx.x != unsigned(thread));
    else __trap();
  }
}
__global__ void spin_forever_kernel(int* flag) {
  while (*static_cast<volatile int*>(flag) == 0) __nanosleep(100);
}

// ---- scheduling
// Deterministic: block sum through shared memory + barriers + a warp shuffle; per-thread output
// also depends on neighbours' values, so a missing barrier would show up.
__global__ void reduce_kernel(const int* in, int* out) {
  __shared__ int s[256];
  const int t = threadIdx.x, n = blockDim.x;
  const int v = in[blockIdx.x * n + t];
  s[t] = v;
  __syncthreads();
  const int neighbour = s[(t + 1) % n];
  __syncthreads();
  for (int stride = n / 2; stride >= 32; stride /= 2) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  int x = t < 32 ? s[t] : 0;
  if (t < 32)
    for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  out[blockIdx.x * n + t] = neighbour * 3 + (t == 0 ? x : 0);
}
// The same neighbour exchange with the barrier removed when sync == 0 (a deliberate race).
__global__ void racy_kernel(int sync, int* out) {
  __shared__ int s[256];
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = -1;
  __syncthreads();
  s[t] = t + 1;
  if (sync) __syncthreads();
  out[t] = s[(t + 1) % n];
}
// Intra-block producer/consumer through a shared flag: the waiting thread yields in __nanosleep.
__global__ void nanosleep_kernel(int* out) {
  __shared__ volatile int flag;
  __shared__ int value;
  const int t = threadIdx.x;
  if (t == 0) flag = 0;
  __syncthreads();
  if (t == 0) {
    while (flag == 0) __nanosleep(32);
    out[0] = value;
  } else if (t == int(blockDim.x) - 1) {
    value = 4242;
    __threadfence_block();
    flag = 1;
  }
}

// ---- memory and indices
__global__ void dynsmem_kernel(float* out) {
  SIMT_DYNAMIC_SHARED(float, buf);
  const int t = threadIdx.x, n = blockDim.x;
  out[t] = buf[t];  // before any write: the simulator's poison (NaN)
  __syncthreads();
  buf[t] = float(t);
  __syncthreads();
  out[n + t] = buf[n - 1 - t];
}
__global__ void index_kernel(int* out) {
  const int bl = int(blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
  const int tl = int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  int* o = out + 12 * (bl * int(blockDim.x * blockDim.y * blockDim.z) + tl);
  o[0] = int(threadIdx.x); o[1] = int(threadIdx.y); o[2] = int(threadIdx.z);
  o[3] = int(blockIdx.x); o[4] = int(blockIdx.y); o[5] = int(blockIdx.z);
  o[6] = int(blockDim.x); o[7] = int(blockDim.y); o[8] = int(blockDim.z);
  o[9] = int(gridDim.x); o[10] = int(gridDim.y); o[11] = int(gridDim.z);
}
__global__ void cp_async_kernel(const uint4* src, uint4* dst) {
  __shared__ uint4 s[64];
  const int t = threadIdx.x;
  simt::cp_async16(&s[t], &src[t]);
  simt::cp_async_commit();
  simt::cp_async_wait<0>();
  __syncthreads();
  dst[t] = s[63 - t];
}

// ---- numerics and bit tricks
__global__ void convert_kernel(const float* in, uint16_t* f16, uint16_t* bf16, float* back, int n) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  const __half h = __float2half_rn(in[i]);
  const __nv_bfloat16 b = __float2bfloat16_rn(in[i]);
  f16[i] = __half_as_ushort(h);
  bf16[i] = __bfloat16_as_ushort(b);
  back[2 * i] = __half2float(h);
  back[2 * i + 1] = __bfloat162float(b);
}
__global__ void bits_kernel(const uint32_t* a, const uint32_t* b, const uint32_t* c, uint32_t* out, int n) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  uint32_t* o = out + 6 * i;
  o[0] = simt::lop3<0x96>(a[i], b[i], c[i]);  // a ^ b ^ c
  o[1] = simt::lop3<0xE8>(a[i], b[i], c[i]);  // majority
  o[2] = simt::lop3<0xCA>(a[i], b[i], c[i]);  // a ? b : c, bitwise
  o[3] = simt::prmt(a[i], b[i], 0x5140u);     // interleave low bytes of a and b
  o[4] = simt::prmt(a[i], b[i], c[i] & 0xffffu);
  o[5] = simt::prmt(a[i], b[i], 0x8888u | 0x0000u);  // sign-replicate byte 0 of a
}

__global__ void empty_kernel() {}

// A thread with a large local array (kDeepStackInts * 4 = 32 KiB of stack frame): legal on a GPU
// (local memory), more than a small simulator fiber stack. With local[i] = 3 i + g (g the global
// thread index), out[g] = sum over i < n of local[(7 i) % n].
constexpr int kDeepStackInts = 8192;
__global__ void deep_stack_kernel(int* out, int n) {
  volatile int local[kDeepStackInts];
  const int g = int(blockIdx.x * blockDim.x + threadIdx.x);
  for (int i = 0; i < n; ++i) local[i] = 3 * i + g;
  int s = 0;
  for (int i = 0; i < n; ++i) s += local[(7 * i) % n];
  out[g] = s;
}

// 16 KiB of static shared memory next to the dynamic shared memory: the per-block launch limit
// counts both. out[t] = s[4095 - t] + dyn[n - 1 - t] with s[i] = i, dyn[t] = 2 t. Two instances:
// OptIn = 0 is never given an opt-in (the attribute is per kernel and persists), OptIn = 1 is.
template <int OptIn>
__global__ void static_smem_kernel(float* out) {
  __shared__ float s[4096];
  SIMT_DYNAMIC_SHARED(float, dyn);
  const int t = int(threadIdx.x), n = int(blockDim.x);
  for (int i = t; i < 4096; i += n) s[i] = float(i);
  dyn[t] = float(2 * t);
  __syncthreads();
  out[t] = s[4095 - t] + dyn[n - 1 - t];
}

// Writes one element past the end of `out` (n elements): only run under the sanitizer build,
// which must report a heap-buffer-overflow at this line.
__global__ void oob_write_kernel(int* out, int n) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i == n - 1) out[i + 1] = 7;
}

}  // namespace lowbit::simt_tests
