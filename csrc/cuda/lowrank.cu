// lowrank family: the down-projection kernel (csrc/kernels/lowrank.cuh) and the launcher
// (csrc/launch/lowrank.inl), which reuses the gemm kernels of csrc/cuda/gemm.cu for the product and
// the up-projection epilogue. nvcc builds this file into _cuda; the simulator build includes it
// from a g++ wrapper into _sim.
#include "lowbit/simt/compat.cuh"
#include "kernels/lowrank.cuh"
#include "launch/lowrank.inl"
