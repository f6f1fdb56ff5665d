// csrc/cpu/optim_rules.h — the per-element rules of the optim family (the reference's fp32
// sequence, see include/lowbit/optim.h) and the 8-bit code search tables shared by optim.cpp
// (portable path, block tails) and optim_avx2.cpp (vector path). Both are bit-exact.
#pragma once
#include <algorithm>
#include <cmath>

#include "cpu/common.h"
#include "lowbit/optim.h"

namespace lowbit::cpu {

struct AdamWElem { float p, m, v; };

// One AdamW element step; m and v are the fp32 (dequantized) state.
inline AdamWElem adamw_elem(float p, float g, float m, float v, const AdamWScalars& s) {
  p = p * s.decay;
  m = m * s.beta1 + g * s.one_minus_beta1;
  v = v * s.beta2 + (g * s.one_minus_beta2) * g;
  const float d = std::sqrt(v) * s.inv_bc2_sqrt + s.eps;
  p = p + s.neg_step_size * (m / d);
  return {p, m, v};
}

// The 8-bit re-quantization without an 8-step binary search. Every rounding rule is a table of
// 255 non-decreasing boundaries (optim.h optim_boundary): code(t) = #(boundaries < t). A table
// indexed by the high bits of |t| (and its sign) gives c = the count at the bottom of t's bucket;
// each bucket holds at most one distinct boundary value (checked when the table is built; equal
// boundaries are codes the rule never produces), so the code is c, or up[c] once t passes bnd[c].
// Buckets: |t| bits clamped to [2^-26, 1.0] (no boundary lies below 2^-26 in magnitude, the
// bitsandbytes rule's lowest is 2^-25), 2^16 bit patterns each = 128 buckets per binade (the
// densest part of either map, [0.5, 1], has distinct boundaries 0.007 apart = 1.8 buckets).
struct Code8Search {
  static constexpr uint32_t kLoBits = 0x32800000u;  // 2^-26
  static constexpr uint32_t kHiBits = 0x3f800000u;  // 1.0
  static constexpr int kShift = 16;
  static constexpr int kKeys = int((kHiBits - kLoBits) >> kShift) + 1;  // per sign
  uint8_t lut[2 * kKeys];  // lut[key] for t >= 0, lut[kKeys + key] for t < 0
  float bnd[256];          // the rule's boundaries, bnd[255] = +inf
  uint8_t up[256];         // the code just above bnd[c]: #(boundaries <= bnd[c])
  // The same search folded into one 32-bit entry per bucket for the vector path (one gather, no
  // dependent second lookup): bits 0-7 c, bits 8-11 the jump up[c] - c (0 when the bucket holds no
  // boundary), bits 12-31 thr, and code = c + (xlow > thr ? jump : 0) where xlow is the low shift32
  // bits of |t| (XOR low_mask for t < 0: there a larger |t| is a smaller t). thr is the boundary's
  // low bits transformed the same way, low_mask when the bucket holds none. Sized to stay in L1 next
  // to the other map (2 x 13.3 KB): signed map 2^17 patterns per bucket, both signs; unsigned map
  // 2^16 per bucket, t >= 0 only (v is never negative; a negative or -0 t goes to key 0).
  int shift32, keys32;
  bool neg32;
  uint32_t low_mask32;
  uint32_t lut32[2 * kKeys];
  Code8Search(const float* map, int32_t rounding, int shift32, bool neg32);
  static inline int key(float x) {
    const uint32_t u = float_to_bits(x);
    uint32_t a = u & 0x7fffffffu;
    a = std::min(std::max(a, kLoBits), kHiBits);  // also keeps NaN / inf in range
    return int((a - kLoBits) >> kShift) + ((u >> 31) ? kKeys : 0);
  }
  // x already scaled and clamped to [-1, 1].
  inline int code(float x) const {
    const int c = lut[key(x)];
    return bnd[c] < x ? up[c] : c;
  }
};
// The tables of (signed / unsigned map, rounding rule).
const Code8Search& code8_search(bool is_signed, int32_t rounding);

// The bitsandbytes rule as bitsandbytes applies it: t -> grid index i = optim_bnb_grid_index(t) in
// [0, 65535] -> the code of grid value i (the number of midpoints below it). One byte load per
// element instead of the bucket search (same codes: the rule's boundaries are defined through the
// grid index, and code8_grid checks every one of them against Code8Search when it builds the table).
// v is never negative, so its table keeps the upper half only: index i - kGridHalf, i >= kGridHalf.
struct Code8Grid {
  static constexpr int kGridHalf = 32767;  // optim_bnb_grid_index(-0.0f) - 1: below every t >= -0
  uint8_t code[65536];                     // signed map: all of [-1, 1]; unsigned: code[i - kGridHalf]
};
const Code8Grid& code8_grid(bool is_signed);


// The 8-bit quantization rule of the quant family (Quantize8Params), one element.
inline float code8_inv(float absmax) { return 1.0f / std::max(absmax, kAbsmaxFloor); }
inline uint8_t code8(const Code8Search& cs, float x, float inv) {
  float t = x * inv;
  t = std::min(std::max(t, -1.0f), 1.0f);
  return uint8_t(cs.code(t));
}
// The second moment: as code8 with the unsigned map, but v > 0 never becomes code 0 (optim.h).
inline uint8_t code8_v(const Code8Search& cu, float v, float inv) {
  const uint8_t c = code8(cu, v, inv);
  return (c == 0 && v > 0.0f) ? uint8_t(1) : c;
}

}  // namespace lowbit::cpu
