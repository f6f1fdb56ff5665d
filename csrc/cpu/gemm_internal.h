// csrc/cpu/gemm_internal.h — what the gemm family's files share: gemm.cpp (checks, dispatch,
// portable path), gemm_avx2.cpp (AVX2 tile kernels and the AVX2 GEMV), gemm_avx512.cpp (the AVX-512
// VNNI int16 kernels), gemm_gemv_i16.h (the small-M GEMV, built into both ISA files) and lowrank.cpp
// (the lowrank family runs on the gemm kernels with its branch fused in).
//
// The helpers defined here are in an anonymous namespace on purpose: this header is compiled with
// different ISA flags in different files, and an inline function with external linkage would be
// merged by the linker into one copy — possibly the AVX-512 one, called from the portable path.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <new>

#include "cpu/common.h"
#include "lowbit/gemm.h"
#include "lowbit/lowrank.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace lowbit::cpu {

// ---- across files (defined once)
void check_gemm(const GemmParams& p, const char* who);             // gemm.cpp; lowrank.cpp too
void gemm_portable(const GemmParams& p, const LowrankParams* lr);  // gemm.cpp: forward, + branch if lr
#if LOWBIT_HAVE_AVX2_TU
// gemm_avx2.cpp (use_avx2()): the forward (GEMV in passes for M ≤ 24, tile GEMM above; the low-rank
// branch fused when lr) and gemm_t. Each picks the AVX-512 VNNI int16 variant when use_avx512().
void gemm_avx2(const GemmParams& p, const LowrankParams* lr);
void gemm_t_avx2(const GemmParams& p);

// The kernel a product runs (gemm_avx2.cpp: gemm_route, where the rules are written down).
enum class Route { gemv_i16, tile_f32, tile_f32_bf16w, tile_i16, avx512bf16, amx, amx_emulated, gemv_bf16, amx_rows,
                   amx_rows_emulated };
Route gemm_route(DType dt, int64_t m, bool transposed, Fmt fmt);
// The bf16 engines (cpu/gemm_bf16.h): gemm / lowrank forward (lr) and gemm_t, per engine TU.
void gemm_bf16_avx512bf16(const GemmParams& p, const LowrankParams* lr);  // gemm_avx512bf16.cpp
void gemm_t_bf16_avx512bf16(const GemmParams& p);
void gemm_bf16_amx(const GemmParams& p, const LowrankParams* lr);  // gemm_amx.cpp
void gemm_t_bf16_amx(const GemmParams& p);
void gemm_bf16_amx_emu(const GemmParams& p, const LowrankParams* lr);  // gemm_amx_emu_avx2.cpp
void gemm_t_bf16_amx_emu(const GemmParams& p);
void lowrank_backward_bf16_avx512bf16(const LowrankBackwardParams& p);  // the lowrank backward, same TUs
void gemv_bf16_avx512bf16(const GemmParams& p, const LowrankParams* lr);  // small M, the dot form
// The AMX rows form (gemm_amx.h) on CPUs with AVX-512 BF16 (every 'amx' CPU; 'amx-emulated' where present):
// rows [n0, n0 + nr) of W, columns [k0, k0 + kc) (k0 a multiple of 128; kc too, or k0 + kc = K), decoded
// into out (row stride ldo) in the dot form's step order; x's row of k values put in that order
// (deinterleave64 / deinterleave128 of gemm_avx512bf16.cpp).
void decode_rows_avx512bf16(const GemmWeight& w, int64_t n0, int nr, int64_t k0, int kc, uint16_t* out, int64_t ldo);
void step_order_avx512bf16(Fmt fmt, const uint16_t* src, int64_t k, uint16_t* dst);
bool cpu_can_avx512bf16();  // dispatch.cpp: the CPU has AVX-512 F/BW/VL/VNNI/BF16 (whatever the path)
void gemm_rows_amx(const GemmParams& p, const LowrankParams* lr);      // gemm_amx.cpp
void gemm_rows_amx_emu(const GemmParams& p, const LowrankParams* lr);  // gemm_amx_emu_avx2.cpp
void lowrank_backward_bf16_amx(const LowrankBackwardParams& p);
void lowrank_backward_bf16_amx_emu(const LowrankBackwardParams& p);

// gemm_avx512.cpp (use_avx512() only): the GEMV's VNNI build, and the int16 pieces of the tile
// kernels (arguments and layouts at their definitions).
void gemv_avx512(const GemmParams& p, const LowrankParams* lr);
// gemm_gemv_i8_avx512.cpp: the int8-activation GEMV (vpdpbusd) of the `medium` policy, and when it
// applies (use_avx512(), `medium`, fp32 x, not fp4).
bool gemv_i8_applies(DType dt, Fmt fmt);
inline bool gemv_i8_applies(const GemmParams& p) { return gemv_i8_applies(p.dtype, p.w.fmt); }
void gemv_i8_avx512(const GemmParams& p, const LowrankParams* lr);
void pack_x_i16(const float* v, int64_t K, float qx, int32_t* xq, float* dx, float* gsum);
void decode_tile_i16(const GemmWeight& w, int64_t n0, int rows, int rows_pad, int64_t k0, int kc, float qw,
                     int32_t* out, int64_t ld, float* sw, int64_t lds);
