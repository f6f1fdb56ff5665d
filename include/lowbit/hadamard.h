// lowbit/hadamard.h — the `hadamard` family contract: the Walsh–Hadamard transform along the last
// dimension, out = x · H_n · scale (or x · H_nᵀ · scale, the backward), fp32 arithmetic.
//
// Sizes: n = m · 2^k ≤ 32768 with m ∈ {1, 12, 20, 28, 40, 172} and H_n = H_m ⊗ H_{2^k}
// (Kronecker product; H_{2^k} the Sylvester matrix), i.e. element i = a · 2^k + b of a row is
// sub-row a, column b: the transform is a WHT of each of the m sub-rows of length 2^k, then the
// dense m × m mix of the sub-rows. m is the LARGEST order of the list that leaves a power of two
// (n = 40 · 2^k uses H_40, never H_20 ⊗ H_{2^{k+1}}): one n, one matrix.
//
// H_m (the one definition, constexpr here; python/lowbit/reference.py rebuilds them independently
// and tests/test_hadamard.py checks both against each other and H Hᵀ = m I):
//   12, 20, 28  Paley II over GF(q), q = 5, 9, 13 (q ≡ 1 mod 4): symmetric.
//   40          H_2 ⊗ H_20: symmetric.
//   172         Williamson array of four symmetric circulants of order 43 (first rows below, the
//               quadruple of Baumert & Hall as tabulated in Hall, Combinatorial Theory, 1983):
//               NOT symmetric, so the backward (x · H_nᵀ) needs `transpose`.
// The spec is python/lowbit/reference.py::hadamard_ref.
#pragma once
#include <cstdint>

#include "lowbit/formats.h"

