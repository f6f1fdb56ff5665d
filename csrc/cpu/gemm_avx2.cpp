// csrc/cpu/gemm_avx2.cpp — AVX2/FMA/F16C kernels of the gemm family (this file alone is compiled
// with -mavx2 -mfma -mf16c; gemm.cpp calls it only when the CPU has them).
//
// Two kernels per direction, chosen by M (see gemm_avx2 / gemm_t_avx2 at the bottom):
//
//  * gemv_i16 (forward, M ≤ 8): the weight streams from DRAM once and must be decoded at
//    memory speed. Codes are decoded to int16 with byte shuffles / masks and multiplied with
//    vpmaddwd against activations quantized per group of 32 to int16; int32 partial sums are
//    converted to fp32 every 64 (4-bit) / 128 (2-bit) weights. Source in cpu/gemv_i16.h (shared with
//    the AVX-512 VNNI build, gemm_avx512.cpp, used instead when use_avx512()).
//
//  * tile GEMM (forward, larger M; and gemm_t always): a tile of W is decoded exactly to fp32
//    (bit-identical to cpu::dequantize) into L2, then a register-blocked 6×16 FMA micro-kernel runs
//    over it for many rows of x; decode cost is amortised over the rows. Error: fp32 accumulation
//    only (same as a dense fp32 GEMM on dequant(W)).
#include "cpu/gemv_i16.h"

namespace lowbit::cpu {

namespace {


// n elements (fp32 / bf16 / fp16) -> fp32, exact (the low-rank factors, once per call).
void to_f32(const void* src, DType t, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8(src, t, i));
  for (; i < n; ++i) out[i] = load_as_float(src, t, i);
}


// Exact fp32 decode of rows [n0, n0 + rows) × columns [k0, k0 + kc) of W into out (row stride ld);
// rows [rows, rows_pad) are zero-filled. k0 and kc are multiples of 32, so every run of 32
// elements lies in one block. Same fp32 operations as cpu::dequantize (no FMA): bit-identical.
// Cost ≈ 7 vector instructions per 8 weights (broadcast, srlv, and, 2 vpermps, blend, mul, store).
void decode_tile_f32(const GemmWeight& w, int64_t n0, int rows, int rows_pad, int64_t k0, int kc,
                     float* out, int64_t ld) {
  const int bits = fmt_bits(w.fmt), per_byte = 8 / bits;
  const bool is_table = fmt_is_table(w.fmt);
  const float* table = w.fmt == Fmt::nf4 ? kNF4 : kFP4;
  const __m256 t_lo = _mm256_loadu_ps(table), t_hi = _mm256_loadu_ps(table + 8);
  for (int r = 0; r < rows; ++r) {
    const int64_t row0 = (n0 + r) * w.k;
    float* o = out + r * ld;
    for (int i = 0; i < kc; i += 32) {
      const int64_t e0 = row0 + k0 + i, b = e0 / w.block;
      const __m256 s = _mm256_set1_ps(weight_scale(w, b));
      const __m256 z = _mm256_set1_ps(is_table ? 0.0f : w.zero[b]);
      const uint8_t* src = w.codes + e0 / per_byte;
      for (int j = 0; j < 32; j += 8) {
        const __m256i idx = unpack8(src + j / per_byte, bits);
        __m256 v;
        if (is_table) {
          __m256 a = _mm256_permutevar8x32_ps(t_lo, idx), c = _mm256_permutevar8x32_ps(t_hi, idx);
          v = _mm256_mul_ps(_mm256_blendv_ps(a, c, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))), s);
        } else {
          v = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(idx), z), s);
        }
        _mm256_store_ps(o + i + j, v);
      }
    }
  }
  for (int r = rows; r < rows_pad; ++r) std::memset(out + r * ld, 0, sizeof(float) * size_t(kc));
}

// fp32 -> output dtype for one element (round to nearest even; scalar is fine: O(m·n) stores).
// ============================================================================ tile GEMM (forward)
// y (M, N) = x (M, K) · Wᵀ. Loop nest per m-block of kMC rows of x:
//   pack x → xp[m/16][k][16] fp32 (shared by the threads; converts bf16/fp16 once)
//   each thread, over its range of n, in blocks of kNC rows:
//     for each k-block of kKC: decode W[n-block, k-block] → Wt (fp32, kNC × kKC, L2 resident)
//       for each sliver of 16 rows of x (16 × kKC floats: L1 resident)
//         for each group of 6 rows of W: micro_fwd (6 × 16 outputs in 12 ymm accumulators)
//   the per-thread C buffer (kNC × kMC fp32, n-major) is transposed into y with bias at the end.
// Roofline: per k step the micro-kernel issues 12 FMA, 2 loads, 6 broadcasts: FMA-bound (2/cycle
// on Zen 3), ≈ 85-90% of the fp32 FMA peak in the loop; the decode (≈ 0.9 instr/weight) is paid
// once per kMC rows of x (≤ 2-4% at M ≥ 128). Weight bytes read: M/kMC passes over the packed W.
constexpr int kMR = 16;   // rows of x per micro tile (two ymm)
constexpr int kNR = 6;    // rows of W per micro tile (broadcasts)
constexpr int kKC = 256;  // k per decoded tile (multiple of every block size)
constexpr int kNC = 96;   // rows of W per decoded tile: 96 KB of fp32 in L2
constexpr int kMC = 256;  // rows of x per m-block (decode amortised over these)
static_assert(kNC % kNR == 0 && kMC % kMR == 0 && kKC % 32 == 0, "tile sizes");

