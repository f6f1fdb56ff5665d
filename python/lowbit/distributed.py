"""lowbit on torch.distributed: DDP, FSDP2 (``fully_shard``) and distributed checkpoints (DCP).

Nothing here communicates by itself: every byte moves through torch.distributed (DDP's broadcast and
all-reduce, FSDP2's all-gather and reduce-scatter, DCP's planners). What lowbit adds is the shape of
its modules that those engines need (docs/distributed.md has the design and the figures):

* :func:`prepare_model` makes each ``QuantLinear``'s components (codes, scales, zeros, double-quant
  statistics) frozen parameters (``requires_grad=False``) instead of buffers, under the same names,
  so the state-dict keys and every checkpoint format stay as they are. DDP then broadcasts them once
  at construction and never all-reduces them (only parameters that require grad enter its buckets);
  FSDP2 shards them (it shards parameters, never buffers).
* :func:`fully_shard` applies ``torch.distributed.fsdp.fully_shard`` per quantized layer (the adapter
  module around a ``QuantLinear``, or the ``QuantLinear``), per decoder layer, then to the root.
  Each quantized layer's unit never casts its parameters (the uint8 codes would not be cast anyway; the
  fp32 scales must not become bf16), so a ``MixedPrecisionPolicy(param_dtype=bf16)`` applies to the
  rest of the model and to the activations. Dim-0 shards of a (N, K·bits/8) codes matrix are whole
  rows, i.e. whole blocks; with N % world == 0 (checked) every rank holds the same rows of codes and
  the statistics of exactly those rows' blocks.
* :func:`save_checkpoint` / :func:`load_checkpoint`: DCP with ``get_model_state_dict`` /
  ``get_optimizer_state_dict`` plus a small JSON record of the quantized layers, the adapters and the
  world size, checked before any tensor is read. :func:`full_state_dict` and :func:`export` give the
  single-process files (``lowbit.save_model`` / PEFT adapter) from a sharded run.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .convert import save_adapter, save_model
from .formats import is_dtensor
from .nn import LoRALinear, QuantLinear
from .nn.qwha import HadamardAdapterLinear

__all__ = ["prepare_model", "check_shardable", "fully_shard", "quantized_bytes", "full_state_dict", "export",
           "save_checkpoint", "load_checkpoint", "CHECKPOINT_META"]

CHECKPOINT_META = "lowbit_distributed.json"  # beside DCP's .metadata: what the checkpoint holds, checked first
_ADAPTERS = (LoRALinear, HadamardAdapterLinear)


def _quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def prepare_model(model: nn.Module) -> nn.Module:
    """Turn every QuantLinear's weight components into frozen parameters, in place (idempotent).

    Same names, so ``state_dict()`` keys, ``lowbit.save_model`` files and ``save_pretrained``
    checkpoints are unchanged. Call it before wrapping in DDP or sharding (:func:`fully_shard` does).
    The 0-d ``scale_offset`` of double quant stays a buffer (4 bytes; FSDP2 shards along dim 0)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for m in _quant_layers(model).values():
        for name in list(m._buffers):
            t = m._buffers[name]
            if name in m._components() and t is not None and t.dim() > 0:
                del m._buffers[name]
                m._parameters[name] = nn.Parameter(t, requires_grad=False)
    return model


def check_shardable(model: nn.Module, world_size: int) -> None:
    """ValueError unless every quantized layer splits into ``world_size`` equal row shards (whole blocks
    with their own statistics) and every trainable parameter splits evenly along dim 0 (the 8-bit
    optimizer keeps blockwise statistics per local shard and saves them as equal shards)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive int")
    for name, m in _quant_layers(model).items():
        if m.out_features % world_size:
            raise ValueError(f"world_size={world_size} does not divide the block structure of {name!r}: "
                             f"out_features={m.out_features} rows of {m.in_features // m.spec.block_size} blocks "
                             f"do not split into {world_size} equal shards of whole rows")
    for name, p in model.named_parameters():
        if p.requires_grad and (p.dim() == 0 or p.shape[0] % world_size):
            raise ValueError(f"world_size={world_size} does not divide trainable parameter {name!r} of shape "
                             f"{tuple(p.shape)} along dim 0")


def _units(model: nn.Module) -> list[nn.Module]:
    """The modules that hold a QuantLinear and call it (or read its weight) in their own forward: the adapter
    around it if any, else the QuantLinear itself."""
    units, inside = [], set()
    for m in model.modules():
        if isinstance(m, _ADAPTERS) and isinstance(m.base, QuantLinear):
            units.append(m)
            inside.add(id(m.base))
    units += [m for m in model.modules() if isinstance(m, QuantLinear) and id(m) not in inside]
    return units


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """transformers' decoder layers (``_no_split_modules`` names them), else the items of every ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    return [m for ml in model.modules() if isinstance(ml, nn.ModuleList) for m in ml]


