// csrc/cpu/tile.h — the AMX tile operations lowbit's kernels use, behind one interface with two
// bodies (like simt for CUDA):
//
//   LOWBIT_TILE_EMULATE 0 (gemm_amx.cpp, -mamx-tile -mamx-bf16): the intrinsics, one instruction each.
//   LOWBIT_TILE_EMULATE 1 (gemm_amx_emu_avx2.cpp): a scalar emulation with the same register file
//     (8 tiles of 16 rows × 64 bytes, per thread), the same operand layouts and the same arithmetic,
//     so the 'amx-emulated' CPU path runs the very kernel code of the 'amx' path on any CPU.
//
// The operations (every tile is configured 16 rows × 64 bytes, palette 1; the kernels use no other shape):
//   configure()            ldtilecfg
//   zero<T>()              tilezero   T = 0
//   load<T>(p, stride)     tileloadd  T.row[r] = the 64 bytes at p + r·stride (bytes)
//   store<T>(p, stride)    tilestored
//   dpbf16ps<C, A, B>()    tdpbf16ps  C (16 × 16 fp32) += A (16 rows × 32 bf16) · B (16 rows × 16 bf16 pairs)
//   dpbssd<C, A, B>()      tdpbssd    C (16 × 16 int32) += A (16 rows × 64 s8) · B (16 rows × 16 s8 quads)
//   dpbsud<C, A, B>()      tdpbsud    the same with B's bytes unsigned (AMX-INT8; needs -mamx-int8)
//   release()              tilerelease
//
// What the emulation models of tdpbf16ps (Intel SDM pseudo-code for TDPBF16PS): for each row m of C
// and each k-pair of A in order, each column n: c += a[2k]·b[k][2n], then c += a[2k+1]·b[k][2n+1],
// every product exact in fp32 (8-bit significands), every sum rounded to nearest even; bf16 input
// denormals read as zero (DAZ) and denormal results flushed to zero (FTZ); MXCSR is not consulted.
// Of tdpbssd / tdpbsud (the SDM's DPBD): for each row m, each dword k of A's row and each column n,
// c.dword[n] += a[m][4k+i]·b[k][4n+i] for i = 0..3, A's bytes sign-extended, B's sign- (ssd) or zero-
// (sud) extended to 32 bits, the sum wrapping modulo 2^32 (no saturation) — exact integer arithmetic.
// Not modelled: faults, the tile-state permission and context switching (the emulated tiles are
// thread_local memory), configurations other than 16 × 64.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if !LOWBIT_TILE_EMULATE
#include <immintrin.h>
#endif

