// csrc/cpu/gemm_amx.h — the AMX engine of cpu/gemm_bf16.h, written once against cpu/tile.h and built
// twice: gemm_amx.cpp (the intrinsics; 'amx') and gemm_amx_emu_avx2.cpp (the emulator; 'amx-emulated').
//
// Micro-kernel: 32 rows of x × 32 columns per pass = 2 × 2 C tiles (tiles 0-3), A tiles 4-5 (16 rows ×
// 32 bf16 of x each, loaded from the packed rows with their stride), B tiles 6-7 (two panel tiles);
// per 32 k: 4 tile loads, 4 tdpbf16ps (16 × 16 × 32 multiply-adds each). Two passes per 64-column
// panel; C tiles stay in registers across the panel's k steps and go through the C buffer between k
// blocks. Roofline (measured on the Xeon of DESIGN.md: one tdpbf16ps per ~4.9 ns per core): ≈ 3.4
// TFLOP/s per core; the panel decode (≈ 2 instr/weight) is then the larger cost below ~2000 rows of
// x, hence kMC = 2048 rows per decode. The 64 × 256 panel (32 KiB) stays in L1.
// Arithmetic: tile.h (the SDM's TDPBF16PS: even product then odd, each sum rounded to nearest even,
// DAZ/FTZ). Error vs the float64 product of the same bf16 operands: fp32 accumulation only.
#pragma once
#include "cpu/gemm_bf16.h"
#include "cpu/tile.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace lowbit::cpu {
namespace {

struct Amx {
  static constexpr int kMR = 32, kNC = 64, kKC = 256;
  static constexpr int64_t kMC = 2048;
  static void thread_init() { tile::configure(); }
  static void thread_done() { tile::release(); }