// A micro-kernel's 6×16 fp32 result into c (row stride ldc): stored (first) or added.
inline void store_tile(bool first, const __m256 (&acc)[kNR][2], float* c, int64_t ldc) {
  for (int i = 0; i < kNR; ++i) {
    float* ci = c + i * ldc;
    if (first) {
      _mm256_store_ps(ci, acc[i][0]);
      _mm256_store_ps(ci + 8, acc[i][1]);
    } else {
      _mm256_store_ps(ci, _mm256_add_ps(_mm256_load_ps(ci), acc[i][0]));
      _mm256_store_ps(ci + 8, _mm256_add_ps(_mm256_load_ps(ci + 8), acc[i][1]));
    }
  }
}

// The 6x16 FMA micro-kernel: c[i][0..15] (+)= Σ_t b_i[t] · v_t[0..15] for i < 6, where the 16-float
// vector v_t sits at v + t * v_step (loaded) and b_i[t] at b + i * ldb + t (broadcast). 12 ymm
// accumulators + 2 loads + 1 broadcast: 15 of the 16 registers.
template <bool kFirst>
inline void micro_6x16(int depth, const float* v, int64_t v_step, const float* b, int64_t ldb, float* c, int64_t ldc) {
  __m256 acc[kNR][2];
  for (int i = 0; i < kNR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const float* b0 = b;
  const float* b1 = b + ldb;
  const float* b2 = b + 2 * ldb;
  const float* b3 = b + 3 * ldb;
  const float* b4 = b + 4 * ldb;
  const float* b5 = b + 5 * ldb;
  for (int t = 0; t < depth; ++t) {
    const __m256 a0 = _mm256_load_ps(v + v_step * t), a1 = _mm256_load_ps(v + v_step * t + 8);
    __m256 x;
    x = _mm256_broadcast_ss(b0 + t); acc[0][0] = _mm256_fmadd_ps(x, a0, acc[0][0]); acc[0][1] = _mm256_fmadd_ps(x, a1, acc[0][1]);
    x = _mm256_broadcast_ss(b1 + t); acc[1][0] = _mm256_fmadd_ps(x, a0, acc[1][0]); acc[1][1] = _mm256_fmadd_ps(x, a1, acc[1][1]);
    x = _mm256_broadcast_ss(b2 + t); acc[2][0] = _mm256_fmadd_ps(x, a0, acc[2][0]); acc[2][1] = _mm256_fmadd_ps(x, a1, acc[2][1]);
    x = _mm256_broadcast_ss(b3 + t); acc[3][0] = _mm256_fmadd_ps(x, a0, acc[3][0]); acc[3][1] = _mm256_fmadd_ps(x, a1, acc[3][1]);
    x = _mm256_broadcast_ss(b4 + t); acc[4][0] = _mm256_fmadd_ps(x, a0, acc[4][0]); acc[4][1] = _mm256_fmadd_ps(x, a1, acc[4][1]);
    x = _mm256_broadcast_ss(b5 + t); acc[5][0] = _mm256_fmadd_ps(x, a0, acc[5][0]); acc[5][1] = _mm256_fmadd_ps(x, a1, acc[5][1]);
  }
  store_tile(kFirst, acc, c, ldc);
}

// Forward: vectors are 16 packed rows of x per k (xs, stride kMR), broadcasts are 6 rows of W.
template <bool kFirst>
inline void micro_fwd(int kc, const float* xs, const float* w, int64_t ldw, float* c, int64_t ldc) {
  micro_6x16<kFirst>(kc, xs, kMR, w, ldw, c, ldc);
}

// Up to this M the GEMV in passes of kGemvMaxM rows beats the tile kernels, whose weight decode is
// amortised over too few rows (2 threads, 4096² nf4 + dq, ms: M = 9 tile 4.8 / 6.8 (avx512 / avx2)
// against 2.2 / 2.5 in passes of 8 + 1; M = 16 5.0 / 6.3 against 3.8 / 4.2; M = 24 7.2 / 7.8
// against 5.7 / 6.3; M = 32 about even).
constexpr int64_t kGemvPassMaxM = 24;

// ---------------------------------------------------------------------------- int16 tile variant
// On CPUs with AVX-512 VNNI (use_avx512()) the tile kernel multiplies int16 images instead of fp32:
// x is quantized per row and group of 32 k, xq = round(x / max|x|_g · QX), W's tile is decoded to
// int16 (int4/int2: the code; fp4: T·3072, exact; nf4: round(T·QW)), and the micro-kernel issues
// one vpdpwssd (16 multiply-adds, 2 per cycle on Zen 4) where the fp32 kernel issues one FMA (8):
// twice the multiply-add rate. Each int32 lane sums the 32 products of one group (16 k pairs), then
// the fp32 accumulator takes cvt(acc) · dx_g · s (one cvt + mul + fma per 16 vpdpwssd).
// No overflow: 32·QX·QW < 2^31 — nf4 32·8191·8192, fp4 32·16383·3072, int4 32·32767·15, int2 less.
// Error (docs/kernels.md): x off by ≤ 0.5/QX of its group max (nf4 6.1e-5, fp4 3.1e-5, int 1.5e-5),
// nf4 weights by ≤ 0.5/8192 = 6.1e-5 of the block absmax; fp32 accumulation otherwise.
// The int formats' zero point: Σ_b s_b z_b X_b (X_b = Σ_{g∈b} dx_g Σ xq) is one more fp32
// micro-kernel pass of depth K / block per output tile.
struct TileQ { float qx, qw; };
inline TileQ tile_q(Fmt f) {
  switch (f) {
    case Fmt::nf4: return {8191.0f, 8192.0f};
    case Fmt::fp4: return {16383.0f, 3072.0f};
    default: return {32767.0f, 1.0f};
  }
}
constexpr int kG = 32;  // k per activation group (and per int32 flush)

// One sliver of 16 rows (fp32, k-major [k][16], K a multiple of 32) → xq[k/2][16] (int16 pairs
// (x[2t], x[2t+1]) per int32 lane), dx[g][16] = max|x|_g / QX, gsum[g][16] = dx_g · Σ_{k∈g} xq
// (int formats). A group with a NaN gets dx = NaN, one with an inf dx = inf: the output is NaN.
void pack_x_i16(const float* v, int64_t K, float qx, int32_t* xq, float* dx, float* gsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f), vqx = _mm256_set1_ps(qx), zero = _mm256_setzero_ps();
  const __m256i lo16 = _mm256_set1_epi32(0xffff);
  for (int64_t g = 0; g < K / kG; ++g) {
    const float* vg = v + g * kG * 16;
    for (int h = 0; h < 2; ++h) {
      __m256 mx = zero, bad = zero;
      for (int k = 0; k < kG; ++k) {
        const __m256 a = _mm256_load_ps(vg + k * 16 + 8 * h);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, a));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
      }
      const __m256 pos = _mm256_cmp_ps(mx, zero, _CMP_GT_OQ);
      const __m256 inv = _mm256_and_ps(_mm256_div_ps(vqx, mx), pos);  // 0 for an all-zero group (and inf)
      __m256 d = _mm256_div_ps(mx, vqx);
      d = _mm256_blendv_ps(d, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), bad);
      __m256i sum = _mm256_setzero_si256();
      for (int t = 0; t < kG / 2; ++t) {
        const __m256i e = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(vg + (2 * t) * 16 + 8 * h), inv));
        const __m256i o = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(vg + (2 * t + 1) * 16 + 8 * h), inv));
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(e, o));
        _mm256_store_si256(reinterpret_cast<__m256i*>(xq + (g * (kG / 2) + t) * 16 + 8 * h),
                           _mm256_or_si256(_mm256_and_si256(e, lo16), _mm256_slli_epi32(o, 16)));
      }
      _mm256_store_ps(dx + g * 16 + 8 * h, d);
      if (gsum) _mm256_store_ps(gsum + g * 16 + 8 * h, _mm256_mul_ps(d, _mm256_cvtepi32_ps(sum)));
    }
  }
}

