// csrc/cpu/quant_rules.h — the per-block scalar rules of the quant family (the reference's rules
// written in C++). quant.cpp uses them for the portable path and for block tails; the AVX2 path
// (quant_avx2.cpp) vectorises the same sequence of fp32 operations, so both are bit-exact.
#pragma once
#include <algorithm>
#include <cmath>

#include "cpu/common.h"
#include "lowbit/quant.h"

namespace lowbit::cpu {

// Midpoints between consecutive sorted codes, (a + b) / 2 in fp32, as torch computes them.
struct Midpoints {
  float nf4[15], fp4[15], dyn_signed[255], dyn_unsigned[255];
  Midpoints() {
    float fp4_sorted[16];
    for (int i = 0; i < 16; ++i) fp4_sorted[i] = kFP4[kFP4SortedCodes[i]];
    for (int i = 0; i < 15; ++i) {
      nf4[i] = (kNF4[i] + kNF4[i + 1]) / 2.0f;
      fp4[i] = (fp4_sorted[i] + fp4_sorted[i + 1]) / 2.0f;
    }
    for (int i = 0; i < 255; ++i) {
      dyn_signed[i] = (kDynamicSigned[i] + kDynamicSigned[i + 1]) / 2.0f;
      dyn_unsigned[i] = (kDynamicUnsigned[i] + kDynamicUnsigned[i + 1]) / 2.0f;
    }
  }
};
const Midpoints& midpoints();

// nf4 / fp4: reciprocal of the block absmax, as bitsandbytes computes it.
inline float table_inv(float absmax) { return 1.0f / std::max(absmax, kAbsmaxFloor); }

// 4-bit table code of one element already scaled by table_inv (clamped to [-1, 1] here).
inline int table_code(Fmt fmt, float scaled) {
  scaled = std::min(std::max(scaled, -1.0f), 1.0f);
  const Midpoints& mp = midpoints();
  if (fmt == Fmt::nf4) return nearest_sorted(mp.nf4, scaled);
  return kFP4SortedCodes[nearest_sorted(mp.fp4, scaled)];
}

// int formats: step and zero point of a block from its min and max.
struct IntBlock { float scale, inv, zero; };
inline IntBlock int_block(float mn, float mx, int qmax) {
  // -0 -> +0: min reductions may return either zero; the stored zero point must not depend on it
  mn = mn + 0.0f;
  float s = (mx - mn) / float(qmax);
  if (!(s >= kMinIntStep)) s = 1.0f;  // constant block: codes 0, w_hat = min exactly
  float inv = 1.0f / s;
  return {s, inv, -(mn * inv)};
}
inline int int_code(float w, const IntBlock& b, int qmax) {
  float t = w * b.inv;
  t = t + b.zero;
  t = std::nearbyint(t);  // round half to even (default rounding mode), like torch.round
  return int(std::min(std::max(t, 0.0f), float(qmax)));
}

// Scale of block b, rebuilt from double quant when present.
inline float block_scale(const DequantizeParams& p, int64_t b) {
  if (!p.scale_q) return p.scale[b];
  return dq_scale(kDynamicSigned[p.scale_q[b]], p.scale_nested[nested_block_of(b)], p.scale_offset);
}

}  // namespace lowbit::cpu
