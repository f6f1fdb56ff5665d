// csrc/cpu/dispatch.cpp — what every CPU family asks of the machine: which ISA path runs (CPU
// features, the path forced by _C.set_cpu_path), how many threads, and huge pages for big outputs.
//
// Paths, each including the ones before it: 'portable' (scalar C++, any build), 'avx2' (the
// *_avx2.cpp files: AVX2 + FMA + F16C), 'avx512' (plus the *_avx512.cpp files: AVX-512 F/BW/VL/VNNI),
// 'avx512bf16' (plus gemm_avx512bf16.cpp: vdpbf16ps), 'amx' (plus gemm_amx.cpp: AMX-TILE/BF16 tile
// GEMMs). And 'amx-emulated': the 'avx2' path with the AMX tile kernels built over the scalar tile
// emulator (cpu/tile.h, in gemm_amx_emu_avx2.cpp) — the very kernel code of 'amx' on any AVX2 CPU,
// for tests. The ISA files are compiled with their flags alone (CMakeLists.txt), so this file decides
// at run time, before any of their instructions can execute: the library loads and runs on any x86-64.
//
// AMX needs three things (checked in this order, the first missing one is the reason lowbit.info()
// reports): the CPU (CPUID.7.0:EDX bits 24 AMX-TILE, 22 AMX-BF16), the OS enabling the tile state in
// XCR0 (bits 17 XTILECFG and 18 XTILEDATA), and this process's permission to use it (Linux ≥ 5.16:
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), asked once; without it the first tile
// instruction raises SIGILL).
#include <omp.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

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
bool cpu_has_avx512bf16() {
#if LOWBIT_HAVE_AVX2_TU && (defined(__x86_64__) || defined(__i386__))
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// "" when AMX-BF16 tiles can run in this process, else why not (asked once: the permission is per process).
std::string amx_status_now() {
#if LOWBIT_HAVE_AVX2_TU && defined(__x86_64__)
  if (!cpu_has_avx512bf16()) return "the CPU has no AVX-512 BF16 (lowbit's AMX kernels need it beside AMX)";
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22)))
    return "the CPU has no AMX-TILE/AMX-BF16 (CPUID.7.0:EDX bits 24, 22)";
  uint32_t xlo, xhi;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  if ((xlo & (3u << 17)) != (3u << 17)) return "the OS does not enable the AMX tile state (XCR0 bits 17, 18)";
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return "the kernel refused the AMX permission (arch_prctl ARCH_REQ_XCOMP_PERM; Linux >= 5.16 needed)";
  return "";
#else
  return "not an x86-64 build with the ISA files";
#endif
}
const std::string& amx_status() {
  static const std::string s = amx_status_now();
  return s;
}
bool cpu_has_amx() { return amx_status().empty(); }

int best_path() {
  if (cpu_has_amx()) return 4;
  if (cpu_has_avx512bf16()) return 3;
  return cpu_has_avx512() ? 2 : (cpu_has_avx2() ? 1 : 0);
}
// -1 unknown, 0 portable, 1 avx2, 2 avx512 (avx2 + the VNNI kernels), 3 avx512bf16, 4 amx, 5 amx-emulated
std::atomic<int> g_path{-1};
constexpr int kAmxEmulated = 5;
const char* const kPathNames[] = {"portable", "avx2", "avx512", "avx512bf16", "amx", "amx-emulated"};
std::atomic<int> g_precision{int(Precision::high)};

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
bool use_avx512() { const int v = path_level(); return v >= 2 && v != kAmxEmulated; }
Engine bf16_engine() {
  switch (path_level()) {
    case 3: return Engine::avx512bf16;
    case 4: return Engine::amx;
    case kAmxEmulated: return Engine::amx_emulated;
    default: return Engine::none;
  }
}
std::string cpu_path() { return kPathNames[path_level()]; }
std::string set_cpu_path(const std::string& path) {
  struct Want { const char* name; int level; bool ok; const char* needs; };
  const Want wants[] = {
      {"portable", 0, true, ""},
      {"avx2", 1, cpu_has_avx2(), "AVX2 + FMA + F16C"},
      {"avx512", 2, cpu_has_avx512(), "AVX-512 F/BW/VL/VNNI"},
      {"avx512bf16", 3, cpu_has_avx512bf16(), "AVX-512 F/BW/VL/VNNI/BF16"},
      {"amx", 4, cpu_has_amx(), "AMX-TILE/BF16 usable by this process"},
      {"amx-emulated", kAmxEmulated, cpu_has_avx2(), "AVX2 + FMA + F16C"},
  };
  if (path == "auto") {
    g_path.store(best_path());
    return cpu_path();
  }
  for (const Want& w : wants)
    if (path == w.name) {
      if (!w.ok) {
        std::string why = w.level == 4 ? ": " + amx_status() : "";
        throw std::invalid_argument("cpu path '" + path + "' (" + w.needs + ") is not available on this CPU/build" + why);
      }
      g_path.store(w.level);
      return cpu_path();
    }
  throw std::invalid_argument("cpu path must be 'auto', 'portable', 'avx2', 'avx512', 'avx512bf16', 'amx' or "
                              "'amx-emulated', got '" + path + "'");
}
std::vector<std::string> available_cpu_paths() {
  std::vector<std::string> out{"portable"};
  if (cpu_has_avx2()) out.push_back("avx2");
  if (cpu_has_avx512()) out.push_back("avx512");
  if (cpu_has_avx512bf16()) out.push_back("avx512bf16");
  if (cpu_has_amx()) out.push_back("amx");
  if (cpu_has_avx2()) out.push_back("amx-emulated");
  return out;
}
std::string amx_unavailable_reason() { return amx_status(); }
bool cpu_can_avx512bf16() { return cpu_has_avx512bf16(); }

Precision matmul_precision() { return Precision(g_precision.load(std::memory_order_relaxed)); }
void set_matmul_precision(Precision p) {
  LOWBIT_CHECK(int(p) >= 0 && int(p) <= 2, "matmul precision id " + std::to_string(int(p)) + " is not 0, 1 or 2");
  g_precision.store(int(p), std::memory_order_relaxed);
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
