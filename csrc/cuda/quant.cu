// quant family: CUDA kernels (csrc/kernels/quant.cuh) and their launchers (csrc/launch/quant.inl).
// nvcc builds this file into _cuda; the simulator build includes it from a g++ wrapper into _sim.
#include "lowbit/simt/compat.cuh"
#include "kernels/quant.cuh"
#include "launch/quant.inl"
