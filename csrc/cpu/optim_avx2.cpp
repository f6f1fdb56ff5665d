// csrc/cpu/optim_avx2.cpp — AVX2/FMA/F16C inner loops of the optim family (this file alone is
// compiled with -mavx2 -mfma -mf16c; optim.cpp calls it only when the CPU supports them).
// Same fp32 operation sequence as optim_rules.h (no FMA: -ffp-contract=off and explicit mul/add),
// so every path is bit-exact with the reference; tails go through the scalar rules.
#include <immintrin.h>

#include "cpu/optim_rules.h"
#include "cpu/simd_avx2.h"

namespace lowbit::cpu {

namespace {

using simd::hmax;
using simd::load8;
using simd::store8;

struct VScalars {
  __m256 beta1, omb1, beta2, omb2, eps, decay, nstep, ibc2s;
  explicit VScalars(const AdamWScalars& s)
      : beta1(_mm256_set1_ps(s.beta1)), omb1(_mm256_set1_ps(s.one_minus_beta1)), beta2(_mm256_set1_ps(s.beta2)),
        omb2(_mm256_set1_ps(s.one_minus_beta2)), eps(_mm256_set1_ps(s.eps)), decay(_mm256_set1_ps(s.decay)),
        nstep(_mm256_set1_ps(s.neg_step_size)), ibc2s(_mm256_set1_ps(s.inv_bc2_sqrt)) {}
};

// The optim_rules.h::adamw_elem sequence on 8 lanes; m, v updated in place, returns p.
inline __m256 adamw8lanes(__m256 p, __m256 g, __m256& m, __m256& v, const VScalars& s) {
  p = _mm256_mul_ps(p, s.decay);
  m = _mm256_add_ps(_mm256_mul_ps(m, s.beta1), _mm256_mul_ps(g, s.omb1));
  v = _mm256_add_ps(_mm256_mul_ps(v, s.beta2), _mm256_mul_ps(_mm256_mul_ps(g, s.omb2), g));
  const __m256 d = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(v), s.ibc2s), s.eps);
  return _mm256_add_ps(p, _mm256_mul_ps(s.nstep, _mm256_div_ps(m, d)));
}

// lut32 key of t and the low bits of |t|, flipped for t < 0 (the convention of optim_rules.h).
inline void code8_key(const Code8Search& cs, __m256 t, __m256i& key, __m256i& xlow) {
  const __m256i u = _mm256_castps_si256(t);
  const __m256i neg = _mm256_srai_epi32(u, 31);
  const __m256i mask = _mm256_set1_epi32(int(cs.low_mask32));
  __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  a = _mm256_min_epi32(_mm256_max_epi32(a, _mm256_set1_epi32(int(Code8Search::kLoBits))),
                       _mm256_set1_epi32(int(Code8Search::kHiBits)));
  key = _mm256_srl_epi32(_mm256_sub_epi32(a, _mm256_set1_epi32(int(Code8Search::kLoBits))),
                         _mm_cvtsi32_si128(cs.shift32));
  xlow = _mm256_and_si256(a, mask);
  if (cs.neg32) {
    key = _mm256_add_epi32(key, _mm256_and_si256(neg, _mm256_set1_epi32(cs.keys32)));
    xlow = _mm256_xor_si256(xlow, _mm256_and_si256(neg, mask));
  } else {
    key = _mm256_andnot_si256(neg, key);  // x < 0 (or -0): key 0, whose entry gives code 0
  }
}
// code = c + (xlow > thr ? jump : 0) from the looked-up entries e = lut32[key] (optim_rules.h).
inline __m256i code8_finish(__m256i e, __m256i xlow) {
  const __m256i c = _mm256_and_si256(e, _mm256_set1_epi32(0xff));
  const __m256i jump = _mm256_and_si256(_mm256_srli_epi32(e, 8), _mm256_set1_epi32(0xf));
  const __m256i thr = _mm256_srli_epi32(e, 12);
  return _mm256_add_epi32(c, _mm256_and_si256(_mm256_cmpgt_epi32(xlow, thr), jump));
}

inline void store_codes8(uint8_t* dst, __m256i c) {
  __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(w, w));
}

