// csrc/cpu/optim.cpp — optim family on the CPU: the fused AdamW step with 32-bit and 8-bit
// blockwise state. OpenMP over element ranges / state blocks; AVX2 inner loops (optim_avx2.cpp)
// when the CPU has them, the scalar rules of optim_rules.h otherwise. Bit-exact with the reference.
//
// Roofline (2 Zen 3 cores, ~30-37 GB/s read+write): the 32-bit step touches 28 B/param (read
// p, g, m, v; write p, m, v), the 8-bit step 14 B/param + 16 B per 256 (read p, g, qm, qv; write
// p, qm, qv; absmaxes). Both are memory-bound once the inner loop costs < ~1 ns per 8 params.
#include <omp.h>

#include <limits>

#include "cpu/optim_rules.h"

namespace lowbit::cpu {

#if LOWBIT_HAVE_AVX2_TU
// optim_avx2.cpp: elements [i0, i1) (32-bit; any range) / state blocks [b0, b1) (8-bit).
void adamw32_range_avx2(const AdamW32Params& p, int64_t i0, int64_t i1);
void adamw8_blocks_avx2(const AdamW8Params& p, int64_t b0, int64_t b1);
#endif

Code8Search::Code8Search(const float* map, int32_t rounding, int shift, bool neg)
    : shift32(shift), keys32(int((kHiBits - kLoBits) >> shift) + 1), neg32(neg), low_mask32((1u << shift) - 1) {
  for (int i = 0; i < 255; ++i) bnd[i] = optim_boundary(map, i, rounding);
  bnd[255] = std::numeric_limits<float>::infinity();
  auto count_below = [&](float x) {  // number of boundaries strictly below x
    int c = 0;
    while (c < 255 && bnd[c] < x) ++c;
    return c;
  };
  for (int c = 0; c < 256; ++c) {
    int u = c;
    while (u < 255 && bnd[u] <= bnd[c]) ++u;
    up[c] = uint8_t(u);
    LOWBIT_CHECK(c == 255 || bnd[c] <= bnd[c + 1], "optim: 8-bit boundaries must be sorted");
  }
  // One bucket: t in [xmin, xmax]; c = the code at xmin; the code at xmax must be c or up[c].
  auto bucket = [&](int sign, uint32_t a0, uint32_t a1, bool first, int& c, bool& inside) {
    const float lo = first ? 0.0f : bits_to_float(a0), hi = bits_to_float(a1);
    const float xmin = sign ? -hi : lo, xmax = sign ? -lo : hi;
    c = count_below(xmin);
    const int top = count_below(xmax);
    LOWBIT_CHECK(top == c || top == up[c], "optim: 8-bit code search table needs finer buckets");
    inside = top != c;
  };
  for (int sign = 0; sign < 2; ++sign) {
    for (int k = 0; k < kKeys; ++k) {
      // |t| bit patterns of bucket k: [a0, a1]; bucket 0 also holds everything below 2^-26.
      const uint32_t a0 = kLoBits + (uint32_t(k) << kShift);
      int c;
      bool inside;
      bucket(sign, a0, std::min(a0 + ((1u << kShift) - 1), kHiBits), k == 0, c, inside);
      LOWBIT_CHECK(!(k == 0 && inside), "optim: a boundary below 2^-26");
      lut[sign * kKeys + k] = uint8_t(c);
    }
  }
  for (int sign = 0; sign < (neg32 ? 2 : 1); ++sign) {
    for (int k = 0; k < keys32; ++k) {
      const uint32_t a0 = kLoBits + (uint32_t(k) << shift32);
      int c;
      bool inside;
      bucket(sign, a0, std::min(a0 + low_mask32, kHiBits), k == 0, c, inside);
      LOWBIT_CHECK(!(k == 0 && inside) && up[c] - c < 16, "optim: 8-bit code search table needs finer buckets");
      uint32_t thr = low_mask32, jump = 0;
      if (inside) {
        const uint32_t low = float_to_bits(std::fabs(bnd[c])) & low_mask32;
        thr = sign ? (low_mask32 ^ low) : low;
        jump = uint32_t(up[c] - c);
      }
      lut32[sign * keys32 + k] = uint32_t(c) | (jump << 8) | (thr << 12);
    }
  }
}
const Code8Search& code8_search(bool is_signed, int32_t rounding) {
  static const Code8Search s_bnb(kDynamicSigned, kOptimRoundBitsandbytes, 17, true);
  static const Code8Search u_bnb(kDynamicUnsigned, kOptimRoundBitsandbytes, 16, false);
  static const Code8Search s_near(kDynamicSigned, kOptimRoundNearest, 17, true);
  static const Code8Search u_near(kDynamicUnsigned, kOptimRoundNearest, 16, false);
  if (rounding == kOptimRoundNearest) return is_signed ? s_near : u_near;
  return is_signed ? s_bnb : u_bnb;
}

// code[i] = the number of midpoints (fp32 (map[j] + map[j + 1]) / 2, as optim_boundary) below grid
// value i. Checked against the boundary search on both sides of every finite boundary, so the
// vector path that uses it is the rule of optim.h, not a second definition of it.
static Code8Grid make_code8_grid(bool is_signed) {
  const float* map = is_signed ? kDynamicSigned : kDynamicUnsigned;
  const Code8Search& cs = code8_search(is_signed, kOptimRoundBitsandbytes);
  const int i0 = is_signed ? 0 : Code8Grid::kGridHalf;
  Code8Grid g{};
  int c = 0;
  for (int i = i0; i < 65536; ++i) {
    const float gv = optim_bnb_grid_value(i);
    while (c < 255 && (map[c] + map[c + 1]) * 0.5f < gv) ++c;
    g.code[i - i0] = uint8_t(c);
  }
  auto grid_code = [&](float t) { return int(g.code[optim_bnb_grid_index(t) - i0]); };
  for (int j = 0; j < 255; ++j) {
    const float b = cs.bnd[j];
    if (!std::isfinite(b)) continue;
    for (float t : {b, std::nextafter(b, 2.0f)}) {
      if (t < (is_signed ? -1.0f : 0.0f) || t > 1.0f) continue;
      LOWBIT_CHECK(grid_code(t) == cs.code(t), "optim: the 8-bit grid table disagrees with the boundary search");
    }
  }
  return g;
}
const Code8Grid& code8_grid(bool is_signed) {
  static const Code8Grid s = make_code8_grid(true), u = make_code8_grid(false);
  return is_signed ? s : u;
}

// ---------------------------------------------------------------- portable paths
static void adamw32_range_portable(const AdamW32Params& p, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const AdamWElem e = adamw_elem(load_as_float(p.p, p.p_dtype, i), load_as_float(p.g, p.g_dtype, i),
                                   p.m[i], p.v[i], p.s);
    store_from_float(p.p, p.p_dtype, i, e.p);
    p.m[i] = e.m;
    p.v[i] = e.v;
  }
}

