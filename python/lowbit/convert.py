"""Checkpoints: lowbit safetensors files and bitsandbytes ``Linear4bit`` state dicts."""

from __future__ import annotations

import json
import math
import os
from typing import Union

import torch

from .formats import DTYPE_NAME, FP4, NESTED_BLOCK, NF4, QuantizedTensor, QuantSpec, dynamic_map
from .reference import _f32

__all__ = ["to_bnb", "from_bnb", "save_file", "load_file", "quantize_model", "save_adapter", "load_adapter"]

_META_KEY = "lowbit"  # safetensors metadata entry holding the quantized tensors' descriptions
_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- bitsandbytes
def to_bnb(qt: QuantizedTensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """State-dict entries that bitsandbytes' ``Linear4bit`` / ``Params4bit.from_prequantized`` loads.

    Keys: ``weight`` (uint8 (N*K/2, 1)), ``weight.absmax``, ``weight.quant_map``, with double
    quant ``weight.nested_absmax`` and ``weight.nested_quant_map``, and
    ``weight.quant_state.bitsandbytes__<fmt>`` (uint8 bytes of a JSON dict).
    """
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    if qt.fmt not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes stores only nf4/fp4 weights; this weight is fmt={qt.fmt!r}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    p = prefix + "weight"
    table = NF4 if qt.fmt == "nf4" else FP4
    sd = {p: qt.codes.reshape(-1, 1).clone(), f"{p}.quant_map": _f32(table).to(qt.device)}
    state = {"quant_type": qt.fmt, "blocksize": qt.block_size, "dtype": DTYPE_NAME[qt.dtype],
             "shape": list(qt.shape)}
    if qt.double_quant:
        sd[f"{p}.absmax"] = qt.scale_q.clone()
        sd[f"{p}.nested_absmax"] = qt.scale_nested.clone()
        sd[f"{p}.nested_quant_map"] = dynamic_map(True).to(qt.device)
        # float(fp32) -> JSON keeps every bit (a double holds any fp32 exactly)
        state.update(nested_blocksize=NESTED_BLOCK, nested_dtype="float32",
                     nested_offset=float(qt.scale_offset))
    else:
        sd[f"{p}.absmax"] = qt.scale.clone()
    sd[f"{p}.quant_state.bitsandbytes__{qt.fmt}"] = torch.tensor(
        list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    return sd


def _need(sd, key):
    if key not in sd:
        raise ValueError(f"state dict lacks {key!r} (keys present: {sorted(sd)[:12]})")
    v = sd[key]
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"state dict entry {key!r} must be a tensor, got {type(v).__name__}")
    return v


def from_bnb(state_dict: dict, prefix: str = "") -> QuantizedTensor:
    """Read a bitsandbytes 4-bit weight (``{prefix}weight`` + its quant-state entries), bit-exactly.

    Accepts ``quant_storage`` uint8, bf16, fp16 or fp32 (the packed bytes are reinterpreted).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    p = prefix + "weight"
    packed = _need(state_dict, p)
    qs_keys = [k for k in state_dict if k.startswith(f"{p}.quant_state.bitsandbytes__")]
    if len(qs_keys) != 1:
        raise ValueError(f"expected exactly one '{p}.quant_state.bitsandbytes__nf4|fp4' entry, found {qs_keys}")
    try:
        state = json.loads(bytes(_need(state_dict, qs_keys[0]).to(torch.uint8).tolist()).decode("utf-8"))
        fmt, block = state["quant_type"], int(state["blocksize"])
        shape, dtype_name = [int(s) for s in state["shape"]], state["dtype"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{qs_keys[0]} is not a valid bitsandbytes quant state: {e}") from None
    if fmt not in ("nf4", "fp4") or not qs_keys[0].endswith(fmt):
        raise ValueError(f"quant_type={fmt!r} does not match key {qs_keys[0]!r}")
    dtype = {v: k for k, v in DTYPE_NAME.items()}.get(dtype_name)
    if dtype is None:
        raise ValueError(f"dtype={dtype_name!r} in {qs_keys[0]} is not float32/bfloat16/float16")
    if len(shape) != 2:
        raise ValueError(f"shape={shape} in {qs_keys[0]}: lowbit stores 2-D weights (N, K)")
    quant_map = _need(state_dict, f"{p}.quant_map")
    expected = _f32(NF4 if fmt == "nf4" else FP4)
    if not torch.equal(quant_map.float().cpu(), expected):
        raise ValueError(f"{p}.quant_map is not the standard {fmt} table; custom maps are not supported")
    codes = packed.contiguous().view(torch.uint8).reshape(-1)
    spec_dq = "nested_offset" in state or f"{p}.nested_absmax" in state_dict
    absmax = _need(state_dict, f"{p}.absmax")
    if not spec_dq and absmax.dtype != torch.float32:
        raise TypeError(f"{p}.absmax.dtype={absmax.dtype}: expected float32 (or uint8 with nested_* entries)")
    if spec_dq:
        nested = _need(state_dict, f"{p}.nested_absmax").float()
        if int(state.get("nested_blocksize", -1)) != NESTED_BLOCK:
            raise ValueError(f"nested_blocksize={state.get('nested_blocksize')} is not supported (lowbit uses {NESTED_BLOCK})")
        nmap = _need(state_dict, f"{p}.nested_quant_map")
        if not torch.equal(nmap.float().cpu(), dynamic_map(True)):
            raise ValueError(f"{p}.nested_quant_map is not the signed 8-bit dynamic map")
        if "nested_offset" not in state:
            raise ValueError(f"{qs_keys[0]} lacks nested_offset")
        offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32, device=codes.device)
        return QuantizedTensor(QuantSpec(fmt, block, True), shape, dtype, codes,
                               scale_q=absmax.reshape(-1).to(torch.uint8), scale_nested=nested.reshape(-1),
                               scale_offset=offset)
    return QuantizedTensor(QuantSpec(fmt, block, False), shape, dtype, codes, scale=absmax.float().reshape(-1))


# ----------------------------------------------------------------------------- safetensors
def save_file(tensors: dict, path: Union[str, os.PathLike], metadata: dict | None = None) -> None:
    """Save a dict of ``torch.Tensor`` and :class:`QuantizedTensor` values to a safetensors file.

    A QuantizedTensor ``"w"`` is stored as tensors ``"w.codes"``, ``"w.scale"``... plus its
    description in the file's metadata; :func:`load_file` rebuilds it exactly.
    """
    from safetensors.torch import save_file as st_save

    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict, got {type(tensors).__name__}")
    flat, described = {}, {}
    for name, v in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"keys must be str, got {name!r}")
        if isinstance(v, QuantizedTensor):
            described[name] = v.metadata()
            for comp, t in v.components().items():
                flat[f"{name}.{comp}"] = t.detach().cpu().contiguous()
        elif isinstance(v, torch.Tensor):
            flat[name] = v.detach().cpu().contiguous()
        else:
            raise TypeError(f"value of {name!r} must be a Tensor or QuantizedTensor, got {type(v).__name__}")
    if len(flat) != sum(len(v.components()) if isinstance(v, QuantizedTensor) else 1 for v in tensors.values()):
        raise ValueError("a tensor key collides with a component of a quantized tensor (e.g. 'w.codes' beside 'w')")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[_META_KEY] = json.dumps({"version": _FORMAT_VERSION, "quantized": described})
    st_save(flat, os.fspath(path), metadata=meta)


def load_file(path: Union[str, os.PathLike], device: str = "cpu") -> dict:
    """Load a file written by :func:`save_file` (plain safetensors files load as plain tensors)."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path={path!r} is not a file")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path!r} is not a readable safetensors file: {e}") from None
    described = {}
    if _META_KEY in meta:
        try:
            info = json.loads(meta[_META_KEY])
            described = info["quantized"]
            if info.get("version") != _FORMAT_VERSION:
                raise ValueError(f"lowbit format version {info.get('version')} (this lowbit reads {_FORMAT_VERSION})")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path!r} has corrupt lowbit metadata: {e}") from None
    out = {}
    for name, m in described.items():
        comps = {k[len(name) + 1:]: flat.pop(k) for k in list(flat) if k.startswith(name + ".")
                 and k[len(name) + 1:] in ("codes", "scale", "zero", "scale_q", "scale_nested", "scale_offset")}
        try:
            out[name] = QuantizedTensor.from_components(m, comps)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path!r}: quantized tensor {name!r} is inconsistent: {e}") from None
    out.update(flat)
    return out


