// lowbit._sim / lowbit._cuda — one binding for the CUDA kernels, built twice: against the simt
// simulator (LOWBIT_SIM, module _sim) and against the nvcc-built kernels (LOWBIT_CUDA, module _cuda).
// Same raw-pointer interface as _C (csrc/bind/cpu.cpp) plus a trailing `stream` (an int: a
// cudaStream_t under _cuda, ignored by the simulator). python/lowbit/ops.py validates everything.
// A launcher's nonzero return code becomes RuntimeError; a fault inside a simulated kernel
// arrives as simt::KernelError (a std::runtime_error) and becomes RuntimeError too.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "lowbit/formats.h"
#include "lowbit/gemm.h"
#include "lowbit/lowrank.h"
#include "lowbit/optim.h"
#include "lowbit/hadamard.h"
#include "lowbit/quant.h"

#if defined(LOWBIT_SIM)
#include "lowbit/simt/simt.h"
#elif defined(LOWBIT_CUDA)
#include <cuda_runtime_api.h>
#else
#error "kernels.cpp is built with LOWBIT_SIM or LOWBIT_CUDA"
#endif

#define LOWBIT_STR2(x) #x
#define LOWBIT_STR(x) LOWBIT_STR2(x)

namespace lowbit::simt_tests {  // csrc/launch/simt.inl
int run(const std::string& name, const std::vector<intptr_t>& p, const std::vector<int64_t>& i, intptr_t stream);
}

namespace py = pybind11;
using namespace lowbit;

template <class T>
static T* ptr(intptr_t p) { return reinterpret_cast<T*>(p); }

static void check(int code, const char* what) {
  if (code == 0) return;
#if defined(LOWBIT_SIM)
  std::string detail = simt::last_launch_error();
  throw std::runtime_error(std::string("lowbit._sim: ") + what + " failed: " + simt::error_string(code) +
                           " (error " + std::to_string(code) + (detail.empty() ? "" : ": " + detail) + ")");
#else
  throw std::runtime_error(std::string("lowbit._cuda: ") + what + " failed: " +
                           cudaGetErrorString(cudaError_t(code)) + " (error " + std::to_string(code) + ")");
#endif
}

PYBIND11_MODULE(LOWBIT_MODULE_NAME, m) {
  py::call_guard<py::gil_scoped_release> nogil;
#if defined(LOWBIT_SIM)
  m.doc() = "lowbit CUDA kernels run on the simt CPU simulator (raw-pointer interface; use lowbit.ops)";
  m.def("configure", [](const std::string& schedule, int threads) { simt::configure(schedule, threads); },
        py::arg("schedule") = "forward", py::arg("threads") = 0,
        "schedule: 'forward', 'reverse' or 'random:<seed>' (fiber start and barrier release order); "
        "threads: OS threads running blocks (0 = SIMT_THREADS or the core count)");
  m.def("get_config", [] { return std::make_pair(simt::schedule(), simt::configured_threads()); },
        "(schedule, threads) as last given to configure: configure(*get_config()) restores it");
  m.def("set_stack_kb", [](int kb) { simt::set_stack_kb(kb); }, py::arg("stack_kb"),
        "stack of every simulated thread in KiB, [16, 65536] (default 64, or SIMT_STACK_KB); a thread that "
        "overflows it raises RuntimeError naming the kernel");
  m.def("stack_kb", &simt::stack_kb, "stack of every simulated thread in KiB");
  m.def("static_smem", [] {
    py::dict d;
    for (const auto& e : simt::static_smem_table()) d[py::str(e.first)] = e.second;
    return d;
  }, "{kernel (demangled): bytes of static __shared__ it declares}, as counted against the launch limit");
  m.def("schedule", &simt::schedule);
  m.def("threads", &simt::threads);
  m.def("stats", [] {
    const simt::Stats s = simt::stats();
    py::dict d;
    d["launches"] = s.launches;
    d["blocks"] = s.blocks;
    d["threads"] = s.threads;  // simulated CUDA threads
    d["warp_ops"] = s.warp_ops;
    d["barriers"] = s.barriers;
    d["seconds"] = s.seconds;  // wall time inside launches
    d["threads_per_second"] = s.seconds > 0 ? s.threads / s.seconds : 0.0;
    return d;
  }, "counters since import or reset_stats()");
  m.def("reset_stats", &simt::reset_stats);
#if defined(SIMT_ASAN) && SIMT_ASAN
  m.attr("sanitized") = true;  // built with LOWBIT_SANITIZE=ON (-fsanitize=address,undefined)
#else
  m.attr("sanitized") = false;
#endif
#else
  m.doc() = "lowbit CUDA kernels (nvcc build; raw-pointer interface; use lowbit.ops)";
  m.def("device_status", []() -> std::pair<int, std::string> {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear the sticky error
      return {0, std::string("no CUDA device: ") + cudaGetErrorString(e) + " (error " + std::to_string(int(e)) + ")"};
    }
    if (n == 0) return {0, "no CUDA device: none found"};
    return {n, std::to_string(n) + " CUDA device(s)"};
  }, "(device_count, message); cudaErrorInsufficientDriver (35) and no device report 'no CUDA device: <reason>'");
  m.def("compiled_archs", [] { return std::string(LOWBIT_CUDA_ARCHS); });
