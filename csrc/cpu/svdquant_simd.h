// csrc/cpu/svdquant_simd.h — the svdquant family's fast CPU kernels (contract: include/lowbit/svdquant.h),
// written once over a small vector interface `V` and built per ISA:
//   svdquant_avx512.cpp   V = 512-bit (AVX-512 F/BW/VL/VNNI: vpdpbusd)           'avx512' and up
//   svdquant_avx2.cpp     V = 256-bit (AVX2: vpmaddubsw + vpmaddwd for vpdpbusd)  'avx2', 'amx-emulated'
//   svdquant_amx.cpp / svdquant_amx_emu_avx2.cpp: the panel decode and epilogue below around the AMX
//   micro-kernel (cpu/svdquant_amx.h).
// Everything has internal linkage: each translation unit gets its own copy for its own flags.
//
// ============================================================================ the activation pass
// Rows in blocks of kActRows (8 / 4): each row is read once — converted to fp32, times inv_smooth (one
// fp32 multiply, as the contract says) into a K-long fp32 row buffer (L1/L2), quantized group by group
// from there (IEEE vdivps and round-to-nearest-even vroundps/vrndscaleps: bit-exact with
// svdq_quantize_group), and the block's rows then meet L2 (r, K) in one sweep: each l2 vector is loaded
// and converted once per block and feeds kActRows FMAs, so for large M l2 (r·K·2 bytes, 256 KiB at r = 32,
// K = 4096 bf16) streams from the L2 cache M / kActRows times instead of M times.
//
// ============================================================================ the W4A4 GEMM
// The int8 engine: vpdpbusd multiplies UNSIGNED bytes by SIGNED bytes, four per int32 lane, exactly. The
// weight is the unsigned side: a nibble q & 0xF (two's complement) XOR 8 is q + 8 ∈ [1, 15], so decoding
// is shift / and / xor only; x is the signed side (qx ∈ [-7, 7]). Then Σ qx·(qw + 8) = Σ qx·qw + 8·Σ qx,
// and the accumulator of each (row, group) starts at −8·Σ_{k∈g} qx (computed here once per row of x):
// the group sums stay exact integers (|Σ| ≤ 64·7·15 < 2^13; the int32 → fp32 conversion is exact).
// One 64-wide group is one scale step: y += float(acc) · sw[n,g] · sx[m,g] (fp32).
//
// Two shapes of loop:
//  * panel path (M > kGemvRows): per column panel of NR = 2·lanes columns the packed weight is decoded
//    once into an L2-resident u8 panel in vpdpbusd's layout, [group][k-quad 16][NR columns][4 bytes]
//    (K·NR bytes: 128 KiB at K = 4096, NR = 32), with sw, l1 (fp32) and the bias beside it; every
//    MR-row strip of x then runs the micro-kernel over the whole K: MR × 2 int32 accumulators for the
//    current group and MR × 2 fp32 accumulators for y stay in registers (AVX-512: MR = 6, 24 + 2 + 3 of 32
//    zmm), per k-quad 2 panel loads + MR broadcasts of 4 x bytes feed 2·MR vpdpbusd. The decode (once per
//    panel for all M rows): AVX-512 widens each column's group (vpmovzxbw, shift/and/or) and transposes
//    16 × 16 dwords (64 shuffles), ≈ 0.15 instr/weight; AVX2 gathers 4 packed bytes per column
//    (vpgatherdd) from a copy of the panel's rows with a one-line skew, then vpshufb / shift / and / or.
//    Measured (1 thread, Zen 4, 4096², wall): decode ≈ 1 ms with gathers on AVX-512 too, hence the
//    transpose there; M = 8 costs ≈ 2 ms on the panel path vs ≈ 4-5 ms as two GEMV passes.
//    The up-projection down·l1ᵀ and the bias are the epilogue of the same tile (l1 is in the panel as
//    fp32 [r][NR]): r·MR·2 FMAs per tile against K/4·MR·2 vpdpbusd — at r = 32, K = 4096, 3%.
//  * GEMV path (M ≤ kGemvRows): no panel; the packed row itself is the operand. A vector of 4·lanes
//    packed bytes holds 8·lanes consecutive elements = lanes/8 groups; its high nibbles are the even
//    elements, the low nibbles the odd ones, so x is pre-split once into even/odd halves in the same
//    order (xe[s][j] = qx[8·lanes·s + 2j]) and two vpdpbusd cover the step; int32 lanes 8t..8t+7 hold
//    group t of the step, scaled by a per-lane vector (sx·sw of its group) into fp32 lanes; one
//    horizontal sum per (row, column) at the end, where the branch (down · l1 row, lanes along r) and the
//    bias join it. Per 128 weights (AVX-512): 1 load, 3 decode (shift, 2 vpternlogd), 2 for sw, then per
//    row 2 vpdpbusd + cvt + mul + fma; 4 columns per pass share the x loads.
//
// Roofline, AMD Zen 4 (the project machine): vpdpbusd zmm 1/cycle/core (two 256-bit halves; ymm 2/cycle)
// = 64 int8 MACs/cycle, twice vdpbf16ps (32) and 4× fp32 FMA (16): at ~3.5 GHz ≈ 450 GOP/s per core for the
// W4A4 GEMM vs ≈ 225 for torch's bf16 and ≈ 110 for fp32. M = 1 reads K·N/2 weight bytes, the same as
// a W4A16 GEMV (plus sw: K·N/64·4 bytes, +12.5%), so it is bandwidth-bound like that one.
#pragma once
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/common.h"
#include "lowbit/svdquant.h"

