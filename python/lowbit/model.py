"""Model surgery: quantize a model's Linears and attach adapters, with one loop and one matcher.

* :func:`quantize_model` — every ``nn.Linear`` → :class:`lowbit.nn.QuantLinear` (in place), or with
  ``fmt="w4a4"`` → :class:`lowbit.nn.SVDQuantLinear` (SVDQuant: 4-bit weights and activations + a low-rank branch).
* :func:`add_lora` — LoRA adapters (:class:`lowbit.nn.LoRALinear`); with ``init=`` ("svd", "loftq",
  "qera", "lq_lora") each dense target is quantized and its adapter initialised from the quantization
  error in the same pass: these inits need the dense weight W, which only exists before quantization.
* :func:`add_qwha` — QWHA adapters (:class:`lowbit.nn.HadamardAdapterLinear`), initialised from the
  quantization error of each dense target (:func:`lowbit.init.qwha_init`).

**Which modules** (:func:`matches`, the one rule of all three): a module is a target when the last
component of its name is in ``target_modules`` (``None``: every Linear), and is skipped when some entry
of ``skip`` appears in its dotted name as a whole run of components: ``"lm_head"`` skips ``lm_head`` and
``model.lm_head``, ``"vision"`` skips everything under ``model.vision``, ``"layers.0.mlp"`` skips that
block — never ``"lm_head_2"`` or ``"my_vision"`` (components are compared whole). Every rule the copies
before issue 12 used (equal, dotted suffix, any component) is a case of it.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Optional

import torch
from torch import nn

from . import _deprecated
from .formats import QuantSpec
from .init import INITS, calibration_covariances, qwha_init
from .nn import HadamardAdapterLinear, LoRALinear, QuantLinear, SVDQuantLinear
from .ops.qwha import adapter_hadamard_factors

logger = logging.getLogger(__name__)

__all__ = ["TARGETS", "matches", "select_modules", "replace_modules", "quantize_model", "add_lora", "add_qwha",
           "add_adapters", "apply_init", "calibration_amax", "W4A4_METHODS"]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # a decoder's Linears
_ADAPTERS = (LoRALinear, HadamardAdapterLinear)

# Called with the model after quantize_model / add_lora / add_qwha replaced Linears by QuantLinears.
# lowbit/__init__ adds lowbit.hf's `attach` for transformers models (this module cannot import lowbit.hf, which
# sits above it): it gives the model lowbit's quantizer, so that save_pretrained writes a lowbit checkpoint
# instead of state-dict keys that from_pretrained would drop with a warning (random weights).
AFTER_QUANTIZE: list[Callable[[nn.Module], None]] = []


def _after_quantize(model: nn.Module) -> None:
    for hook in AFTER_QUANTIZE:
        hook(model)


def _names(arg) -> Optional[tuple[str, ...]]:
    return None if arg is None else ((arg,) if isinstance(arg, str) else tuple(arg))


def matches(name: str, target_modules=None, skip=()) -> bool:
    """Whether module ``name`` is a target: its last component is in ``target_modules`` (None: any), and
    no entry of ``skip`` is a run of whole components of the name (see the module docstring)."""
    parts = name.split(".")
    targets = _names(target_modules)
    if targets is not None and parts[-1] not in targets:
        return False
    for s in _names(skip):
        sub = s.split(".")
        if any(parts[i:i + len(sub)] == sub for i in range(len(parts) - len(sub) + 1)):
            return False
    return True


def select_modules(model: nn.Module, types, target_modules=None, skip=(), into_adapters: bool = True) -> list[str]:
    """Names of the modules of ``types`` that :func:`matches` accepts, in model order. Without
    ``into_adapters`` the bases inside existing adapters are not candidates (the adapter is)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    names, adapters = [], []
    for name, m in model.named_modules():
        if not into_adapters and any(name.startswith(a + ".") for a in adapters):
            continue
        if isinstance(m, _ADAPTERS):
            adapters.append(name)
        if isinstance(m, types) and matches(name, target_modules, skip):
            names.append(name)
    return names