// Table lookups as scalar loads. GCC would otherwise "vectorize" these loops into an
// extract/insert sequence ~5x slower than the plain loads; keep them scalar.
#define LOWBIT_SCALAR_LOOP __attribute__((optimize("no-tree-vectorize", "no-tree-slp-vectorize")))
// Each lookup is a load of the index, a load from the table and a store: three memory operations,
// and Zen 3 issues three per cycle, so ~1.1 cycles per lookup measured (L1 or L2 tables alike;
// unpacking the indices from 64-bit loads with shifts instead was no faster).
LOWBIT_SCALAR_LOOP void lookup_maps(const uint8_t* qm, const uint8_t* qv, int n, float* m, float* v) {
  for (int j = 0; j < n; ++j) {
    m[j] = kDynamicSigned[qm[j]];
    v[j] = kDynamicUnsigned[qv[j]];
  }
}
// Codes of the bitsandbytes rule: one byte load per element from the grid tables, stored straight
// into the state (im / iv hold grid indices, iv already minus kGridHalf).
LOWBIT_SCALAR_LOOP void lookup_grid(const uint8_t* lut_m, const uint8_t* lut_v, const uint16_t* im,
                                    const uint16_t* iv, int n, uint8_t* qm, uint8_t* qv) {
  for (int j = 0; j < n; ++j) {
    qm[j] = lut_m[im[j]];
    qv[j] = lut_v[iv[j]];
  }
}
LOWBIT_SCALAR_LOOP void lookup_buckets(const uint32_t* lut_m, const uint32_t* lut_v, int n, uint32_t* km,
                                       uint32_t* kv) {
  for (int j = 0; j < n; ++j) {
    km[j] = lut_m[km[j]];
    kv[j] = lut_v[kv[j]];
  }
}

}  // namespace

void adamw32_range_avx2(const AdamW32Params& p, int64_t i0, int64_t i1) {
  const VScalars s(p.s);
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    __m256 m = _mm256_loadu_ps(p.m + i), v = _mm256_loadu_ps(p.v + i);
    const __m256 pn = adamw8lanes(load8(p.p, p.p_dtype, i), load8(p.g, p.g_dtype, i), m, v, s);
    store8(p.p, p.p_dtype, i, pn);
    _mm256_storeu_ps(p.m + i, m);
    _mm256_storeu_ps(p.v + i, v);
  }
  for (; i < i1; ++i) {
    const AdamWElem e = adamw_elem(load_as_float(p.p, p.p_dtype, i), load_as_float(p.g, p.g_dtype, i),
                                   p.m[i], p.v[i], p.s);
    store_from_float(p.p, p.p_dtype, i, e.p);
    p.m[i] = e.m;
    p.v[i] = e.v;
  }
}