# ----------------------------------------------------------------------------- models
def _module_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def quantize_model(model: torch.nn.Module, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False,
                   skip=("lm_head",), progress: bool = True, lora_init: str | None = None, r: int = 16,
                   alpha: float = 32, calib=None, iters: int = 5) -> dict:
    """Replace every ``nn.Linear`` of ``model`` in place by a :class:`lowbit.nn.QuantLinear`.

    ``skip``: module names (or name suffixes / components, e.g. ``"lm_head"``) to leave dense.
    Linears whose ``in_features`` is not a multiple of ``block_size`` are left dense and listed.
    With ``lora_init`` ("svd", "loftq", "qera", "lq_lora"; see :mod:`lowbit.init`) each layer gets a
    rank-``r`` LoRA adapter that corrects its quantization error (``calib``: token ids or model
    kwargs for QERA's activation statistics).
    Returns a report: ``{"replaced", "skipped", "incompatible", "bytes_before", "bytes_after"}``
    (+ ``"init_error"``: relative weight error per layer after the correction).
    """
    import sys

    from .nn import QuantLinear

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    QuantSpec(fmt, block_size, double_quant)  # validate once, before touching the model
    if lora_init is not None:
        from .init import apply_init

        before = _module_bytes(model)
        errors = apply_init(model, lora_init, fmt, r, alpha, block_size, double_quant, calib, skip, iters, progress)
        return {"replaced": list(errors), "init_error": errors, "bytes_before": before,
                "bytes_after": _module_bytes(model)}
    if isinstance(skip, str):
        skip = (skip,)

    def skipped(name: str) -> bool:
        parts = name.split(".")
        return any(name == s or name.endswith("." + s) or s in parts for s in skip)

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    report = {"replaced": [], "skipped": [], "incompatible": [], "bytes_before": _module_bytes(model)}
    todo = []
    for name, m in targets:
        if skipped(name):
            report["skipped"].append(name)
        elif m.in_features % block_size:
            report["incompatible"].append(name)
        else:
            todo.append(name)
    for i, name in enumerate(todo):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(getattr(parent, child), fmt, block_size, double_quant))
        report["replaced"].append(name)
        if progress:
            done = (i + 1) * 30 // len(todo)
            print(f"\rquantize_model {fmt}: [{'#' * done}{'.' * (30 - done)}] {i + 1}/{len(todo)}",
                  end="" if i + 1 < len(todo) else "\n", file=sys.stderr, flush=True)
    report["bytes_after"] = _module_bytes(model)
    if progress:
        print(f"quantize_model: {len(todo)} Linear -> QuantLinear({fmt}, block {block_size}"
              f"{', double quant' if double_quant else ''}); memory {report['bytes_before'] / 2**20:.1f} MiB -> "
              f"{report['bytes_after'] / 2**20:.1f} MiB; skipped {report['skipped']}"
              + (f"; left dense (K % block != 0): {report['incompatible']}" if report["incompatible"] else ""),
              file=sys.stderr)
    return report