namespace lowbit::cpu {
namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__)
// ---------------------------------------------------------------------------- 512-bit vectors
struct V {
  static constexpr int L = 16;  // fp32 / int32 lanes
  using I = __m512i;
  using F = __m512;
  static I zero_i() { return _mm512_setzero_si512(); }
  static F zero_f() { return _mm512_setzero_ps(); }
  static I set1_i(int32_t v) { return _mm512_set1_epi32(v); }
  static I set1_b(char v) { return _mm512_set1_epi8(v); }
  static F set1_f(float v) { return _mm512_set1_ps(v); }
  static I load_i(const void* p) { return _mm512_loadu_si512(p); }
  static void store_i(void* p, I v) { _mm512_storeu_si512(p, v); }
  static F load_f(const float* p) { return _mm512_loadu_ps(p); }
  static void store_f(float* p, F v) { _mm512_storeu_ps(p, v); }
  static I bcast4(const void* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
  // the packed weight bytes of one step (4·L bytes); `half`: only the first 2·L are valid (odd group count)
  static I load_step(const uint8_t* p, bool half) {
    return half ? _mm512_maskz_loadu_epi8(0xffffffffull, p) : _mm512_loadu_si512(p);
  }
  // lanes 0-7 = p[0], lanes 8-15 = p[1] (p[1] not read, and 0, when `half`)
  static F expand_groups(const float* p, bool half) {
    const __m128 t = half ? _mm_load_ss(p) : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), _mm512_castps128_ps512(t));
  }
  static I dpbusd(I acc, I u, I s) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, u, s);
