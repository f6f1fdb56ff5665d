"""Hugging Face front door: lowbit as a transformers quantization method, bitsandbytes 4-bit checkpoints,
and PEFT LoRA on lowbit layers.

* :class:`LowbitConfig` — ``AutoModelForCausalLM.from_pretrained(path, quantization_config=LowbitConfig(...))``
  quantizes each targeted ``nn.Linear`` as its weight is read (the model skeleton sits on the meta device, so
  the fp weights of the whole model are never in memory together); ``model.save_pretrained(dir)`` writes the
  quantized weights and the config; ``from_pretrained(dir)`` rebuilds the QuantLinears from their bytes.
* :func:`from_pretrained` — the same, and a bitsandbytes 4-bit checkpoint (``BitsAndBytesConfig(load_in_4bit=True)``
  in its config.json) loads straight into QuantLinears, bit-exactly (:func:`lowbit.from_bnb`).
* :func:`register_peft` — ``peft.get_peft_model(model, register_peft(LoraConfig(...)))`` wraps QuantLinears in
  :class:`LowbitLoraLinear` (PEFT's custom-module registration), which runs on lowbit's fused low-rank kernel.

Importing this module imports transformers and registers the ``"lowbit"`` quantization method (idempotent);
``import lowbit`` alone does not (transformers takes seconds to import). A transformers model quantized by
:func:`lowbit.quantize_model` / :func:`lowbit.add_lora` / :func:`lowbit.add_qwha` is given the same quantizer
(:func:`attach`), so its ``save_pretrained`` writes the same checkpoint.

**Checkpoint layout** (safetensors, written by ``save_pretrained``): for a QuantLinear ``X``, ``X.weight`` holds
the codes (uint8 ``(N, K·bits/8)``, canonical layout, exact bytes) and ``X.weight.<component>`` the rest
(``scale`` or ``scale_q``/``scale_nested``/``scale_offset``, ``zero``); ``X.bias`` as usual. config.json's
``quantization_config`` (``quant_method: "lowbit"``) lists every quantized module with its format
(``modules``: ``QuantizedTensor.metadata()``). A reader that does not know lowbit fails loudly: the codes sit
under ``X.weight`` with a shape no dense Linear has, and transformers refuses mismatched shapes — so a lowbit
checkpoint never loads as random weights.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import ops
from .formats import DTYPE_NAME, QuantizedTensor, QuantSpec, from_bnb, parse_metadata
from .model import replace_modules, select_modules
from .nn import HadamardAdapterLinear, LoRALinear, QuantLinear, SVDQuantLinear

__all__ = ["LowbitConfig", "LowbitHfQuantizer", "from_pretrained", "attach", "register_peft", "LowbitLoraLinear",
           "PRECISIONS", "CHECKPOINT_FORMATS"]

QUANT_METHOD = "lowbit"
PRECISIONS = ("highest", "high", "medium")
CHECKPOINT_FORMATS = ("lowbit", "bitsandbytes")
FORMAT_VERSION = 1
_COMPONENTS = ("scale", "zero", "scale_q", "scale_nested", "scale_offset")  # beside the codes, under X.weight.<c>
_BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                 "quant_state.bitsandbytes__fp4")


def _names(arg, what: str) -> Optional[tuple[str, ...]]:
    if arg is None:
        return None
    arg = (arg,) if isinstance(arg, str) else arg
    if not isinstance(arg, (list, tuple)) or not all(isinstance(s, str) and s for s in arg):
        raise TypeError(f"{what}={arg!r} must be a str or a list of non-empty str")
    return tuple(arg)


# ----------------------------------------------------------------------------------- config
class LowbitConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a lowbit model (``quant_method: "lowbit"``).

    ``fmt``, ``block_size``, ``double_quant``: the format each targeted Linear is quantized to on load.
    ``target_modules``: last name components to quantize (None: every Linear); ``skip``: names or runs of name
    components to leave dense (:func:`lowbit.model.matches`); Linears tied to another weight, those in the
    model's ``_keep_in_fp32_modules`` and those whose in_features is not a multiple of ``block_size`` stay
    dense too. ``precision``: the lowbit matmul precision policy to set when the model loads ("highest",
    "high", "medium"; None leaves it alone; process-wide, see ``lowbit.set_matmul_precision``).
    ``modules`` and ``checkpoint_format`` describe a saved checkpoint (written by ``save_pretrained``,
    :meth:`from_bnb`); leave them alone.
    """

    def __init__(self, fmt: str = "nf4", block_size: int = 64, double_quant: bool = True, skip=("lm_head",),
                 target_modules=None, precision: Optional[str] = None, modules: Optional[dict] = None,
                 checkpoint_format: str = "lowbit", format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        spec = QuantSpec(fmt, block_size, double_quant)  # validates, names the bad value
        self.fmt, self.block_size, self.double_quant = spec.fmt, spec.block_size, spec.double_quant
        self.skip = list(_names(skip, "skip") or ())
        targets = _names(target_modules, "target_modules")
        self.target_modules = None if targets is None else list(targets)
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not one of {PRECISIONS} (or None)")
        self.precision = precision
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"checkpoint_format={checkpoint_format!r} is not one of {CHECKPOINT_FORMATS}")
        self.checkpoint_format = checkpoint_format
        if isinstance(format_version, bool) or format_version != FORMAT_VERSION:
            raise ValueError(f"format_version={format_version!r}: this lowbit reads lowbit checkpoints of version "
                             f"{FORMAT_VERSION}")
        self.format_version = FORMAT_VERSION
        if modules is not None:
            if not isinstance(modules, dict):
                raise TypeError(f"modules must be a dict of module name to format metadata, got {type(modules).__name__}")
            for name, meta in modules.items():
                parse_metadata(meta, f"quantization_config.modules[{name!r}]")
        self.modules = modules
        unknown = sorted(k for k in kwargs if k != "quant_method")
        if unknown:
            raise ValueError(f"LowbitConfig got unknown fields {unknown}")

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.fmt, self.block_size, self.double_quant)

    @classmethod
    def from_bnb(cls, bnb_config=None, **kwargs) -> "LowbitConfig":
        """A config that reads a bitsandbytes 4-bit checkpoint: ``bnb_config`` is its ``BitsAndBytesConfig``
        (or the dict in its config.json). The format of each layer is read from the checkpoint's quant states;
        nf4/fp4 and double quant from the config are the defaults for layers quantized later."""
        d = {}
        if bnb_config is not None:
            d = bnb_config if isinstance(bnb_config, dict) else bnb_config.to_dict()
            if not d.get("load_in_4bit", False):
                raise ValueError(f"bnb_config is not a 4-bit bitsandbytes config (load_in_4bit="
                                 f"{d.get('load_in_4bit')!r}); lowbit reads 4-bit checkpoints only")
        fmt = d.get("bnb_4bit_quant_type", "nf4")
        kwargs.setdefault("fmt", fmt)
        kwargs.setdefault("double_quant", bool(d.get("bnb_4bit_use_double_quant", False)))
        kwargs.setdefault("skip", list(d.get("llm_int8_skip_modules") or ["lm_head"]))
        return cls(checkpoint_format="bitsandbytes", **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "fmt": self.fmt, "block_size": self.block_size,
                "double_quant": self.double_quant, "skip": list(self.skip), "target_modules": self.target_modules,
                "precision": self.precision, "checkpoint_format": self.checkpoint_format,
                "format_version": self.format_version, "modules": self.modules}


