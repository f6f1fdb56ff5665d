// csrc/bind/entries.h — the entry points that _C (cpu.cpp) and _sim / _cuda (gpu.cpp) share, written
// once: Python name, positional arguments (with their py::arg names), and the Params struct they
// become. Arguments are raw pointers (Python ints from tensor.data_ptr()), sizes and enum ids; the
// Python layer (python/lowbit/ops) validates everything first. The order of the arguments is the
// ABI the Python layer calls positionally: append, never reorder.
//
// Each module passes its binder, which decides what is module-specific:
//   cpu.cpp: CpuBinder — the arguments as listed, runs cpu::<name>(params).
//   gpu.cpp: GpuBinder — the arguments plus a trailing `stream` (default 0), runs
//            kernels::<name>(params, stream) and turns a nonzero cudaError_t into RuntimeError.
// Both release the GIL while the kernel runs. A binder is a struct with
//   template <class Run, class Make, class... A, class... Extra>
//   static void def(py::module_& m, const char* name, Run run, Make make, type_list<A...>, Extra... py_args);
// where A... are make's argument types, make(a...) builds the Params and run(params[, stream]) calls
// the family function.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

#include "lowbit/formats.h"
#include "lowbit/gemm.h"
#include "lowbit/hadamard.h"
#include "lowbit/lowrank.h"
#include "lowbit/optim.h"
#include "lowbit/quant.h"
#include "lowbit/svdquant.h"

namespace lowbit::bind {

// A tensor's address (tensor.data_ptr()) as an entry point takes it: an int in Python, shown as
// `Address` in the signatures, so lowbit._native.call can tell addresses from sizes when it explains
// a conversion error without printing the values (pybind11's own message lists every argument's
// value: raw addresses; issue 14, finding 9).
struct Address {
  intptr_t v = 0;
};

}  // namespace lowbit::bind

namespace pybind11::detail {
template <>
struct type_caster<lowbit::bind::Address> {
  PYBIND11_TYPE_CASTER(lowbit::bind::Address, const_name("Address"));
  bool load(handle src, bool convert) {
    type_caster<intptr_t> as_int;
    if (!as_int.load(src, convert)) return false;
    value.v = static_cast<intptr_t>(as_int);
    return true;
  }
  static handle cast(const lowbit::bind::Address& a, return_value_policy, handle) { return PyLong_FromSsize_t(a.v); }
};
}  // namespace pybind11::detail

namespace lowbit::bind {

namespace py = pybind11;
using py::arg;

template <class T>
T* ptr(Address p) { return reinterpret_cast<T*>(p.v); }

// The argument types of a Make lambda: the binder declares its Python function with them.
template <class... A>
struct type_list {};
template <class F>
struct signature_of : signature_of<decltype(&F::operator())> {};
template <class C, class R, class... A>
struct signature_of<R (C::*)(A...) const> {
  using args = type_list<A...>;
};
template <class Binder, class Run, class Make, class... Extra>
void def_entry(py::module_& m, const char* name, Run run, Make make, Extra... py_args) {
  Binder::def(m, name, run, make, typename signature_of<Make>::args{}, py_args...);
}

// The Python name of an entry and its family function: cpu::fn(p) in _C, kernels::fn(p, stream) in
// _sim / _cuda. The branch a module does not take is never instantiated, so _C links no CUDA
// launcher and _sim / _cuda no CPU kernel.
#define LOWBIT_ENTRY(fn)                                                       \
  #fn, [](const auto& p, auto... stream) {                                     \
    if constexpr (sizeof...(stream) == 0) return ::lowbit::cpu::fn(p);         \
    else return ::lowbit::kernels::fn(p, stream...);                          \
  }

// The packed weight of gemm, gemm_t and lowrank: the same ten arguments in each.
inline GemmWeight weight(Address codes, Address scale, Address zero, Address scale_q, Address scale_nested,
                         float scale_offset, int64_t n, int64_t k, int block, int fmt) {
  return {ptr<const uint8_t>(codes), ptr<const float>(scale), ptr<const float>(zero), ptr<const uint8_t>(scale_q),
          ptr<const float>(scale_nested), scale_offset, n, k, block, Fmt(fmt)};
}
#define LOWBIT_WEIGHT_ARGS                                                                              \
  arg("codes"), arg("scale"), arg("zero"), arg("scale_q"), arg("scale_nested"), arg("scale_offset"), \
      arg("block"), arg("fmt")
#define LOWBIT_ADAMW_ARGS                                                                                 \
  arg("numel"), arg("beta1"), arg("one_minus_beta1"), arg("beta2"), arg("one_minus_beta2"), arg("eps"), \
      arg("decay"), arg("neg_step_size"), arg("inv_bc2_sqrt")