// Eight codes of W from element e0 (a multiple of 8) → their int16 images as int32 lanes: the code
// (int4 / int2) or round(T[code] · qw) (nf4 / fp4, through two vpermd and a blend).
struct Decode16 {
  int bits, per_byte;
  bool is_table;
  __m256i t_lo, t_hi;
  Decode16(Fmt f, float qw) : bits(fmt_bits(f)), per_byte(8 / fmt_bits(f)), is_table(fmt_is_table(f)) {
    const float* table = f == Fmt::nf4 ? kNF4 : kFP4;
    alignas(32) int32_t t16[16];
    for (int i = 0; i < 16; ++i) t16[i] = is_table ? int32_t(std::nearbyint(table[i] * qw)) : 0;
    t_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(t16));
    t_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(t16 + 8));
  }
  __m256i operator()(const uint8_t* codes, int64_t e0) const {
    const __m256i idx = unpack8(codes + e0 / per_byte, bits);
    if (!is_table) return idx;
    const __m256i a = _mm256_permutevar8x32_epi32(t_lo, idx), c = _mm256_permutevar8x32_epi32(t_hi, idx);
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(c),
                                                _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))));
  }
};

// Rows [n0, n0 + rows) × k [k0, k0 + kc) of W → int16 pairs along k, out[r][k / 2] (row stride ld
// pairs), and the scale of each group of 32 → sw[r][i / 32] (nf4/fp4: s / QW; int: s). Rows
// [rows, rows_pad) are zero.
void decode_tile_i16(const GemmWeight& w, int64_t n0, int rows, int rows_pad, int64_t k0, int kc, float qw,
                     int32_t* out, int64_t ld, float* sw, int64_t lds) {
  const Decode16 dec(w.fmt, qw);
  const float inv_qw = 1.0f / qw;
  for (int r = 0; r < rows; ++r) {
    const int64_t row0 = (n0 + r) * w.k;
    for (int i = 0; i < kc; i += kG) {
      const int64_t e0 = row0 + k0 + i;
      const float s = weight_scale(w, e0 / w.block);
      sw[r * lds + i / kG] = dec.is_table ? s * inv_qw : s;
      for (int j = 0; j < kG; j += 8) {
        const __m256i v = dec(w.codes, e0 + j);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r * ld + (i + j) / 2),
                         _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
      }
    }
  }
  for (int r = rows; r < rows_pad; ++r) {
    std::memset(out + r * ld, 0, sizeof(int32_t) * size_t(kc / 2));
    for (int i = 0; i < kc; i += kG) sw[r * lds + i / kG] = 0.0f;
  }
}