def replace_modules(model: nn.Module, names: list[str], build: Callable[[str, nn.Module], nn.Module],
                    label: Optional[str] = None) -> None:
    """The one replacement loop: module ``name`` becomes ``build(name, module)``; a progress bar on
    stderr when ``label`` is given."""
    from tqdm.auto import tqdm

    # disable=None: tqdm draws only when stderr is a terminal (nothing in logs, pipes or CI)
    for name in tqdm(names, desc=label, unit="layer", file=sys.stderr, disable=None if label else True):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, build(name, getattr(owner, child)))


def _module_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _check_blocks(model: nn.Module, names: list[str], block_size: int) -> None:
    """Every target must hold whole blocks along K (checked before any module changes)."""
    for n in names:
        k = model.get_submodule(n).in_features
        if k % block_size:
            raise ValueError(f"{n}: in_features={k} is not a multiple of block_size={block_size}")


# ----------------------------------------------------------------------------- quantize_model
def quantize_model(model: nn.Module, fmt: str = "nf4", block_size: int = 64, double_quant: bool = False,
                   skip=("lm_head",), progress: bool = True, lora_init: Optional[str] = None, r: Optional[int] = None,
                   alpha: float = 32, calib=None, iters: int = 5, *, method: Optional[str] = None,
                   smooth_alpha: float = 0.5) -> dict:
    """Replace every ``nn.Linear`` of ``model`` in place by a :class:`lowbit.nn.QuantLinear`.

    ``fmt="w4a4"``: 4-bit weights *and activations* — every Linear becomes a :class:`lowbit.nn.SVDQuantLinear`
    (:func:`lowbit.init.svdquant`), ``method`` one of

    * ``"svdquant"`` (default): rank-``r`` branch (default 32) from the SVD of the smoothed weight; smoothing
      from ``calib`` when given (token ids (B, T) / (T,), a dict of model kwargs, or a list of either), with
      strength ``smooth_alpha``; without ``calib`` no smoothing;
    * ``"smoothquant"``: smoothing only (r = 0, ``calib`` required);
    * ``"rtn"``: plain W4A4 round-to-nearest (r = 0, no smoothing, no ``calib``).

    Smoothing needs only max |x_k| per input channel of each Linear: one forward pass of ``calib`` through the
    unquantized model collects them for every layer (forward pre-hooks; (K,) floats per layer), then the
    layers are replaced one by one (progress bar). ``block_size`` must be 64 and ``double_quant`` False (the
    format's groups). The report adds ``"method"`` and ``"r"``.

    ``skip``: module names or runs of name components to leave dense (:func:`matches`). Linears whose
    ``in_features`` is not a multiple of ``block_size`` are left dense and listed.
    Returns a report: ``{"replaced", "skipped", "incompatible", "bytes_before", "bytes_after"}``.
    ``lora_init=`` (deprecated: use ``add_lora(model, r, alpha, target_modules=None, init=..., fmt=...)``)
    also attaches initialised LoRA adapters and adds ``"init_error"`` to the report.
    ``progress``: a tqdm bar on stderr, drawn only when stderr is a terminal. The summary (layers,
    memory before and after) goes to the ``lowbit.model`` logger at INFO level.
    """
    if fmt == "w4a4" or method is not None:
        return _quantize_w4a4(model, fmt, block_size, double_quant, skip, progress, lora_init, r, calib, method,
                              smooth_alpha)
    r = 16 if r is None else r
    spec = QuantSpec(fmt, block_size, double_quant)  # validate once, before touching the model
    linears = select_modules(model, nn.Linear, None, (), into_adapters=True)
    todo = [n for n in linears if matches(n, None, skip) and model.get_submodule(n).in_features % block_size == 0]
    report = {"replaced": todo, "skipped": [n for n in linears if not matches(n, None, skip)],
              "incompatible": [n for n in linears if matches(n, None, skip) and n not in todo],
              "bytes_before": _module_bytes(model)}
    if lora_init is not None:
        _deprecated.warn("quantize_model(lora_init=...)", "lowbit.add_lora(model, r, alpha, target_modules=None, "
                         "init=..., fmt=...)")
        report["init_error"] = _lora(model, todo, r, alpha, 0.0, "default", lora_init, spec, calib, iters,
                                     progress)
    else:
        replace_modules(model, todo, lambda n, m: QuantLinear.from_linear(m, fmt, block_size, double_quant),
                 f"quantize_model {fmt}" if progress and todo else None)
    report["bytes_after"] = _module_bytes(model)
    if todo:
        _after_quantize(model)
    logger.info("quantize_model: %d Linear -> QuantLinear(%s, block %d%s); memory %.1f MiB -> %.1f MiB; skipped %s%s",
                len(todo), fmt, block_size, ", double quant" if double_quant else "", report["bytes_before"] / 2**20,
                report["bytes_after"] / 2**20, report["skipped"],
                f"; left dense (K % block != 0): {report['incompatible']}" if report["incompatible"] else "")
    return report


