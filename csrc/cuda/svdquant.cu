// svdquant family: CUDA kernels (csrc/kernels/svdquant.cuh) and launchers (csrc/launch/svdquant.inl).
// nvcc builds this file into _cuda; the simulator build includes it from a g++ wrapper into _sim.
#include "lowbit/simt/compat.cuh"
#include "kernels/svdquant.cuh"
#include "launch/svdquant.inl"
