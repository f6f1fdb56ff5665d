// lowbit/check.h — the native layer's own argument checks: the second line behind python/lowbit/ops,
// which validates first. An entry point called with arguments the ops would never pass (directly
// through lowbit._C / _sim / _cuda, or by a bug above) raises instead of reading or writing out of
// bounds: std::invalid_argument, which pybind11 turns into ValueError. Host code only (the CPU
// kernels' entry points and the CUDA launchers, never device code).
#pragma once
#include <stdexcept>
#include <string>

#include "lowbit/formats.h"

// msg names the entry and the offending argument with its value ("quantize8: block=-10 must be > 0").
#define LOWBIT_CHECK(cond, msg)                                                                  \
  do {                                                                                           \
    if (!(cond)) throw std::invalid_argument(std::string("lowbit internal check: ") + (msg));    \
  } while (0)

namespace lowbit {
// Enum ids arrive from Python as ints (formats.py FMT_ID / DTYPE_ID): one outside the enum would take
// a kernel's fall-through branch (another format's code path, another element size).
inline bool fmt_valid(Fmt f) { return int32_t(f) >= 0 && int32_t(f) <= 3; }
inline bool dtype_valid(DType d) { return int32_t(d) >= 0 && int32_t(d) <= 2; }
inline std::string show(const char* name, int64_t v) { return std::string(name) + "=" + std::to_string(v); }
}  // namespace lowbit
