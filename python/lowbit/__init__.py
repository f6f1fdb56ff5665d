"""lowbit: low-bit weights, packed GEMM, low-rank adapters, Hadamard transforms, 8-bit optimizers.

Quick start::

    import lowbit, torch
    qt = lowbit.quantize(w, "nf4", block_size=64, double_quant=True)   # (N, K) -> QuantizedTensor
    w_hat = qt.dequantize(torch.bfloat16)
    with lowbit.use_backend("sim", schedule="random:7"):              # CUDA kernels on the simulator
        w_sim = qt.dequantize()
"""

from __future__ import annotations

import importlib
import os

import torch  # noqa: F401  (loads torch's OpenMP runtime before lowbit._C links to it)

from . import formats, functional, init, model, nn, ops, optim, reference  # noqa: E402  (lowbit.init.qera, ...)
from . import _deprecated, _native, convert  # noqa: E402  (_native: use_backend, BACKENDS, info())
from ._ptxas import parse_ptxas_log
from ._native import BACKENDS, use_backend
from .convert import (load_adapter, load_file, load_model, load_tensors, save_adapter, save_file, save_model,
                      save_tensors)
from .formats import FORMATS, QuantizedTensor, QuantSpec, from_bnb, to_bnb
from .functional import hadamard, linear, lora_linear
from .model import add_adapters, add_lora, add_qwha, quantize_model
from .ops import dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    # data and formats
    "BACKENDS", "FORMATS", "QuantSpec", "QuantizedTensor", "quantize", "dequantize", "from_bnb", "to_bnb",
    # files
    "save_tensors", "load_tensors", "save_adapter", "load_adapter", "save_model", "load_model",
    # backends and facts
    "use_backend", "info",
    # functional
    "linear", "lora_linear", "hadamard",
    # models
    "quantize_model", "add_lora", "add_qwha",
    # subpackages and modules
    "nn", "optim", "init", "ops", "functional", "formats", "reference", "model", "convert",
    # deprecated spellings (they warn), kept for star-imports
    "save_file", "load_file", "add_adapters",
]

# Deprecated spellings of names that moved up out of lower layers (a lower module cannot import
# lowbit.model, so the top sets them): each warns and calls the new home.
nn.add_lora = nn.lora.add_lora = _deprecated.alias(add_lora, "lowbit.nn.add_lora", "lowbit.add_lora")
nn.add_adapters = nn.qwha.add_adapters = add_adapters  # warns itself (-> add_qwha / add_lora)
init.apply_init = model.apply_init  # warns itself (-> add_lora(init=...))
convert.quantize_model = _deprecated.alias(quantize_model, "lowbit.convert.quantize_model", "lowbit.quantize_model")


def _attach_hf(m) -> None:
    """After lowbit quantized a model: a transformers model gets lowbit's quantizer (lowbit.hf.attach), so that
    its save_pretrained writes a lowbit checkpoint. lowbit.hf (which imports transformers) is imported only
    for a transformers model, whose class tells without importing anything."""
    if any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers") for c in type(m).__mro__):
        importlib.import_module(".hf", __name__).attach(m)


model.AFTER_QUANTIZE.append(_attach_hf)


def __getattr__(name):
    # lowbit.hf imports transformers (seconds): loaded on first use, `lowbit.hf.LowbitConfig` works after `import lowbit`
    if name == "hf":
        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ptxas_kernels() -> list[dict]:
    path = os.path.join(os.path.dirname(__file__), "ptxas_resource_usage.log")
    return parse_ptxas_log(path) if os.path.exists(path) else []


def info() -> dict:
    """Build and run-time facts: version, modules built, CPU path and threads, CUDA archs and status,
    and the ptxas resource usage of every compiled CUDA kernel."""
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