static void adamw8_blocks_portable(const AdamW8Params& p, int64_t b0, int64_t b1) {
  const Code8Search &cs = code8_search(true, p.rounding), &cu = code8_search(false, p.rounding);
  float mbuf[kOptimBlock], vbuf[kOptimBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t base = b * kOptimBlock;
    const int n = int(std::min<int64_t>(kOptimBlock, p.numel - base));
    const float am = p.absmax_m[b], av = p.absmax_v[b];
    float new_am = 0.0f, new_av = 0.0f;
    for (int j = 0; j < n; ++j) {
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
    for (int j = 0; j < n; ++j) {
      p.qm[base + j] = code8(cs, mbuf[j], inv_m);
      p.qv[base + j] = code8_v(cu, vbuf[j], inv_v);
    }
  }
}

// ---------------------------------------------------------------- dispatch
// Independent chunks of ~64 K elements (L2-sized working set), a few per thread.
template <class F>
static void parallel_chunks(int64_t n_units, int64_t units_per_chunk, F&& f) {
  const int64_t chunks = (n_units + units_per_chunk - 1) / units_per_chunk;
  if (chunks <= 1) { f(0, n_units); return; }
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) f(c * units_per_chunk, std::min(n_units, (c + 1) * units_per_chunk));
}

static void check_adamw(const char* who, DType p_dtype, DType g_dtype, int64_t numel, bool buffers) {
  const std::string w(who);
  LOWBIT_CHECK(dtype_valid(p_dtype) && dtype_valid(g_dtype),
               w + ": " + show("p_dtype", int32_t(p_dtype)) + ", " + show("g_dtype", int32_t(g_dtype)) +
                   " are not both dtype ids (0..2)");
  LOWBIT_CHECK(numel >= 0, w + ": " + show("numel", numel) + " must be >= 0");
  LOWBIT_CHECK(numel == 0 || buffers, w + ": a buffer is missing (null)");
}

void adamw32(const AdamW32Params& p) {
  check_adamw("adamw32", p.p_dtype, p.g_dtype, p.numel, p.p && p.g && p.m && p.v);
  const bool avx2 = use_avx2();
  parallel_chunks(p.numel, 65536, [&](int64_t i0, int64_t i1) {
#if LOWBIT_HAVE_AVX2_TU
    if (avx2) return adamw32_range_avx2(p, i0, i1);
#endif
    (void)avx2;
    adamw32_range_portable(p, i0, i1);
  });
}

void adamw8(const AdamW8Params& p) {
  check_adamw("adamw8", p.p_dtype, p.g_dtype, p.numel, p.p && p.g && p.qm && p.qv && p.absmax_m && p.absmax_v);
  LOWBIT_CHECK(p.rounding == kOptimRoundBitsandbytes || p.rounding == kOptimRoundNearest,
               "adamw8: " + show("rounding", p.rounding) + " is not a rounding id");
  code8_search(true, p.rounding), code8_search(false, p.rounding);  // build the tables outside the parallel region
  if (p.rounding == kOptimRoundBitsandbytes) code8_grid(true);
  const int64_t n_blocks = (p.numel + kOptimBlock - 1) / kOptimBlock;
  const bool avx2 = use_avx2();
  parallel_chunks(n_blocks, 256, [&](int64_t b0, int64_t b1) {
#if LOWBIT_HAVE_AVX2_TU
    if (avx2) return adamw8_blocks_avx2(p, b0, b1);
#endif
    (void)avx2;
    adamw8_blocks_portable(p, b0, b1);
  });
}

}  // namespace lowbit::cpu