#endif

  // ---- quant (same signatures as _C, plus stream)
  m.def("quantize", [](intptr_t w, int w_dtype, int64_t numel, int block, int fmt, intptr_t codes, intptr_t scale,
                       intptr_t zero, intptr_t stream) {
    check(kernels::quantize({ptr<const void>(w), DType(w_dtype), numel, block, Fmt(fmt), ptr<uint8_t>(codes),
                             ptr<float>(scale), ptr<float>(zero)}, stream), "quantize");
  }, py::arg("w"), py::arg("w_dtype"), py::arg("numel"), py::arg("block"), py::arg("fmt"), py::arg("codes"),
     py::arg("scale"), py::arg("zero"), py::arg("stream") = 0, nogil);
  m.def("dequantize", [](intptr_t codes, intptr_t scale, intptr_t zero, intptr_t scale_q, intptr_t scale_nested,
                         float scale_offset, intptr_t out, int out_dtype, int64_t numel, int block, int fmt,
                         intptr_t stream) {
    check(kernels::dequantize({ptr<const uint8_t>(codes), ptr<const float>(scale), ptr<const float>(zero),
                               ptr<const uint8_t>(scale_q), ptr<const float>(scale_nested), scale_offset,
                               ptr<void>(out), DType(out_dtype), numel, block, Fmt(fmt)}, stream), "dequantize");
  }, py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("scale_q"), py::arg("scale_nested"),
     py::arg("scale_offset"), py::arg("out"), py::arg("out_dtype"), py::arg("numel"), py::arg("block"),
     py::arg("fmt"), py::arg("stream") = 0, nogil);
  m.def("quantize8", [](intptr_t x, int64_t numel, int block, bool is_signed, float offset, intptr_t q,
                        intptr_t absmax, intptr_t stream) {
    check(kernels::quantize8({ptr<const float>(x), numel, block, is_signed, offset, ptr<uint8_t>(q), ptr<float>(absmax)},
                             stream), "quantize8");
  }, py::arg("x"), py::arg("numel"), py::arg("block"), py::arg("is_signed"), py::arg("offset"), py::arg("q"),
     py::arg("absmax"), py::arg("stream") = 0, nogil);
  m.def("dequantize8", [](intptr_t q, intptr_t absmax, int64_t numel, int block, bool is_signed, float offset,
                          intptr_t out, intptr_t stream) {
    check(kernels::dequantize8({ptr<const uint8_t>(q), ptr<const float>(absmax), numel, block, is_signed, offset,
                                ptr<float>(out)}, stream), "dequantize8");
  }, py::arg("q"), py::arg("absmax"), py::arg("numel"), py::arg("block"), py::arg("is_signed"), py::arg("offset"),
     py::arg("out"), py::arg("stream") = 0, nogil);

  // ---- families register below (one block each, same pattern): gemm, lowrank, hadamard, optim
  // ---- gemm (lowbit::kernels::gemm / gemm_t; csrc/launch/gemm.inl) — gemm family block
  m.def("gemm", [](intptr_t x, intptr_t y, intptr_t bias, int dtype, int64_t m_, int64_t n, int64_t k, intptr_t codes,
                   intptr_t scale, intptr_t zero, intptr_t scale_q, intptr_t scale_nested, float scale_offset, int block,
                   int fmt, intptr_t stream) {
    check(kernels::gemm({{ptr<const uint8_t>(codes), ptr<const float>(scale), ptr<const float>(zero),
                          ptr<const uint8_t>(scale_q), ptr<const float>(scale_nested), scale_offset, n, k, block, Fmt(fmt)},
                         ptr<const void>(x), ptr<void>(y), ptr<const void>(bias), DType(dtype), m_}, stream), "gemm");
  }, py::arg("x"), py::arg("y"), py::arg("bias"), py::arg("dtype"), py::arg("m"), py::arg("n"), py::arg("k"),
     py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("scale_q"), py::arg("scale_nested"),
     py::arg("scale_offset"), py::arg("block"), py::arg("fmt"), py::arg("stream") = 0, nogil);
  m.def("gemm_t", [](intptr_t gy, intptr_t gx, int dtype, int64_t m_, int64_t n, int64_t k, intptr_t codes,
                     intptr_t scale, intptr_t zero, intptr_t scale_q, intptr_t scale_nested, float scale_offset,
                     int block, int fmt, intptr_t stream) {
    check(kernels::gemm_t({{ptr<const uint8_t>(codes), ptr<const float>(scale), ptr<const float>(zero),
                            ptr<const uint8_t>(scale_q), ptr<const float>(scale_nested), scale_offset, n, k, block,
                            Fmt(fmt)}, ptr<const void>(gy), ptr<void>(gx), nullptr, DType(dtype), m_}, stream), "gemm_t");
  }, py::arg("gy"), py::arg("gx"), py::arg("dtype"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("codes"),
     py::arg("scale"), py::arg("zero"), py::arg("scale_q"), py::arg("scale_nested"), py::arg("scale_offset"),
     py::arg("block"), py::arg("fmt"), py::arg("stream") = 0, nogil);
  // ---- end gemm

  // ---- lowrank (lowbit::kernels::lowrank; csrc/launch/lowrank.inl) — lowrank family block
  m.def("lowrank", [](intptr_t x, intptr_t y, intptr_t xa, intptr_t bias, int dtype, int64_t m_, int64_t n, int64_t k,
                      intptr_t codes, intptr_t scale, intptr_t zero, intptr_t scale_q, intptr_t scale_nested,
                      float scale_offset, int block, int fmt, intptr_t a, intptr_t b, int r, float s, intptr_t stream) {
    const GemmParams g{{ptr<const uint8_t>(codes), ptr<const float>(scale), ptr<const float>(zero),
                        ptr<const uint8_t>(scale_q), ptr<const float>(scale_nested), scale_offset, n, k, block, Fmt(fmt)},
                       ptr<const void>(x), ptr<void>(y), ptr<const void>(bias), DType(dtype), m_};
    check(kernels::lowrank({g, ptr<void>(xa), ptr<const void>(a), ptr<const void>(b), r, s}, stream), "lowrank");
  }, py::arg("x"), py::arg("y"), py::arg("xa"), py::arg("bias"), py::arg("dtype"), py::arg("m"), py::arg("n"),
     py::arg("k"), py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("scale_q"), py::arg("scale_nested"),
     py::arg("scale_offset"), py::arg("block"), py::arg("fmt"), py::arg("a"), py::arg("b"), py::arg("r"), py::arg("s"),
     py::arg("stream") = 0, nogil);
  // ---- end lowrank

  // ---- hadamard (lowbit::kernels::hadamard; csrc/launch/hadamard.inl) — hadamard family block
  m.def("hadamard", [](intptr_t x, intptr_t out, int dtype, int64_t rows, int n, float scale, bool transpose,
                       intptr_t stream) {
    check(kernels::hadamard({ptr<const void>(x), ptr<void>(out), DType(dtype), rows, n, scale, transpose}, stream),
          "hadamard");
  }, py::arg("x"), py::arg("out"), py::arg("dtype"), py::arg("rows"), py::arg("n"), py::arg("scale"),
     py::arg("transpose"), py::arg("stream") = 0, nogil);
  // ---- end hadamard

  // ---- optim (lowbit::kernels::adamw32 / adamw8 / managed_*; csrc/cuda/optim.cu) — optim family block
  m.def("adamw32", [](intptr_t p, int p_dtype, intptr_t g, int g_dtype, intptr_t m_, intptr_t v, int64_t numel,
                      float beta1, float omb1, float beta2, float omb2, float eps, float decay, float nstep,
                      float ibc2s, intptr_t stream) {
    check(kernels::adamw32({ptr<void>(p), DType(p_dtype), ptr<const void>(g), DType(g_dtype), ptr<float>(m_),
                            ptr<float>(v), numel, {beta1, omb1, beta2, omb2, eps, decay, nstep, ibc2s}}, stream),
          "adamw32");
  }, nogil);
  m.def("adamw8", [](intptr_t p, int p_dtype, intptr_t g, int g_dtype, intptr_t qm, intptr_t am, intptr_t qv,
                     intptr_t av, int64_t numel, float beta1, float omb1, float beta2, float omb2, float eps,
                     float decay, float nstep, float ibc2s, int rounding, intptr_t stream) {
    check(kernels::adamw8({ptr<void>(p), DType(p_dtype), ptr<const void>(g), DType(g_dtype), ptr<uint8_t>(qm),
                           ptr<float>(am), ptr<uint8_t>(qv), ptr<float>(av), numel,
                           {beta1, omb1, beta2, omb2, eps, decay, nstep, ibc2s}, rounding}, stream),
          "adamw8");
  }, nogil);
  m.def("managed_alloc", [](int64_t bytes) {
    intptr_t ptr = 0;
    check(kernels::managed_alloc(&ptr, bytes), "managed_alloc");
    return ptr;
  }, py::arg("bytes"), "cudaMallocManaged (host memory under _sim); the caller frees with managed_free");
  m.def("managed_free", [](intptr_t ptr) { check(kernels::managed_free(ptr), "managed_free"); }, py::arg("ptr"));
  m.def("managed_prefetch", [](intptr_t ptr, int64_t bytes, int device, intptr_t stream) {
    check(kernels::managed_prefetch(ptr, bytes, device, stream), "managed_prefetch");
  }, py::arg("ptr"), py::arg("bytes"), py::arg("device"), py::arg("stream") = 0, nogil,
     "cudaMemPrefetchAsync to `device` (-1: host); a no-op under _sim");
  // ---- end optim

  // ---- simulator self-tests (tests/test_simt.py); in _cuda they run on a real device
  m.def("simt_test", [](const std::string& name, const std::vector<intptr_t>& ptrs, const std::vector<int64_t>& ints,
                        intptr_t stream) { check(simt_tests::run(name, ptrs, ints, stream), ("simt_test " + name).c_str()); },
        py::arg("name"), py::arg("ptrs"), py::arg("ints"), py::arg("stream") = 0, nogil);
}