namespace lowbit::cpu::tile {
namespace {

constexpr int kRows = 16, kColsB = 64;

#if !LOWBIT_TILE_EMULATE

inline void configure() {
  alignas(64) uint8_t cfg[64] = {};
  cfg[0] = 1;  // palette 1
  for (int t = 0; t < 8; ++t) {
    const uint16_t colsb = kColsB;
    std::memcpy(cfg + 16 + 2 * t, &colsb, 2);
    cfg[48 + t] = kRows;
  }
  _tile_loadconfig(cfg);
}
// gcc's tile intrinsics paste their tile numbers into the assembly text, so each tile number is
// spelled out once here (a template parameter is not a literal to the preprocessor).
template <int T> void zero();
template <int T> void load(const void* p, int64_t stride);
template <int T> void store(void* p, int64_t stride);
template <int C, int A, int B> void dpbf16ps();
template <int C, int A, int B> void dpbssd();
template <int C, int A, int B> void dpbsud();
#define LOWBIT_TILE_REG(T)                                                                   \
  template <> inline void zero<T>() { _tile_zero(T); }                                      \
  template <> inline void load<T>(const void* p, int64_t stride) { _tile_loadd(T, p, stride); } \
  template <> inline void store<T>(void* p, int64_t stride) { _tile_stored(T, p, stride); }
LOWBIT_TILE_REG(0)
LOWBIT_TILE_REG(1)
LOWBIT_TILE_REG(2)
LOWBIT_TILE_REG(3)
LOWBIT_TILE_REG(4)
LOWBIT_TILE_REG(5)
LOWBIT_TILE_REG(6)
LOWBIT_TILE_REG(7)
#undef LOWBIT_TILE_REG
// The (C, A, B) combinations the kernels use (gemm_amx.h's 2 × 2 block); another one is a link error.
#define LOWBIT_TILE_DP(C, A, B) \
  template <> inline void dpbf16ps<C, A, B>() { _tile_dpbf16ps(C, A, B); }
LOWBIT_TILE_DP(0, 4, 6)
LOWBIT_TILE_DP(1, 4, 7)
LOWBIT_TILE_DP(2, 5, 6)
LOWBIT_TILE_DP(3, 5, 7)
#undef LOWBIT_TILE_DP
#if defined(__AMX_INT8__)
// The int8 products of the svdquant micro-kernel (cpu/svdquant_amx.h): the same 2 × 2 block.
#define LOWBIT_TILE_DPI(C, A, B)                                            \
  template <> inline void dpbssd<C, A, B>() { _tile_dpbssd(C, A, B); } \
  template <> inline void dpbsud<C, A, B>() { _tile_dpbsud(C, A, B); }
LOWBIT_TILE_DPI(0, 4, 6)
LOWBIT_TILE_DPI(1, 4, 7)
LOWBIT_TILE_DPI(2, 5, 6)
LOWBIT_TILE_DPI(3, 5, 7)
#undef LOWBIT_TILE_DPI
#endif
inline void release() { _tile_release(); }

#else

struct Regs {
  alignas(64) uint8_t t[8][kRows][kColsB];
  bool configured = false;
};
inline Regs& regs() {
  static thread_local Regs r;
  return r;
}
inline void need_config() {
  if (!regs().configured) throw std::logic_error("tile emulator: tile instruction before configure()");
}
// Timing builds only (CMake -DLOWBIT_TILE_PROXY=ON, bench/amx_proxy.py): with LOWBIT_TILE_ELIDE=1 in the
// environment, zero, load, store and the products do nothing — what is left of an AMX kernel is the work around
// its tile operations (decode, packing, epilogue), timed on a CPU without AMX. Results are then wrong.
#if LOWBIT_TILE_ELIDE
inline bool elided() {
  static const bool e = [] {
    const char* v = std::getenv("LOWBIT_TILE_ELIDE");
    return v && v[0] == '1';
  }();
  return e;
}
#else
constexpr bool elided() { return false; }
#endif

inline void configure() {
  Regs& r = regs();
  std::memset(r.t, 0, sizeof r.t);  // ldtilecfg zeroes the tiles
  r.configured = true;
}
template <int T> inline void zero() {
  if (elided()) return;
  need_config();
  std::memset(regs().t[T], 0, sizeof regs().t[T]);
}
template <int T> inline void load(const void* p, int64_t stride) {
  if (elided()) return;
  need_config();
  for (int r = 0; r < kRows; ++r) std::memcpy(regs().t[T][r], static_cast<const uint8_t*>(p) + r * stride, kColsB);
}
template <int T> inline void store(void* p, int64_t stride) {
  if (elided()) return;
  need_config();
  for (int r = 0; r < kRows; ++r) std::memcpy(static_cast<uint8_t*>(p) + r * stride, regs().t[T][r], kColsB);
}

inline float bf16_daz(const uint8_t* p) {  // a bf16 as fp32, denormals as zero
  uint16_t h;
  std::memcpy(&h, p, 2);
  if ((h & 0x7f80u) == 0) h &= 0x8000u;
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float ftz(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
  std::memcpy(&f, &u, 4);
  return f;
}

template <int C, int A, int B> inline void dpbf16ps() {
  static_assert(C != A && C != B && A != B, "tdpbf16ps needs three different tiles");
  if (elided()) return;
  need_config();
  Regs& R = regs();
  for (int m = 0; m < kRows; ++m) {
    float c[16];
    std::memcpy(c, R.t[C][m], 64);
    for (int k = 0; k < kColsB / 4; ++k) {
      const float a0 = bf16_daz(&R.t[A][m][4 * k]), a1 = bf16_daz(&R.t[A][m][4 * k + 2]);
      for (int n = 0; n < 16; ++n) {
        c[n] = ftz(c[n] + a0 * bf16_daz(&R.t[B][k][4 * n]));
        c[n] = ftz(c[n] + a1 * bf16_daz(&R.t[B][k][4 * n + 2]));
      }
    }
    std::memcpy(R.t[C][m], c, 64);
  }
}
template <int C, int A, int B, bool BSigned> inline void dpbd() {
  static_assert(C != A && C != B && A != B, "tdpb*d needs three different tiles");
  if (elided()) return;
  need_config();
  Regs& R = regs();
  for (int m = 0; m < kRows; ++m) {
    uint32_t c[16];  // unsigned: the SDM's dword sum wraps modulo 2^32
    std::memcpy(c, R.t[C][m], 64);
    for (int k = 0; k < kColsB / 4; ++k)
      for (int n = 0; n < 16; ++n)
        for (int i = 0; i < 4; ++i) {
          const int32_t a = int8_t(R.t[A][m][4 * k + i]);
          const uint8_t bu = R.t[B][k][4 * n + i];
          const int32_t b = BSigned ? int32_t(int8_t(bu)) : int32_t(bu);
          c[n] += uint32_t(a * b);
        }
    std::memcpy(R.t[C][m], c, 64);
  }
}
template <int C, int A, int B> inline void dpbssd() { dpbd<C, A, B, true>(); }
template <int C, int A, int B> inline void dpbsud() { dpbd<C, A, B, false>(); }
inline void release() { regs().configured = false; }

#endif

}  // namespace
}  // namespace lowbit::cpu::tile