#else  // exact here: |u·s + u·s| ≤ 2·15·7, far from vpmaddubsw's int16 saturation
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
  }
  static I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  static I and_xor(I a, I m, I x) { return _mm512_ternarylogic_epi32(a, m, x, 0x6A); }  // (a & m) ^ x
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  static I srl16(I a, int s) { return _mm512_srli_epi16(a, s); }
  static I sll16(I a, int s) { return _mm512_slli_epi16(a, s); }
  static I shuffle_b(I a, I c) { return _mm512_shuffle_epi8(a, c); }
  static I gather4(const void* base, I idx) { return _mm512_i32gather_epi32(idx, base, 1); }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(F a) { return _mm512_reduce_add_ps(a); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F abs(F a) { return _mm512_abs_ps(a); }
  static float hmax(F a) { return _mm512_reduce_max_ps(a); }
  // all lanes |v| ≤ FLT_MAX (false for inf and NaN: ordered compare)
  static bool all_finite(F a) {
    return _mm512_cmp_ps_mask(_mm512_abs_ps(a), _mm512_set1_ps(3.4028234663852886e38f), _CMP_LE_OQ) == 0xffff;
  }
  // 16 fp32 from x's dtype
  static F load_as(const void* p, DType t, int64_t i) {
    switch (t) {
      case DType::f32: return _mm512_loadu_ps(static_cast<const float*>(p) + i);
      case DType::bf16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i))), 16));
      default:
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
    }
  }
  // q = clamp(rne(v / s), -7, 7) of 64 values (4 vectors) → 64 int8
  static void quant64(const float* v, float s, int8_t* q) {
    const F sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-7.0f), hi = _mm512_set1_ps(7.0f);
    for (int t = 0; t < 4; ++t) {
      F d = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(v + 16 * t), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      d = _mm512_min_ps(_mm512_max_ps(d, lo), hi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * t), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(d)));
    }
  }
};
#else
// ---------------------------------------------------------------------------- 256-bit vectors (AVX2)
struct V {
  static constexpr int L = 8;
  using I = __m256i;
  using F = __m256;
  static I zero_i() { return _mm256_setzero_si256(); }
  static F zero_f() { return _mm256_setzero_ps(); }
  static I set1_i(int32_t v) { return _mm256_set1_epi32(v); }
  static I set1_b(char v) { return _mm256_set1_epi8(v); }
  static F set1_f(float v) { return _mm256_set1_ps(v); }
  static I load_i(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static void store_i(void* p, I v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
  static F load_f(const float* p) { return _mm256_loadu_ps(p); }
  static void store_f(float* p, F v) { _mm256_storeu_ps(p, v); }
  static I bcast4(const void* p) { int32_t v; std::memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
  static I load_step(const uint8_t* p, bool) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static F expand_groups(const float* p, bool) { return _mm256_broadcast_ss(p); }
  // vpdpbusd's arithmetic: exact here (|u·s + u·s| ≤ 2·15·7, far from vpmaddubsw's int16 saturation)
  static I dpbusd(I acc, I u, I s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
  static I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  static I and_xor(I a, I m, I x) { return _mm256_xor_si256(_mm256_and_si256(a, m), x); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  static I srl16(I a, int s) { return _mm256_srli_epi16(a, s); }
  static I sll16(I a, int s) { return _mm256_slli_epi16(a, s); }
  static I shuffle_b(I a, I c) { return _mm256_shuffle_epi8(a, c); }
  static I gather4(const void* base, I idx) { return _mm256_i32gather_epi32(static_cast<const int*>(base), idx, 1); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F abs(F a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
  static float hmax(F a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static bool all_finite(F a) {
    return _mm256_movemask_ps(_mm256_cmp_ps(abs(a), _mm256_set1_ps(3.4028234663852886e38f), _CMP_LE_OQ)) == 0xff;
  }
  static F load_as(const void* p, DType t, int64_t i) {
    switch (t) {
      case DType::f32: return _mm256_loadu_ps(static_cast<const float*>(p) + i);
      case DType::bf16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i))), 16));
      default:
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
    }
  }
  static void quant64(const float* v, float s, int8_t* q) {
    const F sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-7.0f), hi = _mm256_set1_ps(7.0f);
    for (int h = 0; h < 2; ++h) {
      I c[4];
      for (int t = 0; t < 4; ++t) {
        F d = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(v + 32 * h + 8 * t), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        c[t] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(d, lo), hi));
      }
      // packs work per 128-bit lane: dwords come out as [a0 b0 c0 d0 a1 b1 c1 d1] (4 bytes each)
      const I p = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * h),
                          _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
  }
};
#endif

constexpr int kNR = 2 * V::L;                 // columns per panel (two vectors)
constexpr int kQuads = kSvdqGroup / 4;        // k-quads per group: one vpdpbusd step each
constexpr int kActRows = V::L == 16 ? 8 : 4;  // rows per block of the activation pass
constexpr int kGemvRows = 4;                  // rows per GEMV pass, and the largest M sent to it
static_assert(kSvdqGroup == 64, "one group = 16 k-quads = one AMX k64 step");

