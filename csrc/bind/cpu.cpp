// lowbit._C — the CPU kernels. The entry points shared with _sim / _cuda come from the table in
// bind/entries.h (run as cpu::<name>(params)); this file adds the CPU-only ones: path choice,
// threads, the code tables, QWHA's sparse products and the H_m sign tables. The GIL is released
// while a kernel runs; a std::invalid_argument from a kernel's check arrives as ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bind/entries.h"
#include "cpu/common.h"
#include "lowbit/formats.h"
#include "lowbit/hadamard.h"
#include "lowbit/qwha.h"

namespace py = pybind11;
using namespace lowbit;
using bind::Address;
using bind::ptr;
using py::arg;

namespace {

// A shared entry as _C declares it: the table's arguments, as they are.
struct CpuBinder {
  template <class Run, class Make, class... A, class... Extra>
  static void def(py::module_& m, const char* name, Run run, Make make, bind::type_list<A...>, Extra... extra) {
    m.def(name, [run, make](A... a) { run(make(a...)); }, extra..., py::call_guard<py::gil_scoped_release>());
  }
};

py::dict tables() {
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
}

std::vector<std::vector<int>> hadamard_matrix(int m) {
  LOWBIT_CHECK(m == 12 || m == 20 || m == 28 || m == 40 || m == 172,
               "hadamard_matrix: m not in (12, 20, 28, 40, 172), got " + std::to_string(m));
  std::vector<std::vector<int>> h(m, std::vector<int>(m));
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < m; ++j) h[i][j] = hadamard_sign(kHadamardSigns.w, m, i, j);
  return h;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowbit CPU kernels (raw-pointer interface; use lowbit.ops)";
  const py::call_guard<py::gil_scoped_release> nogil;

  m.def("cpu_path", &cpu::cpu_path,
        "the CPU path in use: 'amx', 'avx512bf16', 'avx512', 'avx2', 'portable' or 'amx-emulated' "
        "(csrc/cpu/dispatch.cpp)");
  m.def("set_cpu_path", &cpu::set_cpu_path, arg("path"),
        "Force one of available_cpu_paths() or 'auto' (the best available; tests use it to check every path); "
        "returns the path in use");
  m.def("available_cpu_paths", &cpu::available_cpu_paths, "the paths this CPU and build can run");
  m.def("amx_status", &cpu::amx_unavailable_reason, "'' when AMX tiles run in this process, else why not");
  m.def("matmul_precision", [] { return int(cpu::matmul_precision()); },
        "the precision policy: 0 highest, 1 high, 2 medium (lowbit.get_matmul_precision)");
  m.def("gemm_route", [](int dtype, int64_t m, bool transposed, int fmt) {
          return cpu::gemm_route_name(DType(dtype), m, transposed, Fmt(fmt)); },
        arg("dtype"), arg("m"), arg("transposed") = false, arg("fmt") = 0,
        "the kernel gemm (gemm_t) runs for m rows in this dtype id, of a weight in this format id (fp32 x under "
        "`medium`: the GEMV's range depends on it), under the current path and policy");
  m.def("set_matmul_precision", [](int p) { cpu::set_matmul_precision(Precision(p)); }, arg("precision"));
  m.def("num_threads", &cpu::num_threads);
  m.def("tables", &tables, "the code tables and block-size lists of include/lowbit/formats.h");
#if defined(LOWBIT_SANITIZED) && LOWBIT_SANITIZED
  m.attr("sanitized") = true;  // built with LOWBIT_SANITIZE=ON (-fsanitize=address,undefined)
#else
  m.attr("sanitized") = false;
#endif

  bind::def_shared<CpuBinder>(m);

  // ---- the lowrank backward on the bf16 matrix engines (include/lowbit/lowrank.h); CPU only. The weight
  // arguments as in gemm_t (gy's n, the weight's k), then x, xa, gxa, A, B, ga, gb, r, s.
  m.def("lowrank_backward", [](Address gy, Address gx, int dtype, int64_t m_, int64_t n, int64_t k, Address codes,
                               Address scale, Address zero, Address scale_q, Address scale_nested, float scale_offset,
                               int block, int fmt, Address x, Address xa, Address gxa, Address a, Address b, Address ga,
                               Address gb, int r, float s) {
    const GemmParams g{bind::weight(codes, scale, zero, scale_q, scale_nested, scale_offset, n, k, block, fmt),
                       ptr<const void>(gy), ptr<void>(gx), nullptr, DType(dtype), m_};
    cpu::lowrank_backward({g, ptr<const void>(x), ptr<const void>(xa), ptr<const void>(gxa), ptr<const void>(a),
                           ptr<const void>(b), ptr<float>(ga), ptr<float>(gb), r, s});
  }, nogil, arg("gy"), arg("gx"), arg("dtype"), arg("m"), arg("n"), arg("k"), arg("codes"), arg("scale"), arg("zero"), arg("scale_q"),
     arg("scale_nested"), arg("scale_offset"), arg("block"), arg("fmt"), arg("x"), arg("xa"),
     arg("gxa"), arg("a"), arg("b"), arg("ga"), arg("gb"), arg("r"), arg("s"));

  // ---- QWHA's sparse products (include/lowbit/qwha.h); CPU only
  m.def("qwha_spmm", [](Address z, Address values, Address crow, Address cols, int64_t m_, int k, int n_out,
                        float scale, Address y, bool accumulate) {
    cpu::qwha_spmm({ptr<const float>(z), ptr<const float>(values), ptr<const int32_t>(crow), ptr<const int32_t>(cols),
                    m_, k, n_out, scale, ptr<float>(y), accumulate});
  }, nogil, arg("z"), arg("values"), arg("crow"), arg("cols"), arg("m"), arg("k"), arg("n_out"), arg("scale"),
     arg("y"), arg("accumulate") = false);
  m.def("qwha_sddmm", [](Address gy, Address z, Address crow, Address cols, int64_t m_, int k, int n_out,
                         Address gvals) {
    cpu::qwha_sddmm({ptr<const float>(gy), ptr<const float>(z), ptr<const int32_t>(crow), ptr<const int32_t>(cols),
                     m_, k, n_out, ptr<float>(gvals)});
  }, nogil, arg("gy"), arg("z"), arg("crow"), arg("cols"), arg("m"), arg("k"), arg("n_out"), arg("gvals"));

  m.def("hadamard_matrix", &hadamard_matrix, arg("m"),
        "H_m of include/lowbit/hadamard.h (the C++ sign table) as a list of rows");
}