// The 6×16 int16 micro-kernel shared by the forward and gemm_t tiles, over `depth` pairs (a multiple
// of 16, one group of 32 products per int32 flush):
//   c[i][0..15] (+)= Σ_g rs_i[g] · ls_g[0..15] · Σ_{t∈g} <v pair t [0..15], b_i pair t>
// v: 16 int32 pairs per t at v + t · v_step (loaded), b: 6 rows of int32 pairs (stride ldb, broadcast),
// rs: the rows' per-group scales (stride lds), ls: per-lane scales [g][16] or null (all 1).
// Forward: v = x pairs, b = W rows, ls = dx, rs = W's group scales. gemm_t: v = W pairs interleaved
// along n, b = gy' rows, ls = null, rs = gy''s group scales. Compiled for AVX-512 VL + VNNI (32 ymm
// registers: 12 int32 + 12 fp32 accumulators); called only when use_avx512().
__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"), noinline))
void micro_i16(bool first, int depth, const int32_t* v, int64_t v_step, const int32_t* b, int64_t ldb, const float* ls,
               const float* rs, int64_t lds, float* c, int64_t ldc) {
  __m256 cf[kNR][2];
  for (int i = 0; i < kNR; ++i) cf[i][0] = cf[i][1] = _mm256_setzero_ps();
  const int32_t *b0 = b, *b1 = b + ldb, *b2 = b + 2 * ldb, *b3 = b + 3 * ldb, *b4 = b + 4 * ldb, *b5 = b + 5 * ldb;
  for (int g = 0; g < depth / (kG / 2); ++g) {
    // twelve named accumulators (an array made GCC shuffle them between registers every step)
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
    __m256i a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
#pragma GCC unroll 16
    for (int tt = 0; tt < kG / 2; ++tt) {
      const int t = g * (kG / 2) + tt;
      const __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(v + t * v_step));
      const __m256i x1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(v + t * v_step + 8));
      __m256i w;
      w = _mm256_set1_epi32(b0[t]); a00 = _mm256_dpwssd_epi32(a00, x0, w); a01 = _mm256_dpwssd_epi32(a01, x1, w);
      w = _mm256_set1_epi32(b1[t]); a10 = _mm256_dpwssd_epi32(a10, x0, w); a11 = _mm256_dpwssd_epi32(a11, x1, w);
      w = _mm256_set1_epi32(b2[t]); a20 = _mm256_dpwssd_epi32(a20, x0, w); a21 = _mm256_dpwssd_epi32(a21, x1, w);
      w = _mm256_set1_epi32(b3[t]); a30 = _mm256_dpwssd_epi32(a30, x0, w); a31 = _mm256_dpwssd_epi32(a31, x1, w);
      w = _mm256_set1_epi32(b4[t]); a40 = _mm256_dpwssd_epi32(a40, x0, w); a41 = _mm256_dpwssd_epi32(a41, x1, w);
      w = _mm256_set1_epi32(b5[t]); a50 = _mm256_dpwssd_epi32(a50, x0, w); a51 = _mm256_dpwssd_epi32(a51, x1, w);
    }
    const __m256i acc[kNR][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 l0 = ls ? _mm256_load_ps(ls + g * 16) : one, l1 = ls ? _mm256_load_ps(ls + g * 16 + 8) : one;
#pragma GCC unroll 6
    for (int i = 0; i < kNR; ++i) {
      const __m256 f = _mm256_broadcast_ss(rs + i * lds + g);
      cf[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][0]), _mm256_mul_ps(l0, f), cf[i][0]);
      cf[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][1]), _mm256_mul_ps(l1, f), cf[i][1]);
    }
  }
  store_tile(first, cf, c, ldc);
}

