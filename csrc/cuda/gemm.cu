// gemm family: CUDA kernels (csrc/kernels/gemm.cuh: GEMV and backward; csrc/kernels/gemm_mma.cuh:
// tensor cores) and their launchers (csrc/launch/gemm.inl).
// nvcc builds this file into _cuda; the simulator build includes it from a g++ wrapper into _sim.
#include "lowbit/simt/compat.cuh"
#include "kernels/gemm.cuh"
#include "kernels/gemm_mma.cuh"
#include "launch/gemm.inl"
