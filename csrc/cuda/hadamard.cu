// hadamard family: CUDA kernel (csrc/kernels/hadamard.cuh) and launcher (csrc/launch/hadamard.inl).
// nvcc builds this file into _cuda; the simulator build includes it from a g++ wrapper into _sim.
#include "lowbit/simt/compat.cuh"
#include "kernels/hadamard.cuh"
#include "launch/hadamard.inl"