void gemm_tile(const GemmParams& p, const LowrankParams* lr) {
  const int64_t M = p.m, N = p.w.n, K = p.w.k;
  static thread_local AlignedBuf xp_buf;  // owned by the calling thread, shared inside the region
  const int64_t mc_max = std::min<int64_t>(kMC, (M + kMR - 1) / kMR * kMR);
  float* xp = xp_buf.get(size_t(mc_max * K));
  // int16 variant (AVX-512 VNNI): per sliver of 16 rows, xq16 [K/2][16] int32 pairs, dxs [K/32][16],
  // and for the int formats xb [K/block][16] (the zero-point term's X_b).
  const bool i16 = use_avx512();
  const TileQ tq = tile_q(p.w.fmt);
  const bool is_int = !fmt_is_table(p.w.fmt);
  const int64_t nbk = K / p.w.block, ngk = K / kG;
  static thread_local AlignedBufT<int32_t> xq16_buf;
  static thread_local AlignedBuf dxs_buf, gsum_buf, xb_buf;
  int32_t* xq16 = i16 ? xq16_buf.get(size_t(mc_max / kMR) * size_t(K / 2) * kMR) : nullptr;
  float* dxs = i16 ? dxs_buf.get(size_t(mc_max) * size_t(ngk)) : nullptr;
  float* gsum = i16 && is_int ? gsum_buf.get(size_t(mc_max) * size_t(ngk)) : nullptr;
  float* xb = i16 && is_int ? xb_buf.get(size_t(mc_max) * size_t(nbk)) : nullptr;
  // Low-rank branch (lr != null): A and B in fp32 (A padded to whole groups of kNR rows, B with kNR
  // zero rows past N so the last group of an n-block may read past nb), and per sliver of 16 rows
  // of x the down-projection xa = x·Aᵀ as [j][16] — the micro-kernel's x layout with k = j — so the
  // up-projection c += (s·xa)·Bᵀ is one more micro_fwd pass of depth r on the output tile.
  const int r = lr ? lr->r : 0, rp = (r + kNR - 1) / kNR * kNR;
  static thread_local AlignedBuf af_buf, bf_buf, xas_buf;
  float* af = lr ? af_buf.get(size_t(rp) * size_t(K)) : nullptr;     // (rp, K)
  float* bf = lr ? bf_buf.get(size_t(N + kNR) * size_t(r)) : nullptr;  // (N + kNR, r)
  float* xas = lr ? xas_buf.get(size_t(mc_max) * size_t(rp)) : nullptr;  // (mc/16, rp, 16)
  if (lr) {
    to_f32(lr->a, p.dtype, int64_t(r) * K, af);
    std::memset(af + int64_t(r) * K, 0, sizeof(float) * size_t((rp - r) * K));
    to_f32(lr->b, p.dtype, N * r, bf);
    std::memset(bf + N * r, 0, sizeof(float) * size_t(kNR * r));
  }
#pragma omp parallel
  {
    static thread_local AlignedBuf wt_buf, c_buf;
    float* wt = wt_buf.get(size_t(kNC) * kKC);
    float* cb = c_buf.get(size_t(kNC) * size_t(mc_max));
    static thread_local AlignedBufT<int32_t> wt16_buf;
    static thread_local AlignedBuf swt_buf, negsz_buf;
    int32_t* wt16 = i16 ? wt16_buf.get(size_t(kNC) * (kKC / 2)) : nullptr;  // int16 pairs
    float* swt = i16 ? swt_buf.get(size_t(kNC) * (kKC / kG)) : nullptr;
    float* negsz = i16 && is_int ? negsz_buf.get(size_t(kNC) * size_t(nbk)) : nullptr;
    const int T = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t na = N * t / T, nb = N * (t + 1) / T;
    for (int64_t m0 = 0; m0 < M; m0 += kMC) {
      const int64_t mv = std::min<int64_t>(kMC, M - m0), mcp = (mv + kMR - 1) / kMR * kMR;
      const int64_t nsl = mcp / kMR;
      // pack x rows [m0, m0 + mv) as 16-row slivers, k-major; pad rows with zeros
#pragma omp for schedule(static)
      for (int64_t s = 0; s < nsl; ++s) {
        float* dst = xp + s * K * kMR;
        for (int j = 0; j < kMR; ++j) {
          const int64_t m = m0 + s * kMR + j;
          if (m < M) {
            for (int64_t k = 0; k < K; ++k) dst[k * kMR + j] = load_as_float(p.x, p.dtype, m * K + k);
          } else {
            for (int64_t k = 0; k < K; ++k) dst[k * kMR + j] = 0.0f;
          }
        }
        if (lr) {  // xa of these 16 rows (exact fp32 GEMM of depth K), then the xa output, then × s
          float* xs = xas + s * rp * kMR;
          for (int g = 0; g < rp / kNR; ++g)
            micro_fwd<true>(int(K), dst, af + int64_t(g) * kNR * K, K, xs + g * kNR * kMR, kMR);
          for (int j = 0; j < kMR; ++j) {
            const int64_t m = m0 + s * kMR + j;
            if (m < M)
              for (int q = 0; q < r; ++q) store_out(lr->xa, p.dtype, m * r + q, xs[q * kMR + j]);
          }
          const __m256 sv = _mm256_set1_ps(lr->s);
          for (int i = 0; i < r * kMR; i += 8) _mm256_store_ps(xs + i, _mm256_mul_ps(_mm256_load_ps(xs + i), sv));
        }
        if (i16) {
          float* gs = gsum ? gsum + s * ngk * kMR : nullptr;
          pack_x_i16(dst, K, tq.qx, xq16 + s * (K / 2) * kMR, dxs + s * ngk * kMR, gs);
          if (is_int) {  // X_b = Σ_{g∈b} dx_g Σ xq, [b][16]
            const int gpb = p.w.block / kG;
            float* xbs = xb + s * nbk * kMR;
            for (int64_t b = 0; b < nbk; ++b)
              for (int h = 0; h < kMR; h += 8) {
                __m256 t = _mm256_setzero_ps();
                for (int g = 0; g < gpb; ++g) t = _mm256_add_ps(t, _mm256_load_ps(gs + (b * gpb + g) * kMR + h));
                _mm256_store_ps(xbs + b * kMR + h, t);
              }
          }
        }
      }  // implicit barrier: xp (and xas) complete
      for (int64_t n0 = na; n0 < nb; n0 += kNC) {
        const int nv = int(std::min<int64_t>(kNC, nb - n0)), ng = (nv + kNR - 1) / kNR;
        for (int64_t k0 = 0; k0 < K; k0 += kKC) {
          const int kc = int(std::min<int64_t>(kKC, K - k0));
          if (i16) {
            decode_tile_i16(p.w, n0, nv, ng * kNR, k0, kc, tq.qw, wt16, kKC / 2, swt, kKC / kG);
            for (int64_t s = 0; s < nsl; ++s)
              for (int g = 0; g < ng; ++g)
                micro_i16(k0 == 0, kc / 2, xq16 + (s * (K / 2) + k0 / 2) * kMR, kMR,
                          wt16 + g * kNR * (kKC / 2), kKC / 2, dxs + (s * ngk + k0 / kG) * kMR,
                          swt + g * kNR * (kKC / kG), kKC / kG, cb + g * kNR * mcp + s * kMR, mcp);
            continue;
          }
          decode_tile_f32(p.w, n0, nv, ng * kNR, k0, kc, wt, kKC);
          for (int64_t s = 0; s < nsl; ++s) {
            const float* xs = xp + (s * K + k0) * kMR;
            for (int g = 0; g < ng; ++g) {
              float* c = cb + g * kNR * mcp + s * kMR;
              if (k0 == 0) micro_fwd<true>(kc, xs, wt + g * kNR * kKC, kKC, c, mcp);
              else micro_fwd<false>(kc, xs, wt + g * kNR * kKC, kKC, c, mcp);
            }
          }
        }
        if (i16 && is_int) {  // − Σ_b s_b z_b X_b: an fp32 micro-kernel pass of depth K / block
          for (int rr = 0; rr < ng * kNR; ++rr)
            for (int64_t b = 0; b < nbk; ++b) {
              const int64_t fb = (n0 + rr) * nbk + b;
              negsz[rr * nbk + b] = rr < nv ? -(weight_scale(p.w, fb) * p.w.zero[fb]) : 0.0f;
            }
          for (int64_t s = 0; s < nsl; ++s)
            for (int g = 0; g < ng; ++g)
              micro_fwd<false>(int(nbk), xb + s * nbk * kMR, negsz + g * kNR * nbk, nbk, cb + g * kNR * mcp + s * kMR, mcp);
        }
        if (lr)  // epilogue: the output tile is still in cb (L2); B rows of this n-block read once
          for (int64_t s = 0; s < nsl; ++s)
            for (int g = 0; g < ng; ++g)
              micro_fwd<false>(r, xas + s * rp * kMR, bf + (n0 + g * kNR) * r, r, cb + g * kNR * mcp + s * kMR, mcp);
        for (int64_t m = 0; m < mv; ++m)
          for (int n = 0; n < nv; ++n) {
            const float b = p.bias ? load_as_float(p.bias, p.dtype, n0 + n) : 0.0f;
            store_out(p.y, p.dtype, (m0 + m) * N + n0 + n, cb[n * mcp + m] + b);
          }
      }
      if (m0 + kMC < M) {  // xp is rewritten for the next m-block (uniform condition)
#pragma omp barrier
      }
    }
  }
}

