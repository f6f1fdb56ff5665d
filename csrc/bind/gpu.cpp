// lowbit._sim / lowbit._cuda — the CUDA kernels, one binding built twice: against the simt simulator
// (LOWBIT_SIM, module _sim) and against the nvcc-built kernels (LOWBIT_CUDA, module _cuda). The entry
// points shared with _C come from the table in bind/entries.h, each with a trailing `stream` (an int:
// a cudaStream_t under _cuda, ignored by the simulator) and run as kernels::<name>(params, stream);
// this file adds the simulator's controls, the device status and the managed memory of the paged
// optimizers. python/lowbit/ops validates everything first. A launcher's nonzero return code becomes
// RuntimeError; a fault inside a simulated kernel arrives as simt::KernelError (a std::runtime_error)
// and becomes RuntimeError too.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bind/entries.h"
#include "lowbit/optim.h"

#if defined(LOWBIT_SIM)
#include "lowbit/simt/simt.h"
#elif defined(LOWBIT_CUDA)
#include <cuda_runtime_api.h>
#else
#error "gpu.cpp is built with LOWBIT_SIM or LOWBIT_CUDA"
#endif

#define LOWBIT_STR2(x) #x
#define LOWBIT_STR(x) LOWBIT_STR2(x)

namespace lowbit::simt_tests {  // csrc/launch/simt.inl
int run(const std::string& name, const std::vector<intptr_t>& p, const std::vector<int64_t>& i, intptr_t stream);
}
namespace lowbit::kernels {  // csrc/launch/svdquant.inl
int svdquant_use_reference(int on);
}

namespace py = pybind11;
using namespace lowbit;

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

namespace {

// A shared entry as _sim / _cuda declare it: the table's arguments plus `stream`; the launcher's
// error code becomes an exception naming the entry.
struct GpuBinder {
  template <class Run, class Make, class... A, class... Extra>
  static void def(py::module_& m, const char* name, Run run, Make make, bind::type_list<A...>, Extra... extra) {
    m.def(name, [run, make, name](A... a, intptr_t stream) { check(run(make(a...), stream), name); }, extra...,
          py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>());
  }
};

}  // namespace

PYBIND11_MODULE(LOWBIT_MODULE_NAME, m) {
  py::call_guard<py::gil_scoped_release> nogil;
#if defined(LOWBIT_SIM)
  m.doc() = "lowbit CUDA kernels run on the simt CPU simulator (raw-pointer interface; use lowbit.ops)";
  m.def("configure", [](const std::string& schedule, int threads) { simt::configure(schedule, threads); },
        py::arg("schedule") = "forward", py::arg("threads") = 0,
        "schedule: 'forward', 'reverse' or 'random:<seed>' (fiber start and barrier release order); "
        "threads: OS threads running blocks (0 = SIMT_THREADS or the core count)");
  m.def("configure_thread", [](const std::string& schedule, int threads) { simt::configure_thread(schedule, threads); },
        py::arg("schedule") = "", py::arg("threads") = -1,
        "the calling thread's launches only, over configure's: schedule '' and threads -1 keep the process-wide "
        "value (lowbit.use_backend sets it around each call)");
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

  bind::def_shared<GpuBinder>(m);

  // ---- managed memory of the paged optimizers (lowbit::kernels::managed_*; csrc/cuda/optim.cu)
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

  // ---- svdquant's kernel choice (csrc/launch/svdquant.inl): the tests run the fast kernels and the
  // simplest correct ones on the same inputs
  m.def("svdquant_kernels", [](const std::string& which) {
    if (which != "reference" && which != "fast")
      throw py::value_error("svdquant_kernels: which='" + which + "' is not 'reference' or 'fast'");
    return kernels::svdquant_use_reference(which == "reference") ? std::string("reference") : std::string("fast");
  }, py::arg("which"),
     "'reference': every svdquant launch runs the simplest correct kernels; 'fast': the usual path choice. "
     "Process-wide; returns the previous setting");

  // ---- the simulator's known-answer kernels (tests/test_simt.py); in _cuda they run on a real device
  m.def("simt_test", [](const std::string& name, const std::vector<intptr_t>& ptrs, const std::vector<int64_t>& ints,
                        intptr_t stream) { check(simt_tests::run(name, ptrs, ints, stream), ("simt_test " + name).c_str()); },
        py::arg("name"), py::arg("ptrs"), py::arg("ints"), py::arg("stream") = 0, nogil);
}