W4A4_METHODS = ("svdquant", "smoothquant", "rtn")


def _calib_batches(calib) -> list:
    if isinstance(calib, (list, tuple)):
        return list(calib)
    return [calib]


@torch.no_grad()
def calibration_amax(model: nn.Module, calib, module_names) -> dict[str, torch.Tensor]:
    """max |x_k| per input channel (K,) fp32 of the inputs of the named modules over forward passes of
    ``calib`` (token ids (B, T) or (T,), a dict of model kwargs, or a list of these) through ``model``."""
    amax, hooks = {}, []

    def hook(name):
        def fn(mod, args):
            x = args[0].detach()
            a = x.reshape(-1, x.shape[-1]).abs().amax(0).float() if x.numel() else None
            if a is not None:
                amax[name] = a if name not in amax else torch.maximum(amax[name], a)
        return fn

    for name in module_names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        for batch in _calib_batches(calib):
            if isinstance(batch, dict):
                model(**batch)
            else:
                if not isinstance(batch, torch.Tensor):
                    raise TypeError(f"calib must be token ids (a tensor), a dict of model kwargs or a list of "
                                    f"these, got {type(batch).__name__}")
                model(batch[None] if batch.dim() == 1 else batch)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in module_names if n not in amax]
    if missing:
        raise ValueError(f"the calibration pass never reached {missing[:4]} (or gave them no tokens)")
    return amax


