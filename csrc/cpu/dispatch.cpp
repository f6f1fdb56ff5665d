// csrc/cpu/dispatch.cpp — what every CPU family asks of the machine: which ISA path runs (CPU
// features, the path forced by _C.set_cpu_path), how many threads, and huge pages for big outputs.
//
// Paths: 'portable' (scalar C++, any build), 'avx2' (the *_avx2.cpp files: AVX2 + FMA + F16C),
// 'avx512' (the avx2 path plus the *_avx512.cpp files: AVX-512 F/BW/VL/VNNI). The ISA files are
// compiled with their flags alone (CMakeLists.txt), so this file decides at run time, before any of
// their instructions can execute: the library loads and runs on any x86-64.
#include <omp.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/common.h"

namespace lowbit::cpu {

namespace {

bool cpu_has_avx2() {
#if LOWBIT_HAVE_AVX2_TU && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}
// The AVX2 set plus AVX-512 F/BW/VL/VNNI (libgcc's check includes the OS's xgetbv state).
bool cpu_has_avx512() {
#if LOWBIT_HAVE_AVX2_TU && (defined(__x86_64__) || defined(__i386__))
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}
int best_path() { return cpu_has_avx512() ? 2 : (cpu_has_avx2() ? 1 : 0); }
std::atomic<int> g_path{-1};  // -1 unknown, 0 portable, 1 avx2, 2 avx512 (avx2 + the VNNI kernels)

int path_level() {
  int v = g_path.load(std::memory_order_relaxed);
  if (v < 0) {
    v = best_path();
    g_path.store(v);
  }
  return v;
}

}  // namespace

bool use_avx2() { return path_level() >= 1; }
bool use_avx512() { return path_level() >= 2; }
std::string cpu_path() {
  static const char* names[] = {"portable", "avx2", "avx512"};
  return names[path_level()];
}
std::string set_cpu_path(const std::string& path) {
  if (path == "avx512") {
    if (!cpu_has_avx512()) throw std::invalid_argument("cpu path 'avx512' (AVX-512 F/BW/VL/VNNI) is not available on this CPU/build");
    g_path.store(2);
  } else if (path == "avx2") {
    if (!cpu_has_avx2()) throw std::invalid_argument("cpu path 'avx2' is not available on this CPU/build");
    g_path.store(1);
  } else if (path == "portable") {
    g_path.store(0);
  } else if (path == "auto") {
    g_path.store(best_path());
  } else {
    throw std::invalid_argument("cpu path must be 'avx512', 'avx2', 'portable' or 'auto', got '" + path + "'");
  }
  return cpu_path();
}
int num_threads() { return omp_get_max_threads(); }

void hint_huge_pages(void* p, size_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  uintptr_t b = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)p; (void)bytes;
#endif
}

}  // namespace lowbit::cpu