# ----------------------------------------------------------------------------- PEFT adapters
_PEFT_PREFIX = "base_model.model."


def save_adapter(model: torch.nn.Module, directory: Union[str, os.PathLike], adapter_name: str = "default",
                 base_model_name_or_path: str | None = None) -> None:
    """Write one adapter of a model in PEFT's LoRA format: ``adapter_model.safetensors`` (keys
    ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``) and ``adapter_config.json``."""
    from safetensors.torch import save_file as st_save

    from .nn.lora import lora_layers

    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.lora_A}
    if not layers:
        raise ValueError(f"the model has no LoRA adapter named {adapter_name!r}")
    tensors, ranks, alphas = {}, set(), set()
    for name, m in layers.items():
        a, b = m.lora_A[adapter_name], m.lora_B[adapter_name]
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().cpu().contiguous()
        ranks.add(a.shape[0])
        alphas.add(m.scaling[adapter_name] * a.shape[0])
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"PEFT's config holds one r and one alpha; this adapter has r={sorted(ranks)}, alpha={sorted(alphas)}")
    dropouts = {float(getattr(m.dropout[adapter_name], "p", 0.0)) for m in layers.values()}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ranks.pop(), "lora_alpha": alphas.pop(),
        "lora_dropout": max(dropouts), "target_modules": sorted({n.rpartition(".")[2] for n in layers}),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
        "modules_to_save": None, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
    }
    os.makedirs(directory, exist_ok=True)
    st_save(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_adapter(model: torch.nn.Module, directory: Union[str, os.PathLike], adapter_name: str = "default") -> list[str]:
    """Load a PEFT LoRA adapter (``adapter_model.safetensors`` + ``adapter_config.json``) into a
    model: wraps the targeted modules with :class:`lowbit.nn.LoRALinear` where needed, then sets
    A and B exactly. Returns the module names loaded."""
    from safetensors.torch import load_file as st_load

    from .nn.lora import LoRALinear

    cfg_path = os.path.join(directory, "adapter_config.json")
    w_path = os.path.join(directory, "adapter_model.safetensors")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise ValueError(f"{p!r} is missing: not a PEFT adapter directory")
    with open(cfg_path) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type={config.get('peft_type')!r}: only LORA adapters are supported")
    try:
        tensors = st_load(w_path)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise ValueError(f"{w_path!r} is not a readable safetensors file: {e}") from None
    alpha, use_rslora = float(config["lora_alpha"]), bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout", 0.0))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(_PEFT_PREFIX) or not key.endswith(".weight"):
            raise ValueError(f"unexpected key {key!r} in {w_path}")
        body = key[len(_PEFT_PREFIX):-len(".weight")]
        mod, _, which = body.rpartition(".")
        if which not in ("lora_A", "lora_B"):
            raise ValueError(f"unexpected key {key!r} (only lora_A / lora_B weights are supported)")
        pairs.setdefault(mod, {})[which] = t
    loaded = []
    for mod, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"module {mod!r} has only {sorted(ab)} in {w_path}")
        try:
            m = model.get_submodule(mod)
        except AttributeError:
            raise ValueError(f"the adapter targets {mod!r}, which this model does not have") from None
        a, b = ab["lora_A"], ab["lora_B"]
        r = a.shape[0]
        if not isinstance(m, LoRALinear):
            parent_name, _, child = mod.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            m = LoRALinear(m, r, alpha, dropout, adapter_name)
            setattr(parent, child, m)
        elif adapter_name not in m.lora_A:
            m.add_adapter(adapter_name, r, alpha, dropout)
        if a.shape != m.lora_A[adapter_name].shape or b.shape != m.lora_B[adapter_name].shape:
            raise ValueError(f"{mod}: adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                             f"({m.out_features}, {m.in_features}) with r={m.lora_A[adapter_name].shape[0]}")
        with torch.no_grad():
            m.lora_A[adapter_name].copy_(a)
            m.lora_B[adapter_name].copy_(b)
        m.scaling[adapter_name] = alpha / (math.sqrt(r) if use_rslora else r)
        loaded.append(mod)
    return loaded
