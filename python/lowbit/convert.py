"""Checkpoints (I/O only): lowbit safetensors files and PEFT LoRA adapter directories.

bitsandbytes ``Linear4bit`` interchange (:func:`to_bnb`, :func:`from_bnb`) is format data and lives in
:mod:`lowbit.formats`; it is re-exported here.
"""

from __future__ import annotations

import json
import math
import os
from typing import Union

import torch

from . import _deprecated
from .formats import QuantizedTensor, finite_float, from_bnb, json_loads, to_bnb
from .model import replace_modules
from .nn import LoRALinear, lora_layers

__all__ = ["to_bnb", "from_bnb", "save_tensors", "load_tensors", "save_adapter", "load_adapter", "save_file",
           "load_file"]

_META_KEY = "lowbit"  # safetensors metadata entry holding the quantized tensors' descriptions
_FORMAT_VERSION = 1
_COMPONENT_NAMES = ("codes", "scale", "zero", "scale_q", "scale_nested", "scale_offset")  # QuantizedTensor.components()


# ----------------------------------------------------------------------------- safetensors
def save_tensors(tensors: dict, path: Union[str, os.PathLike], metadata: dict | None = None) -> None:
    """Save a dict of ``torch.Tensor`` and :class:`QuantizedTensor` values to a safetensors file.

    A QuantizedTensor ``"w"`` is stored as tensors ``"w.codes"``, ``"w.scale"``... plus its
    description in the file's metadata; :func:`load_tensors` rebuilds it exactly. What this accepts
    loads back exactly, so it refuses (ValueError) a plain tensor named like a component of a
    quantized one (``"w.zero"`` beside ``"w"``), the name ``"__metadata__"`` and the metadata key
    ``"lowbit"``; ``metadata`` is str: str. (Named apart from ``safetensors.torch.save_file``, which
    takes plain tensors only.)
    """
    from safetensors.torch import save_file as st_save

    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict, got {type(tensors).__name__}")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    # Refuse here what load_tensors could not give back exactly: saved data that cannot be loaded is lost.
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata entries must be str: str (safetensors stores strings), got {k!r}: {v!r}")
    if _META_KEY in (metadata or {}):
        raise ValueError(f"metadata key {_META_KEY!r} is reserved for lowbit's description of the quantized tensors")
    quantized = {name for name, v in tensors.items() if isinstance(v, QuantizedTensor)}
    flat, described = {}, {}
    for name, v in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"keys must be str, got {name!r}")
        if isinstance(v, QuantizedTensor):
            described[name] = v.metadata()
            for comp, t in v.components().items():
                flat[f"{name}.{comp}"] = t.detach().cpu().contiguous()
        elif isinstance(v, torch.Tensor):
            owner, _, comp = name.rpartition(".")
            if comp in _COMPONENT_NAMES and owner in quantized:
                raise ValueError(f"tensor key {name!r} is reserved for the {comp!r} component of the quantized "
                                 f"tensor {owner!r}; rename one of them")
            if name == "__metadata__":
                raise ValueError(f"tensor key {name!r} is reserved by the safetensors header")
            flat[name] = v.detach().cpu().contiguous()
        else:
            raise TypeError(f"value of {name!r} must be a Tensor or QuantizedTensor, got {type(v).__name__}")
    meta = dict(metadata or {})
    meta[_META_KEY] = json.dumps({"version": _FORMAT_VERSION, "quantized": described})
    st_save(flat, os.fspath(path), metadata=meta)


def load_tensors(path: Union[str, os.PathLike], device: str = "cpu") -> dict:
    """Load a file written by :func:`save_tensors` (plain safetensors files load as plain tensors)."""
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
        info = json_loads(f"{path!r} has corrupt lowbit metadata", meta[_META_KEY])
        if not isinstance(info, dict) or not isinstance(info.get("quantized"), dict):
            raise ValueError(f"{path!r} has corrupt lowbit metadata: expected an object with a 'quantized' object, "
                             f"got {meta[_META_KEY][:200]!r}")
        version = info.get("version")
        if isinstance(version, bool) or version != _FORMAT_VERSION:
            raise ValueError(f"{path!r}: lowbit format version={version!r} (this lowbit reads {_FORMAT_VERSION})")
        described = info["quantized"]
    parts = {name: {c: f"{name}.{c}" for c in _COMPONENT_NAMES if f"{name}.{c}" in flat} for name in described}
    parts = {name: {c: flat.pop(k) for c, k in keys.items()} for name, keys in parts.items()}
    both = sorted(set(described) & set(flat))
    if both:
        raise ValueError(f"{path!r}: {both} are both plain and quantized tensors")
    out = {}
    for name, m in described.items():
        try:
            out[name] = QuantizedTensor.from_components(m, parts[name])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path!r}: quantized tensor {name!r} is inconsistent: {e}") from None
    out.update(flat)
    return out


# ----------------------------------------------------------------------------- PEFT adapters
_PEFT_PREFIX = "base_model.model."


def save_adapter(model: torch.nn.Module, directory: Union[str, os.PathLike], adapter_name: str = "default",
                 base_model_name_or_path: str | None = None) -> None:
    """Write one adapter of a model in PEFT's LoRA format: ``adapter_model.safetensors`` (keys
    ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``) and ``adapter_config.json``."""
    from safetensors.torch import save_file as st_save

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

    cfg_path = os.path.join(directory, "adapter_config.json")
    w_path = os.path.join(directory, "adapter_model.safetensors")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise ValueError(f"{p!r} is missing: not a PEFT adapter directory")
    with open(cfg_path, "rb") as f:
        config = json_loads(f"{cfg_path!r} is not a PEFT adapter config", f.read())
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path!r} holds a JSON {type(config).__name__}, expected an object")
    if "lora_alpha" not in config:
        raise ValueError(f"{cfg_path!r} lacks lora_alpha")
    for field, default in (("lora_alpha", None), ("lora_dropout", 0.0)):
        v = config.get(field, default)
        if finite_float(v) is None:
            raise ValueError(f"{cfg_path!r}: {field}={v!r} must be a finite number")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{cfg_path!r}: use_rslora={config['use_rslora']!r} must be true or false")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type={config.get('peft_type')!r}: only LORA adapters are supported")
    try:
        tensors = st_load(w_path)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise ValueError(f"{w_path!r} is not a readable safetensors file: {e}") from None
    alpha, use_rslora = float(config["lora_alpha"]), config.get("use_rslora", False)
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
            replace_modules(model, [mod], lambda name, base: LoRALinear(base, r, alpha, dropout, adapter_name))
            m = model.get_submodule(mod)
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


# ------------------------------------------------------------------------- deprecated spellings
# lowbit.save_file / load_file reused safetensors' names for another meaning (QuantizedTensor values in and out)
save_file = _deprecated.alias(save_tensors, "lowbit.save_file", "lowbit.save_tensors")
load_file = _deprecated.alias(load_tensors, "lowbit.load_file", "lowbit.load_tensors")
