"""AdamW optimizers with fused lowbit kernels: 32-bit or 8-bit blockwise state, optionally paged."""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

from ..formats import check_storage, is_dtensor
from . import functional as F
from .pages import PAGE_BYTES, PagePool

__all__ = ["AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit"]


def _check_scalar(name: str, x) -> None:
    """A hyperparameter is a finite real >= 0: a NaN lr would silently turn every parameter into NaN,
    and ``lr=True`` is a bug, not 1.0 (bool is an int subclass, hence the explicit test)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name}={x!r} must be a float, not {type(x).__name__}")
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name}={x!r} must be a finite float >= 0")


def _check_betas(name: str, betas) -> None:
    """Two real numbers in [0, 1) (NaN fails the comparison, so it is refused too)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(
            not isinstance(b, bool) and isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{name}={betas!r} must be two floats in [0, 1)")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient as the kernels see it: a DTensor's local shard (FSDP2), else itself."""
    return t.to_local() if is_dtensor(t) else t


def _check_sharding(p) -> None:
    """A DTensor parameter (FSDP2) must be evenly sharded along dim 0 on a 1-D mesh: its state is kept per
    local shard and saved as equal shards of one global tensor (state_dict)."""
    from torch.distributed.tensor import Shard

    w = p.device_mesh.size()
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),) or p.dim() == 0 or p.shape[0] % w:
        raise ValueError(f"a sharded parameter of shape {tuple(p.shape)} with placements {tuple(p.placements)} on "
                         f"world_size={w}: lowbit's optimizers step DTensors sharded evenly along dim 0 on one "
                         f"mesh dimension (FSDP2's fully_shard with shape[0] % world_size == 0)")