def fully_shard(model: nn.Module, *, mesh=None, mp_policy=None, reshard_after_forward: bool = True,
                layers: Optional[list[nn.Module]] = None) -> nn.Module:
    """FSDP2 for a lowbit model: :func:`prepare_model`, :func:`check_shardable`, then torch's ``fully_shard``
    on each quantized unit (parameters never cast: the policy keeps only ``reduce_dtype``), on each of
    ``layers`` (default: the decoder layers) and on ``model``, with ``mp_policy`` (a torch
    ``MixedPrecisionPolicy`` or None). Returns ``model`` (sharded in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("lowbit.distributed.fully_shard needs torch.distributed initialised "
                           "(torch.distributed.init_process_group)")
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy, got {type(mp_policy).__name__}")
    world = mesh.size() if mesh is not None else dist.get_world_size()
    prepare_model(model)
    check_shardable(model, world)
    mp = mp_policy or MixedPrecisionPolicy()
    # A quantized unit computes in its input's dtype (bf16 under the policy); its parameters stay as stored:
    # codes are bytes, and a bf16 copy of an fp32 scale would be another weight.
    keep = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=mp.reduce_dtype, output_dtype=None,
                                cast_forward_inputs=False)
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    for unit in _units(model):
        torch_fully_shard(unit, mp_policy=keep, **kw)
    for layer in (_decoder_layers(model) if layers is None else layers):
        torch_fully_shard(layer, mp_policy=mp, **kw)
    torch_fully_shard(model, mp_policy=mp, **kw)
    return model


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of quantized-weight components this rank holds, bytes of the whole quantized weights).
    Under FSDP2 a component is a DTensor: its local shard is what the rank holds (padding included)."""
    local = total = 0
    for m in _quant_layers(model).values():
        for t in m._components().values():
            size = t.element_size()
            total += t.numel() * size
            local += (t.to_local().numel() if is_dtensor(t) else t.numel()) * size
    return local, total


def full_state_dict(model: nn.Module) -> dict:
    """The whole state dict gathered on CPU on rank 0 (other ranks get ``{}``); every rank must call it.
    Plain tensors, the keys of the unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export(model: nn.Module, directory: Union[str, os.PathLike], *, adapter: Optional[str] = None) -> None:
    """Write a sharded (or DDP) model as one process would: ``lowbit.save_model`` (``adapter=None``) or the PEFT
    files of ``adapter`` (``lowbit.save_adapter``). Every rank calls it; rank 0 writes."""
    sd = full_state_dict(model)
    if dist.get_rank() == 0:
        if adapter is None:
            save_model(model, directory, state_dict=sd)
        else:
            save_adapter(model, directory, adapter, state_dict=sd)
    dist.barrier()


# ----------------------------------------------------------------------------- distributed checkpoints
def _describe(model: nn.Module, optimizer) -> dict:
    layers = {}
    for name, m in _quant_layers(model).items():
        layers[name] = {"fmt": m.spec.fmt, "block_size": m.spec.block_size, "double_quant": m.spec.double_quant,
                        "shape": [m.out_features, m.in_features]}
    adapters = {n: {a: int(m.lora_A[a].shape[0]) for a in m.lora_A}
                for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    d = {"version": 1, "world_size": dist.get_world_size(), "layers": layers, "adapters": adapters}
    if optimizer is not None:
        d["optimizer"] = {"type": type(optimizer).__name__, "optim_bits": getattr(optimizer, "optim_bits", None)}
    return d


def save_checkpoint(path: Union[str, os.PathLike], model: nn.Module, optimizer=None, *, extra: Optional[dict] = None) -> None:
    """Save model (+ optimizer) with ``torch.distributed.checkpoint``: each rank writes its shards.
    ``extra``: JSON-able values saved with it (a step counter, a data position)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, get_model_state_dict

    path = os.fspath(path)
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    dcp.save(state, checkpoint_id=path)
    if dist.get_rank() == 0:
        meta = _describe(model, optimizer)
        meta["extra"] = extra or {}
        with open(os.path.join(path, CHECKPOINT_META), "w") as f:
            json.dump(meta, f, indent=1)
    dist.barrier()


def _check_meta(path: str, saved: dict, now: dict) -> None:
    for name in sorted(set(saved["layers"]) | set(now["layers"])):
        a, b = saved["layers"].get(name), now["layers"].get(name)
        if a != b:
            raise ValueError(f"checkpoint {path!r} holds quantized layer {name!r} as {a}; this model has {b}")
    for name in sorted(set(saved["adapters"]) | set(now["adapters"])):
        a, b = saved["adapters"].get(name), now["adapters"].get(name)
        if a != b:
            raise ValueError(f"checkpoint {path!r} holds adapters {a} (name: r) on {name!r}; this model has {b}")
    if "optimizer" in now:
        if "optimizer" not in saved:
            raise ValueError(f"checkpoint {path!r} holds no optimizer state")
        if saved["optimizer"] != now["optimizer"]:
            raise ValueError(f"checkpoint {path!r} holds optimizer state of {saved['optimizer']}; "
                             f"this optimizer is {now['optimizer']}")
        if saved["world_size"] != now["world_size"]:
            raise ValueError(f"checkpoint {path!r} was saved with world_size={saved['world_size']}; this run has "
                             f"world_size={now['world_size']}: optimizer state is kept per local shard (8-bit "
                             f"blockwise statistics), load it on {saved['world_size']} ranks (the model alone "
                             f"reshards: load_checkpoint(path, model))")


def load_checkpoint(path: Union[str, os.PathLike], model: nn.Module, optimizer=None) -> dict:
    """Load what :func:`save_checkpoint` wrote into ``model`` (+ ``optimizer``), after checking that the
    checkpoint's quantized layers, adapters and (with an optimizer) world size are this run's; returns
    ``extra``. The model alone loads on any world size (DCP reshards it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    path = os.fspath(path)
    meta_path = os.path.join(path, CHECKPOINT_META)
    if not os.path.isfile(meta_path):
        raise ValueError(f"path={path!r} is not a lowbit distributed checkpoint (no {CHECKPOINT_META})")
    with open(meta_path) as f:
        try:
            saved = json.load(f)
        except ValueError as e:
            raise ValueError(f"{meta_path!r} is corrupt: {e}") from None
    if not isinstance(saved, dict) or saved.get("version") != 1:
        raise ValueError(f"{meta_path!r}: version={saved.get('version') if isinstance(saved, dict) else saved!r} "
                         f"is not a lowbit distributed checkpoint version this lowbit reads (1)")
    _check_meta(path, saved, _describe(model, optimizer))
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
    else:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return saved.get("extra", {})