void micro_i16(bool first, int depth, const int32_t* v, int64_t v_step, const int32_t* b, int64_t ldb, const float* ls,
               const float* rs, int64_t lds, float* c, int64_t ldc);
void pack_gy_i16(const float* gyf, int64_t mp, int64_t N, const float* sb, const float* zb, float qx, int32_t* gq,
                 float* dq, float* zt);
void decode_tile_t_i16(const GemmWeight& w, int64_t n0, int nn, int64_t k0, int kw, float qw, int32_t* out);
#endif

namespace {

// Scale of block b of the weight (flat block index over all n * k / block blocks); double quant
// rebuilds it by the rule of formats.h.
inline float weight_scale(const GemmWeight& w, int64_t b) {
  if (!w.scale_q) return w.scale[b];
  return dq_scale(kDynamicSigned[w.scale_q[b]], w.scale_nested[nested_block_of(b)], w.scale_offset);
}

inline void store_out(void* y, DType t, int64_t i, float v) { store_from_float(y, t, i, v); }

// f(q, l) for the rows [0, p.m) of a product in passes of at most `rows`: q the pass's GemmParams (x and
// y moved to its first row), l its LowrankParams (xa moved too) or null. The small-M kernels take their
// rows in passes (gemv_passes, gemv_bf16).
template <class F>
void row_passes(const GemmParams& p, const LowrankParams* lr, int64_t rows, F f) {
  const size_t es = p.dtype == DType::f32 ? 4 : 2;
  for (int64_t m0 = 0; m0 < p.m; m0 += rows) {
    GemmParams q = p;
    q.m = std::min<int64_t>(rows, p.m - m0);
    q.x = static_cast<const char*>(p.x) + size_t(m0 * p.w.k) * es;
    q.y = static_cast<char*>(p.y) + size_t(m0 * p.w.n) * es;
    LowrankParams l;
    if (lr) {
      l = *lr;
      l.g = q;
      l.xa = static_cast<char*>(lr->xa) + size_t(m0 * lr->r) * es;
    }
    f(q, lr ? &l : nullptr);
  }
}

// A 64-byte aligned buffer reused across calls on the same thread (grows, never shrinks).
template <class T>
struct AlignedBufT {
  T* p = nullptr;
  size_t cap = 0;
  T* get(size_t n) {
    if (n > cap) {
      std::free(p);
      cap = (n * sizeof(T) + 63) / 64 * 64 / sizeof(T);
      p = static_cast<T*>(std::aligned_alloc(64, cap * sizeof(T)));
      if (!p) throw std::bad_alloc();
    }
    return p;
  }
  ~AlignedBufT() { std::free(p); }
};
using AlignedBuf = AlignedBufT<float>;

// ---- the tile kernels' shapes (gemm_avx2.cpp; the int16 micro-kernel of gemm_avx512.cpp too)
constexpr int kMR = 16;  // rows of x per micro tile (two ymm)
constexpr int kNR = 6;   // rows of W per micro tile (broadcasts)
constexpr int kG = 32;   // int16 variant: k per activation group (and per int32 flush)

// int16 variant: the activations' scale QX and the table weights' QW per format (the overflow and
// error bounds behind them: top of gemm_avx512.cpp).
struct TileQ { float qx, qw; };
inline TileQ tile_q(Fmt f) {
  switch (f) {
    case Fmt::nf4: return {8191.0f, 8192.0f};
    case Fmt::fp4: return {16383.0f, 3072.0f};
    default: return {32767.0f, 1.0f};
  }
}

#if defined(__AVX2__)  // the ISA files only
// Eight codes (int32 lanes, from unpack8) → their fp32 values with the fp32 operations of
// cpu::dequantize (no FMA; bit-identical): table[q]·s (t_lo/t_hi: the 16-entry table) or (q − z)·s.
inline __m256 decode8_f32(__m256i idx, bool is_table, __m256 t_lo, __m256 t_hi, __m256 s, __m256 z) {
  if (is_table) {
    const __m256 lo = _mm256_permutevar8x32_ps(t_lo, idx), hi = _mm256_permutevar8x32_ps(t_hi, idx);
    return _mm256_mul_ps(_mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))), s);
  }
  return _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(idx), z), s);
}

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
#endif

}  // namespace
}  // namespace lowbit::cpu