template <class Binder>
void def_shared(py::module_& m) {
  // ---- quant (include/lowbit/quant.h)
  def_entry<Binder>(m, LOWBIT_ENTRY(quantize),
      [](Address w, int w_dtype, int64_t numel, int block, int fmt, Address codes, Address scale, Address zero) {
        return QuantizeParams{ptr<const void>(w), DType(w_dtype), numel, block, Fmt(fmt), ptr<uint8_t>(codes),
                              ptr<float>(scale), ptr<float>(zero)};
      },
      arg("w"), arg("w_dtype"), arg("numel"), arg("block"), arg("fmt"), arg("codes"), arg("scale"), arg("zero"));
  def_entry<Binder>(m, LOWBIT_ENTRY(dequantize),
      [](Address codes, Address scale, Address zero, Address scale_q, Address scale_nested, float scale_offset,
         Address out, int out_dtype, int64_t numel, int block, int fmt) {
        return DequantizeParams{ptr<const uint8_t>(codes), ptr<const float>(scale), ptr<const float>(zero),
                                ptr<const uint8_t>(scale_q), ptr<const float>(scale_nested), scale_offset,
                                ptr<void>(out), DType(out_dtype), numel, block, Fmt(fmt)};
      },
      arg("codes"), arg("scale"), arg("zero"), arg("scale_q"), arg("scale_nested"), arg("scale_offset"), arg("out"),
      arg("out_dtype"), arg("numel"), arg("block"), arg("fmt"));
  def_entry<Binder>(m, LOWBIT_ENTRY(quantize8),
      [](Address x, int64_t numel, int block, bool is_signed, float offset, Address q, Address absmax) {
        return Quantize8Params{ptr<const float>(x), numel, block, is_signed, offset, ptr<uint8_t>(q), ptr<float>(absmax)};
      },
      arg("x"), arg("numel"), arg("block"), arg("is_signed"), arg("offset"), arg("q"), arg("absmax"));
  def_entry<Binder>(m, LOWBIT_ENTRY(dequantize8),
      [](Address q, Address absmax, int64_t numel, int block, bool is_signed, float offset, Address out) {
        return Dequantize8Params{ptr<const uint8_t>(q), ptr<const float>(absmax), numel, block, is_signed, offset,
                                 ptr<float>(out)};
      },
      arg("q"), arg("absmax"), arg("numel"), arg("block"), arg("is_signed"), arg("offset"), arg("out"));

  // ---- gemm (include/lowbit/gemm.h); gemm_t has no bias: gx = gy · dequant(W)
  def_entry<Binder>(m, LOWBIT_ENTRY(gemm),
      [](Address x, Address y, Address bias, int dtype, int64_t m_, int64_t n, int64_t k, Address codes,
         Address scale, Address zero, Address scale_q, Address scale_nested, float scale_offset, int block, int fmt) {
        return GemmParams{weight(codes, scale, zero, scale_q, scale_nested, scale_offset, n, k, block, fmt),
                          ptr<const void>(x), ptr<void>(y), ptr<const void>(bias), DType(dtype), m_};
      },
      arg("x"), arg("y"), arg("bias"), arg("dtype"), arg("m"), arg("n"), arg("k"), LOWBIT_WEIGHT_ARGS);
  def_entry<Binder>(m, LOWBIT_ENTRY(gemm_t),
      [](Address gy, Address gx, int dtype, int64_t m_, int64_t n, int64_t k, Address codes, Address scale,
         Address zero, Address scale_q, Address scale_nested, float scale_offset, int block, int fmt) {
        return GemmParams{weight(codes, scale, zero, scale_q, scale_nested, scale_offset, n, k, block, fmt),
                          ptr<const void>(gy), ptr<void>(gx), nullptr, DType(dtype), m_};
      },
      arg("gy"), arg("gx"), arg("dtype"), arg("m"), arg("n"), arg("k"), LOWBIT_WEIGHT_ARGS);

  // ---- lowrank (include/lowbit/lowrank.h): the gemm arguments, xa after y, then A, B, r, s
  def_entry<Binder>(m, LOWBIT_ENTRY(lowrank),
      [](Address x, Address y, Address xa, Address bias, int dtype, int64_t m_, int64_t n, int64_t k,
         Address codes, Address scale, Address zero, Address scale_q, Address scale_nested, float scale_offset,
         int block, int fmt, Address a, Address b, int r, float s) {
        const GemmParams g{weight(codes, scale, zero, scale_q, scale_nested, scale_offset, n, k, block, fmt),
                           ptr<const void>(x), ptr<void>(y), ptr<const void>(bias), DType(dtype), m_};
        return LowrankParams{g, ptr<void>(xa), ptr<const void>(a), ptr<const void>(b), r, s};
      },
      arg("x"), arg("y"), arg("xa"), arg("bias"), arg("dtype"), arg("m"), arg("n"), arg("k"), LOWBIT_WEIGHT_ARGS,
      arg("a"), arg("b"), arg("r"), arg("s"));

  // ---- svdquant (include/lowbit/svdquant.h): the activation pass, then the W4A4 GEMM
  def_entry<Binder>(m, LOWBIT_ENTRY(svdquant_act),
      [](Address x, int dtype, int64_t m_, int64_t k, Address inv_smooth, Address l2, int r, Address qx, Address sx,
         Address down) {
        return SvdquantActParams{ptr<const void>(x), ptr<const float>(inv_smooth), ptr<const void>(l2),
                                 ptr<int8_t>(qx), ptr<float>(sx), ptr<float>(down), DType(dtype), m_, k, r};
      },
      arg("x"), arg("dtype"), arg("m"), arg("k"), arg("inv_smooth"), arg("l2"), arg("r"), arg("qx"), arg("sx"),
      arg("down"));
  def_entry<Binder>(m, LOWBIT_ENTRY(svdquant_gemm),
      [](Address qx, Address sx, Address qw, Address sw, Address down, Address l1, Address bias, Address y, int dtype,
         int64_t m_, int64_t n, int64_t k, int r) {
        return SvdquantGemmParams{ptr<const int8_t>(qx), ptr<const float>(sx), ptr<const uint8_t>(qw),
                                  ptr<const float>(sw), ptr<const float>(down), ptr<const void>(l1),
                                  ptr<const void>(bias), ptr<void>(y), DType(dtype), m_, n, k, r};
      },
      arg("qx"), arg("sx"), arg("qw"), arg("sw"), arg("down"), arg("l1"), arg("bias"), arg("y"), arg("dtype"), arg("m"),
      arg("n"), arg("k"), arg("r"));

  // ---- hadamard (include/lowbit/hadamard.h)
  def_entry<Binder>(m, LOWBIT_ENTRY(hadamard),
      [](Address x, Address out, int dtype, int64_t rows, int n, float scale, bool transpose) {
        return HadamardParams{ptr<const void>(x), ptr<void>(out), DType(dtype), rows, n, scale, transpose};
      },
      arg("x"), arg("out"), arg("dtype"), arg("rows"), arg("n"), arg("scale"), arg("transpose"));

  // ---- optim (include/lowbit/optim.h): the AdamWScalars in their struct order
  def_entry<Binder>(m, LOWBIT_ENTRY(adamw32),
      [](Address p, int p_dtype, Address g, int g_dtype, Address m_, Address v, int64_t numel, float beta1,
         float omb1, float beta2, float omb2, float eps, float decay, float nstep, float ibc2s) {
        return AdamW32Params{ptr<void>(p), DType(p_dtype), ptr<const void>(g), DType(g_dtype), ptr<float>(m_),
                             ptr<float>(v), numel, {beta1, omb1, beta2, omb2, eps, decay, nstep, ibc2s}};
      },
      arg("p"), arg("p_dtype"), arg("g"), arg("g_dtype"), arg("m"), arg("v"), LOWBIT_ADAMW_ARGS);
  def_entry<Binder>(m, LOWBIT_ENTRY(adamw8),
      [](Address p, int p_dtype, Address g, int g_dtype, Address qm, Address am, Address qv, Address av,
         int64_t numel, float beta1, float omb1, float beta2, float omb2, float eps, float decay, float nstep,
         float ibc2s, int rounding) {
        return AdamW8Params{ptr<void>(p), DType(p_dtype), ptr<const void>(g), DType(g_dtype), ptr<uint8_t>(qm),
                            ptr<float>(am), ptr<uint8_t>(qv), ptr<float>(av), numel,
                            {beta1, omb1, beta2, omb2, eps, decay, nstep, ibc2s}, rounding};
      },
      arg("p"), arg("p_dtype"), arg("g"), arg("g_dtype"), arg("qm"), arg("absmax_m"), arg("qv"), arg("absmax_v"),
      LOWBIT_ADAMW_ARGS, arg("rounding"));
}

#undef LOWBIT_ADAMW_ARGS
#undef LOWBIT_WEIGHT_ARGS
#undef LOWBIT_ENTRY

}  // namespace lowbit::bind
