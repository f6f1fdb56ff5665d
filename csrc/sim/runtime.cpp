// csrc/sim/runtime.cpp — the simt scheduler: fibers, context switch, blocks over OS threads,
// barriers, launch validation, configuration and statistics. Warp collectives: warp.cpp.
//
// One OS thread runs one block at a time: its fibers (one per CUDA thread) are resumed from a run
// queue by a scheduler loop on the OS thread's own stack; a fiber runs until it blocks (barrier,
// collective, __nanosleep, exit) and switches back. Fibers never migrate, so thread_local static
// shared memory is the block's shared memory. A block whose run queue empties before all fibers
// exited is deadlocked: reported, never a hang.
#include "runtime.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <thread>


#if defined(SIMT_ASAN) && SIMT_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN_ON 1
#else
#define SIMT_ASAN_ON 0
#endif

namespace simt::detail {

thread_local ThreadState t_state;
thread_local Worker* t_worker = nullptr;

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

// ---------------------------------------------------------------------------- configuration
namespace {
enum class Sched { forward, reverse, random };
struct Config {
  Sched sched = Sched::forward;
  uint64_t seed = 0;
  int threads = 0;  // 0: SIMT_THREADS or hardware concurrency
  std::string text = "forward";
};
Config g_config;
std::mutex g_launch_mutex;  // one grid at a time (streams are synchronous in the simulator)

struct Counters {
  std::atomic<uint64_t> launches{0}, blocks{0}, threads{0}, warp_ops{0}, barriers{0};
  std::atomic<uint64_t> nanos{0};
} g_stats;

int default_threads() {
  if (const char* e = std::getenv("SIMT_THREADS")) {
    int v = std::atoi(e);
    if (v > 0) return v;
  }
  unsigned h = std::thread::hardware_concurrency();
  return h ? int(h) : 1;
}
}  // namespace
size_t fiber_stack_bytes() {
  static size_t v = [] {
    size_t kb = SIMT_ASAN_ON ? 256 : 64;  // ASan frames carry redzones
    if (const char* e = std::getenv("SIMT_STACK_KB")) kb = size_t(std::max(16, std::atoi(e)));
    return kb * 1024;
  }();
  return v;
}
namespace {
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

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
}  // namespace

// ---------------------------------------------------------------------------- kernel names
// The kernel's address is looked up in the module's own ELF symbol table (_sim is linked without
// stripping): hidden template instantiations are not in the dynamic symbol table.
static std::string demangle(const char* s) {
  int st = 0;
  char* d = abi::__cxa_demangle(s, nullptr, nullptr, &st);
  std::string r = (st == 0 && d) ? d : s;
  std::free(d);
  return r;
}
static std::string kernel_name(const void* addr) {
  static std::mutex mu;
  static std::map<const void*, std::string> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(addr);
  if (it != cache.end()) return it->second;
  char buf[64];
  std::snprintf(buf, sizeof buf, "kernel@%p", addr);
  std::string name = buf;
  Dl_info info{};
  if (dladdr(addr, &info) && info.dli_fname) {
    if (info.dli_sname && info.dli_saddr == addr) {
      name = demangle(info.dli_sname);
    } else {
      int fd = open(info.dli_fname, O_RDONLY);
      struct stat sb {};
      if (fd >= 0 && fstat(fd, &sb) == 0 && size_t(sb.st_size) > sizeof(Elf64_Ehdr)) {
        void* map = mmap(nullptr, size_t(sb.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
        if (map != MAP_FAILED) {
          const char* base = static_cast<const char*>(map);
          const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
          const uintptr_t off = uintptr_t(addr) - uintptr_t(info.dli_fbase);
          if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 && eh->e_ident[EI_CLASS] == ELFCLASS64 &&
              eh->e_shoff + size_t(eh->e_shnum) * sizeof(Elf64_Shdr) <= size_t(sb.st_size)) {
            const auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
            for (int i = 0; i < eh->e_shnum; ++i) {
              if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
              const auto* syms = reinterpret_cast<const Elf64_Sym*>(base + sh[i].sh_offset);
              const char* strs = base + sh[sh[i].sh_link].sh_offset;
              const size_t n = sh[i].sh_size / sizeof(Elf64_Sym);
              for (size_t k = 0; k < n; ++k)
                if (ELF64_ST_TYPE(syms[k].st_info) == STT_FUNC && syms[k].st_value == off) {
                  name = demangle(strs + syms[k].st_name);
                  break;
                }
            }
          }
          munmap(map, size_t(sb.st_size));
        }
      }
      if (fd >= 0) close(fd);
    }
  }
  cache[addr] = name;
  return name;
}

std::string short_path(const char* file) {
  if (!file) return "?";
  std::string f = file;
  for (const char* root : {"/csrc/", "/include/", "/tests/"}) {
    size_t p = f.rfind(root);
    if (p != std::string::npos) return f.substr(p + 1);
  }
  size_t s = f.rfind('/');
  return s == std::string::npos ? f : f.substr(s + 1);
}

// ---------------------------------------------------------------------------- workers
Fiber* current_fiber() { return t_worker ? t_worker->cur : nullptr; }
Fiber& fiber_at(Worker& w, unsigned linear) { return w.fibers[linear]; }
WarpState& warp_at(Worker& w, unsigned warp) { return w.warps[warp]; }
unsigned existing_lanes(const Worker& w, unsigned warp) {
  const unsigned lo = warp * 32, hi = std::min(w.n, lo + 32);
  const unsigned cnt = hi - lo;
  return cnt >= 32 ? 0xffffffffu : ((1u << cnt) - 1u);
}
void count_warp_op() { g_stats.warp_ops.fetch_add(1, std::memory_order_relaxed); }
void note_progress(Worker& w) { w.spin = 0; }

static void push_ready(Worker& w, unsigned id) {
  w.runq[(w.rq_head + w.rq_count) % w.capacity] = id;
  ++w.rq_count;
  w.fibers[id].state = Fiber::ready;
}

// Release order of a group of fibers (barrier, collective, block start): the schedule.
static void order(Worker& w, std::vector<unsigned>& ids) {
  switch (g_config.sched) {
    case Sched::forward: std::sort(ids.begin(), ids.end()); break;
    case Sched::reverse: std::sort(ids.begin(), ids.end(), std::greater<unsigned>()); break;
    case Sched::random:
      std::sort(ids.begin(), ids.end());
      for (size_t i = ids.size(); i > 1; --i) std::swap(ids[i - 1], ids[splitmix(w.rng) % i]);
      break;
  }
}
void wake_in_order(Worker& w, std::vector<unsigned>& ids) {
  order(w, ids);
  for (unsigned id : ids) push_ready(w, id);
}

// ---------------------------------------------------------------------------- switching
static void fiber_main(Fiber* f);

#if SIMT_USE_UCONTEXT
static void uc_entry(unsigned lo, unsigned hi) {
  fiber_main(reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
#endif

static void init_fiber(Worker& w, Fiber& f) {
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

static void resume(Worker& w, Fiber& f) {
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
static void to_scheduler(Worker& w, Fiber& f, bool dying) {
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

static std::string where(const Worker& w, const Fiber& f) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u), thread (%u,%u,%u)", w.bidx.x, w.bidx.y, w.bidx.z,
                f.tid.x, f.tid.y, f.tid.z);
  return buf;
}

static void set_error(Worker& w, const Fiber& f, const std::string& what) {
  if (w.failed) return;
  w.failed = true;
  w.error = "simt: kernel " + kernel_name(w.spec->kernel) + ", " + where(w, f) + ": " + what;
}

static void release_barrier(Worker& w);

static void on_exit(Worker& w) {
  ++w.done;
  note_progress(w);
  if (w.bar_arrived > 0 && w.bar_arrived + w.done == w.n) release_barrier(w);
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

// ---------------------------------------------------------------------------- fiber-side API
[[noreturn]] void fail(const char* file, int line, const std::string& what) {
  throw KernelError(what + " at " + short_path(file) + ":" + std::to_string(line));
}

static Worker& in_kernel(const char* what) {
  if (!t_worker || !t_worker->cur) throw KernelError(std::string(what) + " called outside a simt kernel");
  return *t_worker;
}

static void release_barrier(Worker& w) {
  std::vector<unsigned> ids;
  ids.reserve(w.bar_arrived);
  for (unsigned i = 0; i < w.n; ++i)
    if (w.fibers[i].state == Fiber::barrier) {
      // results of __syncthreads_count/_and/_or, read by each fiber when it resumes
      w.fibers[i].bar_result = w.bar_count;
      w.fibers[i].bar_pred = w.bar_and | (w.bar_or << 1);
      ids.push_back(i);
    }
  w.bar_arrived = 0;
  w.bar_file = nullptr;
  g_stats.barriers.fetch_add(1, std::memory_order_relaxed);
  note_progress(w);
  wake_in_order(w, ids);
}

static int barrier(int op, int pred, const char* file, int line) {
  Worker& w = in_kernel("__syncthreads");
  Fiber& f = *w.cur;
  if (w.bar_arrived == 0) {
    w.bar_file = file;
    w.bar_line = line;
    w.bar_first = f.linear;
    w.bar_count = 0;
    w.bar_and = 1;
    w.bar_or = 0;
  } else if (w.bar_line != line || std::strcmp(w.bar_file, file) != 0) {
    const Fiber& first = w.fibers[w.bar_first];
    char buf[96];
    std::snprintf(buf, sizeof buf, "thread (%u,%u,%u)", first.tid.x, first.tid.y, first.tid.z);
    throw KernelError("divergent __syncthreads: this thread reached the barrier at " + short_path(file) + ":" +
                      std::to_string(line) + " while " + buf + " waits at the barrier at " +
                      short_path(w.bar_file) + ":" + std::to_string(w.bar_line));
  }
  ++w.bar_arrived;
  w.bar_count += pred != 0;
  w.bar_and &= pred != 0;
  w.bar_or |= pred != 0;
  f.state = Fiber::barrier;
  f.file = file;
  f.line = line;
  if (w.bar_arrived + w.done == w.n) release_barrier(w);
  to_scheduler(w, f, false);
  switch (op) {
    case 0: return f.bar_result;
    case 1: return f.bar_pred & 1;
    default: return (f.bar_pred >> 1) & 1;
  }
}
void syncthreads(const char* file, int line) { barrier(0, 0, file, line); }
int syncthreads_op(int op, int pred, const char* file, int line) { return barrier(op, pred, file, line); }

void nanosleep_yield() {
  Worker& w = in_kernel("__nanosleep");
  Fiber& f = *w.cur;
  // A spin-wait that nothing in the block can satisfy (an inter-block protocol, or a bug) would
  // spin forever: report it after 2^24 consecutive yields without progress.
  if (++w.spin > (uint64_t(1) << 24))
    throw KernelError("spin-wait with __nanosleep made no progress after 2^24 yields "
                      "(inter-block spin-waits are not supported by the simulator)");
  push_ready(w, f.linear);
  to_scheduler(w, f, false);
}

void block_on_collective(Worker& w, Fiber& f) {
  f.state = Fiber::warp_wait;
  to_scheduler(w, f, false);
}

// ---------------------------------------------------------------------------- running a block
static void run_block(Worker& w, const LaunchSpec& spec, uint64_t linear) {
  const unsigned bx = spec.block.x, by = spec.block.y;
  w.spec = &spec;
  w.n = spec.block.x * spec.block.y * spec.block.z;
  w.ensure_stacks(w.n);
  w.bidx = {unsigned(linear % spec.grid.x), unsigned((linear / spec.grid.x) % spec.grid.y),
            unsigned(linear / (uint64_t(spec.grid.x) * spec.grid.y))};
  w.block_linear = linear;
  uint64_t s = g_config.seed ^ (linear * 0xd1b54a32d192ed03ull);
  w.rng = splitmix(s);
  w.done = 0;
  w.bar_arrived = 0;
  w.spin = 0;
  w.failed = false;
  w.error.clear();
  w.warps.assign((w.n + 31) / 32, WarpState{});
  t_state.block_idx = w.bidx;
  t_state.block_dim = {spec.block.x, spec.block.y, spec.block.z};
  t_state.grid_dim = {spec.grid.x, spec.grid.y, spec.grid.z};
  if (spec.smem) {
    if (w.smem_buf.size() < spec.smem + 128) w.smem_buf.resize(spec.smem + 128);
    unsigned char* p = w.smem_buf.data();
    p += (128 - uintptr_t(p) % 128) % 128;
    std::memset(p, 0xff, spec.smem);  // NaN as f32/f16/bf16: reading before writing shows up
    t_state.dyn_smem = p;
  } else {
    t_state.dyn_smem = nullptr;
  }
  std::vector<unsigned> ids(w.n);
  for (unsigned i = 0; i < w.n; ++i) {
    Fiber& f = w.fibers[i];
    f.linear = i;
    f.tid = {i % bx, (i / bx) % by, i / (bx * by)};
    f.lane = i % 32;
    f.warp = i / 32;
    init_fiber(w, f);
    ids[i] = i;
  }
  w.rq_head = 0;
  w.rq_count = 0;
  wake_in_order(w, ids);
  for (;;) {
    while (w.rq_count) {
      const unsigned id = w.runq[w.rq_head];
      w.rq_head = (w.rq_head + 1) % w.capacity;
      --w.rq_count;
      resume(w, w.fibers[id]);
      if (w.failed) {
        w.stacks_dirty = true;
        return;
      }
    }
    if (w.done == w.n) return;
    // Nothing runnable and not finished: deadlock. Name the first waiting thread.
    const Fiber* first = nullptr;
    for (unsigned i = 0; i < w.n && !first; ++i)
      if (w.fibers[i].state == Fiber::barrier || w.fibers[i].state == Fiber::warp_wait) first = &w.fibers[i];
    set_error(w, first ? *first : w.fibers[0], describe_deadlock(w));
    w.stacks_dirty = true;
    return;
  }
}

std::string describe_barrier_waiters(Worker& w);  // defined below, used by warp.cpp
std::string describe_barrier_waiters(Worker& w) {
  unsigned cnt = 0;
  for (unsigned i = 0; i < w.n; ++i) cnt += w.fibers[i].state == Fiber::barrier;
  if (!cnt) return "";
  return std::to_string(cnt) + " thread(s) wait at __syncthreads at " + short_path(w.bar_file) + ":" +
         std::to_string(w.bar_line) + ", " + std::to_string(w.done) + " exited, of " + std::to_string(w.n);
}

// ---------------------------------------------------------------------------- thread pool
namespace {
struct Grid {
  const LaunchSpec* spec = nullptr;
  uint64_t n_blocks = 0;
  std::atomic<uint64_t> next{0};
  std::atomic<bool> abort{false};
  std::mutex mu;
  uint64_t err_block = ~uint64_t(0);
  std::string error;
};

void work(Worker& w, Grid& g) {
  t_worker = &w;
  for (;;) {
    if (g.abort.load(std::memory_order_relaxed)) break;
    const uint64_t b = g.next.fetch_add(1, std::memory_order_relaxed);
    if (b >= g.n_blocks) break;
    run_block(w, *g.spec, b);
    g_stats.blocks.fetch_add(1, std::memory_order_relaxed);
    g_stats.threads.fetch_add(w.n, std::memory_order_relaxed);
    if (w.failed) {
      std::lock_guard<std::mutex> lock(g.mu);
      if (b < g.err_block) {
        g.err_block = b;
        g.error = w.error;
      }
      g.abort.store(true);
    }
  }
  t_worker = nullptr;
}

class Pool {
 public:
  ~Pool() { stop(); }
  void run(Grid& g, int nthreads) {
    if (int(threads_.size()) != nthreads - 1) {
      stop();
      start(nthreads - 1);
    }
    const int helpers = int(std::min<uint64_t>(threads_.size(), g.n_blocks > 0 ? g.n_blocks - 1 : 0));
    {
      std::lock_guard<std::mutex> lock(mu_);
      grid_ = &g;
      want_ = helpers;
      active_ = helpers;
      ++epoch_;
    }
    cv_.notify_all();
    work(main_worker_, g);
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return active_ == 0; });
    grid_ = nullptr;
  }

 private:
  void start(int n) {
    quit_ = false;
    workers_.clear();
    for (int i = 0; i < n; ++i) workers_.emplace_back(new Worker());
    for (int i = 0; i < n; ++i) threads_.emplace_back([this, i] { loop(i); });
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
    workers_.clear();
  }
  void loop(int i) {
    uint64_t seen = 0;
    for (;;) {
      Grid* g;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return quit_ || (epoch_ != seen && i < want_); });
        if (quit_) return;
        seen = epoch_;
        g = grid_;
      }
      work(*workers_[i], *g);
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) done_cv_.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> threads_;
  std::vector<std::unique_ptr<Worker>> workers_;
  Worker main_worker_;
  Grid* grid_ = nullptr;
  uint64_t epoch_ = 0;
  int want_ = 0, active_ = 0;
  bool quit_ = false;
};
Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: joining threads at exit is not worth the risk
  return *p;
}
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
  size_t limit = kSmemDefault;
  {
    std::lock_guard<std::mutex> lock(g_attr_mutex);
    auto it = g_max_dyn_smem.find(spec.kernel);
    if (it != g_max_dyn_smem.end()) limit = size_t(it->second);
  }
  if (spec.smem > limit)
    return bad(kErrorInvalidValue, "dynamic shared memory of " + std::to_string(spec.smem) + " bytes is over the " +
                                       std::to_string(limit) + "-byte limit of this kernel" +
                                       (limit == kSmemDefault ? " (opt in with simt::set_max_dynamic_smem)" : ""));
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const auto t0 = std::chrono::steady_clock::now();
  Grid g;
  g.spec = &spec;
  g.n_blocks = uint64_t(spec.grid.x) * spec.grid.y * spec.grid.z;
  const int nt = g_config.threads > 0 ? g_config.threads : default_threads();
  pool().run(g, nt);
  g_stats.launches.fetch_add(1, std::memory_order_relaxed);
  g_stats.nanos.fetch_add(uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                       std::chrono::steady_clock::now() - t0).count()),
                          std::memory_order_relaxed);
  if (!g.error.empty()) throw KernelError(g.error);
  return kSuccess;
}

}  // namespace simt::detail