def _quantize_w4a4(model, fmt, block_size, double_quant, skip, progress, lora_init, r, calib, method,
                   smooth_alpha) -> dict:
    """quantize_model(fmt="w4a4"): every target Linear -> SVDQuantLinear (see quantize_model)."""
    method = "svdquant" if method is None else method
    if fmt != "w4a4":
        raise ValueError(f"method={method!r} quantizes weights and activations: use fmt='w4a4' (got fmt={fmt!r})")
    if method not in W4A4_METHODS:
        raise ValueError(f"method={method!r} must be one of {W4A4_METHODS}")
    if lora_init is not None:
        raise ValueError("lora_init= does not apply to fmt='w4a4' (add adapters with lowbit.add_lora afterwards)")
    if block_size != 64 or double_quant:
        raise ValueError(f"fmt='w4a4' has groups of 64 and fp32 scales: block_size={block_size}, "
                         f"double_quant={double_quant} are not available")
    if isinstance(smooth_alpha, bool) or not isinstance(smooth_alpha, (int, float)) or not 0 <= smooth_alpha <= 1:
        raise ValueError(f"smooth_alpha={smooth_alpha!r} must be a number in [0, 1]")
    if method == "svdquant":
        r = 32 if r is None else r
    elif r not in (None, 0):
        raise ValueError(f"method={method!r} has no low-rank branch; r={r!r} (use method='svdquant')")
    else:
        r = 0
    if method == "smoothquant" and calib is None:
        raise ValueError("method='smoothquant' needs calib= (token ids) for the activation maxima")
    if method == "rtn" and calib is not None:
        raise ValueError("method='rtn' uses no calibration data; calib= must be None")
    linears = select_modules(model, nn.Linear, None, (), into_adapters=True)
    todo = [n for n in linears if matches(n, None, skip) and model.get_submodule(n).in_features % 64 == 0]
    for n in todo:
        m = model.get_submodule(n)
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= min(m.in_features, m.out_features, 256):
            raise ValueError(f"r={r!r} must be an int in [0, min(N, K, 256)]; {n} is ({m.out_features}, "
                             f"{m.in_features})")
        bad = int((~torch.isfinite(m.weight.detach())).sum())
        if bad:
            raise ValueError(f"{n}: weight holds {bad} non-finite values")
    report = {"replaced": todo, "skipped": [n for n in linears if not matches(n, None, skip)],
              "incompatible": [n for n in linears if matches(n, None, skip) and n not in todo],
              "bytes_before": _module_bytes(model), "method": method, "r": r}
    amax = calibration_amax(model, calib, todo) if (calib is not None and todo) else {}
    replace_modules(model, todo,
                    lambda n, m: SVDQuantLinear.from_linear(m, r, act_amax=amax.pop(n, None), alpha=smooth_alpha),
                    f"quantize_model w4a4 {method} r={r}" if progress and todo else None)
    report["bytes_after"] = _module_bytes(model)
    if todo:
        _after_quantize(model)
    logger.info("quantize_model: %d Linear -> SVDQuantLinear(w4a4, %s, r=%d%s); memory %.1f MiB -> %.1f MiB; "
                "skipped %s%s", len(todo), method, r, ", smoothed" if calib is not None else "",
                report["bytes_before"] / 2**20, report["bytes_after"] / 2**20, report["skipped"],
                f"; left dense (K % 64 != 0): {report['incompatible']}" if report["incompatible"] else "")
    return report


# ----------------------------------------------------------------------------------- LoRA
def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0, target_modules=TARGETS,
             adapter_name: str = "default", *, init: Optional[str] = None, fmt: Optional[str] = None,
             block_size: int = 64, double_quant: bool = False, calib=None, iters: int = 5, skip=(),
             progress: bool = False) -> list[str]:
    """Wrap the target ``QuantLinear`` / ``SVDQuantLinear`` / ``nn.Linear`` modules of ``model`` in
    :class:`lowbit.nn.LoRALinear`
    (an existing LoRALinear target gets one more adapter, ``adapter_name``) and freeze every other
    parameter. Returns the wrapped module names.

    ``target_modules``: last name components (None: every Linear); ``skip``: see :func:`matches`.
    ``fmt``: quantize dense ``nn.Linear`` targets to this format first (None keeps them dense).
    ``init``: ``None`` (PEFT's init: A Kaiming-uniform, B zero — the layer starts as its base) or an
    error-reconstructing init of :mod:`lowbit.init` (``"svd"``, ``"loftq"``, ``"qera"``, ``"lq_lora"``):
    each target is then quantized to ``fmt`` and its adapter set so that ``deq(Q) + s·BA ≈ W``. These
    need the dense W, so with ``init`` every target must still be an ``nn.Linear`` (quantize through
    this call, not before it). ``"qera"`` needs ``calib`` (token ids or a dict of model kwargs: one
    forward pass gives E[xᵀx] per layer); ``iters`` is LoftQ's / LQ-LoRA's number of alternations.
    """
    types = (LoRALinear, QuantLinear, SVDQuantLinear, nn.Linear)
    names = select_modules(model, types, target_modules, skip, into_adapters=False)
    if not names:
        raise ValueError(f"no Linear/QuantLinear/SVDQuantLinear module of the model matches "
                         f"target_modules={_names(target_modules)}")
    if init is not None:
        if fmt is None:
            raise ValueError(f"init={init!r} quantizes each target: give fmt= (e.g. 'nf4')")
        not_dense = [n for n in names if type(model.get_submodule(n)) is not nn.Linear]
        if not_dense:
            raise ValueError(f"init={init!r} needs the dense weight, but {not_dense} are no longer nn.Linear; "
                             f"call add_lora(init=..., fmt=...) on the unquantized model")
        spec = QuantSpec(fmt, block_size, double_quant)
        _check_blocks(model, names, block_size)
        _lora(model, names, r, alpha, dropout, adapter_name, init, spec, calib, iters, progress)
    else:
        if fmt is not None:
            spec = QuantSpec(fmt, block_size, double_quant)
            _check_blocks(model, [n for n in names if type(model.get_submodule(n)) is nn.Linear], block_size)

        def build(name, m):
            if isinstance(m, LoRALinear):
                m.add_adapter(adapter_name, r, alpha, dropout)
                return m
            if fmt is not None and type(m) is nn.Linear:
                m = QuantLinear.from_linear(m, spec.fmt, spec.block_size, spec.double_quant)
            return LoRALinear(m, r, alpha, dropout, adapter_name)

        replace_modules(model, names, build, f"add_lora r={r}" if progress else None)
    if fmt is not None:
        _after_quantize(model)
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_A." in pname or ".lora_B." in pname)
    return names


