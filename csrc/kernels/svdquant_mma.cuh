// csrc/kernels/svdquant_mma.cuh — the svdquant family's fast CUDA kernels (include/lowbit/svdquant.h),
// behind the same entry points as the simplest correct ones (csrc/kernels/svdquant.cuh), which stay the
// reference and the fallback (csrc/launch/svdquant.inl says which runs when).
//
//   svdq_act_fused_kernel   one pass over x: smoothing, the 4-bit quantizer and the low-rank
//                           down-projection xs · L2ᵀ fused (Nunchaku's fusion: x is read once).
//   svdq_gemm_mma_kernel    the W4A4 product on the int8 tensor cores (mma.m16n8k32 .s8), exact int32
//                           per 64-group, the fp32 group scales, then the up-projection down · L1ᵀ and the
//                           bias in the epilogue.
//
// Why s8 m16n8k32 and not s4 m16n8k64: Hopper (sm_90, the H100/H200 this project is lent) has no 4-bit
// tensor cores (NVIDIA lists no INT4 rate for H100; Nunchaku refuses sm_90 for its INT4 path for this
// reason), so s4 mma there is no faster than s8; and qx arrives as int8 (the contract), so A goes from
// global to shared to fragments with no repacking. On sm_80/86/89 an s4 variant would double the
// tensor rate (it needs qx repacked to nibbles and the weight's nibble order swapped): not done here.
//
// Weight decode: the canonical packed weight (element 2i in the high nibble) is unpacked to s8 once per
// CTA and group, in shared memory (one 16-byte chunk of nibbles per thread: 2 shifts/masks, 2 sign
// extensions and 4 byte permutes per 4 bytes), so both operands then reach the mma through ldmatrix
// (b16, not transposed: lane L gets bytes 4(L%4)..+3 of row L/4 — exactly the s8 A and B fragments of
// the PTX ISA, "Matrix Fragments for mma.m16n8k32"). Decoding in registers per warp instead would
// repeat the work in each of the 2 warps that share a column block and need 16-bit loads at 4t
// offsets that ldmatrix cannot give.
//
// Numerics: the int32 group sums are exact (|Σ| ≤ 64 · 128 · 8 = 2^16, so their fp32 value is exact too);
// the fp32 part is y += (sx · sw) · acc per group (rounded products and sums in any order: the
// contract's "order free"), then Σ_j down·l1 and the bias in fp32, one rounding to the dtype.
#pragma once
#include "kernels/svdquant.cuh"

