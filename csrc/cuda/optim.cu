// optim family: CUDA kernels (csrc/kernels/optim.cuh), their launchers (csrc/launch/optim.inl),
// and the managed-memory calls behind the paged optimizers (python/lowbit/optim/pages.py).
// nvcc builds this file into _cuda; the simulator build includes it from a g++ wrapper into _sim.
#include "lowbit/simt/compat.cuh"
#include "kernels/optim.cuh"
#include "launch/optim.inl"

namespace lowbit::kernels {

// Paged state: cudaMallocManaged memory that the driver migrates between host and device; the
// optimizer prefetches a parameter's state to the device before its step. Compiled here, never run
// (no GPU on the build machines): the simulator build below gives the same calls host memory.
#if defined(__CUDACC__)
int managed_alloc(intptr_t* ptr, int64_t bytes) {
  void* p = nullptr;
  const cudaError_t e = cudaMallocManaged(&p, size_t(bytes), cudaMemAttachGlobal);
  *ptr = reinterpret_cast<intptr_t>(p);
  return int(e);
}
int managed_free(intptr_t ptr) { return int(cudaFree(reinterpret_cast<void*>(ptr))); }
int managed_prefetch(intptr_t ptr, int64_t bytes, int device, intptr_t stream) {
#if CUDART_VERSION >= 13000
  cudaMemLocation loc{};
  loc.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  loc.id = device < 0 ? 0 : device;
  return int(cudaMemPrefetchAsync(reinterpret_cast<void*>(ptr), size_t(bytes), loc, 0,
                                  reinterpret_cast<cudaStream_t>(stream)));
#else
  return int(cudaMemPrefetchAsync(reinterpret_cast<void*>(ptr), size_t(bytes), device < 0 ? cudaCpuDeviceId : device,
                                  reinterpret_cast<cudaStream_t>(stream)));
#endif
}
#else
int managed_alloc(intptr_t* ptr, int64_t bytes) {
  // 4 KiB aligned like a page; the pool zero-fills.
  void* p = ::operator new(size_t(bytes < 1 ? 1 : bytes), std::align_val_t(4096), std::nothrow);
  *ptr = reinterpret_cast<intptr_t>(p);
  return p ? 0 : kErrMemoryAllocation;
}
int managed_free(intptr_t ptr) {
  ::operator delete(reinterpret_cast<void*>(ptr), std::align_val_t(4096));
  return 0;
}
int managed_prefetch(intptr_t, int64_t, int, intptr_t) { return 0; }
#endif

}  // namespace lowbit::kernels
