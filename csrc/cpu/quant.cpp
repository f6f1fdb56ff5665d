// csrc/cpu/quant.cpp — quant family on the CPU: OpenMP over blocks, AVX2 inner loops when the CPU
// has them (quant_avx2.cpp), the portable scalar rules otherwise. Bit-exact with the reference.
//
// Roofline: quantize reads 2-4 B/weight and writes 0.5 B + 8 B/block; dequantize the reverse. At
// ~20 GB/s per core both are memory-bound only if the inner loop costs < ~1 ns per 8 weights, which
// the scalar code does not reach (table search, nibble packing) — hence the AVX2 path.
#include <algorithm>

#include "cpu/quant_rules.h"

namespace lowbit::cpu {

#if LOWBIT_HAVE_AVX2_TU
// quant_avx2.cpp: process blocks [b0, b1) of the given params.
void quantize_blocks_avx2(const QuantizeParams& p, int64_t b0, int64_t b1);
void dequantize_blocks_avx2(const DequantizeParams& p, int64_t b0, int64_t b1);
#endif

const Midpoints& midpoints() {
  static const Midpoints m;
  return m;
}

// ---------------------------------------------------------------- portable block loops
static void quantize_blocks_portable(const QuantizeParams& p, int64_t b0, int64_t b1) {
  const int bits = fmt_bits(p.fmt), per_byte = 8 / bits, qmax = fmt_qmax(p.fmt);
  float buf[kMaxTableBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t base = b * p.block;
    for (int i = 0; i < p.block; ++i) buf[i] = load_as_float(p.w, p.w_dtype, base + i);
    uint8_t* out = p.codes + base / per_byte;
    std::fill(out, out + p.block / per_byte, uint8_t(0));
    if (fmt_is_table(p.fmt)) {
      float amax = 0.0f;
      for (int i = 0; i < p.block; ++i) amax = std::max(amax, std::fabs(buf[i]));
      const float inv = table_inv(amax);
      p.scale[b] = amax;
      for (int i = 0; i < p.block; ++i) {
        int q = table_code(p.fmt, buf[i] * inv);
        out[i / per_byte] |= uint8_t(q << pack_shift(bits, i % per_byte));
      }
    } else {
      float mn = buf[0], mx = buf[0];
      for (int i = 1; i < p.block; ++i) { mn = std::min(mn, buf[i]); mx = std::max(mx, buf[i]); }
      const IntBlock ib = int_block(mn, mx, qmax);
      p.scale[b] = ib.scale;
      p.zero[b] = ib.zero;
      for (int i = 0; i < p.block; ++i) {
        int q = int_code(buf[i], ib, qmax);
        out[i / per_byte] |= uint8_t(q << pack_shift(bits, i % per_byte));
      }
    }
  }
}

static void dequantize_blocks_portable(const DequantizeParams& p, int64_t b0, int64_t b1) {
  const int bits = fmt_bits(p.fmt), per_byte = 8 / bits, mask = (1 << bits) - 1;
  const float* table = p.fmt == Fmt::nf4 ? kNF4 : kFP4;
  for (int64_t b = b0; b < b1; ++b) {
    const float s = block_scale(p, b);
    const int64_t base = b * p.block;
    const uint8_t* in = p.codes + base / per_byte;
    if (fmt_is_table(p.fmt)) {
      for (int i = 0; i < p.block; ++i) {
        int q = (in[i / per_byte] >> pack_shift(bits, i % per_byte)) & mask;
        store_from_float(p.out, p.out_dtype, base + i, table[q] * s);
      }
    } else {
      const float z = p.zero[b];
      for (int i = 0; i < p.block; ++i) {
        int q = (in[i / per_byte] >> pack_shift(bits, i % per_byte)) & mask;
        store_from_float(p.out, p.out_dtype, base + i, (float(q) - z) * s);
      }
    }
  }
}

// Blocks are independent: split them evenly over the threads, at least ~16 K elements per chunk
// so small tensors do not pay the fork/join.
template <class F>
static void parallel_blocks(int64_t n_blocks, int block, F&& f) {
  const int64_t min_blocks = std::max<int64_t>(1, 16384 / std::max(block, 1));
  const int64_t chunks = std::min<int64_t>(n_blocks / min_blocks + 1, int64_t(num_threads()) * 4);
  if (chunks <= 1) { f(0, n_blocks); return; }
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b0 = n_blocks * c / chunks, b1 = n_blocks * (c + 1) / chunks;
    if (b1 > b0) f(b0, b1);
  }
}

