// csrc/sim/runtime.h — internals of the simt runtime shared by csrc/sim/*.cpp (not for kernels).
#pragma once
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
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

// Fiber stack size in bytes: SIMT_STACK_KB at the first launch, then simt::set_stack_kb.
size_t fiber_stack_bytes();
// PROT_NONE guard below every fiber stack. 64 KiB rather than one page: a frame that skips a single
// page without touching it (code built without -fstack-clash-protection) still lands in it.
constexpr size_t kGuardBytes = 64 * 1024;

struct WarpState {
  unsigned waiting = 0;  // lanes parked in a collective
};

struct Worker;
// Workers whose fiber stacks are mapped, for the SIGSEGV handler (it may not touch TLS).
void register_worker(Worker* w);
void unregister_worker(Worker* w);

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

  ~Worker() {
    unregister_worker(this);
    if (region) munmap(region, region_bytes);
  }

  // Room for `count` fibers with stacks of the configured size (remapped when simt::set_stack_kb
  // changed it since).
  void ensure_stacks(unsigned count) {
    const size_t want = fiber_stack_bytes();
    if (count <= capacity && want == stack_bytes) return;
    unregister_worker(this);
    if (region) munmap(region, region_bytes);
    region = nullptr;
    capacity = 0;
    stack_bytes = want;
    slot = kGuardBytes + want;
    // Always room for the largest block (1024 threads): mapped once per worker, pages touched
    // only as fibers use them (MAP_NORESERVE).
    const size_t cap = std::max<size_t>(count, 1024);
    region_bytes = slot * cap;
    char* r = static_cast<char*>(mmap(nullptr, region_bytes, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (r == MAP_FAILED) throw std::runtime_error("simt: cannot map fiber stacks");
    // The guard at the low end of each stack: a fiber overflowing its stack faults right away
    // (caught by the SIGSEGV handler in runtime.cpp: a KernelError, not a crash) instead of
    // corrupting its neighbour.
    for (size_t i = 0; i < cap; ++i) mprotect(r + i * slot, kGuardBytes, PROT_NONE);
    fibers.assign(cap, Fiber{});
    for (size_t i = 0; i < cap; ++i) {
      fibers[i].stack = r + i * slot + kGuardBytes;
      fibers[i].stack_size = want;
    }
#if SIMT_USE_UCONTEXT
    ucs.assign(cap, ucontext_t{});
#endif
    runq.assign(cap, 0);
    region = r;
    capacity = cap;
    register_worker(this);
  }
};

extern thread_local Worker* t_worker;

// warp.cpp: computes the results of a complete collective group (all lanes of `group` wait).
void compute_collective(Worker& w, unsigned warp, unsigned group);
std::string describe_deadlock(Worker& w);

// runtime.cpp
Fiber* current_fiber();
unsigned existing_lanes(const Worker& w, unsigned warp);
Fiber& fiber_at(Worker& w, unsigned linear);
WarpState& warp_at(Worker& w, unsigned warp);
void wake_in_order(Worker& w, std::vector<unsigned>& linear_ids);
void block_on_collective(Worker& w, Fiber& f);
void note_progress(Worker& w);
void count_warp_op();
std::string short_path(const char* file);
std::string op_name(Op op);

}  // namespace simt::detail