  static void micro(bool first, const uint16_t* x, int64_t ldx, const int32_t* panel, int kc, float* c, int64_t ldc,
                    int nv) {
    const int64_t sx = ldx * 2, sc = ldc * 4;
    for (int cp = 0; cp < kNC / 32 && 32 * cp < nv; ++cp) {
      float* c0 = c + cp * 32;
      if (first) {
        tile::zero<0>(), tile::zero<1>(), tile::zero<2>(), tile::zero<3>();
      } else {
        tile::load<0>(c0, sc), tile::load<1>(c0 + 16, sc);
        tile::load<2>(c0 + 16 * ldc, sc), tile::load<3>(c0 + 16 * ldc + 16, sc);
      }
      for (int ks = 0; ks < kc / 32; ++ks) {
        const int32_t* b = panel + (int64_t(ks) * (kNC / 16) + 2 * cp) * 256;
        tile::load<4>(x + ks * 32, sx);
        tile::load<5>(x + 16 * ldx + ks * 32, sx);
        tile::load<6>(b, 64);
        tile::load<7>(b + 256, 64);
        tile::dpbf16ps<0, 4, 6>();
        tile::dpbf16ps<1, 4, 7>();
        tile::dpbf16ps<2, 5, 6>();
        tile::dpbf16ps<3, 5, 7>();
      }
      tile::store<0>(c0, sc), tile::store<1>(c0 + 16, sc);
      tile::store<2>(c0 + 16 * ldc, sc), tile::store<3>(c0 + 16 * ldc + 16, sc);
    }
  }
};

// ---- The rows form (small M, route amx_rows): W's decoded rows as the A tiles ----------------------------
// C = X · Ŵᵀ computed as Cᵀ = Ŵ · Xᵀ: A tiles = 16 rows of Ŵ × 32 k, row-major as the decode writes
// them — no transpose into the B layout (the engine's tile_rows spends ≈ 4 of its ≈ 11 instructions per 32
// weights on it); B tiles = x packed once per call, 16 k-pairs × 16 rows of x; C tiles = 16 rows of W ×
// 16 rows of x, in the tile registers over all of K (no C round trips between k blocks) for M ≤ 32: one or
// two B tiles per 32 k; per 32 k, 2 A loads, 1-2 B loads, 2-4 tdpbf16ps. Up to M = 128 (kRowsMaxM), in
// m-blocks of 32 rows of x per decoded chunk, C through a buffer between chunks (the route's default stops
// at 32; above is for the AMX crossover to time).
// Per thread, groups of 32 rows of W (dynamic): per chunk of up to 4096 k, the group's 32 rows decoded into
// a buffer, then the chunk's tile steps. The decode is the dot form's
// (decode_rows_avx512bf16: nf4 / fp4 / int4 4 instructions per 64 weights, int2 3 per 32), whose
// order within a chunk of 64 (int2: 128) weights is its own (the step order): x is packed in the same
// order. The emulator on a CPU without AVX-512 BF16 decodes each row with src_row_bf16 and reorders it in
// scalar code (LOWBIT_AMX_ROWS_DECODE=generic forces that path: tests).
// Lowrank (lr): xa = x · Aᵀ first, the same way (A's rows as the A tiles, x packed in k order), then
// s·xa rounded to bf16 packed as B tiles, and B's rows (N × r) as A tiles: a second term accumulated into
// the same C tiles after W's.
// Arithmetic: the engine's (bf16 products, fp32 sums in the tiles' order); every output element is summed
// by one thread in a fixed order: independent of the thread count.
constexpr int kRowsGroup = 32, kRowsKC = 4096;

// One row of k bf16 values in the step order of chunks of `chunk` (64: the 4-bit formats, 128: int2):
// each whole chunk as its chunk / 32 phases (phase p: elements p, p + chunk/32, ...), a last partial chunk
// as it lies — deinterleave64 / deinterleave128 of gemm_avx512bf16.cpp, in portable code.
inline void step_order_generic(int chunk, const uint16_t* src, int64_t k, uint16_t* dst) {
  const int ph = chunk / 32;
  int64_t c = 0;
  for (; c + chunk <= k; c += chunk)
    for (int p = 0; p < ph; ++p)
      for (int j = 0; j < 32; ++j) dst[c + 32 * p + j] = src[c + ph * j + p];
  for (; c < k; ++c) dst[c] = src[c];
}

inline bool rows_fast_decode() {
  const char* e = std::getenv("LOWBIT_AMX_ROWS_DECODE");
  return cpu_can_avx512bf16() && !(e && std::strcmp(e, "generic") == 0);
}

// A term of the rows form: A rows from src (rows past its end read as zeros), kp columns (a multiple of 32)
// in `order` (0: k order; 64 / 128: the step order, quantized W only), against the B tiles b.
struct RowsTerm {
  RowSrc src;
  int order;
  const int32_t* b;
  int64_t kp;
};

// Rows [n0, n0 + 32) of t's source, columns [k0, k0 + kc) → a (row stride lda).
inline void rows_a(const RowsTerm& t, int64_t n0, int64_t k0, int kc, bool fast, uint16_t* a, int64_t lda, uint16_t* tmp) {
  const int nr = int(std::clamp<int64_t>(t.src.rows - n0, 0, kRowsGroup));
  if (t.src.w && t.order && fast) {
    decode_rows_avx512bf16(*t.src.w, n0, nr, k0, kc, a, lda);
  } else {
    for (int r = 0; r < nr; ++r) {
      if (!t.order) {
        src_row_bf16(t.src, n0 + r, k0, kc, a + r * lda);
        continue;
      }
      src_row_bf16(t.src, n0 + r, k0, kc, tmp);
      step_order_generic(t.order, tmp, kc, a + r * lda);
    }
  }
  for (int r = nr; r < kRowsGroup; ++r) std::memset(a + r * lda, 0, sizeof(uint16_t) * size_t(kc));
}

// One m-block's k steps of a chunk: C tiles 0, 2 (and 1, 3: `two`, the block's second 16 rows of x) +=
// the chunk's A rows (a, row stride lda, kc columns from column k0 of the term) · B tiles from g0 of gt.
inline void rows_steps(const int32_t* b, int64_t gt, int64_t g0, bool two, const uint16_t* a, int64_t lda, int64_t k0, int kc) {
  for (int64_t s = 0; s < kc; s += 32) {
    const int32_t* bt = b + ((k0 + s) / 32 * gt + g0) * 256;
    tile::load<4>(a + s, lda * 2);
    tile::load<5>(a + 16 * lda + s, lda * 2);
    tile::load<6>(bt, 64);
    tile::dpbf16ps<0, 4, 6>();
    tile::dpbf16ps<2, 5, 6>();
    if (two) {
      tile::load<7>(bt + 256, 64);
      tile::dpbf16ps<1, 4, 7>();
      tile::dpbf16ps<3, 5, 7>();
    }
  }
}

inline void rows_c_store(float* cb, bool two) {  // C tiles → cb[32 rows][32 columns]
  tile::store<0>(cb, 128), tile::store<2>(cb + 16 * 32, 128);
  if (two) tile::store<1>(cb + 16, 128), tile::store<3>(cb + 16 * 32 + 16, 128);
}

// The C of one group of 32 source rows over the terms, for gt 16-row groups of x → cbuf (per m-block of
// 32 rows of x: [32 source rows][32 columns], 1024 floats). Each term in chunks of kRowsKC columns (the
// decoded chunk: 32 × 4096 bf16, 256 KiB, in L2): smaller chunks cost more in the decode's per-call
// set-up (its scales and tables per 4 rows) than they saved — Zen 4, the tile operations elided
// (docs/kernels.md), 4096², M = 1-32: chunks of 256 ≈ 5×, of 1024 ≈ 1.3× the time. One m-block (M ≤ 32):
// C stays in the tiles over every chunk and term; more: each chunk's decode serves every m-block, C going
// through cbuf between chunks.
inline void rows_group(const RowsTerm* terms, int nt, int64_t n0, int64_t gt, bool fast, uint16_t* a, int64_t lda,
                       uint16_t* tmp, float* cbuf) {
  const int64_t nmb = (gt + 1) / 2;
  for (int t = 0; t < nt; ++t) {
    const RowsTerm& T = terms[t];
    for (int64_t k0 = 0; k0 < T.kp; k0 += kRowsKC) {
      const int kc = int(std::min<int64_t>(kRowsKC, T.kp - k0));
      rows_a(T, n0, k0, kc, fast, a, lda, tmp);
      for (int64_t mb = 0; mb < nmb; ++mb) {
        const bool two = 2 * mb + 1 < gt, first = t == 0 && k0 == 0;
        float* cb = cbuf + mb * 1024;
        if (first) {
          tile::zero<0>(), tile::zero<2>();
          if (two) tile::zero<1>(), tile::zero<3>();
        } else if (nmb > 1) {
          tile::load<0>(cb, 128), tile::load<1>(cb + 16, 128);
          tile::load<2>(cb + 16 * 32, 128), tile::load<3>(cb + 16 * 32 + 16, 128);
        }
        rows_steps(T.b, gt, 2 * mb, two, a, lda, k0, kc);
        if (nmb > 1) rows_c_store(cb, two);
      }
    }
  }
  if (nmb == 1) rows_c_store(cbuf, gt == 2);
}

// Step ks's B tiles of 16·gt rows (rows [0, 16gt) of xr, row stride k, bf16 in the term's order): tile
// (ks, g) at (ks·gt + g) · 256 dwords, row p, column c = the pair at k = 32ks + 2p of row 16g + c.
inline void pack_rows_b(const uint16_t* xr, int64_t k, int64_t gt, int64_t ks, int32_t* out) {
  const int32_t* x32 = reinterpret_cast<const int32_t*>(xr);
  const int64_t l = k / 2;
  for (int64_t g = 0; g < gt; ++g) {
    int32_t* tile = out + (ks * gt + g) * 256;
    for (int cb = 0; cb < 2; ++cb)
      for (int pb = 0; pb < 2; ++pb) transpose8x8(x32 + (16 * g + 8 * cb) * l + 16 * ks + 8 * pb, l, tile + 8 * pb * 16 + 8 * cb, 16);
  }
}

// An m-block's C transposed: ct[m][i] = cb[i][m] (32 × 32, 8 × 8 blocks).
inline void rows_transpose(const float* cb, float* ct) {
  const int32_t* c = reinterpret_cast<const int32_t*>(cb);
  int32_t* t = reinterpret_cast<int32_t*>(ct);
  for (int mb = 0; mb < 32; mb += 8)
    for (int ib = 0; ib < kRowsGroup; ib += 8) transpose8x8(c + ib * 32 + mb, 32, t + mb * 32 + ib, 32);
}

// M ≤ kRowsMaxM (route amx_rows; gemm_route's default range is smaller: the rest is there for
// bench/amx_check.py's crossover to time on an AMX CPU through LOWBIT_AMX_ROWS_MAX_M).
constexpr int64_t kRowsMaxM = 128;

inline void gemm_rows(const GemmParams& p, const LowrankParams* lr) {
  const int64_t M = p.m, N = p.w.n, K = p.w.k;  // K % 32 == 0 (block ≥ 32)
  if (M > kRowsMaxM) throw std::logic_error("gemm_rows: M > 128 (gemm_route keeps it lower)");
  const int64_t gt = (M + 15) / 16, mp = 16 * gt, nmb = (gt + 1) / 2;  // 16-row groups of x; m-blocks of 32
  const int r = lr ? lr->r : 0;
  const int64_t rp = round_up(r, 32);
  const int order = p.w.fmt == Fmt::int2 ? 128 : 64;
  const bool fast = rows_fast_decode();
  static thread_local AlignedBufT<uint16_t> xs_buf, xk_buf, xas_buf;
  static thread_local AlignedBufT<int32_t> bs_buf, bk_buf, bxa_buf;
  uint16_t* xs = xs_buf.get(size_t(mp * K));                  // x in the step order (W's term)
  uint16_t* xk = lr ? xk_buf.get(size_t(mp * K)) : nullptr;   // x in k order (A's term)
  int32_t* bs = bs_buf.get(size_t(K / 32 * gt * 256));
  int32_t* bk = lr ? bk_buf.get(size_t(K / 32 * gt * 256)) : nullptr;
  uint16_t* xas = lr ? xas_buf.get(size_t(mp * rp)) : nullptr;  // bf16(s·xa), rows of rp
  int32_t* bxa = lr ? bxa_buf.get(size_t(rp / 32 * gt * 256)) : nullptr;
  RowSrc wsrc;
  wsrc.w = &p.w, wsrc.rows = N, wsrc.cols = K;
  RowSrc asrc, bsrc;
  if (lr) {
    asrc.a = lr->a, asrc.dt = p.dtype, asrc.ld = K, asrc.rows = r, asrc.cols = K;
    bsrc.a = lr->b, bsrc.dt = p.dtype, bsrc.ld = r, bsrc.rows = N, bsrc.cols = r;
  }
  const int64_t lda = std::min<int64_t>(std::max(K, rp), kRowsKC) + kRowPad;
  const size_t es = p.dtype == DType::f32 ? 4 : 2;
#pragma omp parallel
  {
    static thread_local AlignedBufT<uint16_t> a_buf, tmp_buf;
    static thread_local AlignedBuf c_buf, ct_buf;
    uint16_t* a = a_buf.get(size_t(kRowsGroup * lda));
    uint16_t* tmp = tmp_buf.get(size_t(std::max<int64_t>(K, kRowsKC)));
    float* cbuf = c_buf.get(size_t(nmb * 1024));
    float* ct = ct_buf.get(1024);
    Amx::thread_init();
    // x's rows in bf16, in both orders where the branch needs k order too; rows past M zero
#pragma omp for schedule(static)
    for (int64_t m = 0; m < mp; ++m) {
      uint16_t* row = xk ? xk + m * K : tmp;
      if (m < M) pack_row_bf16(p.x, p.dtype, K, m, K, K, row);
      else std::memset(row, 0, sizeof(uint16_t) * size_t(K));
      if (fast) step_order_avx512bf16(p.w.fmt, row, K, xs + m * K);
      else step_order_generic(order, row, K, xs + m * K);
    }
#pragma omp for schedule(static)
    for (int64_t ks = 0; ks < K / 32; ++ks) {
      pack_rows_b(xs, K, gt, ks, bs);
      if (lr) pack_rows_b(xk, K, gt, ks, bk);
    }
    if (lr) {  // xa = x·Aᵀ by groups of 32 of A's rows; then s·xa in bf16 as B tiles
      const RowsTerm ta{asrc, 0, bk, K};
#pragma omp for schedule(dynamic, 1)
      for (int64_t i0 = 0; i0 < rp; i0 += kRowsGroup) {
        rows_group(&ta, 1, i0, gt, fast, a, lda, tmp, cbuf);
        for (int64_t mb = 0; mb < nmb; ++mb) {
          rows_transpose(cbuf + mb * 1024, ct);
          for (int64_t m = 32 * mb; m < std::min(mp, 32 * mb + 32); ++m)
            for (int64_t i = i0; i < i0 + kRowsGroup; ++i) {
              const float v = ct[(m - 32 * mb) * 32 + (i - i0)];
              if (m < M && i < r) store_from_float(lr->xa, p.dtype, m * r + i, v);
              xas[m * rp + i] = m < M && i < r ? float_to_bf16(lr->s * v) : 0;
            }
        }
      }
#pragma omp for schedule(static)
      for (int64_t ks = 0; ks < rp / 32; ++ks) pack_rows_b(xas, rp, gt, ks, bxa);
    }
    const RowsTerm terms[2] = {{wsrc, order, bs, K}, {bsrc, 0, bxa, rp}};
#pragma omp for schedule(dynamic, 1)
    for (int64_t n0 = 0; n0 < N; n0 += kRowsGroup) {
      rows_group(terms, lr ? 2 : 1, n0, gt, fast, a, lda, tmp, cbuf);
      for (int64_t mb = 0; mb < nmb; ++mb) {
        rows_transpose(cbuf + mb * 1024, ct);
        store_rows(ct, 32, std::min<int64_t>(32, M - 32 * mb), int(std::min<int64_t>(kRowsGroup, N - n0)), p.bias,
                   p.dtype, static_cast<char*>(p.y) + size_t(32 * mb * N) * es, N, n0);
      }
    }
    Amx::thread_done();
  }
}

}  // namespace
}  // namespace lowbit::cpu
