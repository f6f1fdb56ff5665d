// lowbit/qwha.h — the `qwha` family contract: the sparse products of the QWHA adapter
// (ΔW = s · F · Hᵀ with a sparse coefficient matrix F; docs/qwha.md), run on the CPU
// (csrc/cpu/qwha.cpp). The Hadamard transform they pair with is the `hadamard` family (hadamard.h).
//
// F (n_out × k) is held in CSR with int32 indices: row pointers crow (n_out + 1, crow[0] = 0,
// non-decreasing, crow[n_out] = nnz), column indices cols (nnz, each in [0, k)), values (nnz).
// All arrays contiguous fp32 / int32; arithmetic fp32. The spec is the same product with F dense
// (tests/test_qwha.py).
#pragma once
#include <cstdint>

namespace lowbit {

struct QwhaSpmmParams {
  const float* z;        // (m, k) row-major
  const float* values;   // (nnz)
  const int32_t* crow;   // (n_out + 1)
  const int32_t* cols;   // (nnz)
  int64_t m;
  int32_t k, n_out;
  float scale;
  float* y;              // (m, n_out) = scale · z · Fᵀ (+ y when accumulate)
  bool accumulate = false;
};
struct QwhaSddmmParams {
  const float* gy;       // (m, n_out)
  const float* z;        // (m, k)
  const int32_t* crow;   // F's pattern as above
  const int32_t* cols;
  int64_t m;
  int32_t k, n_out;
  float* gvals;          // (nnz): gvals[j] = Σ_i gy[i, row(j)] · z[i, cols[j]]  (dF at the support)
};

namespace cpu {  // csrc/cpu/qwha.cpp (+ qwha_avx2.cpp)
// Both throw std::invalid_argument (ValueError) on an inconsistent CSR (crow or a column out of range).
void qwha_spmm(const QwhaSpmmParams& p);
void qwha_sddmm(const QwhaSddmmParams& p);
}  // namespace cpu

}  // namespace lowbit