def _hashable(k):
    try:
        hash(k)
    except TypeError:
        raise TypeError(f"state_dict['param_groups'] holds a parameter id {k!r} of unhashable type "
                        f"{type(k).__name__}") from None
    return k


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter) as ``torch.optim.AdamW`` defines it — decoupled weight decay,
    bias correction, ``eps`` outside the sqrt — in one fused kernel per parameter.

    ``optim_bits=8`` keeps m and v as 8-bit blockwise codes (bitsandbytes' scheme, ~2 bytes per
    parameter) for parameters with at least ``min_8bit_size`` elements; smaller ones keep fp32
    state. ``rounding`` is how the 8-bit state is re-quantized after each step:
    ``"bitsandbytes"`` (default) follows bitsandbytes 0.50.2's CPU quantizer bit for bit — the
    scaled value goes to the nearest of 65536 evenly spaced points over [-1, 1], which then takes
    its nearest code; no point is 0, so a zero moment is stored as ~1.5e-5 x the block absmax —
    and ``"nearest"`` takes the exact nearest code (ties to the lower one), as the quant family
    does. Both keep a positive second moment off code 0. ``paged=True`` puts the state in a :class:`PagePool`: memory-mapped files under
    ``offload_dir`` (a temporary directory if None) for CPU parameters, CUDA managed memory for CUDA
    parameters. Parameters may be fp32, bf16 or fp16; the math is fp32 and the state is fp32 / 8-bit.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, optim_bits: int = 32, min_8bit_size: int = 4096, paged: bool = False,
                 offload_dir: Optional[str] = None, page_bytes: int = PAGE_BYTES, rounding: str = "bitsandbytes"):
        for name, x in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            _check_scalar(name, x)
        _check_betas("betas", betas)
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits={optim_bits!r} must be 8 or 32")
        if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size={min_8bit_size!r} must be a non-negative int")
        F.rounding_id(rounding)  # ValueError naming rounding=
        if offload_dir is not None and not paged:
            raise ValueError("offload_dir= is only used by paged optimizers (paged=True)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.optim_bits, self.min_8bit_size, self.rounding = optim_bits, min_8bit_size, rounding
        self.paged, self._offload_dir, self._page_bytes = paged, offload_dir, page_bytes
        self._pools: dict[str, PagePool] = {}
        for group in self.param_groups:
            for p in group["params"]:
                self._check_param(p)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check_param(p: torch.Tensor) -> None:
        if is_dtensor(p):
            _check_sharding(p)
        if p.is_complex():
            raise TypeError(f"complex parameters are not supported (dtype={p.dtype}, shape={tuple(p.shape)}); "
                            f"view them as real with torch.view_as_real")
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"parameter dtype={p.dtype} is not supported; expected float32, bfloat16 or float16")

    def _bits_for(self, p: torch.Tensor) -> int:
        return 8 if self.optim_bits == 8 and p.numel() >= self.min_8bit_size else 32

    def _pool(self, device: torch.device) -> Optional[PagePool]:
        if not self.paged:
            return None
        key = str(device)
        if key not in self._pools:
            if device.type == "cuda":
                self._pools[key] = PagePool("managed", page_bytes=self._page_bytes, backend="cuda")
            else:
                self._pools[key] = PagePool("file", offload_dir=self._offload_dir, page_bytes=self._page_bytes)
        return self._pools[key]

    def _alloc(self, p: torch.Tensor):
        pool = self._pool(p.device)
        return pool.alloc if pool is not None else None

    def memory_stats(self) -> dict:
        """State memory: ``state_bytes`` (all state tensors), ``params`` / ``state_bytes_per_param``,
        and per pool (paged optimizers) ``total_bytes`` / ``resident_bytes`` / ``used_bytes``."""
        nbytes = nparams = 0
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                nbytes += sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))
                nparams += _local(p).numel() if st else 0  # a shard's state is for its local elements
        d = {"state_bytes": nbytes, "params_with_state": nparams,
             "state_bytes_per_param": nbytes / nparams if nparams else 0.0}
        if self.paged:
            pools = {k: pool.memory_stats() for k, pool in self._pools.items()}
            d["pools"] = pools
            d["total_bytes"] = sum(s["total_bytes"] for s in pools.values())
            res = [s["resident_bytes"] for s in pools.values()]
            d["resident_bytes"] = None if any(r is None for r in res) else sum(res)
        return d

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("lowbit AdamW does not support sparse gradients; use torch.optim.SparseAdam")
                self._check_param(p)
                # FSDP2: the kernels step this rank's shard; 8-bit blocks of OPTIM_BLOCK elements are cut from
                # the local shard (the global numel decides 8- or 32-bit state, alike on every rank)
                lp, lg = _local(p), _local(p.grad)
                state = self.state[p]
                if not state:
                    state.update(F.init_state(lp, self._bits_for(p), self._alloc(lp)))
                    state["step"] = 0
                pool = self._pools.get(str(p.device))
                if pool is not None and pool.kind == "managed":
                    pool.prefetch([t for t in state.values() if isinstance(t, torch.Tensor)],
                                  stream=torch.cuda.current_stream().cuda_stream)
                # The counter advances only once the step was taken: a step that raises (bad state,
                # bad gradient) leaves it as it was, so retrying does not skew the bias correction.
                F.adamw_step(lp, lg, state, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                             weight_decay=group["weight_decay"], step=state["step"] + 1, rounding=self.rounding)
                state["step"] += 1
        return loss

    # ------------------------------------------------------------------ state dict
    def state_dict(self):
        sd = super().state_dict()
        if self.paged:  # copy out of the pool: a saved dict must not alias (or save) whole pages
            sd["state"] = {k: {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in st.items()}
                           for k, st in sd["state"].items()}
        sd["rounding"] = self.rounding  # the 8-bit rule is part of the trajectory
        params = list(itertools.chain.from_iterable(g["params"] for g in self.param_groups))
        for k, st in sd["state"].items():
            p = params[k]
            if is_dtensor(p):  # equal local shards along dim 0 of one global tensor: DCP saves every rank's
                from torch.distributed.tensor import DTensor, Shard

                sd["state"][k] = {n: DTensor.from_local(t, p.device_mesh, [Shard(0)], run_check=False)
                                  if isinstance(t, torch.Tensor) and t.dim() > 0 else t for n, t in st.items()}
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Load a :meth:`state_dict`. Unlike ``torch.optim.Optimizer``, state tensors keep their
        dtype (fp32 / uint8 whatever the parameter dtype: the bits are the state) and are copied,
        into the pool for paged optimizers, so the optimizer never aliases the dict it loaded."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict lacks {key!r} (keys: {sorted(map(str, state_dict))[:8]})")
        saved = state_dict["state"]
        if not isinstance(saved, dict):
            raise TypeError(f"state_dict['state'] is a {type(saved).__name__}, expected a dict")
        rounding = state_dict.get("rounding", self.rounding)
        if rounding != self.rounding:
            raise ValueError(f"state_dict was saved with rounding={rounding!r} but this optimizer uses "
                             f"rounding={self.rounding!r}: construct it with the same rule to resume the same trajectory")
        state_dict = {k: v for k, v in state_dict.items() if k != "rounding"}
        saved = state_dict["state"] = {k: {n: (_local(t) if isinstance(t, torch.Tensor) else t) for n, t in st.items()}
                                       if isinstance(st, dict) else st for k, st in saved.items()}
        groups = state_dict["param_groups"]
        if not isinstance(groups, (list, tuple)) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in groups):
            raise ValueError("state_dict['param_groups'] must be a list of dicts, each with a 'params' list")
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(h["params"]) for g, h in zip(groups, self.param_groups)):
            raise ValueError("loaded state dict's param_groups do not match this optimizer's (number of "
                             "groups or of parameters per group)")
        for i, g in enumerate(groups):
            for name in ("lr", "eps", "weight_decay"):
                if name in g:
                    _check_scalar(f"param_groups[{i}][{name!r}]", g[name])
            if "betas" in g:  # step() reads betas[0], betas[1]: a short tuple was an IndexError there
                _check_betas(f"param_groups[{i}]['betas']", g["betas"])
        saved_ids = list(itertools.chain.from_iterable(g["params"] for g in groups))
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        if len(set(map(_hashable, saved_ids))) != len(saved_ids):
            raise ValueError(f"state_dict['param_groups'] lists a parameter id twice: {saved_ids[:16]}")
        id_map = dict(zip(saved_ids, params))
        unknown = [k for k in saved if k not in id_map]
        if unknown:  # torch keeps such state under the raw key: the parameter it meant would restart silently
            raise ValueError(f"state_dict['state'] has entries {unknown[:8]!r} for no parameter of "
                             f"state_dict['param_groups'] (ids {saved_ids[:16]})")
        # Validate every entry before changing anything (a refused load leaves the optimizer as it
        # was), and here rather than at the next step(): shapes, dtypes and the 8-bit sizes vs the
        # parameter are what the kernels will trust.
        checked = {id_map[k]: _checked_state(k, st, _local(id_map[k])) for k, st in saved.items() if k in id_map}
        super().load_state_dict(state_dict)
        for p, st in checked.items():
            alloc = self._alloc(_local(p))
            new = {}
            for name, t in st.items():
                if isinstance(t, torch.Tensor):
                    dst = alloc(t.shape, t.dtype) if alloc is not None else torch.empty(t.shape, dtype=t.dtype,
                                                                                        device=_local(p).device)
                    new[name] = dst.copy_(t)
                else:
                    new[name] = t
            self.state[p] = new