// Zen 3 gathers cost more than the whole 32-bit step here (measured again with the dequantize
// lookups as gathers: 1.4x slower than below; session 3: 0.38 vs 0.31 ns per element and map), so
// the table lookups (dequantize: map[q]; re-quantize: grid[i] under the bitsandbytes rule,
// lut32[key] under "nearest") are plain scalar loads in their own loops over the block buffers, and
// everything else stays 8-wide. Cost per element on one core (3.7 GHz, L2-resident, bitsandbytes
// rule): dequantize lookups 0.62 ns, update 0.44 (vsqrtps + vdivps: the 32-bit step's whole cost),
// grid indices 0.27, code lookups 0.63 — 1.86 ns (the bucket search it replaces: 2.15).
void adamw8_blocks_avx2(const AdamW8Params& p, int64_t b0, int64_t b1) {
  const VScalars s(p.s);
  const Code8Search &cs = code8_search(true, p.rounding), &cu = code8_search(false, p.rounding);
  const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f), neg_one = _mm256_set1_ps(-1.0f);
  const __m256 zero = _mm256_setzero_ps();
  alignas(32) float mbuf[kOptimBlock], vbuf[kOptimBlock];
  alignas(32) uint32_t km[kOptimBlock], kv[kOptimBlock];
  alignas(32) uint16_t im16[kOptimBlock], iv16[kOptimBlock];
  const bool grid = p.rounding == kOptimRoundBitsandbytes;
  // the grid tables exist only for the bitsandbytes rule (built by adamw8 before its parallel region)
  const Code8Grid* gs = grid ? &code8_grid(true) : nullptr;
  const Code8Grid* gu = grid ? &code8_grid(false) : nullptr;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t base = b * kOptimBlock;
    const int n = int(std::min<int64_t>(kOptimBlock, p.numel - base));
    const int n8 = n & ~7;
    const float am = p.absmax_m[b], av = p.absmax_v[b];
    // pass 0: code -> map value
    lookup_maps(p.qm + base, p.qv + base, n, mbuf, vbuf);
    // pass 1: dequantize (times absmax), update, write p; fp32 state stays in L1 for the new absmax
    const __m256 vam = _mm256_set1_ps(am), vav = _mm256_set1_ps(av);
    __m256 nm = _mm256_setzero_ps(), nv = _mm256_setzero_ps();
    for (int j = 0; j < n8; j += 8) {
      const int64_t i = base + j;
      __m256 m = _mm256_mul_ps(_mm256_load_ps(mbuf + j), vam);
      __m256 v = _mm256_mul_ps(_mm256_load_ps(vbuf + j), vav);
      store8(p.p, p.p_dtype, i, adamw8lanes(load8(p.p, p.p_dtype, i), load8(p.g, p.g_dtype, i), m, v, s));
      _mm256_store_ps(mbuf + j, m);
      _mm256_store_ps(vbuf + j, v);
      nm = _mm256_max_ps(nm, _mm256_andnot_ps(sign, m));
      nv = _mm256_max_ps(nv, _mm256_andnot_ps(sign, v));
    }
    float new_am = hmax(nm), new_av = hmax(nv);
    for (int j = n8; j < n; ++j) {
      const int64_t i = base + j;
      const AdamWElem e = adamw_elem(load_as_float(p.p, p.p_dtype, i), load_as_float(p.g, p.g_dtype, i),
                                     kDynamicSigned[p.qm[i]] * am, kDynamicUnsigned[p.qv[i]] * av, p.s);
      store_from_float(p.p, p.p_dtype, i, e.p);
      mbuf[j] = e.m;
      vbuf[j] = e.v;
      new_am = std::max(new_am, std::fabs(e.m));
      new_av = std::max(new_av, std::fabs(e.v));
    }
    p.absmax_m[b] = new_am;
    p.absmax_v[b] = new_av;
    const float inv_m = code8_inv(new_am), inv_v = code8_inv(new_av);
    const __m256 vim = _mm256_set1_ps(inv_m), viv = _mm256_set1_ps(inv_v);
    for (int j = n8; j < n; ++j) {
      p.qm[base + j] = code8(cs, mbuf[j], inv_m);
      p.qv[base + j] = code8_v(cu, vbuf[j], inv_v);
    }
    if (grid) {
      // pass 2: grid indices t -> trunc(fma((t + 1) * 0.5, 65535, 0.5)) (optim_bnb_grid_index; v's
      // t clamped to [0, 1], which changes nothing for v >= 0 and keeps a NaN in the table)
      const __m256 half = _mm256_set1_ps(0.5f), c65535 = _mm256_set1_ps(65535.0f);
      const __m256i vhalf = _mm256_set1_epi32(Code8Grid::kGridHalf);
      auto grid_index = [&](__m256 t) {
        return _mm256_cvttps_epi32(_mm256_fmadd_ps(_mm256_mul_ps(_mm256_add_ps(t, one), half), c65535, half));
      };
      auto pack16 = [](__m256i x, uint16_t* dst) {
        _mm_store_si128(reinterpret_cast<__m128i*>(dst),
                        _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1)));
      };
      for (int j = 0; j < n8; j += 8) {
        const __m256 tm = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_load_ps(mbuf + j), vim), neg_one), one);
        const __m256 tv = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_load_ps(vbuf + j), viv), zero), one);
        pack16(grid_index(tm), im16 + j);
        pack16(_mm256_sub_epi32(grid_index(tv), vhalf), iv16 + j);
      }
      lookup_grid(gs->code, gu->code, im16, iv16, n8, p.qm + base, p.qv + base);
      continue;
    }
    // pass 2: scale and clamp against the new absmax (kept in the buffers), bucket keys
    __m256i key, xlow;
    for (int j = 0; j < n8; j += 8) {
      const __m256 v = _mm256_load_ps(vbuf + j);
      const __m256 tm = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_load_ps(mbuf + j), vim), neg_one), one);
      const __m256 tv = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, viv), neg_one), one);
      code8_key(cs, tm, key, xlow);
      _mm256_store_si256(reinterpret_cast<__m256i*>(km + j), key);
      _mm256_store_si256(reinterpret_cast<__m256i*>(mbuf + j), xlow);
      code8_key(cu, tv, key, xlow);
      // the v > 0 flag rides in bit 31 of xlow (xlow < 2^16 for the unsigned map)
      xlow = _mm256_or_si256(xlow, _mm256_slli_epi32(_mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_GT_OQ)), 31));
      _mm256_store_si256(reinterpret_cast<__m256i*>(kv + j), key);
      _mm256_store_si256(reinterpret_cast<__m256i*>(vbuf + j), xlow);
    }
    // pass 3: bucket entries; pass 4: codes
    lookup_buckets(cs.lut32, cu.lut32, n8, km, kv);
    auto ld = [](const void* q) { return _mm256_load_si256(static_cast<const __m256i*>(q)); };
    const __m256i low31 = _mm256_set1_epi32(0x7fffffff);
    for (int j = 0; j < n8; j += 8) {
      store_codes8(p.qm + base + j, code8_finish(ld(km + j), ld(mbuf + j)));
      const __m256i xv = ld(vbuf + j);
      store_codes8(p.qv + base + j, _mm256_max_epi32(code8_finish(ld(kv + j), _mm256_and_si256(xv, low31)),
                                                      _mm256_srli_epi32(xv, 31)));
    }
  }
}

}  // namespace lowbit::cpu
