// csrc/launch/simt.inl — host launchers of the simulator self-test kernels, behind one
// entry point: run(name, pointers, ints, stream). Built by nvcc (_cuda) and g++ (_sim).
#pragma once
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/simt.cuh"

namespace lowbit::simt_tests {

// Returns the launch's error code; unknown names throw std::invalid_argument.
int run(const std::string& name, const std::vector<intptr_t>& p, const std::vector<int64_t>& i, intptr_t stream) {
  auto P = [&](size_t k) { return k < p.size() ? p[k] : intptr_t(0); };
  auto I = [&](size_t k) { return k < i.size() ? i[k] : int64_t(0); };
  auto ptr = [&](size_t k) { return reinterpret_cast<void*>(P(k)); };
  if (name == "shfl")  // ints: mode, width, wide, threads
    return simt::launch(shfl_kernel, dim3(1), dim3(unsigned(I(3))), 0, stream, int(I(0)), int(I(1)), int(I(2)),
                        static_cast<const int*>(ptr(0)), static_cast<long long*>(ptr(1)));
  if (name == "vote")
    return simt::launch(vote_kernel, dim3(1), dim3(unsigned(I(0))), 0, stream, static_cast<const int*>(ptr(0)),
                        static_cast<unsigned*>(ptr(1)));
  if (name == "atomics")  // ints: blocks, threads
    return simt::launch(atomics_kernel, dim3(unsigned(I(0))), dim3(unsigned(I(1))), 0, stream,
                        static_cast<int*>(ptr(0)), static_cast<unsigned*>(ptr(1)),
                        static_cast<unsigned long long*>(ptr(2)), static_cast<float*>(ptr(3)),
                        static_cast<double*>(ptr(4)));
  if (name == "mma_f16")
    return simt::launch(mma_kernel<__half>, dim3(1), dim3(32), 0, stream, static_cast<const __half*>(ptr(0)),
                        static_cast<const __half*>(ptr(1)), static_cast<const float*>(ptr(2)), static_cast<float*>(ptr(3)));
  if (name == "mma_bf16")
    return simt::launch(mma_kernel<__nv_bfloat16>, dim3(1), dim3(32), 0, stream,
                        static_cast<const __nv_bfloat16*>(ptr(0)), static_cast<const __nv_bfloat16*>(ptr(1)),
                        static_cast<const float*>(ptr(2)), static_cast<float*>(ptr(3)));
  if (name == "mma_ldmatrix_f16")
    return simt::launch(mma_ldmatrix_kernel<__half>, dim3(1), dim3(32), 0, stream, static_cast<const __half*>(ptr(0)),
                        static_cast<const __half*>(ptr(1)), static_cast<float*>(ptr(2)));
  if (name == "mma_ldmatrix_bf16")
    return simt::launch(mma_ldmatrix_kernel<__nv_bfloat16>, dim3(1), dim3(32), 0, stream,
                        static_cast<const __nv_bfloat16*>(ptr(0)), static_cast<const __nv_bfloat16*>(ptr(1)),
                        static_cast<float*>(ptr(2)));
  if (name == "mma_s8")
    return simt::launch(mma_s8_kernel, dim3(1), dim3(32), 0, stream, static_cast<const int8_t*>(ptr(0)),
                        static_cast<const int8_t*>(ptr(1)), static_cast<const int32_t*>(ptr(2)),
                        static_cast<int32_t*>(ptr(3)));
  if (name == "mma_s8_ldmatrix")
    return simt::launch(mma_s8_ldmatrix_kernel, dim3(1), dim3(32), 0, stream, static_cast<const int8_t*>(ptr(0)),
                        static_cast<const int8_t*>(ptr(1)), static_cast<int32_t*>(ptr(2)));
  if (name == "ldmatrix") {  // ints: N, trans
    const auto* s = static_cast<const uint16_t*>(ptr(0));
    auto* o = static_cast<uint32_t*>(ptr(1));
    const int n = int(I(0));
    const bool t = I(1) != 0;
    if (n == 1) return t ? simt::launch(ldmatrix_kernel<1, true>, dim3(1), dim3(32), 0, stream, s, o)
                         : simt::launch(ldmatrix_kernel<1, false>, dim3(1), dim3(32), 0, stream, s, o);
    if (n == 2) return t ? simt::launch(ldmatrix_kernel<2, true>, dim3(1), dim3(32), 0, stream, s, o)
                         : simt::launch(ldmatrix_kernel<2, false>, dim3(1), dim3(32), 0, stream, s, o);
    return t ? simt::launch(ldmatrix_kernel<4, true>, dim3(1), dim3(32), 0, stream, s, o)
             : simt::launch(ldmatrix_kernel<4, false>, dim3(1), dim3(32), 0, stream, s, o);
  }
  if (name == "divergent_barrier")
    return simt::launch(divergent_barrier_kernel, dim3(1), dim3(32), 0, stream, static_cast<int*>(ptr(0)));
  if (name == "deadlock_shfl")
    return simt::launch(deadlock_shfl_kernel, dim3(1), dim3(32), 0, stream, static_cast<int*>(ptr(0)));
  if (name == "mismatch")
    return simt::launch(mismatch_kernel, dim3(1), dim3(32), 0, stream, static_cast<int*>(ptr(0)));
  if (name == "barrier_vs_warp")
    return simt::launch(barrier_vs_warp_kernel, dim3(1), dim3(32), 0, stream, static_cast<int*>(ptr(0)));
  if (name == "trap")  // ints: blocks, threads, block, thread, use_assert
    return simt::launch(trap_kernel, dim3(unsigned(I(0))), dim3(unsigned(I(1))), 0, stream, int(I(2)), int(I(3)),
                        int(I(4)));
  if (name == "spin_forever")
    return simt::launch(spin_forever_kernel, dim3(1), dim3(1), 0, stream, static_cast<int*>(ptr(0)));
  if (name == "reduce")  // ints: blocks, threads
    return simt::launch(reduce_kernel, dim3(unsigned(I(0))), dim3(unsigned(I(1))), 0, stream,
                        static_cast<const int*>(ptr(0)), static_cast<int*>(ptr(1)));
  if (name == "racy")  // ints: sync, threads
    return simt::launch(racy_kernel, dim3(1), dim3(unsigned(I(1))), 0, stream, int(I(0)), static_cast<int*>(ptr(0)));
  if (name == "nanosleep")
    return simt::launch(nanosleep_kernel, dim3(1), dim3(unsigned(I(0))), 0, stream, static_cast<int*>(ptr(0)));
  if (name == "dynsmem")  // ints: threads, smem bytes
    return simt::launch(dynsmem_kernel, dim3(1), dim3(unsigned(I(0))), size_t(I(1)), stream, static_cast<float*>(ptr(0)));
  if (name == "index")  // ints: grid xyz, block xyz
    return simt::launch(index_kernel, dim3(unsigned(I(0)), unsigned(I(1)), unsigned(I(2))),
                        dim3(unsigned(I(3)), unsigned(I(4)), unsigned(I(5))), 0, stream, static_cast<int*>(ptr(0)));
  if (name == "cp_async")
    return simt::launch(cp_async_kernel, dim3(1), dim3(64), 0, stream, static_cast<const uint4*>(ptr(0)),
                        static_cast<uint4*>(ptr(1)));
  if (name == "convert") {  // ints: n
    const int n = int(I(0));
    return simt::launch(convert_kernel, dim3(unsigned((n + 127) / 128)), dim3(128), 0, stream,
                        static_cast<const float*>(ptr(0)), static_cast<uint16_t*>(ptr(1)),
                        static_cast<uint16_t*>(ptr(2)), static_cast<float*>(ptr(3)), n);
  }
  if (name == "bits") {  // ints: n
    const int n = int(I(0));
    return simt::launch(bits_kernel, dim3(unsigned((n + 127) / 128)), dim3(128), 0, stream,
                        static_cast<const uint32_t*>(ptr(0)), static_cast<const uint32_t*>(ptr(1)),
                        static_cast<const uint32_t*>(ptr(2)), static_cast<uint32_t*>(ptr(3)), n);
  }
  if (name == "launch")  // ints: grid x, block x, block y, block z, smem bytes, opt-in bytes (0: none)
  {
    if (I(5) > 0) {
      const int e = simt::set_max_dynamic_smem(empty_kernel, int(I(5)));
      if (e) return e;
    }
    return simt::launch(empty_kernel, dim3(unsigned(I(0))), dim3(unsigned(I(1)), unsigned(I(2)), unsigned(I(3))),
                        size_t(I(4)), stream);
  }
  if (name == "deep_stack")  // ints: blocks, threads, n (<= kDeepStackInts)
    return simt::launch(deep_stack_kernel, dim3(unsigned(I(0))), dim3(unsigned(I(1))), 0, stream,
                        static_cast<int*>(ptr(0)), int(I(2)));
  if (name == "static_smem") {  // ints: threads, dynamic smem bytes, opt-in bytes (0: none)
    if (I(2) > 0) {
      const int e = simt::set_max_dynamic_smem(static_smem_kernel<1>, int(I(2)));
      if (e) return e;
      return simt::launch(static_smem_kernel<1>, dim3(1), dim3(unsigned(I(0))), size_t(I(1)), stream,
                          static_cast<float*>(ptr(0)));
    }
    return simt::launch(static_smem_kernel<0>, dim3(1), dim3(unsigned(I(0))), size_t(I(1)), stream,
                        static_cast<float*>(ptr(0)));
  }
  if (name == "oob_write")  // ints: n (threads)
    return simt::launch(oob_write_kernel, dim3(1), dim3(unsigned(I(0))), 0, stream, static_cast<int*>(ptr(0)), int(I(0)));
  throw std::invalid_argument("unknown simt_test '" + name + "'");
}

}  // namespace lowbit::simt_tests
