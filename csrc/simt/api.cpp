// csrc/simt/api.cpp — the simulator's public API (include/lowbit/simt/simt.h): launch with the
// launch-time checks of the CUDA runtime (block and grid limits, shared memory per block),
// configuration (schedule, OS threads, fiber stack size), statistics and error strings.
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

#include <pthread.h>

#include "internal.h"

namespace simt::detail {

namespace {
std::mutex g_launch_mutex;  // one grid at a time (streams are synchronous in the simulator)
// Dynamic shared memory: 48 KiB without opt-in; with opt-in the smallest maximum among the
// default target archs (sm_86 / sm_89: 99 KiB per block; sm_80 163 KiB, sm_90 227 KiB).
constexpr size_t kSmemDefault = 48 * 1024;
size_t smem_optin_max() {
  static size_t v = [] {
    if (const char* e = std::getenv("SIMT_SMEM_OPTIN_MAX")) return size_t(std::atol(e));
    return size_t(99 * 1024);
  }();
  return v;
}
std::mutex g_attr_mutex;
std::map<const void*, int> g_max_dyn_smem;
thread_local std::string t_last_launch_error;
struct ThreadOverride {
  bool has_schedule = false;
  Config config;     // sched, seed, text when has_schedule
  int threads = -1;  // -1: the process-wide count
};
thread_local ThreadOverride t_override;  // simt::configure_thread

// fork(): only the forking thread exists in the child, so a mutex another thread held at the fork
// would stay locked there forever, and the pool's threads are gone. The handlers hold every
// simt mutex across fork() (a fork waits for a running launch to end: the pool is then idle), and
// the child re-initialises them and drops the pool, which its next launch re-creates with threads
// of its own (it used to wait forever for the parent's). Lock order: launch, attributes, symbols
// (a launch may look up a kernel's name; nothing takes them the other way round).
void before_fork() {
  g_launch_mutex.lock();
  g_attr_mutex.lock();
  g_symbols_mutex.lock();
}
void after_fork_in_parent() {
  g_symbols_mutex.unlock();
  g_attr_mutex.unlock();
  g_launch_mutex.unlock();
}
void after_fork_in_child() {
  // locked by the forking thread, whose copy in the child has another thread id: re-initialised
  new (&g_symbols_mutex) std::mutex();
  new (&g_attr_mutex) std::mutex();
  new (&g_launch_mutex) std::mutex();
  reset_pool_in_child();
}
const int g_fork_handlers = pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
}  // namespace

int launch(const LaunchSpec& spec) {
  auto bad = [](int code, const std::string& msg) {
    t_last_launch_error = msg;
    return code;
  };
  const uint64_t nthreads = uint64_t(spec.block.x) * spec.block.y * spec.block.z;
  if (spec.block.x == 0 || spec.block.y == 0 || spec.block.z == 0 || nthreads > 1024 || spec.block.x > 1024 ||
      spec.block.y > 1024 || spec.block.z > 64)
    return bad(kErrorInvalidConfiguration,
               "block (" + std::to_string(spec.block.x) + "," + std::to_string(spec.block.y) + "," +
                   std::to_string(spec.block.z) + ") has " + std::to_string(nthreads) +
                   " threads (limits: 1024 in total, 1024 x 1024 x 64)");
  if (spec.grid.x == 0 || spec.grid.y == 0 || spec.grid.z == 0 || spec.grid.x > 0x7fffffffu ||
      spec.grid.y > 65535 || spec.grid.z > 65535)
    return bad(kErrorInvalidConfiguration,
               "grid (" + std::to_string(spec.grid.x) + "," + std::to_string(spec.grid.y) + "," +
                   std::to_string(spec.grid.z) + ") is empty or over the limits (2^31-1, 65535, 65535)");
  // Shared memory per block, as cudaLaunchKernel checks it: the dynamic size may not exceed the
  // kernel's cudaFuncAttributeMaxDynamicSharedMemorySize, which is 48 KiB minus the static shared
  // memory until simt::set_max_dynamic_smem raises it (static + dynamic <= 48 KiB by default).
  const size_t stat = kernel_info(spec.kernel).static_smem;
  if (stat > kSmemDefault)
    return bad(kErrorInvalidValue, "static shared memory of " + std::to_string(stat) +
                                       " bytes is over 48 KiB (ptxas rejects such a kernel: use dynamic shared memory)");
  size_t limit = kSmemDefault - stat;
  bool opted = false;
  {
    std::lock_guard<std::mutex> lock(g_attr_mutex);
    auto it = g_max_dyn_smem.find(spec.kernel);
    if (it != g_max_dyn_smem.end()) {
      limit = size_t(it->second);
      opted = true;
    }
  }
  if (spec.smem > limit)
    return bad(kErrorInvalidValue,
               "static shared memory of " + std::to_string(stat) + " bytes + dynamic shared memory of " +
                   std::to_string(spec.smem) + " bytes: the dynamic part is over the " + std::to_string(limit) +
                   "-byte limit of this kernel" +
                   (opted ? " (its set_max_dynamic_smem)"
                          : " (48 KiB minus the static part; opt in with simt::set_max_dynamic_smem)"));
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  install_segv_handler();
  // The launching thread's override (configure_thread) holds for this grid only: the scheduler's
  // threads read g_config, which nothing else writes while the launch mutex is held.
  const Config process_wide = g_config;
  if (t_override.has_schedule) {
    g_config.sched = t_override.config.sched;
    g_config.seed = t_override.config.seed;
    g_config.text = t_override.config.text;
  }
  if (t_override.threads >= 0) g_config.threads = t_override.threads;
  struct Restore {
    const Config& c;
    ~Restore() { g_config = c; }
  } restore{process_wide};
  const auto t0 = std::chrono::steady_clock::now();
  const std::string error = run_grid(spec, g_config.threads > 0 ? g_config.threads : default_threads());
  g_stats.launches.fetch_add(1, std::memory_order_relaxed);
  g_stats.nanos.fetch_add(uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                       std::chrono::steady_clock::now() - t0).count()),
                          std::memory_order_relaxed);
  if (!error.empty()) throw KernelError(error);
  return kSuccess;
}

}  // namespace simt::detail

