// csrc/cpu/gemm_avx2.cpp — the gemm family's kernels on the 'avx2' and 'avx512' paths. This file is
// compiled with -mavx2 -mfma -mf16c only (no AVX-512 instruction lives here); gemm.cpp and
// lowrank.cpp call it when use_avx2().
//
// Two kernels per direction, chosen by M (see gemm_avx2 / gemm_t_avx2 at the bottom):
//
//  * gemv_i16 (forward, M ≤ 24 in passes of ≤ 8 rows): the weight streams from DRAM once and must be
//    decoded at memory speed. Codes are decoded to int16 with byte shuffles / masks and multiplied
//    with vpmaddwd against activations quantized per group of 32 to int16; int32 partial sums are
//    converted to fp32 every 64 (4-bit) / 128 (2-bit) weights. Source in cpu/gemm_gemv_i16.h, built
//    here and, for the 'avx512' path, in gemm_avx512.cpp (vpdpwssd), which gemv_passes calls instead.
//
//  * tile GEMM (forward, larger M; and gemm_t always): a tile of W is decoded exactly to fp32
//    (bit-identical to cpu::dequantize) into L2, then a register-blocked 6×16 FMA micro-kernel runs
//    over it for many rows of x; decode cost is amortised over the rows. Error: fp32 accumulation
//    only (same as a dense fp32 GEMM on dequant(W)). On the 'avx512' path the drivers below run the
//    int16 variant instead (W and x as int16 images, vpdpwssd): its pieces are in gemm_avx512.cpp,
//    its design and error bounds at the top of that file.
//
// The lowrank family's branch is fused into both kernels (lr != null; see lowrank.cpp).
#include "cpu/gemm_gemv_i16.h"

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
// bf16w: each value then rounded to bf16 (RNE) and back: exactly qt.dequantize(torch.bfloat16), for
// bf16 activations on paths without a bf16 engine (torch's bf16 matmul semantics on fp32 FMA units).
void decode_tile_f32(const GemmWeight& w, int64_t n0, int rows, int rows_pad, int64_t k0, int kc,
                     float* out, int64_t ld, bool bf16w = false) {
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
        __m256 v = decode8_f32(unpack8(src + j / per_byte, bits), is_table, t_lo, t_hi, s, z);
        if (bf16w) v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(simd::to_bf16x8(v)), 16));
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
// kMR = 16 rows of x per micro tile (two ymm), kNR = 6 rows of W (broadcasts): gemm_internal.h.
constexpr int kKC = 256;  // k per decoded tile (multiple of every block size)
constexpr int kNC = 96;   // rows of W per decoded tile: 96 KB of fp32 in L2
constexpr int kMC = 256;  // rows of x per m-block (decode amortised over these)
static_assert(kNC % kNR == 0 && kMC % kMR == 0 && kKC % 32 == 0, "tile sizes");

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

