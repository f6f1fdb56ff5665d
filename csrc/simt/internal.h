// csrc/simt/internal.h — internals of the simt runtime shared by csrc/simt/*.cpp (not for kernels):
// the fiber and worker records, and what each file offers the others.
#pragma once
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(SIMT_UCONTEXT)
#define SIMT_USE_UCONTEXT 1
#include <ucontext.h>
#else
#define SIMT_USE_UCONTEXT 0
#endif

#include "lowbit/simt/simt.h"

namespace simt::detail {

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  void* uctx = nullptr;  // ucontext_t* on the ucontext fallback
  char* stack = nullptr;
  size_t stack_size = 0;
  unsigned linear = 0, lane = 0, warp = 0;
  uint3 tid{0, 0, 0};
  enum State : int { ready, running, barrier, warp_wait, done, failed } state = ready;
  const char* file = nullptr;  // where it waits
  int line = 0;
  int bar_pred = 0, bar_result = 0;
  Collective* coll = nullptr;  // while waiting in a warp collective (lives on the fiber's stack)
  void* fake_stack = nullptr;  // ASan fake stack of this fiber while switched out
};

// PROT_NONE guard below every fiber stack. 64 KiB rather than one page: a frame that skips a single
// page without touching it (code built without -fstack-clash-protection) still lands in it.
constexpr size_t kGuardBytes = 64 * 1024;

struct WarpState {
  unsigned waiting = 0;  // lanes parked in a collective
};

// One per OS thread that runs blocks: fiber stacks, the block being run, its barrier and warps.
struct Worker {
  // fiber stacks: one mapping, a PROT_NONE guard of kGuardBytes below every stack
  char* region = nullptr;
  size_t region_bytes = 0, capacity = 0, slot = 0, stack_bytes = 0;
  std::vector<Fiber> fibers;
  std::vector<unsigned> runq;  // ring buffer of linear ids
  size_t rq_head = 0, rq_count = 0;
  std::vector<WarpState> warps;
  std::vector<unsigned char> smem_buf;
  void* sched_sp = nullptr;
#if SIMT_USE_UCONTEXT
  ucontext_t sched_uc;
  std::vector<ucontext_t> ucs;
#endif
  void* sched_fake = nullptr;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  bool stacks_dirty = false;

  // block being run
  const LaunchSpec* spec = nullptr;
  unsigned n = 0, done = 0;
  uint3 bidx{0, 0, 0};
  uint64_t block_linear = 0, rng = 0;
  Fiber* volatile cur = nullptr;  // volatile: read by the SIGSEGV handler
  // barrier
  unsigned bar_arrived = 0, bar_first = 0;
  const char* bar_file = nullptr;
  int bar_line = 0, bar_count = 0, bar_and = 1, bar_or = 0;
  uint64_t spin = 0;
  // error of this block
  bool failed = false;
  std::string error;

  ~Worker();
  // Room for `count` fibers with stacks of the configured size (remapped when simt::set_stack_kb
  // changed it since). fiber.cpp.
  void ensure_stacks(unsigned count);
};

extern thread_local Worker* t_worker;

// ---- fiber.cpp
// Fiber stack size in bytes: SIMT_STACK_KB at the first launch, then simt::set_stack_kb.
constexpr int kStackKbMin = 16, kStackKbMax = 64 * 1024;
size_t fiber_stack_bytes();
void set_fiber_stack_bytes(size_t bytes);
// Workers whose fiber stacks are mapped, for the SIGSEGV handler (it may not touch TLS).
void register_worker(Worker* w);
void unregister_worker(Worker* w);
void init_fiber(Worker& w, Fiber& f);                // a fresh fiber that will run spec->entry
void resume(Worker& w, Fiber& f);                    // scheduler -> f, until f switches back
void to_scheduler(Worker& w, Fiber& f, bool dying);  // f -> scheduler
void install_segv_handler();                         // at every launch: simt's handler first in line
void ensure_altstack();                              // in every OS thread that runs fibers

// ---- symbols.cpp
struct KernelInfo {
  std::string name;        // demangled, or kernel@<address>
  size_t static_smem = 0;  // bytes of static __shared__ declared in the kernel's body
};
const KernelInfo& kernel_info(const void* kernel);
std::string kernel_name(const void* kernel);
std::vector<std::pair<std::string, size_t>> static_smem_table();
extern std::mutex g_symbols_mutex;  // kernel_info's cache (held across fork by api.cpp's handlers)
std::string short_path(const char* file);  // from csrc/, include/ or tests/ on

// ---- scheduler.cpp
enum class Sched { forward, reverse, random };
struct Config {
  Sched sched = Sched::forward;
  uint64_t seed = 0;
  int threads = 0;  // 0: SIMT_THREADS or hardware concurrency
  std::string text = "forward";
};
extern Config g_config;  // written by simt::configure between launches
struct Counters {
  std::atomic<uint64_t> launches{0}, blocks{0}, threads{0}, warp_ops{0}, barriers{0};
  std::atomic<uint64_t> nanos{0};
};
extern Counters g_stats;
int default_threads();
// Runs every block of the grid on `nthreads` OS threads; the error of the lowest failing block, or "".
std::string run_grid(const LaunchSpec& spec, int nthreads);
// In the child of fork() (under the launch mutex): forget the pool, whose threads stayed in the
// parent; the next launch creates a new one.
void reset_pool_in_child();
void set_error(Worker& w, const Fiber& f, const std::string& what);  // the block's first error wins
void on_exit(Worker& w);  // a fiber of the block returned from the kernel
Fiber* current_fiber();
unsigned existing_lanes(const Worker& w, unsigned warp);
Fiber& fiber_at(Worker& w, unsigned linear);
WarpState& warp_at(Worker& w, unsigned warp);
void wake_in_order(Worker& w, std::vector<unsigned>& linear_ids);
void block_on_collective(Worker& w, Fiber& f);
void note_progress(Worker& w);
void count_warp_op();
std::string describe_barrier_waiters(Worker& w);

// ---- warp.cpp: computes the results of a complete collective group (all lanes of `group` wait).
void compute_collective(Worker& w, unsigned warp, unsigned group);
std::string describe_deadlock(Worker& w);
std::string op_name(Op op);

}  // namespace simt::detail
