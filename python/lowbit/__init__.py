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
from .nn import SVDQuantLinear
from .ops import dequantize, get_matmul_precision, matmul_precision, quantize, set_matmul_precision

__version__ = "0.1.0"

__all__ = [
    # data and formats
    "BACKENDS", "FORMATS", "QuantSpec", "QuantizedTensor", "quantize", "dequantize", "from_bnb", "to_bnb",
    # files
    "save_tensors", "load_tensors", "save_adapter", "load_adapter", "save_model", "load_model",
    # backends and facts
    "use_backend", "info", "set_matmul_precision", "get_matmul_precision", "matmul_precision",
    # functional
    "linear", "lora_linear", "hadamard",
    # models
    "quantize_model", "add_lora", "add_qwha", "SVDQuantLinear",
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
    if name in ("hf", "distributed"):  # distributed: DDP / FSDP2 / DCP helpers (imports torch.distributed's parts)
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ptxas_kernels() -> list[dict]:
    path = os.path.join(os.path.dirname(__file__), "ptxas_resource_usage.log")
    return parse_ptxas_log(path) if os.path.exists(path) else []


def _engine_table(c) -> dict:
    """Which kernel each product runs on the current CPU path and precision policy, per activation
    dtype and range of M (rows of activations): {"bfloat16": {"gemm": [("1-24", "gemv_i16"), ("25+",
    "avx512bf16")], "gemm_t": [...]}, ...}. Read off the dispatcher itself (_C.gemm_route), for an nf4
    weight (fp4 routes as nf4); formats that take other kernels (int4 / int2: the int8 GEMV under
    `medium`, int2's dot-form range) get a row of their own, e.g. "gemm (int4, int2)" or "gemm (int2)"."""
    probe = list(range(1, 129))

    def ranges(dt, transposed, fmt):
        out, start, cur = [], 1, c.gemm_route(dt, 1, transposed, fmt)
        for m in probe[1:]:
            r = c.gemm_route(dt, m, transposed, fmt)
            if r != cur:
                out.append((f"{start}-{m - 1}" if m - 1 > start else f"{start}", cur))
                start, cur = m, r
        out.append((f"{start}+", cur))
        return out

    out = {}
    for name, dt in (("float32", 0), ("bfloat16", 1), ("float16", 2)):
        rows = {"gemm": ranges(dt, False, formats.FMT_ID["nf4"]), "gemm_t": ranges(dt, True, formats.FMT_ID["nf4"])}
        others: dict = {}  # formats grouped by their ranges where they differ from nf4's
        for f in ("int4", "int2"):
            r = ranges(dt, False, formats.FMT_ID[f])
            if r != rows["gemm"]:
                others.setdefault(tuple(r), []).append(f)
        for r, fs in others.items():
            rows[f"gemm ({', '.join(fs)})"] = list(r)
        out[name] = rows
    return out


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
        d["cpu_paths"] = c.available_cpu_paths()
        d["amx_status"] = c.amx_status()
        d["cpu_threads"] = c.num_threads()
        d["matmul_precision"] = get_matmul_precision()
        d["engines"] = _engine_table(c)
    ok, why = _native.cuda_status()
    d["cuda_available"] = ok
    d["cuda_status"] = why
    if mods["cuda"]:
        d["cuda_archs"] = _native.module("cuda").compiled_archs()
        d["cuda_kernels"] = _ptxas_kernels()
    if mods["sim"]:
        d["sim_config"] = _native.module("sim").get_config()
    return d
