// Self-test kernels of the simt simulator: compiled by nvcc into _cuda (ptxas checks every wrapper's
// PTX) and by g++ into _sim (tests/test_simt.py runs them).
#include "lowbit/simt/compat.cuh"
#include "launch/simt.inl"
