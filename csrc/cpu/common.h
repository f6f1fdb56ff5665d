// csrc/cpu/common.h — shared by the CPU kernels: the run-time ISA dispatch and threads (defined in
// dispatch.cpp), exact scalar conversions between fp32 and bf16 / fp16 (round to nearest even, like
// torch's .to()), and the check macro.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "lowbit/check.h"  // LOWBIT_CHECK: a failed argument check raises (ValueError), never aborts
#include "lowbit/formats.h"
#include "lowbit/gemm.h"

namespace lowbit::cpu {

// dispatch.cpp. The path in use, the best the CPU has unless forced: 'amx' (AMX-TILE/BF16 usable by
// the process, + AVX-512 BF16), 'avx512bf16', 'avx512' (AVX-512 F/BW/VL/VNNI), 'avx2' (AVX2 + FMA +
// F16C), 'portable' (or when the ISA files were not built); and 'amx-emulated' (forced only: the
// 'avx2' path with the AMX kernels run on the tile emulator).
std::string cpu_path();
std::string set_cpu_path(const std::string& path);  // throws std::invalid_argument if not available
std::vector<std::string> available_cpu_paths();
std::string amx_unavailable_reason();  // "" when AMX runs in this process
bool use_avx2();    // the *_avx2.cpp kernels (every path but 'portable')
bool use_avx512();  // the *_avx512.cpp kernels (the AVX-512 VNNI int16 GEMV and tile products)
// The bf16 matrix engine of the path: vdpbf16ps ('avx512bf16'), AMX tiles ('amx'), or the AMX kernels
// on the tile emulator ('amx-emulated'); none on the other paths.
enum class Engine { none, avx512bf16, amx, amx_emulated };
Engine bf16_engine();
int num_threads();
// The precision policy (lowbit.set_matmul_precision; the paths each level allows: docs/kernels.md).
Precision matmul_precision();
void set_matmul_precision(Precision p);

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                         // RNE
  return uint16_t(u >> 16);
}

inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    // subnormal: value = man * 2^-24, exact in fp32
    float v = float(man) * 0x1p-24f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}
inline uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                  // below 2^-14: subnormal or zero
    // value / 2^-24 rounded to nearest even by the fp32 adder (exact: result < 2^10 + 1)
    float v = bits_to_float(a) * 0x1p24f;
    float r = (v + 0x1p23f) - 0x1p23f;  // RNE to an integer (v < 2^10)
    return uint16_t(sign | uint16_t(r));
  }
  uint32_t m = a + 0xfffu + ((a >> 13) & 1u);  // RNE on the 13 dropped bits
  return uint16_t(sign | uint16_t((m - 0x38000000u) >> 13));
}

inline float load_as_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::bf16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return half_to_float(static_cast<const uint16_t*>(p)[i]);
  }
}
inline void store_from_float(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::f32: static_cast<float*>(p)[i] = v; break;
    case DType::bf16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
  }
}

// dispatch.cpp. Large fresh output buffers (torch.empty -> mmap) cost a page fault per 4 KiB on first touch:
// ~20 ms for 64 MB here, 5x the dequantize kernel itself. Ask for transparent huge pages on the
// 2 MiB-aligned interior (THP is in 'madvise' mode on common distributions); harmless otherwise.
void hint_huge_pages(void* p, size_t bytes);

}  // namespace lowbit::cpu