namespace lowbit::kernels {
namespace svdq_k {

// ============================================================================ svdq_act_fused_kernel
// CTA = 8 warps over a block of kActRows = 8 rows; warp w takes groups w, w + 8, ... of every row of
// the block (the split of K that keeps a decode step, M = 1, spread over 8 warps). Per (row, group) a
// warp quantizes exactly like svdq_act_kernel (two elements per lane, warp max / finiteness
// reductions, IEEE division: bit-identical codes and scales), parks the 64 fp32 xs in its own shared
// slice, then lane j (+ 32 i) accumulates Σ_c xs[row][c] · l2[j][c] over the group for the 8 rows
// (each l2 element loaded once, from L1/L2, used for 8 rows). After the K loop the 8 warps' partial
// sums meet in shared memory and are added in warp order (deterministic: the same bits under every
// schedule and on every device). JI = ⌈r / 32⌉ ∈ {0, 1, 2, 4, 8}: accumulators per lane = 8 · JI.
// Roofline: x read once (M·K·size), qx written (M·K), l2 read once per CTA (r·K·size per 8 rows, from
// L2); 2·M·r·K fp32 flops on the CUDA cores — ≈ r/64 of the W4A4 GEMM's int8 work at N = K (small
// next to it for r ≤ 64), no tensor cores.
constexpr int kActThreads = 256;
constexpr int kActWarps = kActThreads / 32;
constexpr int kActRows = 8;

template <class T, int JI>
__global__ void __launch_bounds__(kActThreads) svdq_act_fused_kernel(SvdquantActParams p, int l2_vec) {
  static_assert(JI == 0 || JI == 1 || JI == 2 || JI == 4 || JI == 8, "JI = ceil(r / 32), r <= 256");
  constexpr int kJ = JI > 0 ? JI : 1;
  constexpr int kXsRows = JI > 0 ? kActRows : 1;  // no xs staging without a branch
  __shared__ __align__(16) float s_xs[kActWarps][kXsRows][kSvdqGroup];
  __shared__ float s_red[kActWarps][kXsRows][32];

  const T* __restrict__ X = static_cast<const T*>(p.x);
  const T* __restrict__ L2 = static_cast<const T*>(p.l2);
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int64_t groups = p.k / kSvdqGroup, blocks = (p.m + kActRows - 1) / kActRows;

  for (int64_t rb = blockIdx.x; rb < blocks; rb += gridDim.x) {  // uniform per CTA: barriers are safe
    const int64_t row0 = rb * kActRows;
    const int rows = int(p.m - row0 < kActRows ? p.m - row0 : kActRows);
    float acc[kActRows][kJ];
#pragma unroll
    for (int i = 0; i < kActRows; ++i)
#pragma unroll
      for (int ji = 0; ji < kJ; ++ji) acc[i][ji] = 0.0f;

    for (int64_t g = warp; g < groups; g += kActWarps) {
      const int64_t c = g * kSvdqGroup + 2 * lane;
      const float is0 = p.inv_smooth ? p.inv_smooth[c] : 1.0f, is1 = p.inv_smooth ? p.inv_smooth[c + 1] : 1.0f;
#pragma unroll 1
      for (int i = 0; i < rows; ++i) {  // warp-uniform; not unrolled: 8 rows of loads in flight would spill
        const int64_t row = row0 + i;
        float v0 = to_f32(X[row * p.k + c]), v1 = to_f32(X[row * p.k + c + 1]);
        if (p.inv_smooth) {
          v0 = __fmul_rn(v0, is0);
          v1 = __fmul_rn(v1, is1);
        }
        const float s = svdq_quantize_warp(v0, v1, p.qx + row * p.k + c);  // the header's rule
        if (lane == 0) p.sx[row * groups + g] = s;
        if constexpr (JI > 0) {
          s_xs[warp][i][2 * lane] = v0;
          s_xs[warp][i][2 * lane + 1] = v1;
        }
      }
      if constexpr (JI > 0) {
        __syncwarp();  // the warp's xs slice is complete
#pragma unroll
        for (int ji = 0; ji < JI; ++ji) {
          const int j = lane + 32 * ji;
          if (j >= p.r) continue;
          const T* __restrict__ lp = L2 + int64_t(j) * p.k + g * kSvdqGroup;
          for (int c8 = 0; c8 < kSvdqGroup; c8 += 8) {
            float l[8];
            load8(lp + c8, l2_vec != 0, l);
#pragma unroll
            for (int i = 0; i < kActRows; ++i) {
              if (i >= rows) break;
              const float4 x0 = *reinterpret_cast<const float4*>(&s_xs[warp][i][c8]);
              const float4 x1 = *reinterpret_cast<const float4*>(&s_xs[warp][i][c8 + 4]);
              float a = acc[i][ji];
              a = __fmaf_rn(x0.x, l[0], a); a = __fmaf_rn(x0.y, l[1], a);
              a = __fmaf_rn(x0.z, l[2], a); a = __fmaf_rn(x0.w, l[3], a);
              a = __fmaf_rn(x1.x, l[4], a); a = __fmaf_rn(x1.y, l[5], a);
              a = __fmaf_rn(x1.z, l[6], a); a = __fmaf_rn(x1.w, l[7], a);
              acc[i][ji] = a;
            }
          }
        }
        __syncwarp();  // every lane is done with the slice before the next group overwrites it
      }
    }

    if constexpr (JI > 0) {  // down[row][j] = Σ_w partial_w, in warp order
#pragma unroll
      for (int ji = 0; ji < JI; ++ji) {
#pragma unroll
        for (int i = 0; i < kActRows; ++i) s_red[warp][i][lane] = acc[i][ji];
        __syncthreads();
        const int i = warp, j = lane + 32 * ji;  // thread (warp, lane) sums row `warp`, column j
        if (i < rows && j < p.r) {
          float s = 0.0f;
#pragma unroll
          for (int w = 0; w < kActWarps; ++w) s = __fadd_rn(s, s_red[w][i][lane]);
          p.down[(row0 + i) * p.r + j] = s;
        }
        __syncthreads();
      }
    }
  }
}

// ============================================================================ svdq_gemm_mma_kernel
// CTA tile 64 (M) × 128 (N), 8 warps as 2 (M) × 4 (N), warp tile 32 × 32 = 2 m16 × 4 n8 tiles; the K
// loop takes one 64-group per step (two k32 mma steps), with a 3-stage cp.async pipeline (.cg: qx and
// qw are streamed) holding per stage the qx tile (64 rows × 64 B, 16-byte chunks XOR-swizzled so that
// ldmatrix reads 8 rows of the 64-byte-stride tile without bank conflicts), the packed qw tile (128 rows
// × 32 B) and the group's 64 sx and 128 sw. Per group: the qw tile is unpacked to s8 (swizzled like
// qx) by the whole CTA, each warp runs 2 × 8 mma into int32 accumulators that start at the bits of
// 1.5 · 2^23 (so they read as the fp32 1.5 · 2^23 + Σ: no I2F), then folds them into fp32:
// acc += (sx[m] · sw[n]) · (that − 1.5 · 2^23).
// Epilogue: down (64 × 32 fp32) and l1 (128 × 32 → fp32) chunks through shared memory (the freed
// pipeline), 32 FMAs per 12 vector loads per lane per 4 j; then the bias, one rounding, the store.
// Roofline and expected speed: docs/kernels.md, "CUDA svdquant".
constexpr int kThreads = 256;
constexpr int kBM = 64, kBN = 128, kStages = 3;
constexpr int kABytes = kBM * kSvdqGroup;       // 4096: s8 qx
constexpr int kBBytes = kBN * kSvdqGroup / 2;   // 4096: packed qw
constexpr int kSxOff = kABytes + kBBytes;
constexpr int kSwOff = kSxOff + kBM * 4;
constexpr int kStageBytes = kSwOff + kBN * 4;   // 8960
constexpr int kB8Off = kStages * kStageBytes;   // unpacked s8 qw tile (kBN × 64 B)
constexpr int kRJ = 32, kLd = kRJ + 4;          // low-rank chunk and its padded row (conflict-free float4)
constexpr int kPipeBytes = kB8Off + kBN * kSvdqGroup;
constexpr int kEpiBytes = (kBM + kBN) * kLd * 4;
constexpr int kSmem = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;  // 35072: no opt-in needed
static_assert(kStageBytes % 16 == 0 && kSmem <= 48 * 1024, "stage alignment; under the default 48 KiB");
static_assert(kBM * 4 == kThreads && kBN * 2 == kThreads, "one 16-byte qx chunk and one qw chunk per thread per stage");

constexpr int32_t kMagicBits = 0x4B400000;  // the bits of 1.5 · 2^23 (exact int → fp32 below 2^22)
constexpr float kMagic = 12582912.0f;        // 1.5 · 2^23

// Byte offset of 16-byte chunk `ch` (0..3) of row `r` in a tile of 64-byte rows: the XOR spreads the 8
// rows an ldmatrix reads over 8 distinct 16-byte bank groups.
SIMT_DEVICE int swz(int r, int ch) { return r * 64 + ((ch ^ ((r >> 1) & 3)) << 4); }

// 4 packed bytes (8 nibbles, element 2i in the high nibble of byte i) → 8 s8 in k order: lo = k 0..3,
// hi = k 4..7. Sign extension: a nibble v ≥ 8 becomes v | 0xF0 = v − 16; (n & 0x08080808) · 0x1F puts
// 0xF8 exactly on those bytes (no carries between bytes).
SIMT_DEVICE void unpack_s4x8(uint32_t w, uint32_t& lo, uint32_t& hi) {
  uint32_t e = (w >> 4) & 0x0F0F0F0Fu;  // elements 0, 2, 4, 6
  uint32_t o = w & 0x0F0F0F0Fu;         // elements 1, 3, 5, 7
  e |= (e & 0x08080808u) * 0x1Fu;
  o |= (o & 0x08080808u) * 0x1Fu;
  lo = simt::prmt(e, o, 0x5140u);  // {e0, o0, e1, o1}
  hi = simt::prmt(e, o, 0x7362u);  // {e2, o2, e3, o3}
}

template <class T>
__global__ void __launch_bounds__(kThreads, 2) svdq_gemm_mma_kernel(SvdquantGemmParams p) {
  SIMT_DYNAMIC_SHARED(unsigned char, smem);
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t = lane & 3;
  const int64_t M = p.m, N = p.n, K = p.k, G = K / kSvdqGroup;
  const int64_t m_base = int64_t(blockIdx.y) * kBM, n_base = int64_t(blockIdx.x) * kBN;

  auto stage = [&](int st) { return smem + st * kStageBytes; };
  auto load_stage = [&](int st, int64_t kt) {
    unsigned char* s = stage(st);
    {  // qx: 64 rows × 4 chunks
      const int r = tid >> 2, ch = tid & 3;
      const int64_t m = m_base + r;
      const bool ok = m < M;
      simt::cp_async16_zfill(s + swz(r, ch), ok ? p.qx + m * K + kt * kSvdqGroup + ch * 16 : p.qx, ok ? 16 : 0);
    }
    {  // qw: 128 rows × 2 chunks of packed nibbles
      const int r = tid >> 1, ch = tid & 1;
      const int64_t n = n_base + r;
      const bool ok = n < N;
      simt::cp_async16_zfill(s + kABytes + r * 32 + ch * 16, ok ? p.qw + n * (K / 2) + kt * 32 + ch * 16 : p.qw,
                             ok ? 16 : 0);
    }
    // the group's scales (strided in global memory: plain loads); rows / columns outside are 0
    if (tid < kBM) {
      const int64_t m = m_base + tid;
      reinterpret_cast<float*>(s + kSxOff)[tid] = m < M ? __ldg(p.sx + m * G + kt) : 0.0f;
    } else if (tid < kBM + kBN) {
      const int64_t n = n_base + (tid - kBM);
      reinterpret_cast<float*>(s + kSwOff)[tid - kBM] = n < N ? __ldg(p.sw + n * G + kt) : 0.0f;
    }
  };

  float acc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;

#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < G) load_stage(st, st);
    simt::cp_async_commit();
  }
  unsigned char* b8 = smem + kB8Off;
  for (int64_t kt = 0; kt < G; ++kt) {
    simt::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed for all; every warp is done with b8 and with stage kt - 1
    if (kt + kStages - 1 < G) load_stage(int((kt + kStages - 1) % kStages), kt + kStages - 1);
    simt::cp_async_commit();
    const unsigned char* s = stage(int(kt % kStages));

    {  // unpack the qw tile: thread → (row tid / 2, k half tid % 2) = 16 packed bytes → 2 s8 chunks
      const int r = tid >> 1, h = tid & 1;
      const uint4 v = *reinterpret_cast<const uint4*>(s + kABytes + r * 32 + h * 16);
      uint4 c0, c1;
      unpack_s4x8(v.x, c0.x, c0.y);
      unpack_s4x8(v.y, c0.z, c0.w);
      unpack_s4x8(v.z, c1.x, c1.y);
      unpack_s4x8(v.w, c1.z, c1.w);
      *reinterpret_cast<uint4*>(b8 + swz(r, 2 * h)) = c0;
      *reinterpret_cast<uint4*>(b8 + swz(r, 2 * h + 1)) = c1;
    }
    __syncthreads();  // b8 complete

    int32_t ic[2][4][4];
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      uint32_t a[2][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {  // x4: (rows 0-7 | 8-15) × (k 0-15 | 16-31) of this k32 step
        const int r = wm * 32 + mi * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        simt::ldmatrix<4>(a[mi], s + swz(r, 2 * ks + (lane >> 4)));
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {  // x4: (n tile 2np | 2np + 1) × (k 0-15 | 16-31)
        uint32_t q[4];
        const int r = wn * 32 + np * 16 + ((lane >> 4) << 3) + (lane & 7);
        simt::ldmatrix<4>(q, b8 + swz(r, 2 * ks + ((lane >> 3) & 1)));
        b[2 * np][0] = q[0];
        b[2 * np][1] = q[1];
        b[2 * np + 1][0] = q[2];
        b[2 * np + 1][1] = q[3];
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          if (ks == 0) {  // the group's accumulators start at the bits of 1.5 · 2^23 (see below)
            const int32_t bias[4] = {kMagicBits, kMagicBits, kMagicBits, kMagicBits};
            simt::mma_m16n8k32_s8(ic[mi][ni], a[mi], b[ni], bias);
          } else {
            simt::mma_m16n8k32_s8(ic[mi][ni], a[mi], b[ni], ic[mi][ni]);
          }
        }
    }

    // the group is complete: acc += (sx · sw) · Σ. int → fp32 without I2F (a conversion runs at 16 per
    // clock per SM on sm_80-90, an eighth of the FP32 rate: 1024 per warp and group would cost 4× the
    // group's tensor time): the mma accumulated Σ onto the bits of 1.5 · 2^23 (no int32 overflow:
    // 0x4B400000 + 2^16 < 2^31), which read as fp32 are 1.5 · 2^23 + Σ exactly (|Σ| ≤ 2^16 < 2^22 keeps
    // it in [2^23, 2^24), where the ulp is 1); one exact FADD leaves Σ.
    const float* sxs = reinterpret_cast<const float*>(s + kSxOff);
    const float* sws = reinterpret_cast<const float*>(s + kSwOff);
    float sxv[2][2], swv[4][2];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) sxv[mi][h] = sxs[wm * 32 + mi * 16 + g + 8 * h];
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) swv[ni][e] = sws[wn * 32 + ni * 8 + 2 * t + e];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float v = __fsub_rn(__int_as_float(ic[mi][ni][e]), kMagic);  // == Σ, exact
          acc[mi][ni][e] = __fmaf_rn(__fmul_rn(sxv[mi][e >> 1], swv[ni][e & 1]), v, acc[mi][ni][e]);
        }
  }
  simt::cp_async_wait_all();

  // Up-projection: acc += down · l1ᵀ, 32 j at a time through shared memory (zeros outside M, N, r).
  if (p.r > 0) {
    const T* __restrict__ L1 = static_cast<const T*>(p.l1);
    float* s_dn = reinterpret_cast<float*>(smem);  // [kBM][kLd]
    float* s_l1 = s_dn + kBM * kLd;                // [kBN][kLd]
    for (int j0 = 0; j0 < p.r; j0 += kRJ) {
      __syncthreads();  // the pipeline (first chunk) or the previous chunk is no longer read
      for (int i = tid; i < kBM * kRJ; i += kThreads) {
        const int rl = i / kRJ, jj = i % kRJ;
        const int64_t m = m_base + rl;
        const int j = j0 + jj;
        s_dn[rl * kLd + jj] = (m < M && j < p.r) ? __ldg(p.down + m * p.r + j) : 0.0f;
      }
      for (int i = tid; i < kBN * kRJ; i += kThreads) {
        const int nl = i / kRJ, jj = i % kRJ;
        const int64_t n = n_base + nl;
        const int j = j0 + jj;
        s_l1[nl * kLd + jj] = (n < N && j < p.r) ? to_f32(L1[n * p.r + j]) : 0.0f;
      }
      __syncthreads();
      const int jn = p.r - j0 < kRJ ? p.r - j0 : kRJ;
      for (int jj = 0; jj < jn; jj += 4) {
        float4 dv[2][2], lv[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            dv[mi][h] = *reinterpret_cast<const float4*>(&s_dn[(wm * 32 + mi * 16 + g + 8 * h) * kLd + jj]);
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            lv[ni][e] = *reinterpret_cast<const float4*>(&s_l1[(wn * 32 + ni * 8 + 2 * t + e) * kLd + jj]);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float4 d = dv[mi][e >> 1], l = lv[ni][e & 1];
              float v = acc[mi][ni][e];
              v = __fmaf_rn(d.x, l.x, v);
              v = __fmaf_rn(d.y, l.y, v);
              v = __fmaf_rn(d.z, l.z, v);
              v = __fmaf_rn(d.w, l.w, v);
              acc[mi][ni][e] = v;
            }
      }
    }
  }

  // Epilogue: C fragment rows g, g + 8 and columns 2t, 2t + 1 of each tile; bias in fp32; one rounding.
  T* __restrict__ Y = static_cast<T*>(p.y);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m_base + wm * 32 + mi * 16 + g + 8 * h;
      if (m >= M) continue;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t n = n_base + wn * 32 + ni * 8 + 2 * t + e;
          if (n >= N) continue;
          float v = acc[mi][ni][2 * h + e];
          if (bias) v = __fadd_rn(v, to_f32(bias[n]));
          Y[m * N + n] = from_f32<T>(v);
        }
    }
}

}  // namespace svdq_k
}  // namespace lowbit::kernels