# -------------------------------------------------------------------------------- quantizer
def _module_of(key: str) -> str:
    return key.rpartition(".")[0]


def _bnb_plan(checkpoint_files) -> dict[str, dict]:
    """``{module: metadata}`` of every 4-bit layer of a bitsandbytes checkpoint, read from its quant states
    (small uint8 tensors: nothing else is read)."""
    from safetensors import safe_open

    plan = {}
    for path in checkpoint_files or ():
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"checkpoint file {path!r}: lowbit reads bitsandbytes checkpoints in safetensors only")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                head, sep, fmt = key.rpartition(".weight.quant_state.bitsandbytes__")
                if not sep:
                    continue
                raw = f.get_tensor(key)
                try:
                    state = json.loads(bytes(raw.reshape(-1).tolist()).decode("utf-8"))
                    meta = {"fmt": state["quant_type"], "block_size": state["blocksize"],
                            "double_quant": "nested_offset" in state, "shape": state["shape"], "dtype": state["dtype"]}
                    parse_metadata(meta, key)
                except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
                    raise ValueError(f"{path}: {key} is not a valid bitsandbytes quant state: {e}") from None
                if meta["fmt"] != fmt:
                    raise ValueError(f"{path}: quant_type={meta['fmt']!r} does not match key {key!r}")
                plan[head] = meta
    if not plan:
        raise ValueError("the checkpoint has no bitsandbytes 4-bit layers (no '*.weight.quant_state.bitsandbytes__nf4"
                         "|fp4' entries): it is not a 4-bit bitsandbytes checkpoint")
    return plan


