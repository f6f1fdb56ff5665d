"""Checkpoints (I/O only): lowbit safetensors files, whole lowbit models (any ``nn.Module``) and PEFT LoRA
adapter directories. transformers models also save and load through ``save_pretrained`` / ``from_pretrained``
(:mod:`lowbit.hf`).

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
from .nn import HadamardAdapterLinear, LoRALinear, QuantLinear, SVDQuantLinear, lora_layers

__all__ = ["to_bnb", "from_bnb", "save_tensors", "load_tensors", "save_model", "load_model", "save_adapter",
           "load_adapter", "save_file", "load_file"]

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


# ----------------------------------------------------------------------------- whole models
MODEL_FILE = "model.safetensors"
_MODEL_META = "lowbit_model"  # metadata entry of MODEL_FILE: which modules lowbit replaced, and how


def _model_manifest(model: torch.nn.Module) -> dict:
    """What load_model needs beyond the tensors to rebuild the lowbit modules on a skeleton of plain Linears."""
    modules = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            modules[name] = {"type": "QuantLinear"}
        elif isinstance(m, SVDQuantLinear):  # its buffers are plain tensors of the state dict; the rank sizes them
            modules[name] = {"type": "SVDQuantLinear", "rank": m.rank, "dtype": str(m.l1.dtype).split(".")[-1]}
        elif isinstance(m, LoRALinear):
            if m.merged is not None:
                raise ValueError(f"{name}: adapters are merged; unmerge() before saving (a merged quantized base "
                                 f"is re-quantized and its original weight lives outside the state dict)")
            modules[name] = {"type": "LoRALinear", "active": list(m.active), "adapters": {
                a: {"scaling": m.scaling[a], "dropout": float(getattr(m.dropout[a], "p", 0.0)),
                    "dropout_module": type(m.dropout[a]).__name__} for a in m.lora_A}}
            for a, info in modules[name]["adapters"].items():
                if info["dropout_module"] not in ("Identity", "Dropout"):
                    raise ValueError(f"{name}: adapter {a!r} has a custom dropout module {info['dropout_module']}; "
                                     f"save_model stores nn.Dropout / nn.Identity only")
        elif isinstance(m, HadamardAdapterLinear):
            modules[name] = {"type": "HadamardAdapterLinear", "scale": m.scale}
    return modules


def save_model(model: torch.nn.Module, directory: Union[str, os.PathLike], *, state_dict: dict | None = None) -> str:
    """Write a model with lowbit layers (QuantLinear, SVDQuantLinear, LoRALinear, HadamardAdapterLinear) to
    ``directory/model.safetensors``: its state dict with each QuantLinear's weight as a QuantizedTensor
    (:func:`save_tensors`: exact bytes + format; an SVDQuantLinear's buffers are plain tensors), plus a
    description of the lowbit modules in the file's metadata. :func:`load_model` rebuilds the model on a skeleton of the original architecture. Works for
    any ``nn.Module`` (no transformers needed). Tensors shared between entries (tied weights) are stored once
    and tied again on load. Returns the file's path.

    ``state_dict``: the tensors to write instead of the model's own (the full state dict that
    :func:`lowbit.distributed.full_state_dict` gathers from a sharded model, whose modules then only
    describe the structure)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if state_dict is not None and not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    modules = _model_manifest(model)
    quantized = {n for n, info in modules.items() if info["type"] == "QuantLinear"}
    tensors, aliases, seen = {}, {}, {}
    for key, v in (model.state_dict(keep_vars=True) if state_dict is None else state_dict).items():
        owner, _, leaf = key.rpartition(".")
        if owner in quantized and leaf != "bias":
            continue  # the weight's components and format: written once below as a QuantizedTensor
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(v).__name__}, not a tensor")
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype) \
            if v.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = v.detach()
    for name in quantized:
        m = model.get_submodule(name)
        if state_dict is None:
            tensors[f"{name}.weight"] = m.weight
            continue
        comps = {c: state_dict[f"{name}.{c}"] for c in _COMPONENT_NAMES if f"{name}.{c}" in state_dict}
        try:
            tensors[f"{name}.weight"] = QuantizedTensor(m.spec, (m.out_features, m.in_features), m.weight_dtype, **comps)
        except (ValueError, TypeError) as e:
            raise ValueError(f"state_dict does not hold the quantized weight of {name!r}: {e}") from None
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MODEL_FILE)
    # (a quantized weight's components are frozen parameters after lowbit.distributed.prepare_model: not listed)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad
              and not (n.rpartition(".")[0] in quantized and n.rpartition(".")[2] in _COMPONENT_NAMES)]
    save_tensors(tensors, path, metadata={_MODEL_META: json.dumps({"version": _FORMAT_VERSION, "modules": modules,
                                                                    "aliases": aliases, "frozen": frozen})})
    return path


