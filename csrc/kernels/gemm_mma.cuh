// csrc/kernels/gemm_mma.cuh — the gemm family's tensor-core kernel (sm_80 mma.m16n8k16): the
// forward product for M > 8 with bf16/fp16 x, and the lowrank family's fused down-projection.
// The SIMT kernels (GEMV, backward), the low-rank epilogue LrEpi and the weight figures the
// rooflines below use: csrc/kernels/gemm.cuh. Launcher: csrc/launch/gemm.inl (mma_launch).
#pragma once
#include <cstring>
#include <type_traits>

#include "kernels/gemm.cuh"

namespace lowbit::kernels {
namespace gemm_k {

// ============================================================================ gemm_mma_kernel
// CTA tile 64 (M) × 64 (N) × 64 (K), 4 warps as 2 × 2, warp tile 32 × 32 = 2 m16 × 4 n8 mma tiles.
// 3-stage cp.async pipeline (cp.async.cg: x and codes are streamed, L1 is of no use) holding per
// stage: the x tile (8 KB, 16-byte chunks XOR-swizzled by row so that ldmatrix.x4 reads 8 rows of
// a 128-byte-stride tile without bank conflicts), the codes of 64 rows × 64 k (2 KB 4-bit, 1 KB
// 2-bit) in the canonical layout, and the 64 × 2 decoded per-32-group scales and zeros (the double
// quant decode happens here, once per (n, 32-group), not per weight).
//
// Weight decode in registers, exact: the mma's B operand holds *unscaled* code values, and the
// fp32 scale multiplies a per-32-group fp32 partial accumulator (so no scale is ever rounded to 16
// bits; the error is that of fp32 accumulation, as the tests demand):
//   int4/int2  B = q: the 0x6400 magic-number trick — one lop3 puts the two nibbles (crumbs) of a
//              byte into the mantissas of a half2 1024 + q (bf16: 0x4300, 128 + q), one __hadd2
//              of −1024 (−128) leaves q exactly. The zero point is applied as y += s·(x·q − z·Σx),
//              Σx per row and group coming from one extra mma with B = 1 per m16 tile (shared by
//              the 4 n8 tiles: +12.5% tensor work for int formats).
//   fp4        B = 12·v ∈ {0, .0625, 2, 3, 4, 6, 8, 12}: exact in bf16/fp16; the 1/12 is folded
//              into the fp32 scale.
//   nf4        B = table value, not representable in 16 bits: split into planes that sum to it
//              exactly — bf16: 3 planes (8+8+8 bits), fp16: 2 planes of 1024·v (11+11 bits, the
//              1024 keeps the low plane out of fp16 subnormals; 2^-10 goes into the scale). Each
//              plane is one more mma: nf4 costs 3× (bf16) / 2× (fp16) the tensor work of int4.
//   Table formats decode a whole byte (two codes) with one 32-bit shared-memory load from a
//   256-entry pair table per plane (≤ 3 KB), the register pair exactly as the B fragment wants it.
// Fused low-rank down-projection (RP > 0, lowrank family): each stage also holds RP rows of A
//   (RP·128 B, swizzled like x; rows ≥ r zero-filled); per k16 step the two warps of a row half
//   each take RP/2 columns of xa = x · Aᵀ, with A's rows as the B operand (one ldmatrix per two n8
//   tiles, no decode) and the x fragments already loaded: RP/8 extra mma per warp and k16 step
//   against 8·planes (+2) for the weight — r/64 of a one-plane main loop. After the loop the halves
//   meet in the freed stage memory as a 64 × RP fp32 tile, which feeds the up-projection; the CTA
//   of column tile 0 stores it (rounded) as the xa output. Each CTA of a row block computes the
//   same xa (same instructions, same data): redundant tensor work instead of a second launch or
//   atomics. Registers: RP/2 more fp32 accumulators; RP = 64 uses 244-254 of the 255 (no spills),
//   hence r ≤ 64. Smem per stage + RP·128 B: RP = 64 needs the opt-in (57 KB with 3 stages).
// B fragment from the canonical layout: lane (g = lane/4, t = lane%4) needs W[n0+g][k0+2t, 2t+1]
// and [k0+2t+8, 2t+9] = two bytes of the row (4-bit), i.e. the canonical layout already puts each
// register's pair in one byte; a fragment-order repack would only turn two byte loads into one
// 32-bit load per 4 k16 steps (shared-memory instruction count, not bandwidth).
//
// Roofline (4096×4096, block 64): tensor work 2·M·N·K; weight bytes 9.4 MB once per 64-row M tile
// (from L2 after the first), x bytes M·K·2 per 64-column N tile (from L2).
//   M = 16: 0.54 GFLOP; HBM 9.4 MB → 2.8 µs; mma at ≈ 990 TFLOP/s → 0.5 µs (×4 for the M padding to
//           64 rows, ×3 for nf4-bf16 planes: 6 µs!). int4/fp4: ≈ 2-2.5 µs tensor, ≈ 70-80% of HBM
//           bandwidth expected; nf4-bf16 is tensor-bound (≈ 45% of bandwidth); nf4-fp16 ≈ 60%.
//   M = 64: tile fully used; int4/fp4 ≈ 2.2 GFLOP → 2.2 µs tensor vs 2.8 µs HBM: balanced, ≈ 70%
//           of bandwidth expected if the pipeline hides latency; nf4-bf16 ≈ 6.6 µs (≈ 40%).
//   Large M (≥ 1024): compute-bound. Per k16 step a warp issues 8 mma (×planes, +2 for int) against
//           2 ldmatrix.x4, 8 byte loads + 8 decode (lop3 + hadd2, or 1 lds per plane), and every 2
//           steps 32 FMAs of scale application. Expected tensor-pipe utilisation ≈ 40-55% of the
//           990 TFLOP/s (int4/fp4), the SIMT decode and the per-group scale FMAs being the limit; a
//           128×128 CTA tile with fragment-order weights (Marlin) is the next step, not done here.
constexpr int kMmaThreads = 128;
constexpr int kBM = 64, kBN = 64, kBK = 64, kStages = 3;
constexpr int kGroupsPerTile = kBK / 32;
static_assert(kBN * kGroupsPerTile == kMmaThreads, "one thread stages one (n, 32-group) scale per k-tile");

// RP: width of the fused down-projection (r padded to 16, 32 or 64), 0 without (see LrEpi).
template <Fmt F, class T, int RP = 0>
struct MmaCfg {
  static constexpr int kBits = fmt_bits(F);
  static constexpr bool kInt = !fmt_is_table(F);
  static constexpr int kPlanes = F == Fmt::nf4 ? (std::is_same<T, __nv_bfloat16>::value ? 3 : 2) : 1;
  // Table values are scaled by kPre before the 16-bit split; the scale gets 1 / kPre.
  static constexpr float kPre = F == Fmt::fp4 ? 12.0f : (F == Fmt::nf4 && kPlanes == 2 ? 1024.0f : 1.0f);
  static constexpr int kRowBytes = kBK * kBits / 8;           // codes of one row per k-tile: 32 / 16
  static constexpr int kABytes = kBM * kBK * 2;               // 8192
  static constexpr int kBBytes = kBN * kRowBytes;             // 2048 / 1024
  static constexpr int kSBytes = 2 * kBN * kGroupsPerTile * 4;  // scales + zeros: 1024
  static constexpr int kLBytes = RP * kBK * 2;                // rows of A (fused down-projection): 0 / 2 / 4 / 8 KB
  static constexpr int kStageBytes = kABytes + kBBytes + kSBytes + kLBytes;
  static constexpr int kXaLd = RP + 4;                        // fp32 xa tile after the main loop (reuses the stages)
  static constexpr int kSmem = kStages * kStageBytes > kBM * kXaLd * 4 ? kStages * kStageBytes : kBM * kXaLd * 4;
  // the kernel's static __shared__ (s_lut: one 256-entry table per decode plane) counts against the same
  // per-block limit as the dynamic kSmem (48 KiB without the opt-in)
  static constexpr int kStaticSmem = (kInt ? 1 : kPlanes) * 256 * 4;
  // 16-bit images of 1.0 and of the magic bias
  static constexpr uint32_t kOne = std::is_same<T, __half>::value ? 0x3C003C00u : 0x3F803F80u;
  static constexpr uint32_t kMagic = std::is_same<T, __half>::value ? 0x64006400u : 0x43004300u;   // 1024 | 128
  static constexpr uint32_t kNegMagic = std::is_same<T, __half>::value ? 0xE400E400u : 0xC300C300u;  // −1024 | −128
};

template <class T>
SIMT_DEVICE uint32_t hadd2_bits(uint32_t a, uint32_t b) {
  if constexpr (std::is_same<T, __half>::value) {
    __half2 x, y, r;
    memcpy(&x, &a, 4); memcpy(&y, &b, 4);
    r = __hadd2(x, y);
    uint32_t u; memcpy(&u, &r, 4);
    return u;
  } else {
    __nv_bfloat162 x, y, r;
    memcpy(&x, &a, 4); memcpy(&y, &b, 4);
    r = __hadd2(x, y);
    uint32_t u; memcpy(&u, &r, 4);
    return u;
  }
}

// Two codes (`pair`: 4-bit formats a byte, int2 a nibble; the first element in the high bits) →
// B register {first, second} as two 16-bit q, exactly, via the magic-number trick.
template <Fmt F, class T>
SIMT_DEVICE uint32_t decode_int_pair(uint32_t pair) {
  using C = MmaCfg<F, T>;
  constexpr int kB = fmt_bits(F);
  constexpr uint32_t kMask = kB == 4 ? 0x000F000Fu : 0x00030003u;
  const uint32_t w = (pair >> kB) | (pair << 16);               // first code in bits 0.., second in 16..
  const uint32_t biased = simt::lop3<(0xF0 & 0xCC) | 0xAA>(w, kMask, C::kMagic);  // (w & mask) | magic
  return hadd2_bits<T>(biased, C::kNegMagic);
}

template <Fmt F, class T, int RP>
__global__ void __launch_bounds__(kMmaThreads, 2) gemm_mma_kernel(GemmParams p, LrEpi lr) {
  using C = MmaCfg<F, T, RP>;
  static_assert(RP == 0 || RP == 16 || RP == 32 || RP == 64, "fused down-projection width");
  constexpr int kNd = RP / 16;  // n8 tiles of xa per warp: warps wn = 0 / 1 take j < RP/2 / ≥ RP/2
  constexpr int kLutPlanes = C::kInt ? 1 : C::kPlanes;
  __shared__ uint32_t s_lut[kLutPlanes][256];
  static_assert(sizeof(s_lut) == C::kStaticSmem, "MmaCfg::kStaticSmem counts s_lut for the launch check");
  SIMT_DYNAMIC_SHARED(unsigned char, smem);

  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 1, wn = warp & 1, g = lane >> 2, t = lane & 3;
  const int64_t M = p.m, N = p.w.n, K = p.w.k;
  const int64_t m_base = int64_t(blockIdx.y) * kBM, n_base = int64_t(blockIdx.x) * kBN;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const uint8_t* __restrict__ codes = p.w.codes;
  const int64_t row_bytes = K * C::kBits / 8, bpr = K / p.w.block;
  const float post = 1.0f / C::kPre;  // exact for 1 and 1024; fl(1/12) for fp4

  if constexpr (!C::kInt) {  // pair tables: entry b = {plane(value of b >> 4), plane(value of b & 15)}
    for (int i = tid; i < 256; i += kMmaThreads) {
      float r0 = __fmul_rn((F == Fmt::nf4 ? c_nf4 : c_fp4)[i >> 4], C::kPre);
      float r1 = __fmul_rn((F == Fmt::nf4 ? c_nf4 : c_fp4)[i & 15], C::kPre);
#pragma unroll
      for (int pl = 0; pl < C::kPlanes; ++pl) {
        const uint32_t h0 = f32_to_b16<T>(r0), h1 = f32_to_b16<T>(r1);
        s_lut[pl][i] = h0 | (h1 << 16);
        r0 = __fsub_rn(r0, b16_to_f32<T>(h0));  // exact: the residual of a round-to-nearest
        r1 = __fsub_rn(r1, b16_to_f32<T>(h1));
      }
    }
  }  // published by the first __syncthreads of the main loop

  auto stage_a = [&](int st) { return smem + st * C::kStageBytes; };
  auto stage_b = [&](int st) { return smem + st * C::kStageBytes + C::kABytes; };
  auto stage_s = [&](int st) { return reinterpret_cast<float*>(smem + st * C::kStageBytes + C::kABytes + C::kBBytes); };
  auto stage_l = [&](int st) { return smem + st * C::kStageBytes + C::kABytes + C::kBBytes + C::kSBytes; };

  auto load_stage = [&](int st, int64_t kt) {
    const int64_t k0 = kt * kBK;
    unsigned char* as = stage_a(st);
    for (int i = tid; i < kBM * (kBK / 8); i += kMmaThreads) {  // x: 64 rows × 8 chunks of 16 B
      const int r = i >> 3, ch = i & 7;
      const int64_t m = m_base + r, kk = k0 + ch * 8;
      const bool ok = m < M && kk < K;
      simt::cp_async16_zfill(as + r * (kBK * 2) + ((ch ^ (r & 7)) << 4), ok ? x + m * K + kk : x, ok ? 16 : 0);
    }
    unsigned char* bs = stage_b(st);
    constexpr int kCh = C::kRowBytes / 16;  // 16-byte chunks per row: 2 (4-bit) / 1 (2-bit)
    for (int i = tid; i < kBN * kCh; i += kMmaThreads) {
      const int r = i / kCh, ch = i % kCh;
      const int64_t n = n_base + r;
      const bool ok = n < N && k0 + ch * (128 / C::kBits) < K;
      simt::cp_async16_zfill(bs + r * C::kRowBytes + ch * 16,
                             ok ? codes + n * row_bytes + k0 * C::kBits / 8 + ch * 16 : codes, ok ? 16 : 0);
    }
    {  // decoded scale (and zero) of (row tid / 2, 32-group tid % 2)
      const int r = tid >> 1, gi = tid & 1;
      const int64_t n = n_base + r, kg = k0 + 32 * gi;
      float s = 0.0f, z = 0.0f;
      if (n < N && kg < K) {
        const int64_t b = n * bpr + kg / p.w.block;
        s = __fmul_rn(block_scale(p.w, b), post);
        if constexpr (C::kInt) z = __ldg(p.w.zero + b);
      }
      float* ss = stage_s(st);
      ss[r * kGroupsPerTile + gi] = s;
      ss[kBN * kGroupsPerTile + r * kGroupsPerTile + gi] = z;
    }
    if constexpr (RP > 0) {  // A: RP rows × 8 chunks of 16 B, swizzled like x; rows ≥ r are zeros
      const T* __restrict__ am = static_cast<const T*>(lr.a);
      unsigned char* ls = stage_l(st);
      for (int i = tid; i < RP * (kBK / 8); i += kMmaThreads) {
        const int j = i >> 3, ch = i & 7;
        const int64_t kk = k0 + ch * 8;
        const bool ok = j < lr.r && kk < K;
        simt::cp_async16_zfill(ls + j * (kBK * 2) + ((ch ^ (j & 7)) << 4), ok ? am + j * K + kk : am, ok ? 16 : 0);
      }
    }
  };

  float acc[2][4][4], cb[2][4][4], rs[2][4];
  float xd[2][kNd > 0 ? kNd : 1][4];  // fused down-projection: rows of this warp × its n8 tiles of j
#pragma unroll
  for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = cb[mi][ni][e] = 0.0f;
#pragma unroll
    for (int e = 0; e < 4; ++e) rs[mi][e] = 0.0f;
#pragma unroll
    for (int jt = 0; jt < (kNd > 0 ? kNd : 1); ++jt)
#pragma unroll
      for (int e = 0; e < 4; ++e) xd[mi][jt][e] = 0.0f;
  }
  const uint32_t ones[2] = {C::kOne, C::kOne};