// ---------------------------------------------------------------------------- public API
namespace simt {

int set_max_dynamic_smem_impl(const void* kernel, int bytes) {
  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize): static + dynamic may not exceed the device's
  // per-block opt-in maximum.
  const size_t stat = detail::kernel_info(kernel).static_smem;
  if (bytes < 0 || stat + size_t(bytes) > detail::smem_optin_max()) {
    detail::t_last_launch_error = "set_max_dynamic_smem(" + std::to_string(bytes) + ") with static shared memory of " +
                                  std::to_string(stat) + " bytes is over the per-block opt-in maximum of " +
                                  std::to_string(detail::smem_optin_max()) + " bytes";
    return kErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(detail::g_attr_mutex);
  detail::g_max_dyn_smem[kernel] = bytes;
  return kSuccess;
}

void set_stack_kb(int kb) {
  using namespace detail;
  if (kb < kStackKbMin || kb > kStackKbMax)
    throw std::invalid_argument("simt stack_kb must be in [" + std::to_string(kStackKbMin) + ", " +
                                std::to_string(kStackKbMax) + "] (KiB per simulated thread), got " + std::to_string(kb));
  std::lock_guard<std::mutex> lock(g_launch_mutex);  // no grid is running
  set_fiber_stack_bytes(size_t(kb) * 1024);
}
int stack_kb() { return int(detail::fiber_stack_bytes() / 1024); }

namespace {
detail::Config parse_schedule(const std::string& sched) {
  using namespace detail;
  Config c;
  c.text = sched;
  const auto bad = [&] {
    return std::invalid_argument("simt schedule must be 'forward', 'reverse' or 'random:<seed>' with a seed in "
                                 "[0, 2^64), got '" + sched.substr(0, 100) + "'");
  };
  if (sched == "forward") {
    c.sched = Sched::forward;
  } else if (sched == "reverse") {
    c.sched = Sched::reverse;
  } else if (sched.rfind("random:", 0) == 0 && sched.size() > 7 && sched.size() <= 27 &&
             sched.find_first_not_of("0123456789", 7) == std::string::npos) {
    c.sched = Sched::random;
    try {
      c.seed = std::stoull(sched.substr(7));  // out_of_range past 2^64 - 1: it surfaced as IndexError
    } catch (const std::out_of_range&) {
      throw bad();
    }
  } else {
    throw bad();
  }
  return c;
}
void check_threads(int threads, int lo) {
  if (threads < lo || threads > 256)
    throw std::invalid_argument("simt threads must be in [" + std::to_string(lo) + ", 256], got " + std::to_string(threads));
}
}  // namespace

void configure(const std::string& sched, int threads) {
  using namespace detail;
  Config c = parse_schedule(sched);
  check_threads(threads, 0);
  c.threads = threads;
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_config = c;
}

void configure_thread(const std::string& sched, int threads) {
  using namespace detail;
  check_threads(threads, -1);
  ThreadOverride o;
  if (!sched.empty()) {
    o.has_schedule = true;
    o.config = parse_schedule(sched);
  }
  o.threads = threads;
  t_override = o;  // this thread's own: no lock
}
std::string schedule() { return detail::g_config.text; }
int threads() { return detail::g_config.threads > 0 ? detail::g_config.threads : detail::default_threads(); }
int configured_threads() { return detail::g_config.threads; }

Stats stats() {
  auto& s = detail::g_stats;
  return {double(s.launches.load()), double(s.blocks.load()), double(s.threads.load()),
          double(s.warp_ops.load()), double(s.barriers.load()), double(s.nanos.load()) * 1e-9};
}
void reset_stats() {
  auto& s = detail::g_stats;
  s.launches = 0;
  s.blocks = 0;
  s.threads = 0;
  s.warp_ops = 0;
  s.barriers = 0;
  s.nanos = 0;
}
const char* error_string(int code) {
  switch (code) {
    case kSuccess: return "no error";
    case kErrorInvalidValue: return "invalid argument";
    case kErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unknown simt error";
  }
}
std::string last_launch_error() { return detail::t_last_launch_error; }
std::vector<std::pair<std::string, size_t>> static_smem_table() { return detail::static_smem_table(); }

}  // namespace simt
