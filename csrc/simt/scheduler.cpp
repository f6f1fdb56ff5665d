// csrc/simt/scheduler.cpp — the simt scheduler: blocks over a pool of OS threads, the fibers of a
// block in the order of the configured schedule, barriers, and the deadlock check.
//
// One OS thread runs one block at a time: its fibers (one per CUDA thread) are resumed from a run
// queue by a scheduler loop on the OS thread's own stack; a fiber runs until it blocks (barrier,
// collective, __nanosleep, exit) and switches back. Fibers never migrate, so thread_local static
// shared memory is the block's shared memory. A block whose run queue empties before all fibers
// exited is deadlocked: reported, never a hang.
#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <thread>

#include "internal.h"

namespace simt::detail {

thread_local ThreadState t_state;
thread_local Worker* t_worker = nullptr;
Config g_config;
Counters g_stats;

int default_threads() {
  if (const char* e = std::getenv("SIMT_THREADS")) {
    int v = std::atoi(e);
    if (v > 0) return v;
  }
  unsigned h = std::thread::hardware_concurrency();
  return h ? int(h) : 1;
}

namespace {
uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
}  // namespace

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

static std::string where(const Worker& w, const Fiber& f) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u), thread (%u,%u,%u)", w.bidx.x, w.bidx.y, w.bidx.z,
                f.tid.x, f.tid.y, f.tid.z);
  return buf;
}

void set_error(Worker& w, const Fiber& f, const std::string& what) {
  if (w.failed) return;
  w.failed = true;
  w.error = "simt: kernel " + kernel_name(w.spec->kernel) + ", " + where(w, f) + ": " + what;
}

static void release_barrier(Worker& w);

void on_exit(Worker& w) {
  ++w.done;
  note_progress(w);
  if (w.bar_arrived > 0 && w.bar_arrived + w.done == w.n) release_barrier(w);
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

// The helper threads of the pool (the launching thread is the other one) wait for a new epoch in
// which they are wanted. All of the pool's state (grid, epoch, helpers wanted and active) belongs
// to mu_, and a helper's view of the epochs starts from the epoch current when it was created: a
// helper created by a restart with another thread count used to start with `seen = 0`, so it took
// any past launch (epoch != 0, and `want_` still that launch's count) for a new one, ran
// `*grid_` while it was null (SIGSEGV) and decremented `active_` below zero, after which a launch
// could return while helpers still ran its blocks.
class Pool {
 public:
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
    work(*main_worker_, g);
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return active_ == 0; });
    grid_ = nullptr;
    want_ = 0;
  }

  // In the child of fork(): the helper threads exist only in the parent. Their std::thread handles
  // are forgotten (joining or detaching a thread of another process is undefined, and glibc may
  // already have handed their stacks and descriptors to threads of the child) and the workers'
  // fiber stacks unmapped (no thread of the child runs on them: the fork waited for the launch
  // mutex). The Pool itself is leaked, not destroyed: its mutex and condition variables may record
  // waiters that do not exist here, and destroying such a condition variable can block.
  void abandon_after_fork() {
    for (auto& t : threads_) new (&t) std::thread();  // ends the handle's lifetime without ~thread
    threads_.clear();
    workers_.clear();
    main_worker_.reset();
  }

 private:
  void start(int n) {
    workers_.clear();
    for (int i = 0; i < n; ++i) workers_.emplace_back(new Worker());
    uint64_t epoch;
    {
      std::lock_guard<std::mutex> lock(mu_);
      quit_ = false;
      want_ = 0;
      epoch = epoch_;
    }
    for (int i = 0; i < n; ++i) threads_.emplace_back([this, i, epoch] { loop(i, epoch); });
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
  void loop(int i, uint64_t seen) {  // seen: the last epoch before this thread existed
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
  std::unique_ptr<Worker> main_worker_{new Worker()};
  Grid* grid_ = nullptr;
  uint64_t epoch_ = 0;
  int want_ = 0, active_ = 0;
  bool quit_ = false;
};
// Created at the first launch, never destroyed (joining threads at exit is not worth the risk);
// reset in the child of a fork, which then creates its own at its first launch. Only touched under
// the launch mutex (api.cpp), which the fork handlers hold across fork().
Pool* g_pool = nullptr;
Pool& pool() {
  if (!g_pool) g_pool = new Pool();
  return *g_pool;
}
}  // namespace

std::string run_grid(const LaunchSpec& spec, int nthreads) {
  Grid g;
  g.spec = &spec;
  g.n_blocks = uint64_t(spec.grid.x) * spec.grid.y * spec.grid.z;
  pool().run(g, nthreads);
  return g.error;
}

void reset_pool_in_child() {
  if (!g_pool) return;
  g_pool->abandon_after_fork();
  g_pool = nullptr;  // leaked (see Pool::abandon_after_fork)
}

}  // namespace simt::detail