def _lora(model: nn.Module, names: list[str], r: int, alpha: float, dropout: float, adapter_name: str, init: str,
          spec: QuantSpec, calib, iters: int, progress: bool) -> dict[str, float]:
    """Quantize the dense targets ``names`` and attach LoRA adapters initialised by ``init``; returns
    ``{name: ‖W − deq(Q) − BA‖ / ‖W‖}``."""
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {sorted(INITS)}")
    covs = {}
    if init == "qera":
        if calib is None:
            raise ValueError("init='qera' needs calib= (token ids or model kwargs) for the activation statistics")
        covs = calibration_covariances(model, calib, names)
    quant = dict(fmt=spec.fmt, block_size=spec.block_size, double_quant=spec.double_quant)
    errors = {}

    def build(name, lin):
        w = lin.weight.detach()
        extra = {"qera": {"cov": covs.get(name)}, "loftq": {"iters": iters}, "lq_lora": {"iters": iters}}.get(init, {})
        qt, a, b = INITS[init](w, r, **quant, **extra)
        q = QuantLinear.from_linear(lin, spec.fmt, spec.block_size, spec.double_quant)
        q.set_weight(qt)
        layer = LoRALinear(q, r, alpha, dropout, adapter_name)
        with torch.no_grad():
            layer.lora_A[adapter_name].copy_(a)
            layer.lora_B[adapter_name].copy_(b / layer.scaling[adapter_name])
        errors[name] = float((w.double() - qt.dequantize(torch.float32).double() - b.double() @ a.double()).norm()
                             / w.double().norm())
        return layer

    replace_modules(model, names, build, f"lora init={init} {spec.fmt} r={r}" if progress and names else None)
    return errors