// ============================================================================ activation pass
void act_block(const SvdquantActParams& p, int64_t i0, int rows, float* xs /* kActRows × k */) {
  const int64_t k = p.k, groups = k / kSvdqGroup;
  for (int i = 0; i < rows; ++i) {
    const int64_t row = i0 + i;
    float* xr = xs + int64_t(i) * k;
    for (int64_t c = 0; c < k; c += V::L) {
      typename V::F v = V::load_as(p.x, p.dtype, row * k + c);
      if (p.inv_smooth) v = V::mul(v, V::load_f(p.inv_smooth + c));
      V::store_f(xr + c, v);
    }
    for (int64_t g = 0; g < groups; ++g) {
      const float* vg = xr + g * kSvdqGroup;
      typename V::F amax = V::zero_f();
      bool finite = true;
      for (int t = 0; t < kSvdqGroup; t += V::L) {
        const typename V::F a = V::load_f(vg + t);
        finite = finite && V::all_finite(a);
        amax = V::max(amax, V::abs(a));
      }
      int8_t* q = p.qx + row * k + g * kSvdqGroup;
      const float s = finite ? V::hmax(amax) / 7.0f : NAN;
      p.sx[row * groups + g] = s;
      if (finite && s != 0.0f)
        V::quant64(vg, s, q);
      else
        std::memset(q, 0, kSvdqGroup);
    }
  }
  // down = xs · l2ᵀ: each l2 vector (loaded and converted once) feeds every row of the block
  for (int j0 = 0; j0 < p.r; j0 += 2) {
    const int jn = std::min(2, p.r - j0);
    typename V::F acc[kActRows][2];
    for (int i = 0; i < kActRows; ++i) acc[i][0] = acc[i][1] = V::zero_f();
    for (int64_t c = 0; c < k; c += V::L) {
      const typename V::F l0 = V::load_as(p.l2, p.dtype, int64_t(j0) * k + c);
      const typename V::F l1 = jn > 1 ? V::load_as(p.l2, p.dtype, int64_t(j0 + 1) * k + c) : V::zero_f();
      for (int i = 0; i < kActRows; ++i) {
        if (i >= rows) break;
        const typename V::F xv = V::load_f(xs + int64_t(i) * k + c);
        acc[i][0] = V::fma(xv, l0, acc[i][0]);
        acc[i][1] = V::fma(xv, l1, acc[i][1]);
      }
    }
    for (int i = 0; i < rows; ++i)
      for (int j = 0; j < jn; ++j) p.down[(i0 + i) * p.r + j0 + j] = V::hsum(acc[i][j]);
  }
}

void act(const SvdquantActParams& p) {
  const int64_t blocks = (p.m + kActRows - 1) / kActRows;
  const int threads = int(std::min<int64_t>({num_threads(), blocks, std::max<int64_t>(1, p.m * p.k / 16384)}));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> xs(size_t(kActRows * p.k));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b)
      act_block(p, b * kActRows, int(std::min<int64_t>(kActRows, p.m - b * kActRows)), xs.data());
  }
}

// ============================================================================ GEMM: shared pieces
// −8·Σ_{k∈g} qx[m,k] for rows [0, m): the start of each (row, group) accumulator (see the top).
void x_corrections(const int8_t* qx, int64_t m, int64_t k, int32_t* corr) {
  const int64_t groups = k / kSvdqGroup;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* q = qx + i * k + g * kSvdqGroup;
      int32_t s = 0;
      for (int c = 0; c < kSvdqGroup; ++c) s += q[c];
      corr[i * groups + g] = -8 * s;
    }
}

// The panel of columns [n0, n0 + cols) (cols ≤ NR; missing columns read column n0's bytes and are never
// stored): u8 q + 8 in [group][k-quad][NR][4] order, sw as [group][NR], l1 as fp32 [r][NR], the bias [NR].
template <int NR>
struct Panel {
  std::vector<uint8_t> w, raw;  // raw: the packed rows, copied 64 bytes apart
  std::vector<float> sw, l1, bias;
};

