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

// Exact nearest-code search for the 8-bit re-quantization without a 8-step binary search:
// a table indexed by the high bits of |x| (and its sign) gives c = the number of midpoints below
// the bucket that holds x; each bucket holds at most one midpoint (checked when the table is
// built), so the code is c + (mid[c] < x). Buckets: |x| bits clamped to [2^-23, 1.0] (every
// midpoint lies above 2^-23), 2^16 bit patterns each = 128 buckets per binade (the densest
// part of either map, [0.5, 1], has entries 0.007 apart = 1.8 buckets).
struct Code8Search {
  static constexpr uint32_t kLoBits = 0x34000000u;  // 2^-23
  static constexpr uint32_t kHiBits = 0x3f800000u;  // 1.0
  static constexpr int kShift = 16;
  static constexpr int kKeys = int((kHiBits - kLoBits) >> kShift) + 1;  // per sign
  // lut[key] for x >= 0, lut[kKeys + key] for x < 0; +3 bytes so a 32-bit gather of the last
  // entry stays inside the array.
  uint8_t lut[2 * kKeys + 3];
  float mid[256];  // (map[i] + map[i+1]) / 2, mid[255] = +inf
  // The same search folded into one 32-bit entry per bucket, for the vector path (no dependent
  // second lookup): bits 0-7 c, bits 8-31 thr, and code = c + (xlow > thr) where xlow is the low
  // shift32 bits of |x| (XOR low_mask for x < 0: there a larger |x| is a smaller x). thr is the
  // midpoint's low bits transformed the same way, low_mask when the bucket holds no midpoint.
  // Sized to stay in L1 next to the other map (2 x 11.8 KB): signed map 2^17 patterns per bucket,
  // both signs; unsigned map 2^16 per bucket, x >= 0 only (its state v is never negative; a
  // negative or -0 input goes to key 0, whose entry yields code 0 as the exact rule does).
  int shift32, keys32;
  bool neg32;
  uint32_t low_mask32;
  uint32_t lut32[2 * kKeys];
  Code8Search(const float* map, int shift32, bool neg32);
  static inline int key(float x) {
    const uint32_t u = float_to_bits(x);
    uint32_t a = u & 0x7fffffffu;
    a = std::min(std::max(a, kLoBits), kHiBits);  // also keeps NaN / inf in range
    return int((a - kLoBits) >> kShift) + ((u >> 31) ? kKeys : 0);
  }
  // x already scaled and clamped to [-1, 1].
  inline int code(float x) const {
    const int c = lut[key(x)];
    return c + (mid[c] < x ? 1 : 0);
  }
};
const Code8Search& code8_signed();
const Code8Search& code8_unsigned();

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