// The entry points' own checks (include/lowbit/check.h): what the kernels below index by.
static void check_weight_args(const char* who, Fmt fmt, DType dtype, int block, int64_t numel) {
  const std::string w(who);
  LOWBIT_CHECK(fmt_valid(fmt), w + ": " + show("fmt", int32_t(fmt)) + " is not a format id (0..3)");
  LOWBIT_CHECK(dtype_valid(dtype), w + ": " + show("dtype", int32_t(dtype)) + " is not a dtype id (0..2)");
  LOWBIT_CHECK(quant_block_ok(fmt, block), w + ": " + show("block", block) + " is not a block size of this format");
  LOWBIT_CHECK(numel >= 0 && numel % block == 0,
               w + ": " + show("numel", numel) + " is not a whole number of blocks of " + show("block", block));
}

void quantize(const QuantizeParams& p) {
  check_weight_args("quantize", p.fmt, p.w_dtype, p.block, p.numel);
  if (p.numel == 0) return;
  LOWBIT_CHECK(p.w && p.codes && p.scale && (fmt_is_table(p.fmt) || p.zero),
               "quantize: w, codes, scale (and zero for int formats) are required");
  const int64_t n_blocks = p.numel / p.block;
  hint_huge_pages(p.codes, size_t(p.numel) * fmt_bits(p.fmt) / 8);
  const bool avx2 = use_avx2();
  parallel_blocks(n_blocks, p.block, [&](int64_t b0, int64_t b1) {
#if LOWBIT_HAVE_AVX2_TU
    if (avx2) return quantize_blocks_avx2(p, b0, b1);
#endif
    (void)avx2;
    quantize_blocks_portable(p, b0, b1);
  });
}

void dequantize(const DequantizeParams& p) {
  check_weight_args("dequantize", p.fmt, p.out_dtype, p.block, p.numel);
  if (p.numel == 0) return;
  LOWBIT_CHECK(p.codes && p.out && (p.scale || (p.scale_q && p.scale_nested)) && (fmt_is_table(p.fmt) || p.zero),
               "dequantize: codes, out, scale (or scale_q and scale_nested) and zero for int formats are required");
  const int64_t n_blocks = p.numel / p.block;
  hint_huge_pages(p.out, size_t(p.numel) * (p.out_dtype == DType::f32 ? 4 : 2));
  const bool avx2 = use_avx2();
  parallel_blocks(n_blocks, p.block, [&](int64_t b0, int64_t b1) {
#if LOWBIT_HAVE_AVX2_TU
    if (avx2) return dequantize_blocks_avx2(p, b0, b1);
#endif
    (void)avx2;
    dequantize_blocks_portable(p, b0, b1);
  });
}

// ---------------------------------------------------------------- 8-bit dynamic (scalar: the
// inputs are small — one value per weight block for double quant)
// block > 0: block=-10 made negative block indices (a segfault), block=0 divided by zero (issue 14,
// finding 6); the Python layer refuses both first.
static void check8(const char* who, int block, int64_t numel, bool buffers) {
  const std::string w(who);
  LOWBIT_CHECK(block > 0, w + ": " + show("block", block) + " must be > 0");
  LOWBIT_CHECK(numel >= 0, w + ": " + show("numel", numel) + " must be >= 0");
  LOWBIT_CHECK(numel == 0 || buffers, w + ": a buffer is missing (null)");
}

void quantize8(const Quantize8Params& p) {
  check8("quantize8", p.block, p.numel, p.x && p.q && p.absmax);
  const int64_t n_blocks = (p.numel + p.block - 1) / p.block;
  const float* mid = p.is_signed ? midpoints().dyn_signed : midpoints().dyn_unsigned;
  const float(&mid_arr)[255] = *reinterpret_cast<const float(*)[255]>(mid);
#pragma omp parallel for schedule(static) if (p.numel > 65536)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t i0 = b * p.block, i1 = std::min<int64_t>(i0 + p.block, p.numel);
    float amax = 0.0f;
    for (int64_t i = i0; i < i1; ++i) amax = std::max(amax, std::fabs(p.x[i] - p.offset));
    p.absmax[b] = amax;
    const float inv = 1.0f / std::max(amax, kAbsmaxFloor);
    for (int64_t i = i0; i < i1; ++i) {
      float v = (p.x[i] - p.offset) * inv;
      v = std::min(std::max(v, -1.0f), 1.0f);
      p.q[i] = uint8_t(nearest_sorted(mid_arr, v));
    }
  }
}

void dequantize8(const Dequantize8Params& p) {
  check8("dequantize8", p.block, p.numel, p.q && p.absmax && p.out);
  const float* map = p.is_signed ? kDynamicSigned : kDynamicUnsigned;
#pragma omp parallel for schedule(static) if (p.numel > 65536)
  for (int64_t i = 0; i < p.numel; ++i) {
    p.out[i] = dq_scale(map[p.q[i]], p.absmax[i / p.block], p.offset);  // double quant's rule (formats.h)
  }
}

}  // namespace lowbit::cpu