template <int NR>
void decode_panel(const SvdquantGemmParams& p, int64_t n0, int cols, Panel<NR>& pn) {
  static_assert(NR % V::L == 0, "a panel is whole vectors wide");
  const int64_t k = p.k, groups = k / kSvdqGroup, kb = k / 2;  // kb: packed bytes per weight row
  pn.w.resize(size_t(k * NR));
  pn.sw.assign(size_t(groups * NR), 0.0f);
  pn.l1.assign(size_t(std::max(1, p.r) * NR), 0.0f);
  pn.bias.assign(NR, 0.0f);
  // vpshufb controls: per dword j of a 128-bit lane, bytes [4j, 4j+1] (k-quad 2t) or [4j+2, 4j+3]
  // (k-quad 2t+1) spread to words (b, 0): the two codes of byte b become a word
  alignas(64) int8_t c0[4 * V::L], c1[4 * V::L];
  for (int d = 0; d < V::L; ++d) {
    const int b = 4 * (d % 4);
    const int8_t a0[4] = {int8_t(b), -128, int8_t(b + 1), -128}, a1[4] = {int8_t(b + 2), -128, int8_t(b + 3), -128};
    std::memcpy(c0 + 4 * d, a0, 4), std::memcpy(c1 + 4 * d, a1, 4);
  }
  const typename V::I ctl0 = V::load_i(c0), ctl1 = V::load_i(c1), x88 = V::set1_b(char(0x88)),
                      lo4 = V::set1_i(0x000f000f), hi4 = V::set1_i(0x0f000f00);
#if defined(__AVX512F__) && defined(__AVX512BW__)
  // Per group and 16 columns: each column's 32 packed bytes widen to its 64 codes in element order
  // (vpmovzxbw, then word → bytes (b >> 4, b & 15)), one zmm = its 16 k-quads; a 16 × 16 dword transpose
  // (64 shuffles) turns them into 16 panel rows of 16 columns. ≈ 0.15 instr/weight. (Zen 4's vpgatherdd,
  // the first version of this decode, took 1.4 ms of a 4096² M = 1 call; this, ≈ 0.3.)
  (void)ctl0, (void)ctl1, (void)x88;
  for (int v = 0; v < NR / V::L; ++v)
    for (int64_t g = 0; g < groups; ++g) {
      __m512i r[16], t[16];
      for (int c = 0; c < 16; ++c) {
        const int col = v * 16 + c < cols ? v * 16 + c : 0;
        const __m256i b = _mm256_xor_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.qw + (n0 + col) * kb + g * 32)), _mm256_set1_epi8(char(0x88)));
        const __m512i w = _mm512_cvtepu8_epi16(b);
        r[c] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(w, 4), lo4), _mm512_and_si512(_mm512_slli_epi16(w, 8), hi4));
      }
      for (int i = 0; i < 16; i += 2)
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
      for (int i = 0; i < 16; i += 4) {  // r[i + j], 128-bit lane l: k-quad 4l + j of columns i..i+3
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]), r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]), r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
      }
      uint8_t* out = pn.w.data() + (g * kQuads * NR + v * 16) * 4;
      for (int j = 0; j < 4; ++j) {
        const __m512i a = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), b = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
        const __m512i a2 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE), b2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
        _mm512_storeu_si512(out + (0 + j) * NR * 4, _mm512_shuffle_i32x4(a, b, 0x88));
        _mm512_storeu_si512(out + (4 + j) * NR * 4, _mm512_shuffle_i32x4(a, b, 0xDD));
        _mm512_storeu_si512(out + (8 + j) * NR * 4, _mm512_shuffle_i32x4(a2, b2, 0x88));
        _mm512_storeu_si512(out + (12 + j) * NR * 4, _mm512_shuffle_i32x4(a2, b2, 0xDD));
      }
    }
#else
  // The panel's packed rows are one contiguous block (cols · kb bytes): it is first copied in order (the
  // hardware prefetcher streams it) to rows kb + 64 bytes apart — gathering across rows kb apart
  // (2 KiB for K = 4096) straight from qw put all NR lines in one or two L1 sets and left the prefetcher
  // NR streams: measured 2 ms of a 4096² M = 1 call, vs ≈ 0.5 ms this way — then gathered from there (L2).
  const int64_t row_b = kb + 64;
  pn.raw.resize(size_t(NR * row_b));
  uint8_t* buf = pn.raw.data();
  for (int c = 0; c < cols; ++c) std::memcpy(buf + c * row_b, p.qw + (n0 + c) * kb, size_t(kb));
  alignas(64) int32_t off[NR];
  for (int c = 0; c < NR; ++c) off[c] = int32_t((c < cols ? c : 0) * row_b);
  for (int v = 0; v < NR / V::L; ++v) {
    const typename V::I idx = V::load_i(off + v * V::L);
    for (int64_t g = 0; g < groups; ++g)
      for (int t = 0; t < kQuads / 2; ++t) {
        // lane c: packed bytes 4t..4t+3 of group g of column c = elements 8t..8t+7, nibbles XOR 8
        const typename V::I raw = V::xor_(V::gather4(buf + g * 32 + 4 * t, idx), x88);
        for (int h = 0; h < 2; ++h) {
          const typename V::I w = V::shuffle_b(raw, h ? ctl1 : ctl0);  // words: byte b, zero-extended
          // word → bytes (b >> 4, b & 15): element 2i (high nibble) first
          const typename V::I e = V::or_(V::and_(V::srl16(w, 4), lo4), V::and_(V::sll16(w, 8), hi4));
          V::store_i(pn.w.data() + ((g * kQuads + 2 * t + h) * NR + v * V::L) * 4, e);
        }
      }
  }
#endif
  for (int c = 0; c < cols; ++c) {
    const int64_t n = n0 + c;
    for (int64_t g = 0; g < groups; ++g) pn.sw[g * NR + c] = p.sw[n * groups + g];
    for (int j = 0; j < p.r; ++j) pn.l1[j * NR + c] = load_as_float(p.l1, p.dtype, n * p.r + j);
    if (p.bias) pn.bias[c] = load_as_float(p.bias, p.dtype, n);
  }
}