def load_model(directory: Union[str, os.PathLike], model_skeleton: torch.nn.Module) -> torch.nn.Module:
    """Load what :func:`save_model` wrote into ``model_skeleton`` — the architecture as built before lowbit
    touched it (plain ``nn.Linear`` where QuantLinears were; parameters on any device, "meta" included:
    nothing is computed from them) — and return it: the same modules, bit-identical tensors, the same
    adapters, scales, active adapters and tied parameters. Every entry of the file must land in the model and
    every tensor of the model must come from the file (ValueError otherwise)."""
    from safetensors import safe_open

    if not isinstance(model_skeleton, torch.nn.Module):
        raise TypeError(f"model_skeleton must be an nn.Module, got {type(model_skeleton).__name__}")
    path = os.path.join(os.fspath(directory), MODEL_FILE)
    tensors = load_tensors(path)
    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get(_MODEL_META)
    if raw is None:
        raise ValueError(f"{path!r} was not written by lowbit.save_model (no {_MODEL_META!r} metadata)")
    try:
        info = json.loads(raw)
        modules, aliases, frozen = dict(info["modules"]), dict(info["aliases"]), set(info["frozen"])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path!r} has corrupt {_MODEL_META!r} metadata: {e}") from None
    if info.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path!r}: lowbit model format version={info.get('version')!r} (this lowbit reads "
                         f"{_FORMAT_VERSION})")
    model = model_skeleton

    def linear_at(name):
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the saved model has a lowbit layer at {name!r}; the skeleton has no such module") from None
        if type(m) is not torch.nn.Linear:
            raise ValueError(f"the saved model has a lowbit layer at {name!r}; the skeleton has {type(m).__name__} "
                             f"there (expected the original nn.Linear)")
        return m

    def quant_linear(name, lin):
        qt = tensors.pop(f"{name}.weight", None)
        if not isinstance(qt, QuantizedTensor):
            raise ValueError(f"{path!r} lacks the quantized weight of {name!r}")
        if tuple(qt.shape) != (lin.out_features, lin.in_features):
            raise ValueError(f"{name}: saved weight {tuple(qt.shape)} does not fit the skeleton's "
                             f"({lin.out_features}, {lin.in_features}) Linear")
        q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, qt.fmt, qt.block_size,
                        qt.double_quant, dtype=qt.dtype, device="meta")
        q.set_weight(qt)
        return q

    def svdquant_linear(name, lin):
        info = modules[name]
        rank, dtype = info.get("rank"), _SVDQ_DTYPES.get(info.get("dtype"))
        if isinstance(rank, bool) or not isinstance(rank, int) or dtype is None:
            raise ValueError(f"{path!r}: SVDQuantLinear {name!r} has a corrupt description {info!r}")
        try:  # buffers on "meta": load_state_dict(assign=True) below puts the file's tensors in their place
            return SVDQuantLinear(lin.in_features, lin.out_features, lin.bias is not None, rank, dtype, device="meta")
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path!r}: SVDQuantLinear {name!r} does not fit the skeleton's Linear: {e}") from None

    builders = {"QuantLinear": quant_linear, "SVDQuantLinear": svdquant_linear}
    adapters = {n: i for n, i in modules.items() if i.get("type") in ("LoRALinear", "HadamardAdapterLinear")}
    for name, i in modules.items():
        t = i.get("type")
        if t not in ("QuantLinear", "SVDQuantLinear", "LoRALinear", "HadamardAdapterLinear"):
            raise ValueError(f"{path!r}: module {name!r} has unknown type {t!r}")
        if t in builders and _module_of_base(name) not in adapters:
            replace_modules(model, [name], lambda n, m, t=t: builders[t](n, linear_at(n)))
    for name, i in adapters.items():
        lin = linear_at(name)
        base_type = modules.get(f"{name}.base", {}).get("type")
        base = builders[base_type](f"{name}.base", lin) if base_type in builders else lin
        if i["type"] == "HadamardAdapterLinear":
            support, values = tensors.get(f"{name}.support"), tensors.get(f"{name}.values")
            if support is None or values is None:
                raise ValueError(f"{path!r} lacks the support/values of the QWHA adapter {name!r}")
            layer = HadamardAdapterLinear(base, scale=float(i["scale"]), support=support, values=values)
        else:
            names = list(i["adapters"])
            if not names:
                raise ValueError(f"{path!r}: LoRA layer {name!r} lists no adapters")
            layer = None
            for a in names:
                la = tensors.get(f"{name}.lora_A.{a}")
                if la is None:
                    raise ValueError(f"{path!r} lacks {name}.lora_A.{a}")
                r, p = la.shape[0], float(i["adapters"][a]["dropout"])
                if layer is None:
                    layer = LoRALinear(base, r, 1.0, p, a)
                else:
                    layer.add_adapter(a, r, 1.0, p)
                layer.scaling[a] = float(i["adapters"][a]["scaling"])
            layer.set_adapter(list(i["active"]))
        replace_modules(model, [name], lambda n, m, layer=layer: layer)
    # everything else (and the biases, LoRA factors, QWHA values) through load_state_dict, strictly
    plain = {k: v for k, v in tensors.items() if not isinstance(v, QuantizedTensor)}
    leftover = sorted(k for k, v in tensors.items() if isinstance(v, QuantizedTensor))
    if leftover:
        raise ValueError(f"{path!r} has quantized weights {leftover[:4]} for modules it does not describe")
    for key, src in aliases.items():
        if src not in plain:
            raise ValueError(f"{path!r}: {key!r} is tied to {src!r}, which the file does not hold")
        plain[key] = plain[src]
    own = {k for n, m in model.named_modules() if isinstance(m, QuantLinear)
           for k in (f"{n}.{c}" for c in (*_COMPONENT_NAMES, "_extra_state"))}
    expected = set(model.state_dict())
    missing = sorted(expected - set(plain) - own)
    unexpected = sorted(set(plain) - expected)
    if missing or unexpected:
        raise ValueError(f"{path!r} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.load_state_dict(plain, strict=False, assign=True)
    for key, src in aliases.items():  # tie again what was one tensor when saved
        owner, _, leaf = key.rpartition(".")
        sowner, _, sleaf = src.rpartition(".")
        src_mod = model.get_submodule(sowner) if sowner else model
        dst_mod = model.get_submodule(owner) if owner else model
        shared = getattr(src_mod, sleaf)
        if isinstance(shared, torch.nn.Parameter):
            dst_mod.register_parameter(leaf, shared)
        else:
            dst_mod.register_buffer(leaf, shared, persistent=True)
    for n, p in model.named_parameters():  # which parameters train (add_lora froze the rest)
        p.requires_grad_(n not in frozen)
    return model


_SVDQ_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _module_of_base(name: str) -> str:
    """``"x.base"`` -> ``"x"`` (the adapter owning a base), anything else -> ``""``."""
    owner, _, leaf = name.rpartition(".")
    return owner if leaf == "base" else ""


# ----------------------------------------------------------------------------- PEFT adapters
_PEFT_PREFIX = "base_model.model."


def save_adapter(model: torch.nn.Module, directory: Union[str, os.PathLike], adapter_name: str = "default",
                 base_model_name_or_path: str | None = None, *, state_dict: dict | None = None) -> None:
    """Write one adapter of a model in PEFT's LoRA format: ``adapter_model.safetensors`` (keys
    ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``) and ``adapter_config.json``.

    ``base_model_name_or_path`` (what PEFT's ``AutoPeftModel*.from_pretrained`` loads the base from) defaults to
    the model's own: ``model.config.name_or_path`` of a transformers model (its hub id or the directory it was
    loaded from); it stays null only for a model that has none (pass it then)."""
    from safetensors.torch import save_file as st_save

    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str, got {type(base_model_name_or_path).__name__}")

    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.lora_A}
    if not layers:
        raise ValueError(f"the model has no LoRA adapter named {adapter_name!r}")
    tensors, ranks, alphas = {}, set(), set()
    for name, m in layers.items():
        a, b = m.lora_A[adapter_name], m.lora_B[adapter_name]
        if state_dict is not None:
            a, b = (state_dict[f"{name}.lora_{x}.{adapter_name}"] for x in "AB")
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
    # PEFT options lowbit's LoRALinear cannot reproduce: refused, never ignored (the outputs would differ)
    for key, harmless in (("use_dora", False), ("lora_bias", False), ("alpha_pattern", {}), ("modules_to_save", None),
                          ("fan_in_fan_out", False)):
        if config.get(key, harmless) not in (harmless, None, [], {}):
            raise ValueError(f"{key}={config[key]!r} in {cfg_path}: lowbit's LoRA supports plain LoRA only")
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
