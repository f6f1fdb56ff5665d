"""The ops layer: the only door to native code (``lowbit._C`` / ``_sim`` / ``_cuda``).

One module per kernel family — :mod:`~lowbit.ops.quant`, :mod:`~lowbit.ops.gemm`, :mod:`~lowbit.ops.lowrank`,
:mod:`~lowbit.ops.hadamard`, :mod:`~lowbit.ops.qwha`, :mod:`~lowbit.ops.svdquant`,
:mod:`~lowbit.ops.optim` — each with the
validation of its entry points (dtype, shape, contiguity, storage: native code never sees input it
cannot handle), the backend resolved once per call, its torch.library custom ops with fake impls, and
the inference entry points the modules' fast paths use. Everything above (functional, nn, optim,
init, model) reaches the kernels through these names.

The family functions are re-exported here (``lowbit.ops.gemm(x, qt)``); where a function shares its
family's name (gemm, lowrank, hadamard) the attribute is the function, and the module is imported by
its full name (``from lowbit.ops.gemm import gemm_op``).
"""

from __future__ import annotations

from ._common import backend_for, check_finite, check_tensor, has_kernel, weight_args
from ..formats import GEMM_BLOCKS
from .gemm import gemm, gemm_inference, gemm_op, gemm_t, gemm_t_op
from .hadamard import hadamard, hadamard_op
from .precision import PRECISIONS, get_matmul_precision, matmul_precision, set_matmul_precision
from .lowrank import lowrank, lowrank_inference, lowrank_op
from .quant import dequantize, dequantize8, quantize, quantize8
from .svdquant import svdquant_act, svdquant_gemm, svdquant_linear
from .qwha import adapter_hadamard, adapter_hadamard_factors, qwha_inference, qwha_spmm, qwha_spmm_backward
from . import optim  # noqa: E402  (lowbit.ops.optim: the AdamW kernels, managed memory)

__all__ = ["quantize", "dequantize", "quantize8", "dequantize8", "gemm", "gemm_t", "gemm_op", "gemm_t_op", "gemm_inference",
           "GEMM_BLOCKS",
           "lowrank", "lowrank_op", "lowrank_inference", "hadamard", "hadamard_op", "adapter_hadamard",
           "adapter_hadamard_factors", "qwha_spmm", "qwha_spmm_backward", "qwha_inference", "optim",
           "svdquant_act", "svdquant_gemm", "svdquant_linear",
           "set_matmul_precision", "get_matmul_precision", "matmul_precision", "PRECISIONS",
           "backend_for", "has_kernel", "check_tensor", "check_finite", "weight_args"]