// y rows [i0, i0 + rows) × panel columns [n0, n0 + cols): ybuf (rows × NR, the scaled group sums) plus
// the branch and the bias, stored in the output dtype.
// `with_branch`: false when the micro-kernel already added down · l1ᵀ in registers (the VNNI path).
template <int NR>
void panel_epilogue(const SvdquantGemmParams& p, const Panel<NR>& pn, int64_t i0, int rows, int64_t n0, int cols,
                    float* ybuf, bool with_branch = true) {
  const int r = with_branch ? p.r : 0;
  for (int i = 0; i < rows; ++i) {
    float* yr = ybuf + i * NR;
    const float* dn = r ? p.down + (i0 + i) * p.r : nullptr;
    for (int v = 0; v < NR / V::L; ++v) {
      typename V::F y = V::add(V::load_f(yr + v * V::L), V::load_f(pn.bias.data() + v * V::L));
      for (int j = 0; j < r; ++j) y = V::fma(V::set1_f(dn[j]), V::load_f(pn.l1.data() + j * NR + v * V::L), y);
      V::store_f(yr + v * V::L, y);
    }
    if (p.dtype == DType::f32) {
      std::memcpy(static_cast<float*>(p.y) + (i0 + i) * p.n + n0, yr, size_t(cols) * 4);
    } else {
      for (int c = 0; c < cols; ++c) store_from_float(p.y, p.dtype, (i0 + i) * p.n + n0 + c, yr[c]);
    }
  }
}