// ============================================================================ tile GEMM (gemm_t)
// gx (M, K) = gy (M, N) · W. Threads split k in whole blocks (disjoint columns of gx). Per m-block
// of kTM rows of gy (converted to fp32 once, shared, rows zero-padded to a multiple of 6):
//   for each k-tile of kTK columns: C (kTM × kTK fp32) accumulates over n-tiles of kTN rows of W,
//   each decoded exactly to fp32 (kTN × kTK, 128 KB, L2); micro_t: 6 rows of gy × 16 columns of
//   gx, W loaded (2 ymm per n), gy broadcast, 12 FMA per n.
// Roofline: as the forward tile kernel (FMA-bound at large M); decode amortised over kTM rows.
// At small M it is decode-bound (≈ 0.9 instr/weight): "decent", not bandwidth.
constexpr int kTM = 96;   // rows of gy per m-block (multiple of 6)
constexpr int kTK = 128;  // columns of gx per tile (multiple of 32)
constexpr int kTN = 256;  // rows of W per decoded tile
static_assert(kTM % kNR == 0 && kTK % 32 == 0, "tile sizes");

// Transposed: vectors are 16 columns of decoded W per n (wt, stride ldw), broadcasts 6 rows of gy.
template <bool kFirst>
inline void micro_t(int nn, const float* wt, int64_t ldw, const float* g, int64_t ldg, float* c, int64_t ldc) {
  micro_6x16<kFirst>(nn, wt, ldw, g, ldg, c, ldc);
}

// ---------------------------------------------------------------------------- int16 gemm_t variant
// gx = gy · Ŵ with Ŵ[n, k] = s[n, b] · w16[n, k] (w16: the int16 image of the tile kernel, scale s
// including 1 / QW): the scale varies along the contraction (n), so it is folded into gy: per k-block
// b, gy'[m, n] = gy[m, n] · s[n, b] is quantized per row and group of 32 n (QX of tile_q), and
// gx[m, k ∈ b] = Σ_g dq[m, g] Σ_{n∈g} gq'[m, n] w16[n, k] (− Σ_n gy'[m, n] z[n, b] for the int
// formats, in fp32). Per n pair the micro-kernel issues 12 vpdpwssd (6 rows of gy × 16 columns), the
// W pairs interleaved along n in the decoded tile. Costs on top of the products: the quantization of
// gy' once per k-block (≈ 1/block of the multiply-adds' work) and the flush per group of 32 n.