void gemm_tile(const GemmParams& p, const LowrankParams* lr, Route route) {
  const int64_t M = p.m, N = p.w.n, K = p.w.k;
  static thread_local AlignedBuf xp_buf;  // owned by the calling thread, shared inside the region
  const int64_t mc_max = std::min<int64_t>(kMC, (M + kMR - 1) / kMR * kMR);
  float* xp = xp_buf.get(size_t(mc_max * K));
  // int16 variant (the 'avx512' path; its pieces are in gemm_avx512.cpp): per sliver of 16 rows,
  // xq16 [K/2][16] int32 pairs, dxs [K/32][16], and for the int formats xb [K/block][16] (the
  // zero-point term's X_b).
  const bool i16 = route == Route::tile_i16, bf16w = route == Route::tile_f32_bf16w;
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
          decode_tile_f32(p.w, n0, nv, ng * kNR, k0, kc, wt, kKC, bf16w);
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

void gemm_t_tile(const GemmParams& p, Route route) {
  const int64_t M = p.m, N = p.w.n, K = p.w.k, nbk = K / p.w.block;
  // int16 from the forward's tile threshold on: below it gemm_t is decode-bound and the int16
  // variant's extra passes cost more than its products save (8192×28672 nf4, M = 9: 77 vs 72 ms;
  // M = 32: 112 vs 128 ms; M = 128: 315 vs 415 ms)
  // The int16 variant quantizes gy · s per group of kG consecutive n (pack_gy_i16 reads whole
  // groups): an N that is not a multiple of kG would read past gy's rows, so it takes the exact tile.
  const bool i16 = route == Route::tile_i16 && N % kG == 0, bf16w = route == Route::tile_f32_bf16w;
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
    // int16 variant (gemm_avx512.cpp): per thread, gy' of one block (gq, dq, zt), its scales and zeros
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
          decode_tile_f32(p.w, n0, nn, nn, k0, kt, wt, kTK, bf16w);
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

// The GEMV (AVX-512 VNNI build when available) over rows [0, m) in passes of ≤ kGemvMaxM rows.
void gemv_passes(const GemmParams& p, const LowrankParams* lr) {
  row_passes(p, lr, kGemvMaxM, [](const GemmParams& q, const LowrankParams* l) {
    if (gemv_i8_applies(q)) gemv_i8_avx512(q, l);  // `medium`: int8 x, vpdpbusd
    else if (use_avx512()) gemv_avx512(q, l);
    else gemv_i16(q, l);
  });
}

// The kernel each product runs on the paths with AVX2: the one place the precision policy, the
// activation dtype, M and the CPU path meet (lowbit.info() reports it through _C.gemm_route).
//   bf16 x: a bf16 engine if the path has one (else the fp32 tile on Ŵ rounded to bf16: torch's bf16
//           matmul either way), the GEMV at small M (exact Ŵ, int16 x: more accurate than that);
//   fp32 x: highest — the exact fp32 tile at every M; high — the GEMV at small M, then the int16
//           tile ('avx512' and above) or the fp32 tile; medium — as high, but the bf16 engine above
//           the GEMV's range where the path has one (x rounded to bf16);
//   fp16 x: as fp32 under high (fp16-level error needs no more), the fp32 tile under highest.
// Test hook (tests/test_gemm_engines.py): LOWBIT_GEMV_MAX_M=0 in the environment sends every M to the
// tile kernels and engines, so they are tested at M = 1, 2, 3... too. Read per call (≈ 0.1 µs).
// With a bf16 engine the GEMV keeps small M only: the engine's cost at small M is its panel decode
// (≈ 0.4 cycle per weight once per call, session 8), the GEMV's grows with M (a pass per 4-8 rows).
// Zen 4, 4096² nf4 + dq in L3, bf16 x, ms GEMV / engine in one process, 1 thread: M = 2 1.03 / 3.07,
// M = 4 2.01 / 3.19, M = 5 3.78 / 3.17, M = 8 4.01 / 3.38; 2 threads, 11008 × 4096: M = 4 2.74 / 4.54,
// M = 6 5.16 / 4.50, M = 8 5.19 / 4.59. Hence bf16 x: the GEMV up to M = 4. fp32 x under `medium`: up to
// M = 8 where the GEMV is the int8 one (int4 / int2; nf4 with its opt-in), faster than the engine there
// (M = 8, 2 threads: 1.26 against ≈ 2.0 ms; `bench_gemm.py --crossover`, session 10: int4 0.91-0.95 of the
// GEMV's speed up to M = 12), and up to M = 4 where it is the int16 GEMV (nf4, fp4), as for bf16 x — the
// engine is 1.36-1.39x faster at M = 5-8 there (same bench; until session 10 those M took the GEMV).
constexpr int64_t kGemvEngineMaxM = 4, kGemvEngineMaxMI8 = 8;
// The 'avx512bf16' path also has the dot-form bf16 GEMV (gemv_bf16, gemm_avx512bf16.cpp), up to
// kGemvBf16MaxM rows, where the engine's panel decode would dominate; below it the GEMVs keep only what
// they still win. Session 10 (Zen 4, 2 threads, in cache, bf16 x, nf4+dq, ms int16 GEMV / dot / engine,
// bench_gemm.py --crossover): 4096² M = 3 0.60 / 0.52 / 1.31, M = 8 1.80 / 0.96 / 1.33, M = 12 2.65 /
// 1.53 / 1.93, M = 16 3.60 / 1.87 / 1.93; 576² M = 12 0.062 / 0.039 / 0.042, M = 16 0.080 / 0.046 / 0.041
// (the engine wins at 576² from 16: the range stops at 12). Session 11 made the 4-bit formats' dot form
// decode 64 weights per step in 4 instructions and its double-quant scales gather-free; Zen 5 (the same
// bench): nf4+dq 4096² M = 1 0.321 / 0.225 / 0.887, M = 2 0.447 / 0.289, M = 12 2.54 / 1.15 / 1.17;
// 576² M = 1 0.019 / 0.014; int4 M = 1 0.362 / 0.324. Hence the 4-bit formats: the dot form from M = 1.
// int2's dot step (128 weights) against its GEMV, same machine, ms GEMV / dot: bf16 x, 4096² M = 1 0.387 /
// 0.288 (+dq), 0.271 / 0.265; M = 2 0.561 / 0.325, 0.429 / 0.293; 11008 × 4096 without dq (a third of the
// bytes are fp32 block statistics) M = 1 0.78 / 1.00, M = 2 1.23 / 1.36, M = 4 tie: int2 keeps the int16
// GEMV at M = 1. fp32 x under `medium` (the int8 GEMV): int4 keeps it at M = 1 (0.167 / 0.200 ms, the
// dot form 1.1-1.5x faster at M = 2-4); int2 to M = 2 (4096² M = 1 0.190 / 0.254, M = 2 0.285 / 0.283).
constexpr int64_t kGemvBf16MaxM = 12;
inline int64_t dot_path_gemv_max_m(bool i8, Fmt fmt) {
  if (fmt == Fmt::int2) return i8 ? 2 : 1;
  return i8 ? 1 : 0;
}
inline int64_t env_m(const char* name, int64_t dflt) {
  const char* e = std::getenv(name);
  return e && *e ? std::strtoll(e, nullptr, 10) : dflt;
}
inline int64_t gemv_max_m(Engine e, bool engine, DType dt, Fmt fmt) {
  if (!engine) return env_m("LOWBIT_GEMV_MAX_M", kGemvPassMaxM);
  const bool dot = e == Engine::avx512bf16;
  const bool i8 = gemv_i8_applies(dt, fmt);
  if (dot) return env_m("LOWBIT_GEMV_MAX_M", dot_path_gemv_max_m(i8, fmt));
  return env_m("LOWBIT_GEMV_MAX_M", i8 ? kGemvEngineMaxMI8 : kGemvEngineMaxM);
}
// The dot form's range (above the GEMV's). Test / bench hook: LOWBIT_GEMV_BF16_MAX_M (0: never); with
// LOWBIT_GEMV_MAX_M set and this not, none (the engines' tests at small M). On the 'amx' path (whose CPUs
// have AVX512-BF16: dispatch.cpp requires it) only through the hook, so that bench_gemm.py --crossover
// can time it there: no AMX machine has measured it yet.
inline int64_t gemv_bf16_max_m(Engine e) {
  const int64_t dflt = e == Engine::avx512bf16 && !std::getenv("LOWBIT_GEMV_MAX_M") ? kGemvBf16MaxM : 0;
  return e == Engine::avx512bf16 || e == Engine::amx ? env_m("LOWBIT_GEMV_BF16_MAX_M", dflt) : 0;
}

// The AMX rows form's range (gemm_amx.h: W's decoded rows as the A tiles, x as the B tiles, C transposed
// in the epilogue), above the GEMV's: up to 32 rows of x (two B tiles, C kept in the tiles). Written from
// the instruction counts (the engine's decode: ≈ 11 instructions per 32 weights, 4 of them the transpose
// into the B layout, once per call; the rows form's: ≈ 2-3 per 32, no transpose; bench/amx_proxy.py, the
// work around the tile operations on Zen 4: 1.9-2.2× less than the engine's at M = 1-32) and tested
// through the emulator; **not yet timed on an AMX CPU** — bench/amx_check.py's crossover compares it with
// the engine there. LOWBIT_AMX_ROWS_MAX_M: the hook, 0 = never, up to 128 (the form's m-blocks; what the
// crossover times above 32); with LOWBIT_GEMV_MAX_M set and this not, none, as for the dot form.
constexpr int64_t kAmxRowsMaxM = 32, kAmxRowsCapM = 128;
inline int64_t amx_rows_max_m(Engine e) {
  if (e != Engine::amx && e != Engine::amx_emulated) return 0;
  const int64_t dflt = std::getenv("LOWBIT_GEMV_MAX_M") ? 0 : kAmxRowsMaxM;
  return std::min<int64_t>(kAmxRowsCapM, env_m("LOWBIT_AMX_ROWS_MAX_M", dflt));
}

Route gemm_route(DType dt, int64_t m, bool transposed, Fmt fmt) {
  const Engine e = bf16_engine();
  const Precision pr = matmul_precision();
  const bool engine = e != Engine::none && (dt == DType::bf16 || (dt == DType::f32 && pr == Precision::medium));
  const bool exact = dt != DType::bf16 && pr == Precision::highest;
  if (!transposed && !exact && m <= gemv_max_m(e, engine, dt, fmt)) return Route::gemv_i16;
  if (!transposed && engine && m <= gemv_bf16_max_m(e)) return Route::gemv_bf16;
  if (!transposed && engine && m <= amx_rows_max_m(e)) return e == Engine::amx ? Route::amx_rows : Route::amx_rows_emulated;
  if (engine) return e == Engine::avx512bf16 ? Route::avx512bf16 : (e == Engine::amx ? Route::amx : Route::amx_emulated);
  if (dt == DType::bf16) return Route::tile_f32_bf16w;
  if (exact) return Route::tile_f32;
  return use_avx512() && m > kGemvPassMaxM ? Route::tile_i16 : Route::tile_f32;
}

// The forward; with lr, the lowrank family's branch rides on the activation preparation
// (down-projection) and on the output epilogue (up-projection) of the same kernels (docs/kernels.md).
void gemm_avx2(const GemmParams& p, const LowrankParams* lr) {
  const Route r = gemm_route(p.dtype, p.m, false, p.w.fmt);
  switch (r) {
    case Route::gemv_i16: return gemv_passes(p, lr);
    case Route::gemv_bf16: return gemv_bf16_avx512bf16(p, lr);
    case Route::avx512bf16: return gemm_bf16_avx512bf16(p, lr);
    case Route::amx: return gemm_bf16_amx(p, lr);
    case Route::amx_emulated: return gemm_bf16_amx_emu(p, lr);
    case Route::amx_rows: return gemm_rows_amx(p, lr);
    case Route::amx_rows_emulated: return gemm_rows_amx_emu(p, lr);
    default: return gemm_tile(p, lr, r);
  }
}
void gemm_t_avx2(const GemmParams& p) {
  const Route r = gemm_route(p.dtype, p.m, true, p.w.fmt);
  switch (r) {
    case Route::avx512bf16: return gemm_t_bf16_avx512bf16(p);
    case Route::amx: return gemm_t_bf16_amx(p);
    case Route::amx_emulated: return gemm_t_bf16_amx_emu(p);
    default: return gemm_t_tile(p, r);
  }
}

}  // namespace lowbit::cpu