// ============================================================================ GEMM: panel path
// MR rows × kNR columns over the whole K, then the up-projection down · l1ᵀ on the registers (each l1
// vector feeds MR rows); ybuf gets the MR × kNR result.
template <int MR>
void micro(const int8_t* x, int64_t k, const int32_t* corr, const float* sx, const float* down, int r,
           const Panel<kNR>& pn, float* ybuf) {
  const int64_t groups = k / kSvdqGroup;
  typename V::F y[MR][2];
  for (int i = 0; i < MR; ++i) y[i][0] = y[i][1] = V::zero_f();
  for (int64_t g = 0; g < groups; ++g) {
    typename V::I acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = V::set1_i(corr[i * groups + g]);
    const uint8_t* w = pn.w.data() + g * kQuads * kNR * 4;
    const int8_t* xg = x + g * kSvdqGroup;
    for (int q = 0; q < kQuads; ++q) {
      const typename V::I w0 = V::load_i(w + q * kNR * 4), w1 = V::load_i(w + q * kNR * 4 + 4 * V::L);
      for (int i = 0; i < MR; ++i) {
        const typename V::I xb = V::bcast4(xg + i * k + 4 * q);
        acc[i][0] = V::dpbusd(acc[i][0], w0, xb);
        acc[i][1] = V::dpbusd(acc[i][1], w1, xb);
      }
    }
    const typename V::F s0 = V::load_f(pn.sw.data() + g * kNR), s1 = V::load_f(pn.sw.data() + g * kNR + V::L);
    for (int i = 0; i < MR; ++i) {
      const typename V::F sxi = V::set1_f(sx[i * groups + g]);
      y[i][0] = V::fma(V::mul(V::cvt(acc[i][0]), s0), sxi, y[i][0]);
      y[i][1] = V::fma(V::mul(V::cvt(acc[i][1]), s1), sxi, y[i][1]);
    }
  }
  for (int j = 0; j < r; ++j) {
    const typename V::F a0 = V::load_f(pn.l1.data() + j * kNR), a1 = V::load_f(pn.l1.data() + j * kNR + V::L);
    for (int i = 0; i < MR; ++i) {
      const typename V::F d = V::set1_f(down[i * r + j]);
      y[i][0] = V::fma(d, a0, y[i][0]);
      y[i][1] = V::fma(d, a1, y[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) V::store_f(ybuf + i * kNR, y[i][0]), V::store_f(ybuf + i * kNR + V::L, y[i][1]);
}

constexpr int kMR = V::L == 16 ? 6 : 2;  // AVX-512: 24 accumulators + 2 panel + 1-2 broadcast of 32 zmm

void micro_rows(int rows, const int8_t* x, int64_t k, const int32_t* corr, const float* sx, const float* down, int r,
                const Panel<kNR>& pn, float* ybuf) {
  switch (rows) {
    case 1: return micro<1>(x, k, corr, sx, down, r, pn, ybuf);
    case 2: return micro<2>(x, k, corr, sx, down, r, pn, ybuf);
#if defined(__AVX512F__) && defined(__AVX512BW__)
    case 3: return micro<3>(x, k, corr, sx, down, r, pn, ybuf);
    case 4: return micro<4>(x, k, corr, sx, down, r, pn, ybuf);
    case 5: return micro<5>(x, k, corr, sx, down, r, pn, ybuf);
    case 6: return micro<6>(x, k, corr, sx, down, r, pn, ybuf);
#endif
    default: break;
  }
}

void gemm_panels(const SvdquantGemmParams& p, const int32_t* corr) {
  const int64_t k = p.k, groups = k / kSvdqGroup, panels = (p.n + kNR - 1) / kNR;
  const int threads = int(std::min<int64_t>(num_threads(), panels));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    Panel<kNR> pn;
    alignas(64) float ybuf[kMR * kNR];
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < panels; ++b) {
      const int64_t n0 = b * kNR;
      const int cols = int(std::min<int64_t>(kNR, p.n - n0));
      decode_panel<kNR>(p, n0, cols, pn);
      for (int64_t i0 = 0; i0 < p.m; i0 += kMR) {
        const int rows = int(std::min<int64_t>(kMR, p.m - i0));
        micro_rows(rows, p.qx + i0 * k, k, corr + i0 * groups, p.sx + i0 * groups, p.r ? p.down + i0 * p.r : nullptr,
                   p.r, pn, ybuf);
        panel_epilogue<kNR>(p, pn, i0, rows, n0, cols, ybuf, false);
      }
    }
  }
}

// ============================================================================ GEMM: GEMV path
constexpr int kStep = 8 * V::L;  // elements per step: lanes/8 groups, 8 int32 lanes per group

struct GemvX {  // the rows of x in the GEMV path's order, padded to whole steps
  int64_t steps;
  std::vector<int8_t> xe, xo;  // (rows, steps, 4·L): even / odd elements
  std::vector<float> sxv;      // (rows, steps, L): sx of each lane's group
  std::vector<int32_t> cv;     // (rows, steps, L): −8·Σqx of the group in its first lane, 0 elsewhere
};

void gemv_prepare(const SvdquantGemmParams& p, const int32_t* corr, GemvX& gx) {
  const int64_t k = p.k, groups = k / kSvdqGroup;
  gx.steps = (k + kStep - 1) / kStep;
  const int64_t s = gx.steps;
  gx.xe.assign(size_t(p.m * s * 4 * V::L), 0);
  gx.xo.assign(size_t(p.m * s * 4 * V::L), 0);
  gx.sxv.assign(size_t(p.m * s * V::L), 0.0f);
  gx.cv.assign(size_t(p.m * s * V::L), 0);
  for (int64_t i = 0; i < p.m; ++i) {
    for (int64_t c = 0; c < k / 2; ++c) {
      gx.xe[size_t(i * s * 4 * V::L + c)] = p.qx[i * k + 2 * c];
      gx.xo[size_t(i * s * 4 * V::L + c)] = p.qx[i * k + 2 * c + 1];
    }
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t lane0 = i * s * V::L + g * 8;  // group g: step g / (L/8), lanes 8·(g mod L/8) ..
      for (int l = 0; l < 8; ++l) gx.sxv[size_t(lane0 + l)] = p.sx[i * groups + g];
      gx.cv[size_t(lane0)] = corr[i * groups + g];
    }
  }
}

// rows [i0, i0 + MG) × columns [n0, n1), kGemvCols columns per pass (independent accumulation chains;
// the x operands of a step are loaded once for all of them)
constexpr int kGemvCols = 4;