// gy' rows [0, mp) for block b: gq[m][N/2] int32 pairs, dq[m][N/32]; zt[m] = Σ_n gy'[m, n] z[n, b]
// (int formats, else untouched). sb[n] = s[n, b] (nf4/fp4: / QW). ≈ 1.5 vector ops per element
// (the products it feeds are ≈ block / 16 vpdpwssd per element).
void pack_gy_i16(const float* gyf, int64_t mp, int64_t N, const float* sb, const float* zb, float qx, int32_t* gq,
                 float* dq, float* zt) {
  const __m256 sign = _mm256_set1_ps(-0.0f), vqx = _mm256_set1_ps(qx), zero = _mm256_setzero_ps();
  for (int64_t m = 0; m < mp; ++m) {
    const float* g = gyf + m * N;
    __m256 zacc = zero;
    for (int64_t g0 = 0; g0 < N; g0 += kG) {
      __m256 v[4];
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_mul_ps(_mm256_load_ps(g + g0 + 8 * j), _mm256_loadu_ps(sb + g0 + 8 * j));
        if (zb) zacc = _mm256_fmadd_ps(v[j], _mm256_loadu_ps(zb + g0 + 8 * j), zacc);
      }
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      mx = _mm256_max_ps(mx, _mm256_permute2f128_ps(mx, mx, 1));
      mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0x4e));
      mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0xb1));  // every lane: the group max
      const __m256 bad = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(v[0], v[0], _CMP_UNORD_Q), _mm256_cmp_ps(v[1], v[1], _CMP_UNORD_Q)),
                                      _mm256_or_ps(_mm256_cmp_ps(v[2], v[2], _CMP_UNORD_Q), _mm256_cmp_ps(v[3], v[3], _CMP_UNORD_Q)));
      const __m256 inv = _mm256_and_ps(_mm256_div_ps(vqx, mx), _mm256_cmp_ps(mx, zero, _CMP_GT_OQ));
      const float d = _mm256_cvtss_f32(mx) / qx;
      dq[m * (N / kG) + g0 / kG] = _mm256_movemask_ps(bad) ? std::numeric_limits<float>::quiet_NaN() : d;
      // int16 in n order: packs interleaves 4-lane halves, permute4x64 puts them back in order
      const __m256i a = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv)), _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv)));
      const __m256i b = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv)), _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv)));
      int32_t* dst = gq + m * (N / 2) + g0 / 2;
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute4x64_epi64(a, 0xd8));
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 8), _mm256_permute4x64_epi64(b, 0xd8));
    }
    if (zb) zt[m] = hsum(zacc);
  }
}

// Rows [n0, n0 + nn) (nn even) × columns [k0, k0 + kw) (one block) of W → int16 pairs along n:
// out[(n / 2) · kw + k] = (w16[n][k], w16[n + 1][k]).
void decode_tile_t_i16(const GemmWeight& w, int64_t n0, int nn, int64_t k0, int kw, float qw, int32_t* out) {
  const Decode16 dec(w.fmt, qw);
  const __m256i lo16 = _mm256_set1_epi32(0xffff);
  for (int r = 0; r < nn; r += 2) {
    const int64_t row0 = (n0 + r) * w.k + k0, row1 = row0 + w.k;
    for (int j = 0; j < kw; j += 8) {
      const __m256i a = dec(w.codes, row0 + j), b = dec(w.codes, row1 + j);
      _mm256_store_si256(reinterpret_cast<__m256i*>(out + (r / 2) * kw + j),
                         _mm256_or_si256(_mm256_and_si256(a, lo16), _mm256_slli_epi32(b, 16)));
    }
  }
}

