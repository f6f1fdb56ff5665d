// gemm family: CUDA kernels (csrc/kernels/gemm.cuh) and their launchers (csrc/launch/gemm.inl).
// nvcc builds this file into _cuda; the simulator build includes it from a g++ wrapper into _sim.
#include "lowbit/simt/compat.cuh"
#include "kernels/gemm.cuh"
#include "launch/gemm.inl"