namespace lowbit {

struct HadamardParams {
  const void* x;   // (rows, n) row-major, contiguous
  void* out;       // (rows, n); may equal x (in place)
  DType dtype;     // of x and out (fp32 / bf16 / fp16); arithmetic is fp32
  int64_t rows;
  int32_t n;       // a valid size (hadamard_split(n) != 0); the Python layer checks it
  float scale;
  bool transpose;  // out = x · H_nᵀ · scale (differs from x · H_n only when m = 172)
};

constexpr int kHadamardMaxN = 32768;

// n = m · 2^log2_l  ->  m (1 for a power of two), or 0 when n is not a supported size.
LOWBIT_HD constexpr int hadamard_split(int n, int* log2_l) {
  if (n < 1 || n > kHadamardMaxN) return 0;
  const int orders[6] = {172, 40, 28, 20, 12, 1};
  for (int o = 0; o < 6; ++o) {
    const int m = orders[o];
    if (n % m) continue;
    const int l = n / m;
    if (l & (l - 1)) continue;
    int k = 0;
    while ((1 << k) < l) ++k;
    *log2_l = k;
    return m;
  }
  return 0;
}

// ------------------------------------------------------------------ the H_m sign tables
// Bit j of row i is set when H_m[i][j] = -1. Rows are ceil(m / 32) uint32 words.
namespace hadamard_detail {

// GF(q) for q prime (5, 13), and GF(9) = GF(3)[i] / (i² + 1) with element a + 3b <-> a + b·i
// (i² + 1 is irreducible over GF(3): -1 is not a square mod 3).
LOWBIT_HD constexpr int gf_sub(int q, int x, int y) {
  if (q != 9) return ((x - y) % q + q) % q;
  return ((x % 3 - y % 3 + 3) % 3) + 3 * ((x / 3 - y / 3 + 3) % 3);
}
LOWBIT_HD constexpr int gf_mul(int q, int x, int y) {
  if (q != 9) return (x * y) % q;
  const int a = x % 3, b = x / 3, c = y % 3, d = y / 3;
  return ((a * c - b * d + 9) % 3) + 3 * ((a * d + b * c) % 3);
}
// Quadratic character: 0 at 0, +1 on nonzero squares, -1 otherwise.
LOWBIT_HD constexpr int gf_chi(int q, int x) {
  if (x == 0) return 0;
  for (int y = 1; y < q; ++y)
    if (gf_mul(q, y, y) == x) return 1;
  return -1;
}

// Paley II, order 2(q + 1): H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]] with C the
// symmetric conference matrix [[0, 1ᵀ], [1, Q]], Q[a][b] = chi(a - b) (symmetric as q ≡ 1 mod 4).
LOWBIT_HD constexpr int paley2(int q, int i, int j) {
  const int a = i / 2, e = i % 2, b = j / 2, f = j % 2;
  const int c = (a == 0 && b == 0) ? 0 : (a == 0 || b == 0) ? 1 : gf_chi(q, gf_sub(q, a - 1, b - 1));
  const int h2 = (e && f) ? -1 : 1;
  const int k = (a != b) ? 0 : (e == 0 && f == 0) ? 1 : -1;
  return c * h2 + k;
}

// Williamson matrices of order 43 (symmetric circulants A, B, C, D with A² + B² + C² + D² = 172 I):
// first rows, '+' = 1, '-' = -1.
constexpr const char* kWilliamson43[4] = {
    "++---++++-+--+--++--------++--+--+-++++---+",
    "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
    "++-++++++----+-+--++-++-++--+-+----++++++-+",
    "+---++--++++-+-+++-++--++-+++-+-++++--++---",
};
// H_172 = [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]].
LOWBIT_HD constexpr int williamson172(int i, int j) {
  const int bi = i / 43, bj = j / 43, r = i % 43, c = j % 43;
  constexpr int kBlock[4][4] = {{0, 1, 2, 3}, {1, 0, 3, 2}, {2, 3, 0, 1}, {3, 2, 1, 0}};
  constexpr int kSign[4][4] = {{1, 1, 1, 1}, {-1, 1, -1, 1}, {-1, 1, 1, -1}, {-1, -1, 1, 1}};
  const char s = kWilliamson43[kBlock[bi][bj]][((c - r) % 43 + 43) % 43];
  return kSign[bi][bj] * (s == '+' ? 1 : -1);
}

LOWBIT_HD constexpr int entry(int m, int i, int j) {
  switch (m) {
    case 12: return paley2(5, i, j);
    case 20: return paley2(9, i, j);
    case 28: return paley2(13, i, j);
    case 40: return ((i >= 20 && j >= 20) ? -1 : 1) * paley2(9, i % 20, j % 20);
    default: return williamson172(i, j);
  }
}

LOWBIT_HD constexpr int words_per_row(int m) { return (m + 31) / 32; }
LOWBIT_HD constexpr int table_offset(int m) {  // word offset of H_m in the table
  return m == 12 ? 0 : m == 20 ? 12 : m == 28 ? 32 : m == 40 ? 60 : 140;
}
constexpr int kTableWords = 140 + 172 * 6;

struct SignTable {
  uint32_t w[kTableWords];
};
LOWBIT_HD constexpr SignTable make_sign_table() {
  SignTable t{};
  for (int m : {12, 20, 28, 40, 172}) {
    const int wpr = words_per_row(m), off = table_offset(m);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < m; ++j)
        if (entry(m, i, j) < 0) t.w[off + i * wpr + j / 32] |= 1u << (j % 32);
  }
  return t;
}

}  // namespace hadamard_detail

// The sign tables, evaluated at compile time (csrc/kernels/hadamard.cuh copies them to __constant__).
constexpr hadamard_detail::SignTable kHadamardSigns = hadamard_detail::make_sign_table();

// H_m[i][j] as ±1 from a sign table (host or device copy of kHadamardSigns).
LOWBIT_HD constexpr int hadamard_sign(const uint32_t* table, int m, int i, int j) {
  const uint32_t w = table[hadamard_detail::table_offset(m) + i * hadamard_detail::words_per_row(m) + j / 32];
  return ((w >> (j % 32)) & 1u) ? -1 : 1;
}

namespace cpu {  // csrc/cpu/hadamard.cpp (+ hadamard_avx2.cpp)
void hadamard(const HadamardParams& p);
}  // namespace cpu
namespace kernels {  // csrc/launch/hadamard.inl (CUDA; nvcc and simt)
int hadamard(const HadamardParams& p, intptr_t stream);
}  // namespace kernels

}  // namespace lowbit