class _Op(ConversionOps):
    """Base of lowbit's loading ops. ``hf_quantizer`` tells transformers the op reads the checkpoint tensors
    itself (so it casts none of them); the reverse (at save time) is the identity: ``save_pretrained`` gets the
    checkpoint layout from :meth:`LowbitHfQuantizer.get_state_dict_and_metadata`."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo):
        # transformers deep-copies a converter per layer: the copies must share the one quantizer (its plan and
        # the record of what was loaded), not clone it
        return type(self)(self.hf_quantizer)

    @property
    def reverse_op(self) -> ConversionOps:
        return _Identity(self.hf_quantizer)


class _Identity(_Op):
    def convert(self, input_dict, source_patterns=None, target_patterns=None, **kwargs):
        return input_dict


class _Install(_Op):
    """Turns the checkpoint tensors of one layer into its QuantizedTensor and installs it in the QuantLinear
    that preprocessing put there: an fp weight is quantized (quantize on load), lowbit components are read
    as they are, bitsandbytes entries through :func:`lowbit.from_bnb`. Returns nothing for transformers to set."""

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                missing_keys=None, **kwargs):
        q = self.hf_quantizer
        name = _module_of(full_layer_name)
        module = model.get_submodule(name)
        t = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        meta = q.plan[name]
        spec, shape, dtype = parse_metadata(meta, f"{name}")
        if not q.pre_quantized:
            w = t.pop("weight")
            if tuple(w.shape) != tuple(shape):
                raise ValueError(f"{name}.weight has shape {tuple(w.shape)}, expected {tuple(shape)}")
            qt = ops.quantize(w if w.dtype in DTYPE_NAME else w.float(), spec)
        elif q.quantization_config.checkpoint_format == "bitsandbytes":
            qt = from_bnb(t, "")  # validates every entry it reads; the converter collects only bnb's names
            t = {}
        else:
            codes = t.pop("weight")
            comps = {c: t.pop(f"weight.{c}") for c in _COMPONENTS if f"weight.{c}" in t}
            qt = QuantizedTensor(spec, shape, dtype, codes, **comps)
        if t:
            raise ValueError(f"{name}: unexpected checkpoint entries {sorted(t)} for a {spec} layer")
        if (qt.spec, list(qt.shape)) != (spec, list(shape)):
            raise ValueError(f"{name}: the checkpoint holds a {list(qt.shape)} {qt.spec} weight; the config says "
                             f"{list(shape)} {spec}")
        module.set_weight(qt)
        q.plan[name] = qt.metadata()  # on load: the dtype the weight was read in
        module._is_hf_initialized = True
        for key in list(module.state_dict(keep_vars=True)):
            if key != "bias" and missing_keys is not None:
                missing_keys.discard(f"{name}.{key}")
        q.loaded.add(name)
        return {}


class LowbitHfQuantizer(HfQuantizer):
    """transformers' side of lowbit (registered as ``"lowbit"``): replaces the targeted Linears of the meta
    skeleton by QuantLinears, fills each from its checkpoint entries as they are read (:class:`_Install`),
    writes the checkpoint layout on ``save_pretrained`` and checks, after loading, that every QuantLinear got
    its weight (a missing or broken entry raises instead of leaving garbage)."""

    requires_calibration = False
    quantization_config: LowbitConfig

    def __init__(self, quantization_config, **kwargs):
        if isinstance(quantization_config, dict):
            quantization_config = LowbitConfig.from_dict(quantization_config)
        super().__init__(quantization_config, **kwargs)
        self.plan: dict[str, dict] = {}  # module name -> QuantizedTensor.metadata() of the weight it will hold
        self.loaded: set[str] = set()
        self.dtype = torch.float32

    # ---- before loading
    def update_dtype(self, dtype):
        return torch.float32 if dtype is None else dtype

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("lowbit models cannot be offloaded to disk (device_map has 'disk')")

    def preprocess_model(self, model, dtype=None, **kwargs):
        self.dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
        return super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        if self.pre_quantized and cfg.checkpoint_format == "bitsandbytes":
            plan = _bnb_plan(checkpoint_files)
        elif self.pre_quantized:
            if not cfg.modules:
                raise ValueError("this lowbit checkpoint's quantization_config lists no quantized modules "
                                 "(quantization_config.modules is empty): it cannot be loaded")
            plan = dict(cfg.modules)
        else:
            dtype = DTYPE_NAME.get(self.dtype, "float32")  # the weights' dtype as read (QuantLinear computes in x's)
            plan = {n: {"fmt": cfg.fmt, "block_size": cfg.block_size, "double_quant": cfg.double_quant,
                        "shape": [m.out_features, m.in_features], "dtype": dtype}
                    for n, m in ((n, model.get_submodule(n)) for n in self._targets(model))}
        for name, meta in plan.items():
            spec, shape, dtype = parse_metadata(meta, f"quantization_config.modules[{name!r}]")
            try:
                m = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"the checkpoint quantizes {name!r}, which this model does not have") from None
            if type(m) is not nn.Linear or [m.out_features, m.in_features] != list(shape):
                raise ValueError(f"the checkpoint holds a {list(shape)} quantized weight for {name!r}, but the model "
                                 f"has {m!r} there")
        replace_modules(model, list(plan), lambda n, m: QuantLinear(
            m.in_features, m.out_features, m.bias is not None, *_spec_args(plan[n]), device="meta"))
        self.plan, self.loaded = plan, set()

    def _targets(self, model) -> list[str]:
        cfg = self.quantization_config
        tied = set()
        for k, v in getattr(model, "all_tied_weights_keys", {}).items():
            tied |= {_module_of(k), _module_of(v)}
        keep = list(getattr(model, "_keep_in_fp32_modules", None) or ())
        names = select_modules(model, nn.Linear, cfg.target_modules, tuple(cfg.skip) + tuple(keep))
        return [n for n in names if n not in tied and model.get_submodule(n).in_features % cfg.block_size == 0]

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        # only the fp weights read on load go through the quantize op (the key is the renamed one: X.codes)
        return not self.pre_quantized and param_name.endswith(".codes") and _module_of(param_name) in self.plan

    def get_quantize_ops(self):
        return _Install(self)

    def get_weight_conversions(self):
        # X.weight (+ X.weight.<component>) in the checkpoint -> the QuantLinear's codes: the checkpoint's names
        # differ from the module's on purpose (see the module docstring), one converter collects a layer's entries
        if not self.pre_quantized:
            return [WeightConverter(["weight"], "codes", [_Identity(self)])]
        comps = _BNB_SUFFIXES if self.quantization_config.checkpoint_format == "bitsandbytes" else _COMPONENTS
        return [WeightConverter(["weight"] + [f"weight.{c}" for c in comps], "codes", [_Install(self)])]

    def update_weight_conversions(self, weight_conversions, model):
        return list(weight_conversions) + self.get_weight_conversions()

    # ---- after loading
    def _process_model_after_weight_loading(self, model, **kwargs):
        missing = sorted(set(self.plan) - self.loaded)
        if missing:
            raise ValueError(f"{len(missing)} quantized layers got no weight from the checkpoint "
                             f"({missing[:8]}{' ...' if len(missing) > 8 else ''}): its entries are missing or "
                             f"malformed (see the loading report above); refusing to return uninitialised weights")
        if not self.pre_quantized:  # what save_pretrained will write, so a reload needs no guessing
            self.quantization_config.modules = dict(self.plan)
        _apply_precision(self.quantization_config.precision)
        model.is_loaded_in_lowbit = True
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters train on the frozen quantized base (register_peft, lowbit.add_lora)

    def get_state_dict_and_metadata(self, model):
        """The checkpoint layout of the module docstring, and ``quantization_config.modules`` brought up to date
        from the model as it is now (what is saved is what is there)."""
        adapters = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, HadamardAdapterLinear))]
        if adapters:
            raise ValueError(f"save_pretrained writes the quantized base model; {adapters[:4]} carry lowbit adapters. "
                             f"Save them with lowbit.save_adapter(model, dir) (or save everything with "
                             f"lowbit.save_model) instead")
        w4a4 = [n for n, m in model.named_modules() if isinstance(m, SVDQuantLinear)]
        if w4a4:
            raise ValueError(f"save_pretrained has no checkpoint layout for SVDQuant (w4a4) layers ({w4a4[:4]}); "
                             f"save the model with lowbit.save_model(model, dir) and load it with lowbit.load_model")
        quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        sd = {}
        for key, v in model.state_dict().items():
            owner, _, leaf = key.rpartition(".")
            if owner in quantized and leaf != "bias":
                continue
            sd[key] = v
        modules = {}
        for name, m in quantized.items():
            qt = m.weight
            sd[f"{name}.weight"] = qt.codes
            for c, t in qt.components().items():
                if c != "codes":
                    sd[f"{name}.weight.{c}"] = t
            modules[name] = qt.metadata()
        cfg = self.quantization_config
        cfg.modules, cfg.checkpoint_format = modules, "lowbit"
        model.config.quantization_config = cfg
        return sd, {"lowbit_format": str(FORMAT_VERSION)}

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: every QuantLinear becomes an ``nn.Linear`` holding its dequantized weight."""
        def build(name, m):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                            dtype=dtype or m.weight_dtype)
            with torch.no_grad():
                lin.weight.copy_(m.weight.dequantize(lin.weight.dtype))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            return lin

        replace_modules(model, select_modules(model, QuantLinear), build)
        return model


