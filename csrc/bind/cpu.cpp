// lowbit._C — the only CPU file that sees pybind11. Arguments are raw pointers (Python ints from
// tensor.data_ptr()), sizes and enum ids; python/lowbit/ops.py validates everything first.
// The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/common.h"
#include "lowbit/formats.h"
#include "lowbit/gemm.h"
#include "lowbit/hadamard.h"
#include "lowbit/lowrank.h"
#include "lowbit/optim.h"
#include "lowbit/quant.h"
#include "lowbit/qwha.h"

namespace py = pybind11;
using namespace lowbit;

template <class T>
static T* ptr(intptr_t p) { return reinterpret_cast<T*>(p); }

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowbit CPU kernels (raw-pointer interface; use lowbit.ops)";
  py::call_guard<py::gil_scoped_release> nogil;

  m.def("cpu_path", &cpu::cpu_path, "'avx512' (AVX2 kernels + the AVX-512 VNNI GEMV), 'avx2' (AVX2+FMA+F16C) or 'portable'");
  m.def("set_cpu_path", &cpu::set_cpu_path, py::arg("path"),
        "Force 'avx512', 'avx2', 'portable' or 'auto' (the best available; tests use it to check every path); returns the path in use");
  m.def("num_threads", &cpu::num_threads);
  m.def("tables", [] {
    py::dict d;
    d["nf4"] = std::vector<float>(kNF4, kNF4 + 16);
    d["fp4"] = std::vector<float>(kFP4, kFP4 + 16);
    d["fp4_sorted_codes"] = std::vector<int>(kFP4SortedCodes, kFP4SortedCodes + 16);
    d["dynamic_signed"] = std::vector<float>(kDynamicSigned, kDynamicSigned + 256);
    d["dynamic_unsigned"] = std::vector<float>(kDynamicUnsigned, kDynamicUnsigned + 256);
    d["nested_block"] = kNestedBlock;
    std::vector<int> gemm_blocks, nf4_blocks, int4_blocks;  // the block-size rule of formats.h
    for (int b = 1; b <= kMaxTableBlock; b *= 2) {
      if (gemm_block_ok(b)) gemm_blocks.push_back(b);
      if (quant_block_ok(Fmt::nf4, b)) nf4_blocks.push_back(b);
      if (quant_block_ok(Fmt::int4, b)) int4_blocks.push_back(b);
    }
    d["gemm_blocks"] = gemm_blocks;
    d["table_blocks"] = nf4_blocks;  // nf4, fp4
    d["int_blocks"] = int4_blocks;   // int4, int2
    return d;
  });

  // ---- quant
  m.def("quantize", [](intptr_t w, int w_dtype, int64_t numel, int block, int fmt, intptr_t codes,
                       intptr_t scale, intptr_t zero) {
    cpu::quantize({ptr<const void>(w), DType(w_dtype), numel, block, Fmt(fmt), ptr<uint8_t>(codes),
                   ptr<float>(scale), ptr<float>(zero)});
  }, nogil);
  m.def("dequantize", [](intptr_t codes, intptr_t scale, intptr_t zero, intptr_t scale_q,
                         intptr_t scale_nested, float scale_offset, intptr_t out, int out_dtype,
                         int64_t numel, int block, int fmt) {
    cpu::dequantize({ptr<const uint8_t>(codes), ptr<const float>(scale), ptr<const float>(zero),
                     ptr<const uint8_t>(scale_q), ptr<const float>(scale_nested), scale_offset,
                     ptr<void>(out), DType(out_dtype), numel, block, Fmt(fmt)});
  }, nogil);
  m.def("quantize8", [](intptr_t x, int64_t numel, int block, bool is_signed, float offset,
                        intptr_t q, intptr_t absmax) {
    cpu::quantize8({ptr<const float>(x), numel, block, is_signed, offset, ptr<uint8_t>(q), ptr<float>(absmax)});
  }, nogil);
  m.def("dequantize8", [](intptr_t q, intptr_t absmax, int64_t numel, int block, bool is_signed,
                          float offset, intptr_t out) {
    cpu::dequantize8({ptr<const uint8_t>(q), ptr<const float>(absmax), numel, block, is_signed, offset, ptr<float>(out)});
  }, nogil);

  // ---- families register below (one line each): gemm, lowrank, hadamard, optim
  m.def("adamw32", [](intptr_t p, int p_dtype, intptr_t g, int g_dtype, intptr_t m_, intptr_t v, int64_t numel, float beta1, float omb1, float beta2, float omb2, float eps, float decay, float nstep, float ibc2s) { cpu::adamw32({ptr<void>(p), DType(p_dtype), ptr<const void>(g), DType(g_dtype), ptr<float>(m_), ptr<float>(v), numel, {beta1, omb1, beta2, omb2, eps, decay, nstep, ibc2s}}); }, nogil);
  m.def("adamw8", [](intptr_t p, int p_dtype, intptr_t g, int g_dtype, intptr_t qm, intptr_t am, intptr_t qv, intptr_t av, int64_t numel, float beta1, float omb1, float beta2, float omb2, float eps, float decay, float nstep, float ibc2s, int rounding) { cpu::adamw8({ptr<void>(p), DType(p_dtype), ptr<const void>(g), DType(g_dtype), ptr<uint8_t>(qm), ptr<float>(am), ptr<uint8_t>(qv), ptr<float>(av), numel, {beta1, omb1, beta2, omb2, eps, decay, nstep, ibc2s}, rounding}); }, nogil);
  m.def("gemm", [](intptr_t x, intptr_t y, intptr_t bias, int dtype, int64_t m_, int64_t n, int64_t k, intptr_t codes, intptr_t scale, intptr_t zero, intptr_t scale_q, intptr_t scale_nested, float scale_offset, int block, int fmt) { cpu::gemm({{ptr<const uint8_t>(codes), ptr<const float>(scale), ptr<const float>(zero), ptr<const uint8_t>(scale_q), ptr<const float>(scale_nested), scale_offset, n, k, block, Fmt(fmt)}, ptr<const void>(x), ptr<void>(y), ptr<const void>(bias), DType(dtype), m_}); }, nogil);
  m.def("gemm_t", [](intptr_t gy, intptr_t gx, int dtype, int64_t m_, int64_t n, int64_t k, intptr_t codes, intptr_t scale, intptr_t zero, intptr_t scale_q, intptr_t scale_nested, float scale_offset, int block, int fmt) { cpu::gemm_t({{ptr<const uint8_t>(codes), ptr<const float>(scale), ptr<const float>(zero), ptr<const uint8_t>(scale_q), ptr<const float>(scale_nested), scale_offset, n, k, block, Fmt(fmt)}, ptr<const void>(gy), ptr<void>(gx), nullptr, DType(dtype), m_}); }, nogil);
  m.def("lowrank", [](intptr_t x, intptr_t y, intptr_t xa, intptr_t bias, int dtype, int64_t m_, int64_t n, int64_t k, intptr_t codes, intptr_t scale, intptr_t zero, intptr_t scale_q, intptr_t scale_nested, float scale_offset, int block, int fmt, intptr_t a, intptr_t b, int r, float s) { cpu::lowrank({{{ptr<const uint8_t>(codes), ptr<const float>(scale), ptr<const float>(zero), ptr<const uint8_t>(scale_q), ptr<const float>(scale_nested), scale_offset, n, k, block, Fmt(fmt)}, ptr<const void>(x), ptr<void>(y), ptr<const void>(bias), DType(dtype), m_}, ptr<void>(xa), ptr<const void>(a), ptr<const void>(b), r, s}); }, nogil);
  m.def("hadamard", [](intptr_t x, intptr_t out, int dtype, int64_t rows, int n, float scale, bool transpose) { cpu::hadamard({ptr<const void>(x), ptr<void>(out), DType(dtype), rows, n, scale, transpose}); }, nogil);
  m.def("qwha_spmm", [](intptr_t z, intptr_t values, intptr_t crow, intptr_t cols, int64_t m_, int k, int n_out, float scale, intptr_t y, bool accumulate) { cpu::qwha_spmm({ptr<const float>(z), ptr<const float>(values), ptr<const int32_t>(crow), ptr<const int32_t>(cols), m_, k, n_out, scale, ptr<float>(y), accumulate}); }, nogil, py::arg("z"), py::arg("values"), py::arg("crow"), py::arg("cols"), py::arg("m"), py::arg("k"), py::arg("n_out"), py::arg("scale"), py::arg("y"), py::arg("accumulate") = false);
  m.def("qwha_sddmm", [](intptr_t gy, intptr_t z, intptr_t crow, intptr_t cols, int64_t m_, int k, int n_out, intptr_t gvals) { cpu::qwha_sddmm({ptr<const float>(gy), ptr<const float>(z), ptr<const int32_t>(crow), ptr<const int32_t>(cols), m_, k, n_out, ptr<float>(gvals)}); }, nogil);
  m.def("hadamard_matrix", [](int m_) { LOWBIT_CHECK(m_ == 12 || m_ == 20 || m_ == 28 || m_ == 40 || m_ == 172, "hadamard_matrix: m not in (12, 20, 28, 40, 172)"); std::vector<std::vector<int>> h(m_, std::vector<int>(m_)); for (int i = 0; i < m_; ++i) for (int j = 0; j < m_; ++j) h[i][j] = hadamard_sign(kHadamardSigns.w, m_, i, j); return h; }, "H_m of include/lowbit/hadamard.h (the C++ sign table) as a list of rows");
}
