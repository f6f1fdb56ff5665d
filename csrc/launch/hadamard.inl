// csrc/launch/hadamard.inl — host launcher of the hadamard family (lowbit::kernels::hadamard,
// declared in include/lowbit/hadamard.h). Included by csrc/cuda/hadamard.cu in both builds.
//
// Instantiated kernels (STYLE 11): hadamard_kernel<T, EPT, W, H> for T in {float, bf16, fp16} (the
// dtypes of ops.py) × (EPT, W, H): EPT in {1, 2, 4, 8, 16, 32} with W = 0 (no shared-memory
// transpose), EPT = 32 with W = 1..5 (L = 2048..32768), and the two sizes whose row exceeds the
// 99 KB of shared memory, done in two halves (H = 2): 28·1024 (W = 0) and 32768 (W = 5) = 13 × 3.
#pragma once
#include "kernels/hadamard.cuh"

namespace lowbit::kernels {

namespace {

// Elements per thread: 8 (16-byte loads, enough work per shuffle) or L if smaller; 32 when a
// sub-row needs more than one warp (L > 256: then the W = log2(L) - 10 warp bits, at most 5, fit
// in the 32 slots); doubled until a row fits one CTA (n / EPT ≤ 1024 threads).
int hadamard_ept(int n, int l) {
  int ept = l < 8 ? l : 8;
  if (l / ept > 32) ept = 32;
  while (n / ept > kHadamardMaxThreads) ept *= 2;
  return ept;
}

template <class T, int EPT, int W, int H>
int hadamard_launch(const HadamardParams& p, int m, int log2_l, intptr_t stream) {
  const int tpr = p.n / EPT;  // threads per row
  // Small rows: several per CTA, up to ~256 threads, so a CTA is not a handful of warps.
  int rows_per_cta = 1;
  while (tpr * rows_per_cta * 2 <= 256 && rows_per_cta * 2 <= p.rows) rows_per_cta *= 2;
  const bool smem = m > 1 || W > 0;
  const size_t smem_bytes = smem ? size_t(rows_per_cta) * (p.n / H + p.n / H / 32) * sizeof(float) : 0;  // had_pad(n / H)
  if (smem_bytes > 48 * 1024) {
    const int err = simt::set_max_dynamic_smem(hadamard_kernel<T, EPT, W, H>, int(smem_bytes));
    if (err) return err;
  }
  const int64_t ctas = (p.rows + rows_per_cta - 1) / rows_per_cta;
  if (ctas > 0x7fffffff) return kErrInvalidValue;
  const uintptr_t align = reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.out) |
                          uintptr_t(size_t(p.n) * sizeof(T));
  const bool vec = align % 16 == 0;
  return simt::launch(hadamard_kernel<T, EPT, W, H>, dim3(unsigned(ctas)), dim3(tpr, rows_per_cta), smem_bytes, stream,
                      p, m, log2_l, vec);
}

template <class T>
int hadamard_as(const HadamardParams& p, int m, int log2_l, intptr_t stream) {
  const int ept = hadamard_ept(p.n, 1 << log2_l);
  const int w = ept == 32 && log2_l > 10 ? log2_l - 10 : 0;  // L / (32 · EPT) = 2^W
  const bool smem = m > 1 || w > 0;
  const bool halves = smem && size_t(p.n + p.n / 32) * sizeof(float) > size_t(kHadamardSmemBytes);
  switch (ept * 16 + w * 2 + halves) {
    case 1 * 16: return hadamard_launch<T, 1, 0, 1>(p, m, log2_l, stream);
    case 2 * 16: return hadamard_launch<T, 2, 0, 1>(p, m, log2_l, stream);
    case 4 * 16: return hadamard_launch<T, 4, 0, 1>(p, m, log2_l, stream);
    case 8 * 16: return hadamard_launch<T, 8, 0, 1>(p, m, log2_l, stream);
    case 16 * 16: return hadamard_launch<T, 16, 0, 1>(p, m, log2_l, stream);
    case 32 * 16: return hadamard_launch<T, 32, 0, 1>(p, m, log2_l, stream);
    case 32 * 16 + 1: return hadamard_launch<T, 32, 0, 2>(p, m, log2_l, stream);      // 28 · 1024
    case 32 * 16 + 2: return hadamard_launch<T, 32, 1, 1>(p, m, log2_l, stream);
    case 32 * 16 + 4: return hadamard_launch<T, 32, 2, 1>(p, m, log2_l, stream);
    case 32 * 16 + 6: return hadamard_launch<T, 32, 3, 1>(p, m, log2_l, stream);
    case 32 * 16 + 8: return hadamard_launch<T, 32, 4, 1>(p, m, log2_l, stream);
    case 32 * 16 + 10: return hadamard_launch<T, 32, 5, 1>(p, m, log2_l, stream);
    case 32 * 16 + 11: return hadamard_launch<T, 32, 5, 2>(p, m, log2_l, stream);     // 32768
  }
  return kErrInvalidValue;  // unreachable for a valid n
}

}  // namespace

int hadamard(const HadamardParams& p, intptr_t stream) {
  int log2_l = 0;
  const int m = hadamard_split(p.n, &log2_l);
  if (m == 0 || p.rows < 0) return kErrInvalidValue;
  if (p.rows == 0) return 0;
  switch (p.dtype) {
    case DType::f32: return hadamard_as<float>(p, m, log2_l, stream);
    case DType::bf16: return hadamard_as<__nv_bfloat16>(p, m, log2_l, stream);
    case DType::f16: return hadamard_as<__half>(p, m, log2_l, stream);
  }
  return kErrInvalidValue;
}

}  // namespace lowbit::kernels