template <int MG>
void gemv_rows(const SvdquantGemmParams& p, const GemvX& gx, int64_t i0, int64_t n0, int64_t n1) {
  const int64_t k = p.k, groups = k / kSvdqGroup, s = gx.steps, kb = k / 2;
  const typename V::I m4 = V::set1_b(0x0f), x8 = V::set1_b(0x08);
  constexpr int kGroupsPerStep = V::L / 8;
  const bool odd_tail = groups % kGroupsPerStep != 0;
  for (int64_t n = n0; n < n1; n += kGemvCols) {
    const int nc = int(std::min<int64_t>(kGemvCols, n1 - n));
    const uint8_t* wr[kGemvCols];
    const float* swr[kGemvCols];
    for (int c = 0; c < kGemvCols; ++c) {
      const int64_t col = c < nc ? n + c : n;  // missing columns recompute column n, stored once
      wr[c] = p.qw + col * kb, swr[c] = p.sw + col * groups;
    }
    typename V::F y[MG][kGemvCols];
    for (int i = 0; i < MG; ++i)
      for (int c = 0; c < kGemvCols; ++c) y[i][c] = V::zero_f();
    for (int64_t st = 0; st < s; ++st) {
      const bool half = odd_tail && st == s - 1;
      typename V::I hi[kGemvCols], lo[kGemvCols];
      typename V::F swv[kGemvCols];
      for (int c = 0; c < kGemvCols; ++c) {
        // nibble XOR 8 = q + 8 (u8), high nibbles = even elements, low = odd
        const typename V::I b = V::load_step(wr[c] + st * 4 * V::L, half);
        hi[c] = V::and_xor(V::srl16(b, 4), m4, x8), lo[c] = V::and_xor(b, m4, x8);
        swv[c] = V::expand_groups(swr[c] + st * kGroupsPerStep, half);
      }
      for (int i = 0; i < MG; ++i) {
        const int64_t o = (i0 + i) * s + st;
        const typename V::I cv = V::load_i(gx.cv.data() + o * V::L), xe = V::load_i(gx.xe.data() + o * 4 * V::L),
                            xo = V::load_i(gx.xo.data() + o * 4 * V::L);
        const typename V::F sxv = V::load_f(gx.sxv.data() + o * V::L);
        for (int c = 0; c < kGemvCols; ++c) {
          const typename V::I acc = V::dpbusd(V::dpbusd(cv, hi[c], xe), lo[c], xo);
          y[i][c] = V::fma(V::mul(V::cvt(acc), swv[c]), sxv, y[i][c]);
        }
      }
    }
    alignas(64) float ys[MG][kGemvCols][V::L];
    for (int i = 0; i < MG; ++i)
      for (int c = 0; c < kGemvCols; ++c) V::store_f(ys[i][c], y[i][c]);
    for (int c = 0; c < nc; ++c) {
      // the branch: lanes along r, folded into the same horizontal sum
      for (int i = 0; i < MG; ++i) {
        typename V::F yc = V::load_f(ys[i][c]);
        for (int j = 0; j < p.r; j += V::L) {
          const int jn = std::min(V::L, p.r - j);
          alignas(64) float tl[V::L], td[V::L];
          typename V::F lv, d;
          if (jn == V::L) {
            lv = V::load_as(p.l1, p.dtype, (n + c) * p.r + j);
            d = V::load_f(p.down + (i0 + i) * p.r + j);
          } else {
            for (int t = 0; t < V::L; ++t) {
              tl[t] = t < jn ? load_as_float(p.l1, p.dtype, (n + c) * p.r + j + t) : 0.0f;
              td[t] = t < jn ? p.down[(i0 + i) * p.r + j + t] : 0.0f;
            }
            lv = V::load_f(tl), d = V::load_f(td);
          }
          yc = V::fma(d, lv, yc);
        }
        const float bias = p.bias ? load_as_float(p.bias, p.dtype, n + c) : 0.0f;
        store_from_float(p.y, p.dtype, (i0 + i) * p.n + n + c, V::hsum(yc) + bias);
      }
    }
  }
}

void gemm_gemv(const SvdquantGemmParams& p, const int32_t* corr) {
  GemvX gx;
  gemv_prepare(p, corr, gx);
  constexpr int64_t kCols = 64;  // columns per work item
  const int64_t items = (p.n + kCols - 1) / kCols;
  const int threads = int(std::min<int64_t>({num_threads(), items, std::max<int64_t>(1, p.m * p.n * p.k / 262144)}));
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t b = 0; b < items; ++b) {
    const int64_t n0 = b * kCols, n1 = std::min(p.n, n0 + kCols);
    for (int64_t i0 = 0; i0 < p.m; i0 += kGemvRows) {
      switch (std::min<int64_t>(kGemvRows, p.m - i0)) {
        case 1: gemv_rows<1>(p, gx, i0, n0, n1); break;
        case 2: gemv_rows<2>(p, gx, i0, n0, n1); break;
        case 3: gemv_rows<3>(p, gx, i0, n0, n1); break;
        default: gemv_rows<4>(p, gx, i0, n0, n1); break;
      }
    }
  }
}

void gemm(const SvdquantGemmParams& p) {
  std::vector<int32_t> corr(size_t(p.m * (p.k / kSvdqGroup)));
  x_corrections(p.qx, p.m, p.k, corr.data());
  if (p.m <= kGemvRows)
    gemm_gemv(p, corr.data());
  else
    gemm_panels(p, corr.data());
}

}  // namespace
}  // namespace lowbit::cpu