def _spec_args(meta: dict):
    spec, _, dtype = parse_metadata(meta)
    return spec.fmt, spec.block_size, spec.double_quant, dtype


def _apply_precision(precision: Optional[str]) -> None:
    if precision is None:
        return
    setter = getattr(ops, "set_matmul_precision", None)
    if setter is None:
        raise ValueError(f"precision={precision!r}: this lowbit has no matmul precision policy "
                         f"(lowbit.set_matmul_precision); use precision=None")
    setter(precision)


def _register() -> None:
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LowbitConfig:
        if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:  # a reloaded lowbit.hf (importlib.reload, tests)
            del AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]
        register_quantization_config(QUANT_METHOD)(LowbitConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LowbitHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)


_register()


# ------------------------------------------------------------------------------ entry points
def attach(model: nn.Module) -> nn.Module:
    """Give a transformers model whose Linears lowbit replaced (``quantize_model``, ``add_lora(fmt=...)``,
    ``add_qwha``) the lowbit quantizer, so ``save_pretrained`` writes a lowbit checkpoint. Called by those
    functions; a model that is not a transformers ``PreTrainedModel`` is returned untouched."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return model
    q = getattr(model, "hf_quantizer", None)
    if isinstance(q, LowbitHfQuantizer):
        return model
    if q is not None and not _dense_quant_method(q.quantization_config):
        raise ValueError(f"the model is already quantized by transformers ({q.quantization_config.quant_method}); "
                         f"lowbit cannot quantize it further")
    first = next((m for m in model.modules() if isinstance(m, QuantLinear)), None)
    spec = first.spec if first is not None else QuantSpec("nf4", 64, True)
    cfg = LowbitConfig(spec.fmt, spec.block_size, spec.double_quant, modules={})
    q = LowbitHfQuantizer(cfg, pre_quantized=True)
    model.hf_quantizer = q
    model.config.quantization_config = cfg
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_is_quantized"):
            m.config._is_quantized = True
    return model


def _dense_quant_method(cfg) -> bool:
    """Whether a transformers quantization config leaves dense weights: GGUF files are dequantized on load, and
    a model loaded from one and saved keeps ``quant_method: "gguf"`` in its config.json."""
    method = cfg.get("quant_method") if isinstance(cfg, dict) else getattr(cfg, "quant_method", None)
    return str(getattr(method, "value", method)) == "gguf"


def from_pretrained(path, *args, model_class=None, quantization_config: Optional[LowbitConfig] = None, **kwargs):
    """``model_class.from_pretrained(path, ...)`` (default ``AutoModelForCausalLM``) with lowbit in charge:
    a lowbit checkpoint loads as saved; a bitsandbytes 4-bit checkpoint (its config.json has a
    ``load_in_4bit`` quantization_config) loads into QuantLinears, bit-exactly; a plain checkpoint is quantized
    on load with ``quantization_config`` (default ``LowbitConfig()``) — also one saved from a model loaded from
    GGUF (dense weights, but a stale ``quant_method: "gguf"`` in its config.json, which transformers' own
    from_pretrained refuses to combine with a LowbitConfig)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    if quantization_config is not None and not isinstance(quantization_config, LowbitConfig):
        raise TypeError(f"quantization_config must be a lowbit.hf.LowbitConfig, got {type(quantization_config).__name__}")
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(
        path, **{k: kwargs[k] for k in ("trust_remote_code", "revision", "subfolder") if k in kwargs})
    found = getattr(config, "quantization_config", None)
    if found is not None and not isinstance(found, dict):
        found = found.to_dict()
    if found is not None and _dense_quant_method(found):
        del config.quantization_config  # a model dequantized from GGUF and saved: its weights are dense
        found = None
    if found and found.get("load_in_4bit"):
        config.quantization_config = LowbitConfig.from_bnb(found).to_dict()
    elif found and found.get("load_in_8bit"):
        raise ValueError(f"{path!r} is an 8-bit bitsandbytes checkpoint; lowbit reads 4-bit ones")
    elif found is None:
        kwargs["quantization_config"] = quantization_config or LowbitConfig()
    elif found.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path!r} is quantized with quant_method={found.get('quant_method')!r}; lowbit reads lowbit "
                         f"and 4-bit bitsandbytes checkpoints")
    return model_class.from_pretrained(path, *args, config=config, **kwargs)