  const int64_t KT = (K + kBK - 1) / kBK;
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < KT) load_stage(st, st);
    simt::cp_async_commit();
  }
  for (int64_t kt = 0; kt < KT; ++kt) {
    simt::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed for every thread; stage kt - 1 is free for the prefetch
    if (kt + kStages - 1 < KT) load_stage(int((kt + kStages - 1) % kStages), kt + kStages - 1);
    simt::cp_async_commit();

    const int st = int(kt % kStages);
    const unsigned char* as = stage_a(st);
    const unsigned char* bs = stage_b(st);
    const float* ss = stage_s(st);
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      uint32_t a[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {  // ldmatrix.x4: matrices (rows 0-7 | 8-15) × (k 0-7 | 8-15)
        const int r = wm * 32 + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int ch = ks * 2 + (lane >> 4);
        simt::ldmatrix<4>(a[mi], as + r * (kBK * 2) + ((ch ^ (r & 7)) << 4));
      }
      if constexpr (RP > 0) {  // xa += x · Aᵀ: A rows are the B operand (k-contiguous, as ldmatrix gives it)
        const unsigned char* ls = stage_l(st);
        const int ch = ks * 2 + ((lane >> 3) & 1);
        if constexpr (kNd == 1) {
          uint32_t bl[2];
          const int j = wn * (RP / 2) + (lane & 7);
          simt::ldmatrix<2>(bl, ls + j * (kBK * 2) + ((ch ^ (j & 7)) << 4));
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) simt::mma_m16n8k16<T>(xd[mi][0], a[mi], bl, xd[mi][0]);
        } else {
#pragma unroll
          for (int jt = 0; jt < kNd; jt += 2) {  // x4: (j tile jt | jt + 1) × (k 0-7 | 8-15)
            uint32_t bl[4];
            const int j = wn * (RP / 2) + jt * 8 + ((lane >> 4) << 3) + (lane & 7);
            simt::ldmatrix<4>(bl, ls + j * (kBK * 2) + ((ch ^ (j & 7)) << 4));
            const uint32_t b0[2] = {bl[0], bl[1]}, b1[2] = {bl[2], bl[3]};
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
              simt::mma_m16n8k16<T>(xd[mi][jt], a[mi], b0, xd[mi][jt]);
              simt::mma_m16n8k16<T>(xd[mi][jt + 1], a[mi], b1, xd[mi][jt + 1]);
            }
          }
        }
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const unsigned char* cr = bs + (wn * 32 + ni * 8 + g) * C::kRowBytes;
        uint32_t p0, p1;  // codes of k = 2t, 2t+1 and 2t+8, 2t+9 of this k16 step
        if constexpr (C::kBits == 4) {
          p0 = cr[ks * 8 + t];
          p1 = cr[ks * 8 + t + 4];
        } else {
          const int sh = (t & 1) ? 0 : 4;
          p0 = (uint32_t(cr[ks * 4 + (t >> 1)]) >> sh) & 15u;
          p1 = (uint32_t(cr[ks * 4 + 2 + (t >> 1)]) >> sh) & 15u;
        }
#pragma unroll
        for (int pl = 0; pl < C::kPlanes; ++pl) {
          uint32_t b[2];
          if constexpr (C::kInt) {
            b[0] = decode_int_pair<F, T>(p0);
            b[1] = decode_int_pair<F, T>(p1);
          } else {
            b[0] = s_lut[pl][p0];
            b[1] = s_lut[pl][p1];
          }
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) simt::mma_m16n8k16<T>(cb[mi][ni], a[mi], b, cb[mi][ni]);
        }
      }
      if constexpr (C::kInt) {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) simt::mma_m16n8k16<T>(rs[mi], a[mi], ones, rs[mi]);  // Σx per row
      }
      if (ks & 1) {  // a 32-group is complete: acc += s · (Σ x·q − z · Σ x), per column
        const int gi = ks >> 1;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int col = wn * 32 + ni * 8 + 2 * t;
          const float s0 = ss[col * kGroupsPerTile + gi], s1 = ss[(col + 1) * kGroupsPerTile + gi];
          float z0 = 0.0f, z1 = 0.0f;
          if constexpr (C::kInt) {
            z0 = ss[kBN * kGroupsPerTile + col * kGroupsPerTile + gi];
            z1 = ss[kBN * kGroupsPerTile + (col + 1) * kGroupsPerTile + gi];
          }
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float s = (e & 1) ? s1 : s0;
              float v = cb[mi][ni][e];
              if constexpr (C::kInt) v = __fmaf_rn(-((e & 1) ? z1 : z0), rs[mi][e], v);
              acc[mi][ni][e] = __fmaf_rn(s, v, acc[mi][ni][e]);
              cb[mi][ni][e] = 0.0f;
            }
          }
        }
        if constexpr (C::kInt) {
#pragma unroll
          for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int e = 0; e < 4; ++e) rs[mi][e] = 0.0f;
        }
      }
    }
  }
  simt::cp_async_wait_all();

  // Fused down-projection: the two warps of a row half hold xa for half of j each; swap through
  // shared memory (the pipeline's, now free) as a 64 × RP fp32 tile; rows ≥ M and j ≥ r are zeros.
  float* s_xa = reinterpret_cast<float*>(smem);
  if constexpr (RP > 0) {
    __syncthreads();  // every warp is done with the last stage
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int jt = 0; jt < kNd; ++jt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s_xa[(wm * 32 + mi * 16 + g + 8 * (e >> 1)) * C::kXaLd + wn * (RP / 2) + jt * 8 + 2 * t + (e & 1)] = xd[mi][jt][e];
    __syncthreads();
    if (blockIdx.x == 0) {  // one CTA per row block stores xa (every CTA of the row computed the same bits)
      T* __restrict__ xo = static_cast<T*>(lr.xa_out);
      for (int i = tid; i < kBM * lr.r; i += kMmaThreads) {
        const int rl = i / lr.r, j = i % lr.r;
        if (m_base + rl < M) xo[(m_base + rl) * lr.r + j] = from_f32<T>(s_xa[rl * C::kXaLd + j]);
      }
    }
  }

  if (lr.r > 0) {  // low-rank up-projection on the tensor cores: cb (all zero here) += xa · Bᵀ
    // xa is fp32: split into 3 planes of T that sum to it (exact for bf16; fp16 to ~2^-33 relative
    // unless |xa| leaves the fp16 range), so the branch adds only fp32-accumulation error.
    const T* __restrict__ bm = static_cast<const T*>(lr.b);
    auto xa_at = [&](int64_t m, int j) {
      if constexpr (RP > 0) return s_xa[(m - m_base) * C::kXaLd + j];  // j < RP; zero for j ≥ r
      else return (m < M && j < lr.r) ? __ldg(lr.xa + m * lr.r + j) : 0.0f;
    };
    auto b_bits = [&](int64_t n, int j) -> uint32_t {
      if (n >= N || j >= lr.r) return 0u;
      T v = bm[n * lr.r + j];
      unsigned short u; memcpy(&u, &v, 2);
      return u;
    };
    for (int j0 = 0; j0 < lr.r; j0 += 16) {
      uint32_t a[2][3][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int64_t m_lo = m_base + wm * 32 + mi * 16 + g;
#pragma unroll
        for (int q = 0; q < 4; ++q) {  // a[q]: rows g (+8 for odd q), k pair 2t (+8 for q >= 2)
          const int64_t m = m_lo + 8 * (q & 1);
          const int j = j0 + 2 * t + 8 * (q >> 1);
          float v0 = xa_at(m, j), v1 = xa_at(m, j + 1);
#pragma unroll
          for (int pl = 0; pl < 3; ++pl) {
            const uint32_t h0 = f32_to_b16<T>(v0), h1 = f32_to_b16<T>(v1);
            a[mi][pl][q] = h0 | (h1 << 16);
            v0 = __fsub_rn(v0, b16_to_f32<T>(h0));
            v1 = __fsub_rn(v1, b16_to_f32<T>(h1));
          }
        }
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int64_t n = n_base + wn * 32 + ni * 8 + g;
        const int j = j0 + 2 * t;
        const uint32_t b[2] = {b_bits(n, j) | (b_bits(n, j + 1) << 16), b_bits(n, j + 8) | (b_bits(n, j + 9) << 16)};
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int pl = 0; pl < 3; ++pl) simt::mma_m16n8k16<T>(cb[mi][ni], a[mi][pl], b, cb[mi][ni]);
      }
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] = __fmaf_rn(lr.s, cb[mi][ni][e], acc[mi][ni][e]);
  }

  // Epilogue: C fragment rows g, g + 8, columns 2t, 2t + 1 of each tile; bias in fp32; one rounding.
  T* __restrict__ y = static_cast<T*>(p.y);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m_base + wm * 32 + mi * 16 + g + 8 * h;
        const int64_t n = n_base + wn * 32 + ni * 8 + 2 * t;
        if (m >= M) continue;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (n + e >= N) continue;
          float v = acc[mi][ni][2 * h + e];
          if (bias) v = __fadd_rn(v, to_f32(bias[n + e]));
          y[m * N + n + e] = from_f32<T>(v);
        }
      }
}

}  // namespace gemm_k
}  // namespace lowbit::kernels