# ----------------------------------------------------------------------------------- QWHA
def add_qwha(model: nn.Module, r: int = 16, target_modules=TARGETS, calib=None, *, fmt: Optional[str] = "nf4",
             block_size: int = 64, double_quant: bool = False, scale: float = 1.0, alpha: float = 1.0,
             skip=("lm_head",)) -> list[str]:
    """Wrap the target layers of ``model`` in QWHA adapters (:class:`lowbit.nn.HadamardAdapterLinear`)
    and freeze every other parameter; returns the wrapped module names.

    ``nn.Linear`` targets are first quantized to ``fmt`` (``fmt=None`` keeps them dense); ``QuantLinear``
    targets are used as they are. A target that was an ``nn.Linear`` still has its dense weight W here,
    so its adapter is initialised by :func:`lowbit.init.qwha_init` from the quantization error
    W − deq(W_Q) — weighted by the activations of ``calib`` (token ids (B, T) or a dict of model kwargs,
    one forward pass) when given — with row budgets ∝ ‖·‖^``alpha``. A target that was already a
    QuantLinear (W unknown) gets a zero adapter on a random support. ``scale``: the adapter's output scale.
    """
    names = select_modules(model, (QuantLinear, nn.Linear), target_modules, skip, into_adapters=False)
    if not names:
        raise ValueError(f"no Linear/QuantLinear module of the model matches target_modules={_names(target_modules)}")
    for n in names:  # validate every layer before changing any
        try:
            adapter_hadamard_factors(model.get_submodule(n).in_features)
        except ValueError as e:
            raise ValueError(f"{n}: {e}") from None
    dense = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
    if fmt is not None:
        QuantSpec(fmt, block_size, double_quant)
        _check_blocks(model, dense, block_size)
    covs = calibration_covariances(model, calib, dense) if (calib is not None and dense) else {}

    def build(name, m):
        w = m.weight.detach() if isinstance(m, nn.Linear) else None
        if w is not None and fmt is not None:
            m = QuantLinear.from_linear(m, fmt, block_size, double_quant)
        if w is None or not isinstance(m, QuantLinear):
            return HadamardAdapterLinear(m, r, scale)
        support, values = qwha_init(w, r, qweight=m.weight, cov=covs.pop(name, None), alpha=alpha)
        return HadamardAdapterLinear(m, r, scale, support=support, values=values / scale)

    replace_modules(model, names, build)
    if fmt is not None and dense:
        _after_quantize(model)
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.endswith(".values") and isinstance(model.get_submodule(pname.rpartition(".")[0]),
                                                                  HadamardAdapterLinear))
    return names


# ------------------------------------------------------------------------- deprecated spellings
def add_adapters(model: nn.Module, kind: str = "qwha", r: int = 16, target_modules=TARGETS, calib=None, *,
                 fmt: Optional[str] = "nf4", block_size: int = 64, double_quant: bool = False, scale: float = 1.0,
                 alpha: float = 1.0, lora_alpha: float = 32, skip=("lm_head",)) -> list[str]:
    """Deprecated: ``kind="qwha"`` is :func:`add_qwha`, ``kind="lora"`` is :func:`add_lora` (with ``fmt``)."""
    if kind not in ("qwha", "lora"):
        raise ValueError(f"kind={kind!r} must be 'qwha' or 'lora'")
    _deprecated.warn(f"add_adapters(model, {kind!r}, ...)", "lowbit.add_qwha" if kind == "qwha" else "lowbit.add_lora")
    if kind == "qwha":
        return add_qwha(model, r, target_modules, calib, fmt=fmt, block_size=block_size, double_quant=double_quant,
                        scale=scale, alpha=alpha, skip=skip)
    return add_lora(model, r, lora_alpha, target_modules=target_modules, fmt=fmt, block_size=block_size,
                    double_quant=double_quant, skip=skip)


def apply_init(model: nn.Module, method: str, fmt: str, r: int, alpha: float = 32, block_size: int = 64,
               double_quant: bool = False, calib=None, skip=("lm_head",), iters: int = 5, progress: bool = True,
               target_modules=None) -> dict:
    """Deprecated: :func:`add_lora` with ``init=method``. Returns ``{name: relative weight error}`` of the
    targeted Linears whose in_features is a multiple of ``block_size`` (the others are left dense)."""
    _deprecated.warn("lowbit.init.apply_init / lowbit.model.apply_init", "lowbit.add_lora(model, r, alpha, init=...)")
    spec = QuantSpec(fmt, block_size, double_quant)
    names = [n for n in select_modules(model, nn.Linear, target_modules, skip, into_adapters=False)
             if model.get_submodule(n).in_features % block_size == 0]
    return _lora(model, names, r, alpha, 0.0, "default", method, spec, calib, iters, progress)