# ------------------------------------------------------------------------------------ PEFT
_PEFT_CLASS = None


def _peft_class():
    """:class:`LowbitLoraLinear`, built on first use (peft imports bitsandbytes: seconds)."""
    global _PEFT_CLASS
    if _PEFT_CLASS is not None:
        return _PEFT_CLASS
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class LowbitLoraLinear(nn.Module, LoraLayer):
        """PEFT LoRA layer over a :class:`lowbit.nn.QuantLinear` (PEFT's conventions: ``lora_A[name]`` /
        ``lora_B[name]`` Linears, ``scaling``, ``merge``/``unmerge``). With the active adapters' dropout
        inactive and no LoRA bias, the forward is one ``lowbit::lowrank`` op (the base GEMM and the adapters'
        low-rank product fused); otherwise base + PEFT's per-adapter branch. ``merge`` turns the layer's base
        into a dense ``nn.Linear`` holding ``dequantize(W) + Σ scale·B·A`` (fp32 math, exact sum, no
        re-quantization), so ``merge_and_unload()`` returns a dense model; ``unmerge`` puts the original
        QuantLinear back, bit for bit. Only vanilla LoRA (no DoRA and other variants)."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                     **kwargs):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def get_delta_weight(self, adapter) -> torch.Tensor:
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            return (b.float() @ a.float()) * self.scaling[adapter]

        def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
            names = check_adapters_to_merge(self, adapter_names)
            if not names:
                return
            base = self.get_base_layer()
            if isinstance(base, QuantLinear):
                dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                  device=base.weight.device, dtype=base.weight_dtype)
                w = base.weight.dequantize(torch.float32)
                b = None if base.bias is None else base.bias.detach().float().clone()
                self.__dict__["_lowbit_base"] = base  # not a submodule: the merged layer's state is the dense one
            else:
                dense, w = base, base.weight.detach().float()
                b = None if base.bias is None else base.bias.detach().float()
            for n in names:
                if n not in self.lora_A:
                    continue
                w = w + self.get_delta_weight(n)
                if self.lora_bias[n]:
                    b = (b if b is not None else 0) + self.lora_B[n].bias.detach().float()
                if safe_merge and not torch.isfinite(w).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {n} seems to be broken")
                self.merged_adapters.append(n)
            with torch.no_grad():
                dense.weight.copy_(w)
                if b is not None:
                    if dense.bias is None:
                        raise ValueError("lora_bias on a base layer without bias cannot be merged")
                    dense.bias.copy_(b)
            dense.requires_grad_(False)
            self.base_layer = dense

        def unmerge(self) -> None:
            if not self.merged:
                import warnings

                warnings.warn("Already unmerged. Nothing to do.")
                return
            self.base_layer = self.__dict__.pop("_lowbit_base")
            self.merged_adapters.clear()

        def _fusable(self, active) -> bool:
            if not isinstance(self.get_base_layer(), QuantLinear):
                return False
            for n in active:
                d = self.lora_dropout[n]
                if self.lora_bias[n] or n in self.lora_variant or not (
                        isinstance(d, nn.Identity) or (type(d) is nn.Dropout and (not d.training or d.p == 0))):
                    return False
            return True

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._check_forward_args(x, *args, **kwargs)
            adapter_names = kwargs.pop("adapter_names", None)
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return self.base_layer(x, *args, **kwargs)
            if adapter_names is not None:
                return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
            if self.merged:
                return self.base_layer(x, *args, **kwargs)
            active = [n for n in self.active_adapters if n in self.lora_A]
            if not active:
                return self.base_layer(x, *args, **kwargs)
            base = self.get_base_layer()
            if self._fusable(active) and not args and not kwargs:
                # Σ s_i B_i A_i x = [s_1 B_1 | s_2 B_2] [A_1; A_2] x: one fused op for all active adapters
                a = torch.cat([self.lora_A[n].weight for n in active], 0).to(x.dtype)
                b = torch.cat([self.lora_B[n].weight * self.scaling[n] for n in active], 1).to(x.dtype)
                return ops.lowrank(x, base.weight, a, b, 1.0, base.bias)
            y = self.base_layer(x, *args, **kwargs)
            for n in active:
                a = self.lora_A[n]
                h = self.lora_dropout[n](self._cast_input_dtype(x, a.weight.dtype))
                y = y + (self.lora_B[n](a(h)) * self.scaling[n]).to(y.dtype)
            return y

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    LowbitLoraLinear.__module__ = __name__
    LowbitLoraLinear.__qualname__ = "LowbitLoraLinear"
    _PEFT_CLASS = LowbitLoraLinear
    return LowbitLoraLinear


def register_peft(config):
    """Register lowbit's PEFT LoRA layer on a ``peft.LoraConfig`` (PEFT's custom-module API: the mapping
    lives on the config instance) and return the config: ``get_peft_model(model, register_peft(LoraConfig(...)))``,
    ``PeftModel.from_pretrained(model, dir, config=register_peft(LoraConfig.from_pretrained(dir)))``."""
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: _peft_class()})
    return config


def __getattr__(name):
    if name == "LowbitLoraLinear":
        return _peft_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
