// csrc/simt/fiber.cpp — fibers: one per simulated CUDA thread. The context switch (hand-written
// x86-64, or ucontext), the fiber's entry and its exit to the scheduler, the fiber stacks with a
// PROT_NONE guard below each, and the SIGSEGV handler that turns an overflow into a KernelError.
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>

#include "internal.h"

#if defined(SIMT_ASAN) && SIMT_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN_ON 1
#else
#define SIMT_ASAN_ON 0
#endif

namespace simt::detail {

// ---------------------------------------------------------------------------- context switch
#if !SIMT_USE_UCONTEXT
// x86-64 SysV: save the callee-saved registers, MXCSR and the x87 control word on the current
// stack, store rsp in *save, load `to`, restore the same set from there and return into it.
// ~5 ns a round trip (ucontext makes a sigprocmask syscall per switch: ~100x slower).
asm(R"(
  .text
  .globl simt_switch_ctx
  .hidden simt_switch_ctx
  .type simt_switch_ctx,@function
simt_switch_ctx:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size simt_switch_ctx,.-simt_switch_ctx

  .globl simt_fiber_trampoline
  .hidden simt_fiber_trampoline
  .type simt_fiber_trampoline,@function
simt_fiber_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size simt_fiber_trampoline,.-simt_fiber_trampoline
)");
extern "C" void simt_switch_ctx(void** save, void* to);
extern "C" void simt_fiber_trampoline();
#endif

// Fiber stacks: 64 KiB (256 KiB under ASan, whose frames carry redzones), SIMT_STACK_KB at the
// first use, simt::set_stack_kb at run time. Workers remap their stacks when it changed.
static std::atomic<size_t> g_stack_bytes{0};
size_t fiber_stack_bytes() {
  size_t v = g_stack_bytes.load(std::memory_order_relaxed);
  if (v) return v;
  size_t kb = SIMT_ASAN_ON ? 256 : 64;
  if (const char* e = std::getenv("SIMT_STACK_KB")) kb = size_t(std::min(kStackKbMax, std::max(kStackKbMin, std::atoi(e))));
  size_t expected = 0;
  g_stack_bytes.compare_exchange_strong(expected, kb * 1024);
  return g_stack_bytes.load();
}
void set_fiber_stack_bytes(size_t bytes) {
  fiber_stack_bytes();  // SIMT_STACK_KB read first, then overridden
  g_stack_bytes.store(bytes);
}

Worker::~Worker() {
  unregister_worker(this);
  if (region) munmap(region, region_bytes);
}

void Worker::ensure_stacks(unsigned count) {
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
  // (caught by the SIGSEGV handler below: a KernelError, not a crash) instead of
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

// ---------------------------------------------------------------------------- switching
static void fiber_main(Fiber* f);

#if SIMT_USE_UCONTEXT
static void uc_entry(unsigned lo, unsigned hi) {
  fiber_main(reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
#endif

void init_fiber(Worker& w, Fiber& f) {
#if SIMT_ASAN_ON
  // A stack abandoned by a failed block still carries the redzones of its live frames.
  ASAN_UNPOISON_MEMORY_REGION(f.stack, f.stack_size);
#endif
  f.state = Fiber::ready;
  f.fake_stack = nullptr;
  f.coll = nullptr;
#if SIMT_USE_UCONTEXT
  ucontext_t* uc = &w.ucs[f.linear];
  getcontext(uc);
  uc->uc_stack.ss_sp = f.stack;
  uc->uc_stack.ss_size = f.stack_size;
  uc->uc_link = nullptr;
  const uintptr_t p = uintptr_t(&f);
  makecontext(uc, reinterpret_cast<void (*)()>(uc_entry), 2, unsigned(p & 0xffffffffu), unsigned(p >> 32));
  f.uctx = uc;
#else
  (void)w;
  uintptr_t top = (uintptr_t(f.stack) + f.stack_size) & ~uintptr_t(15);
  uintptr_t a = top - 16;  // rsp after the first `ret`: 16-byte aligned before the call
  uint64_t* s = reinterpret_cast<uint64_t*>(a - 64);
  uint32_t mxcsr = __builtin_ia32_stmxcsr();
  uint16_t fpucw;
  asm volatile("fnstcw %0" : "=m"(fpucw));
  uint64_t ctl = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  s[0] = ctl;                                      // mxcsr | x87 cw
  s[1] = 0;                                        // r15
  s[2] = 0;                                        // r14
  s[3] = uint64_t(uintptr_t(&fiber_main));         // r13: entry
  s[4] = uint64_t(uintptr_t(&f));                  // r12: argument
  s[5] = 0;                                        // rbx
  s[6] = 0;                                        // rbp
  s[7] = uint64_t(uintptr_t(&simt_fiber_trampoline));  // return address
  f.sp = s;
#endif
}

void resume(Worker& w, Fiber& f) {
  w.cur = &f;
  f.state = Fiber::running;
  t_state.thread_idx = f.tid;
  t_state.lane = f.lane;
  t_state.warp = f.warp;
#if SIMT_ASAN_ON
  __sanitizer_start_switch_fiber(&w.sched_fake, f.stack, f.stack_size);
#endif
#if SIMT_USE_UCONTEXT
  swapcontext(&w.sched_uc, static_cast<ucontext_t*>(f.uctx));
#else
  simt_switch_ctx(&w.sched_sp, f.sp);
#endif
#if SIMT_ASAN_ON
  __sanitizer_finish_switch_fiber(w.sched_fake, nullptr, nullptr);
#endif
  w.cur = nullptr;
}

// From a fiber back to the scheduler. A dying fiber passes dying=true: ASan frees its fake stack.
void to_scheduler(Worker& w, Fiber& f, bool dying) {
#if SIMT_ASAN_ON
  __sanitizer_start_switch_fiber(dying ? nullptr : &f.fake_stack, w.main_bottom, w.main_size);
#else
  (void)dying;
#endif
#if SIMT_USE_UCONTEXT
  swapcontext(static_cast<ucontext_t*>(f.uctx), &w.sched_uc);
#else
  simt_switch_ctx(&f.sp, w.sched_sp);
#endif
#if SIMT_ASAN_ON
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

static void fiber_main(Fiber* f) {
  Worker& w = *t_worker;
#if SIMT_ASAN_ON
  __sanitizer_finish_switch_fiber(nullptr, &w.main_bottom, &w.main_size);
#endif
  try {
    w.spec->entry(w.spec->ctx);
    f->state = Fiber::done;
    on_exit(w);
  } catch (const std::exception& e) {
    f->state = Fiber::failed;
    set_error(w, *f, e.what());
  } catch (...) {
    f->state = Fiber::failed;
    set_error(w, *f, "unknown C++ exception");
  }
  to_scheduler(w, *f, true);
  __builtin_unreachable();
}

// ---------------------------------------------------------------------------- stack overflow
// A fiber that runs past the bottom of its stack touches the PROT_NONE guard below it: SIGSEGV.
// The handler runs on an alternate signal stack (the fiber's own is exhausted). When the fault
// address is in a guard of a worker and the interrupted stack pointer is in that worker's stacks
// (so the faulting OS thread is the one running that worker's fibers), it rewrites the
// interrupted context so that the return from the handler lands in stack_overflow_exit(fiber) on
// a fresh frame at the top of the fiber's stack: the kernel's frames are abandoned (as those of
// the other fibers of a failed block are), the fiber reports the error and switches to the
// scheduler like a fiber that threw, the launch raises KernelError. sigreturn restores the signal
// mask and releases the alternate stack, so nothing is left half-done in the OS thread.
// The handler touches no TLS (a dynamic TLS access can allocate) and calls nothing unsafe: workers
// are found through a fixed table. Every other SIGSEGV goes to the handler installed before
// simt's (Python's faulthandler under pytest) or gets the default action, as without simt.
// Only x86-64 (the context registers); elsewhere an overflow still kills the process.
namespace {
constexpr int kMaxWorkers = 1024;
std::atomic<Worker*> g_workers[kMaxWorkers];
}  // namespace
void register_worker(Worker* w) {
  for (auto& slot : g_workers) {
    Worker* none = nullptr;
    if (slot.compare_exchange_strong(none, w)) return;
  }
}
void unregister_worker(Worker* w) {
  for (auto& slot : g_workers) {
    Worker* mine = w;
    if (slot.compare_exchange_strong(mine, nullptr)) return;
  }
}

#if defined(__x86_64__) && defined(__linux__)
namespace {
struct sigaction g_prev_segv;           // the SIGSEGV action simt's handler replaced
std::atomic<int> g_chain_depth{0};      // > 0 while the previous handler runs

[[noreturn]] void stack_overflow_exit(Fiber* f) {
  Worker& w = *t_worker;
  f->state = Fiber::failed;
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "fiber stack overflow: the thread needs more than its %zu KiB stack (large local arrays or deep "
                "recursion; raise it with SIMT_STACK_KB or lowbit._sim.set_stack_kb)",
                f->stack_size / 1024);
  set_error(w, *f, buf);
  to_scheduler(w, *f, true);
  __builtin_unreachable();
}

void set_default_segv() {
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(SIGSEGV, &dfl, nullptr);
}

// Not instrumented: it writes to the overflowed stack, whose shadow still holds the redzones of
// the abandoned frames.
__attribute__((no_sanitize("address", "undefined"))) void on_segv(int sig, siginfo_t* si, void* ctx) {
  auto* uc = static_cast<ucontext_t*>(ctx);
  if (si->si_code > 0 && g_chain_depth.load() == 0) {  // a fault, not kill()/raise()
    const uintptr_t addr = uintptr_t(si->si_addr), sp = uintptr_t(uc->uc_mcontext.gregs[REG_RSP]);
    for (auto& slot : g_workers) {
      Worker* w = slot.load(std::memory_order_acquire);
      if (!w || !w->region) continue;
      const uintptr_t lo = uintptr_t(w->region), hi = lo + w->region_bytes;
      if (sp < lo || sp >= hi) continue;  // this thread is not running w's fibers
      Fiber* f = w->cur;
      if (!f || addr < lo || addr >= hi || (addr - lo) % w->slot >= kGuardBytes) break;
      // Enter stack_overflow_exit(f) as if called: rsp % 16 == 8, a null return address.
#if SIMT_ASAN_ON
      ASAN_UNPOISON_MEMORY_REGION(f->stack, f->stack_size);  // a fresh stack for stack_overflow_exit
#endif
      const uintptr_t top = (uintptr_t(f->stack) + f->stack_size) & ~uintptr_t(15);
      uint64_t* rsp = reinterpret_cast<uint64_t*>(top - 8);
      *rsp = 0;
      uc->uc_mcontext.gregs[REG_RSP] = greg_t(uintptr_t(rsp));
      uc->uc_mcontext.gregs[REG_RIP] = greg_t(uintptr_t(&stack_overflow_exit));
      uc->uc_mcontext.gregs[REG_RDI] = greg_t(uintptr_t(f));
      uc->uc_mcontext.gregs[REG_RBP] = 0;
      uc->uc_mcontext.gregs[REG_EFL] &= ~greg_t(0x400);  // DF clear, as the ABI wants at a call
      return;
    }
  }
  if (g_chain_depth.load() > 0) {  // the previous handler re-raised: let the default action end it
    set_default_segv();
    return;
  }
  const struct sigaction prev = g_prev_segv;
  if ((prev.sa_flags & SA_SIGINFO) && prev.sa_sigaction) {
    g_chain_depth.fetch_add(1);
    prev.sa_sigaction(sig, si, ctx);
    g_chain_depth.fetch_sub(1);
  } else if (!(prev.sa_flags & SA_SIGINFO) && prev.sa_handler != SIG_DFL && prev.sa_handler != SIG_IGN) {
    g_chain_depth.fetch_add(1);
    prev.sa_handler(sig);
    g_chain_depth.fetch_sub(1);
  } else {
    // Default action: a fault runs again and kills the process as it would have without simt;
    // a raised SIGSEGV is raised again.
    set_default_segv();
    if (si->si_code <= 0) raise(sig);
  }
}

}  // namespace

// Called at every launch (under the launch mutex): simt's handler first in line, chaining to
// whatever was installed before it (faulthandler may be enabled after _sim is imported).
void install_segv_handler() {
  struct sigaction cur {};
  if (sigaction(SIGSEGV, nullptr, &cur) != 0) return;
  if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == &on_segv) return;
  g_prev_segv = cur;
  struct sigaction sa {};
  sa.sa_sigaction = &on_segv;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigaction(SIGSEGV, &sa, nullptr);
}

// Every OS thread that runs fibers needs an alternate signal stack; one that has none (pool
// threads, most Python threads) gets its own, released when the thread exits.
namespace {
struct AltStack {
  void* mem = nullptr;
  size_t size = 0;
  ~AltStack() {
    if (!mem) return;
    stack_t cur {};
    if (sigaltstack(nullptr, &cur) == 0 && cur.ss_sp == mem) {
      stack_t off {};
      off.ss_flags = SS_DISABLE;
      sigaltstack(&off, nullptr);
    }
    munmap(mem, size);
  }
};
}  // namespace
void ensure_altstack() {
  stack_t cur {};
  if (sigaltstack(nullptr, &cur) != 0 || !(cur.ss_flags & SS_DISABLE)) return;  // has one (or on it)
  static thread_local AltStack alt;
  if (!alt.mem) {
    size_t size = 64 * 1024;
#ifdef _SC_SIGSTKSZ
    const long min = sysconf(_SC_SIGSTKSZ);
    if (min > 0 && size_t(min) > size) size = size_t(min);
#endif
    void* m = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return;
    alt.mem = m;
    alt.size = size;
  }
  stack_t ss {};
  ss.ss_sp = alt.mem;
  ss.ss_size = alt.size;
  sigaltstack(&ss, nullptr);
}
#else
void install_segv_handler() {}
void ensure_altstack() {}
#endif

}  // namespace simt::detail
