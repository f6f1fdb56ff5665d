// csrc/sim/runtime.cpp — the simt scheduler: fibers, context switch, blocks over OS threads,
// barriers, launch validation, configuration and statistics. Warp collectives: warp.cpp.
//
// One OS thread runs one block at a time: its fibers (one per CUDA thread) are resumed from a run
// queue by a scheduler loop on the OS thread's own stack; a fiber runs until it blocks (barrier,
// collective, __nanosleep, exit) and switches back. Fibers never migrate, so thread_local static
// shared memory is the block's shared memory. A block whose run queue empties before all fibers
// exited is deadlocked: reported, never a hang.
#include "internal.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <ucontext.h>
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
// Fiber stacks: 64 KiB (256 KiB under ASan, whose frames carry redzones), SIMT_STACK_KB at the
// first use, simt::set_stack_kb at run time. Workers remap their stacks when it changed.
constexpr int kStackKbMin = 16, kStackKbMax = 64 * 1024;
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

// ---------------------------------------------------------------------------- kernel symbols
// The kernel's address is looked up in the module's own ELF symbol table (_sim is linked without
// stripping): hidden template instantiations are not in the dynamic symbol table. The same table
// gives the kernel's static shared memory: `__shared__` is `thread_local`, so a `__shared__ T s[N]`
// declared in kernel K is a TLS object named _ZZ<K's encoding>E1s (Itanium ABI local name) of
// st_size sizeof(T) * N.
static std::string demangle(const char* s) {
  int st = 0;
  char* d = abi::__cxa_demangle(s, nullptr, nullptr, &st);
  std::string r = (st == 0 && d) ? d : s;
  std::free(d);
  return r;
}

namespace {
struct KernelInfo {
  std::string name;        // demangled, or kernel@<address>
  size_t static_smem = 0;  // bytes of static __shared__ declared in the kernel's body
};
// One module's .symtab, read once: function symbols by offset, TLS objects local to a function
// (_ZZ...) sorted by name.
struct ModuleSymbols {
  std::map<uintptr_t, std::string> funcs;
  std::vector<std::pair<std::string, size_t>> local_tls;
};
ModuleSymbols read_symbols(const char* path) {
  ModuleSymbols m;
  int fd = open(path, O_RDONLY);
  struct stat sb {};
  if (fd >= 0 && fstat(fd, &sb) == 0 && size_t(sb.st_size) > sizeof(Elf64_Ehdr)) {
    void* map = mmap(nullptr, size_t(sb.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
    if (map != MAP_FAILED) {
      const char* base = static_cast<const char*>(map);
      const size_t size = size_t(sb.st_size);
      const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
      if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 && eh->e_ident[EI_CLASS] == ELFCLASS64 &&
          eh->e_shoff + size_t(eh->e_shnum) * sizeof(Elf64_Shdr) <= size) {
        const auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
        for (int i = 0; i < eh->e_shnum; ++i) {
          if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
          const Elf64_Shdr& strsec = sh[sh[i].sh_link];
          if (sh[i].sh_offset + sh[i].sh_size > size || strsec.sh_offset + strsec.sh_size > size) continue;
          const auto* syms = reinterpret_cast<const Elf64_Sym*>(base + sh[i].sh_offset);
          const char* strs = base + strsec.sh_offset;
          const size_t n = sh[i].sh_size / sizeof(Elf64_Sym);
          for (size_t k = 0; k < n; ++k) {
            if (syms[k].st_name >= strsec.sh_size) continue;
            const char* nm = strs + syms[k].st_name;
            const int type = ELF64_ST_TYPE(syms[k].st_info);
            if (type == STT_FUNC && syms[k].st_value) m.funcs.emplace(uintptr_t(syms[k].st_value), nm);
            else if (type == STT_TLS && std::strncmp(nm, "_ZZ", 3) == 0) m.local_tls.emplace_back(nm, size_t(syms[k].st_size));
          }
        }
      }
      munmap(map, size);
    }
  }
  if (fd >= 0) close(fd);
  std::sort(m.local_tls.begin(), m.local_tls.end());
  m.local_tls.erase(std::unique(m.local_tls.begin(), m.local_tls.end()), m.local_tls.end());
  return m;
}
// Bytes of static shared memory declared in the body of the function `mangled` (_Z<encoding>):
// its TLS statics are _ZZ<encoding>E<name>. Statics of lambdas or local classes inside it start
// with _ZZZ, those of other functions differ before the E.
size_t static_smem_of(const ModuleSymbols& m, const std::string& mangled) {
  if (mangled.compare(0, 2, "_Z") != 0) return 0;
  const std::string prefix = "_ZZ" + mangled.substr(2) + "E";
  size_t bytes = 0;
  for (auto t = std::lower_bound(m.local_tls.begin(), m.local_tls.end(), std::make_pair(prefix, size_t(0)));
       t != m.local_tls.end() && t->first.compare(0, prefix.size(), prefix) == 0; ++t)
    bytes += t->second;
  return bytes;
}
}  // namespace

static const KernelInfo& kernel_info(const void* addr) {
  static std::mutex mu;
  static std::map<const void*, KernelInfo> cache;
  static std::map<std::string, ModuleSymbols> modules;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(addr);
  if (it != cache.end()) return it->second;
  char buf[64];
  std::snprintf(buf, sizeof buf, "kernel@%p", addr);
  KernelInfo info{buf, 0};
  Dl_info dl{};
  if (dladdr(addr, &dl) && dl.dli_fname) {
    auto mod = modules.find(dl.dli_fname);
    if (mod == modules.end()) mod = modules.emplace(dl.dli_fname, read_symbols(dl.dli_fname)).first;
    std::string mangled;
    if (dl.dli_sname && dl.dli_saddr == addr) {
      mangled = dl.dli_sname;
    } else {
      auto f = mod->second.funcs.find(uintptr_t(addr) - uintptr_t(dl.dli_fbase));
      if (f != mod->second.funcs.end()) mangled = f->second;
    }
    if (!mangled.empty()) {
      info.name = demangle(mangled.c_str());
      info.static_smem = static_smem_of(mod->second, mangled);
    }
  }
  return cache.emplace(addr, std::move(info)).first->second;
}
static std::string kernel_name(const void* addr) { return kernel_info(addr).name; }

// Every function of this module with static shared memory in its body: (demangled name, bytes).
static std::vector<std::pair<std::string, size_t>> static_smem_table() {
  std::vector<std::pair<std::string, size_t>> out;
  Dl_info dl{};
  if (!dladdr(reinterpret_cast<const void*>(&static_smem_table), &dl) || !dl.dli_fname) return out;
  const ModuleSymbols m = read_symbols(dl.dli_fname);
  for (const auto& f : m.funcs)
    if (const size_t bytes = static_smem_of(m, f.second)) out.emplace_back(demangle(f.second.c_str()), bytes);
  return out;
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
#define SIMT_CATCH_OVERFLOW 1
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

// Called at every launch (under g_launch_mutex): simt's handler first in line, chaining to whatever
// was installed before it (faulthandler may be enabled after _sim is imported).
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
}  // namespace
#else
#define SIMT_CATCH_OVERFLOW 0
namespace {
void install_segv_handler() {}
void ensure_altstack() {}
}  // namespace
#endif

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
  ensure_altstack();
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
  fiber_stack_bytes();                               // SIMT_STACK_KB read first, then overridden
  g_stack_bytes.store(size_t(kb) * 1024);
}
int stack_kb() { return int(detail::fiber_stack_bytes() / 1024); }

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
std::vector<std::pair<std::string, size_t>> static_smem_table() { return detail::static_smem_table(); }

}  // namespace simt