void gemm_t_tile(const GemmParams& p) {
  const int64_t M = p.m, N = p.w.n, K = p.w.k, nbk = K / p.w.block;
  // int16 from the forward's tile threshold on: below it gemm_t is decode-bound and the int16
  // variant's extra passes cost more than its products save (8192×28672 nf4, M = 9: 77 vs 72 ms;
  // M = 32: 112 vs 128 ms; M = 128: 315 vs 415 ms)
  const bool i16 = use_avx512() && M > kGemvPassMaxM;
  const TileQ tq = tile_q(p.w.fmt);
  const bool is_table = fmt_is_table(p.w.fmt);
  static thread_local AlignedBuf gy_buf;
  const int64_t tm_max = std::min<int64_t>(kTM, (M + kNR - 1) / kNR * kNR);
  float* gyf = gy_buf.get(size_t(tm_max * N));
#pragma omp parallel
  {
    static thread_local AlignedBuf wt_buf, c_buf;
    float* wt = wt_buf.get(size_t(kTN) * kTK);
    float* cb = c_buf.get(size_t(kTM) * kTK);
    const int T = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t ka = nbk * t / T * p.w.block, kb = nbk * (t + 1) / T * p.w.block;
    // int16 variant (AVX-512 VNNI): per thread, gy' of one block (gq, dq, zt), its scales and zeros
    static thread_local AlignedBufT<int32_t> gq_buf, wt32_buf;
    static thread_local AlignedBuf dq_buf, zt_buf, sb_buf, zb_buf;
    int32_t* gq = i16 ? gq_buf.get(size_t(tm_max) * size_t(N / 2)) : nullptr;
    float* dq = i16 ? dq_buf.get(size_t(tm_max) * size_t(N / kG)) : nullptr;
    float* zt = i16 ? zt_buf.get(size_t(tm_max)) : nullptr;
    // the thread's blocks' scales (nf4/fp4: / QW) and zeros, transposed to [block][n], once per call
    const int64_t tb = (kb - ka) / p.w.block;
    float* sb = i16 ? sb_buf.get(size_t(tb) * size_t(N)) : nullptr;
    float* zb = i16 && !is_table ? zb_buf.get(size_t(tb) * size_t(N)) : nullptr;
    if (i16)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t bl = 0; bl < tb; ++bl) {
          const int64_t fb = n * nbk + ka / p.w.block + bl;
          sb[bl * N + n] = weight_scale(p.w, fb) * (is_table ? 1.0f / tq.qw : 1.0f);
          if (zb) zb[bl * N + n] = p.w.zero[fb];
        }
    int32_t* wt32 = i16 ? wt32_buf.get(size_t(kTN / 2) * size_t(std::min(p.w.block, kTK))) : nullptr;
    for (int64_t m0 = 0; m0 < M; m0 += kTM) {
      const int64_t mv = std::min<int64_t>(kTM, M - m0), mp = (mv + kNR - 1) / kNR * kNR;
#pragma omp for schedule(static)
      for (int64_t m = 0; m < mp; ++m) {
        float* dst = gyf + m * N;
        if (m < mv) {
          for (int64_t n = 0; n < N; ++n) dst[n] = load_as_float(p.x, p.dtype, (m0 + m) * N + n);
        } else {
          std::memset(dst, 0, sizeof(float) * size_t(N));
        }
      }
      for (int64_t k0 = ka; k0 < kb; k0 += kTK) {
        const int kt = int(std::min<int64_t>(kTK, kb - k0));
        if (i16) {  // block by block: gy' = gy · s[:, b] quantized, then the int16 tile products
          const int bw = std::min(p.w.block, kt);  // columns per pass: one block, or the tile of a 256 block
          for (int64_t bk0 = k0; bk0 < k0 + kt; bk0 += bw) {
            const int64_t bl = bk0 / p.w.block - ka / p.w.block;  // the thread's block index
            pack_gy_i16(gyf, mp, N, sb + bl * N, is_table ? nullptr : zb + bl * N, tq.qx, gq, dq, zt);
            for (int64_t n0 = 0; n0 < N; n0 += kTN) {
              const int nn = int(std::min<int64_t>(kTN, N - n0));
              decode_tile_t_i16(p.w, n0, nn, bk0, bw, tq.qw, wt32);
              for (int ks = 0; ks < bw; ks += 16)
                for (int64_t g = 0; g < mp / kNR; ++g)
                  micro_i16(n0 == 0, nn / 2, wt32 + ks, bw, gq + g * kNR * (N / 2) + n0 / 2, N / 2, nullptr,
                            dq + g * kNR * (N / kG) + n0 / kG, N / kG, cb + g * kNR * kTK + (bk0 - k0) + ks, kTK);
            }
            if (!is_table)  // − Σ_n gy'[m, n] z[n, b] on every column of the block
              for (int64_t m = 0; m < mp; ++m)
                for (int k = 0; k < bw; ++k) cb[m * kTK + (bk0 - k0) + k] -= zt[m];
          }
          for (int64_t m = 0; m < mv; ++m)
            for (int k = 0; k < kt; ++k) store_out(p.y, p.dtype, (m0 + m) * K + k0 + k, cb[m * kTK + k]);
          continue;
        }
        for (int64_t n0 = 0; n0 < N; n0 += kTN) {
          const int nn = int(std::min<int64_t>(kTN, N - n0));
          decode_tile_f32(p.w, n0, nn, nn, k0, kt, wt, kTK);
          for (int ks = 0; ks < kt; ks += 16)
            for (int64_t g = 0; g < mp / kNR; ++g) {
              float* c = cb + g * kNR * kTK + ks;
              const float* gg = gyf + g * kNR * N + n0;
              if (n0 == 0) micro_t<true>(nn, wt + ks, kTK, gg, N, c, kTK);
              else micro_t<false>(nn, wt + ks, kTK, gg, N, c, kTK);
            }
        }
        for (int64_t m = 0; m < mv; ++m)
          for (int k = 0; k < kt; ++k) store_out(p.y, p.dtype, (m0 + m) * K + k0 + k, cb[m * kTK + k]);
      }
      if (m0 + kTM < M) {  // gyf is rewritten for the next m-block (uniform condition)
#pragma omp barrier
      }
    }
  }
}

}  // namespace

void gemv_avx512(const GemmParams& p, const LowrankParams* lr);  // gemm_avx512.cpp

// The GEMV (AVX-512 VNNI build when available) over rows [0, m) in passes of ≤ kGemvMaxM rows.
void gemv_passes(const GemmParams& p, const LowrankParams* lr) {
  const size_t es = p.dtype == DType::f32 ? 4 : 2;
  for (int64_t m0 = 0; m0 < p.m; m0 += kGemvMaxM) {
    GemmParams q = p;
    q.m = std::min<int64_t>(kGemvMaxM, p.m - m0);
    q.x = static_cast<const char*>(p.x) + size_t(m0 * p.w.k) * es;
    q.y = static_cast<char*>(p.y) + size_t(m0 * p.w.n) * es;
    LowrankParams l;
    if (lr) {
      l = *lr;
      l.g = q;
      l.xa = static_cast<char*>(lr->xa) + size_t(m0 * lr->r) * es;
    }
    if (use_avx512()) gemv_avx512(q, lr ? &l : nullptr);
    else gemv_i16(q, lr ? &l : nullptr);
  }
}

void gemm_avx2(const GemmParams& p) {
  if (p.m <= kGemvPassMaxM) return gemv_passes(p, nullptr);
  gemm_tile(p, nullptr);
}

// The lowrank family on the same two kernels: the branch rides on the activation preparation
// (down-projection) and on the output-tile epilogue (up-projection); see docs/kernels.md.
void lowrank_avx2(const LowrankParams& lp) {
  if (lp.g.m <= kGemvPassMaxM) return gemv_passes(lp.g, &lp);
  gemm_tile(lp.g, &lp);
}
void gemm_t_avx2(const GemmParams& p) { gemm_t_tile(p); }

}  // namespace lowbit::cpu