def _checked_state(key, st, p: torch.Tensor) -> dict:
    """Saved state ``st`` of parameter ``p`` (saved under ``key``) checked against the layout that
    :func:`lowbit.ops.optim.state_shapes` gives ``p``; ``step`` as an int. ValueError / TypeError
    naming the entry and the values otherwise."""
    where = f"state_dict['state'][{key!r}]"
    if not isinstance(st, dict):
        raise TypeError(f"{where} is a {type(st).__name__}, expected a dict")
    try:
        bits = F.state_bits(st)  # raises with the keys if the layout is not one of ours
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    out = {}
    step = st.get("step")
    if isinstance(step, torch.Tensor):
        if step.numel() != 1:
            raise ValueError(f"{where}['step'] has {step.numel()} elements, expected one")
        step = step.item()
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2 ** 63:
        # int64 like torch's step tensors (beyond 1.8e308 the bias correction's float() overflowed)
        raise ValueError(f"{where}['step']={step!r} must be an int in [0, 2**63)")
    out["step"] = step
    for name, (shape, dtype, _) in F.state_shapes(p, bits).items():
        t = st[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}[{name!r}] is a {type(t).__name__}, expected a tensor")
        if t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise ValueError(f"{where}[{name!r}] has dtype {t.dtype} and shape {tuple(t.shape)}; expected "
                             f"{dtype} and {tuple(shape)} for a parameter of shape {tuple(p.shape)} "
                             f"({bits}-bit state)")
        check_storage(f"{where}[{name!r}]", t)  # a view of a shrunk storage: copy_ would read past its end
        out[name] = t
    return out


class AdamW8bit(AdamW):
    """:class:`AdamW` with 8-bit blockwise state (``optim_bits=8``)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, min_8bit_size: int = 4096, **kw):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=8, min_8bit_size=min_8bit_size, **kw)


class PagedAdamW(AdamW):
    """:class:`AdamW` with its state in a :class:`PagePool` (``paged=True``)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, offload_dir: Optional[str] = None, **kw):
        super().__init__(params, lr, betas, eps, weight_decay, paged=True, offload_dir=offload_dir, **kw)


class PagedAdamW8bit(AdamW):
    """:class:`AdamW` with 8-bit state in a :class:`PagePool`."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, min_8bit_size: int = 4096, offload_dir: Optional[str] = None, **kw):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=8, min_8bit_size=min_8bit_size,
                         paged=True, offload_dir=offload_dir, **kw)
