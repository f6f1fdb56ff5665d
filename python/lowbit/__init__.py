"""lowbit: low-bit weights, packed GEMM, low-rank adapters, Hadamard transforms, 8-bit optimizers.

Quick start::

    import lowbit, torch
    qt = lowbit.quantize(w, "nf4", block_size=64, double_quant=True)   # (N, K) -> QuantizedTensor
    w_hat = qt.dequantize(torch.bfloat16)
    with lowbit.use_backend("sim", schedule="random:7"):              # CUDA kernels on the simulator
        w_sim = qt.dequantize()
"""

from __future__ import annotations

import os

import torch  # noqa: F401  (loads torch's OpenMP runtime before lowbit._C links to it)

from . import init, nn, optim  # noqa: E402  (subpackages: lowbit.init.qera, lowbit.nn.QuantLinear, ...)
from ._native import BACKENDS, use_backend
from .convert import from_bnb, load_adapter, load_file, quantize_model, save_adapter, save_file, to_bnb
from .nn import add_adapters, add_lora
from .formats import FORMATS, QuantizedTensor, QuantSpec
from .functional import hadamard, linear
from .ops import dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "FORMATS",
    "QuantSpec",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "from_bnb",
    "to_bnb",
    "save_file",
    "load_file",
    "use_backend",
    "info",
    "linear",
    "hadamard",
    "quantize_model",
    "nn",
    "add_lora",
    "add_adapters",
    "save_adapter",
    "load_adapter",
]


def _ptxas_kernels() -> list[dict]:
    from ._ptxas import parse_ptxas_log

    path = os.path.join(os.path.dirname(__file__), "ptxas_resource_usage.log")
    return parse_ptxas_log(path) if os.path.exists(path) else []


def info() -> dict:
    """Build and run-time facts: version, modules built, CPU path and threads, CUDA archs and status,
    and the ptxas resource usage of every compiled CUDA kernel."""
    from . import _native

    mods = {name: (name in _native._modules) for name in ("cpu", "sim", "cuda")}
    d = {
        "version": __version__,
        "torch": torch.__version__,
        "modules": {"_C": mods["cpu"], "_sim": mods["sim"], "_cuda": mods["cuda"]},
        "import_errors": dict(_native._import_errors),
    }
    if mods["cpu"]:
        c = _native.module("cpu")
        d["cpu_path"] = c.cpu_path()
        d["cpu_threads"] = c.num_threads()
    ok, why = _native.cuda_status()
    d["cuda_available"] = ok
    d["cuda_status"] = why
    if mods["cuda"]:
        d["cuda_archs"] = _native.module("cuda").compiled_archs()
        d["cuda_kernels"] = _ptxas_kernels()
    if mods["sim"]:
        d["sim_config"] = _native.module("sim").get_config()
    return d