// ---------------------------------------------------------------------------- public API
namespace simt {

int set_max_dynamic_smem_impl(const void* kernel, int bytes) {
  if (bytes < 0 || size_t(bytes) > detail::smem_optin_max()) {
    detail::t_last_launch_error = "set_max_dynamic_smem(" + std::to_string(bytes) + ") is over the opt-in limit of " +
                                  std::to_string(detail::smem_optin_max()) + " bytes";
    return kErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(detail::g_attr_mutex);
  detail::g_max_dyn_smem[kernel] = std::max(bytes, int(detail::kSmemDefault));
  return kSuccess;
}

void configure(const std::string& sched, int threads) {
  using namespace detail;
  Config c;
  c.text = sched;
  if (sched == "forward") {
    c.sched = Sched::forward;
  } else if (sched == "reverse") {
    c.sched = Sched::reverse;
  } else if (sched.rfind("random:", 0) == 0 && sched.size() > 7 &&
             sched.find_first_not_of("0123456789", 7) == std::string::npos) {
    c.sched = Sched::random;
    c.seed = std::stoull(sched.substr(7));
  } else {
    throw std::invalid_argument("simt schedule must be 'forward', 'reverse' or 'random:<seed>', got '" + sched + "'");
  }
  if (threads < 0 || threads > 256) throw std::invalid_argument("simt threads must be in [0, 256], got " + std::to_string(threads));
  c.threads = threads;
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_config = c;
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

}  // namespace simt
