"""optim family: the fused AdamW steps (32-bit and 8-bit blockwise state) and managed memory for paged state.

State layouts (what the optimizers keep in ``optimizer.state[p]``):

* 32-bit: ``exp_avg``, ``exp_avg_sq`` — fp32, shape of ``p``.
* 8-bit: ``exp_avg_q`` (uint8 codes of the signed dynamic map), ``exp_avg_absmax`` (fp32, one
  per block of 256), ``exp_avg_sq_q`` (unsigned map), ``exp_avg_sq_absmax`` — flat.
"""

from __future__ import annotations

import torch

from .. import reference as ref
from .._native import module
from ..formats import DTYPE_ID
from ._common import backend_for, call

__all__ = ["adamw_step", "init_state", "state_shapes", "state_bits", "rounding_id", "ROUNDINGS", "STATE_KEYS_32",
           "STATE_KEYS_8", "OPTIM_BLOCK", "ManagedMemory"]

OPTIM_BLOCK = ref.OPTIM_BLOCK
STATE_KEYS_32 = ("exp_avg", "exp_avg_sq")
STATE_KEYS_8 = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")
ZERO_CODE_SIGNED, ZERO_CODE_UNSIGNED = 127, 0  # dynamic_map(True)[127] == dynamic_map(False)[0] == 0.0


def state_shapes(p: torch.Tensor, bits: int) -> dict:
    """``{key: (shape, dtype, fill)}`` of fresh state for parameter ``p``."""
    if bits == 32:
        return {"exp_avg": (p.shape, torch.float32, 0.0), "exp_avg_sq": (p.shape, torch.float32, 0.0)}
    nb = -(-p.numel() // OPTIM_BLOCK)
    return {"exp_avg_q": ((p.numel(),), torch.uint8, ZERO_CODE_SIGNED),
            "exp_avg_absmax": ((nb,), torch.float32, 0.0),
            "exp_avg_sq_q": ((p.numel(),), torch.uint8, ZERO_CODE_UNSIGNED),
            "exp_avg_sq_absmax": ((nb,), torch.float32, 0.0)}


def init_state(p: torch.Tensor, bits: int, alloc=None) -> dict:
    """Fresh state (m = v = 0) for ``p``; ``alloc(shape, dtype)`` places it (e.g. a PagePool)."""
    out = {}
    for k, (shape, dtype, fill) in state_shapes(p, bits).items():
        t = alloc(shape, dtype) if alloc is not None else torch.empty(shape, dtype=dtype, device=p.device)
        out[k] = t.fill_(fill) if fill or alloc is None else t
    return out


def state_bits(state: dict) -> int:
    if all(k in state for k in STATE_KEYS_8):
        return 8
    if all(k in state for k in STATE_KEYS_32):
        return 32
    raise ValueError(f"optimizer state has keys {sorted(state)}; expected {STATE_KEYS_32} or {STATE_KEYS_8}")


def _check(p: torch.Tensor, g: torch.Tensor, state: dict, bits: int) -> None:
    if not isinstance(p, torch.Tensor) or not isinstance(g, torch.Tensor):
        raise TypeError("p and g must be torch.Tensors")
    if p.is_complex() or g.is_complex():
        raise TypeError(f"complex parameters are not supported (p.dtype={p.dtype}); view them as real "
                        f"with torch.view_as_real")
    if g.is_sparse or p.is_sparse:
        raise RuntimeError("lowbit AdamW does not support sparse gradients; use torch.optim.SparseAdam")
    for name, t in (("p", p), ("g", g)):
        if t.dtype not in DTYPE_ID:
            raise TypeError(f"{name}.dtype={t.dtype} is not supported; expected one of {list(DTYPE_ID)}")
    if g.shape != p.shape:
        raise ValueError(f"g.shape={tuple(g.shape)} != p.shape={tuple(p.shape)}")
    if g.device != p.device:
        raise ValueError(f"g is on {g.device}, p on {p.device}")
    n, nb = p.numel(), -(-p.numel() // OPTIM_BLOCK)
    want = state_shapes(p, bits)
    for k, (shape, dtype, _) in want.items():
        t = state[k]
        if t.dtype != dtype or t.numel() != (n if k in ("exp_avg", "exp_avg_sq", "exp_avg_q", "exp_avg_sq_q") else nb):
            raise ValueError(f"state[{k!r}] has dtype {t.dtype} and {t.numel()} elements; expected {dtype} "
                             f"with {torch.Size(shape).numel()} for a parameter of {n} elements")
        if t.device != p.device or not t.is_contiguous():
            raise ValueError(f"state[{k!r}] must be contiguous on {p.device}")


ROUNDINGS = ref.OPTIM_ROUNDINGS  # ("bitsandbytes", "nearest"); the index is the kernels' rounding id


def rounding_id(rounding: str) -> int:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} must be one of {ROUNDINGS}")
    return ROUNDINGS.index(rounding)


@torch.no_grad()
def adamw_step(p: torch.Tensor, g: torch.Tensor, state: dict, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.0, step: int, rounding: str = "bitsandbytes") -> None:
    """One fused AdamW step in place on ``p`` and ``state`` (32- or 8-bit, from the state's keys).

    ``step`` is 1-based (the step being taken, as torch counts it). ``rounding`` is the 8-bit
    re-quantization rule (include/lowbit/optim.h, :func:`lowbit.reference.optim_boundaries`):
    ``"bitsandbytes"`` reproduces bitsandbytes 0.50.2's CPU quantizer (a uniform 65536-point grid
    over [-1, 1], then the grid point's nearest code), ``"nearest"`` takes the exact nearest code."""
    rid = rounding_id(rounding)
    bits = state_bits(state)
    _check(p, g, state, bits)
    if p.numel() == 0:
        return
    s = ref.adamw_scalars(float(lr), float(betas[0]), float(betas[1]), float(eps), float(weight_decay), int(step))
    be = backend_for(p)
    # Kernels want contiguous p and g; a non-contiguous p is stepped on a copy and written back.
    pc, gc = p.contiguous(), g.contiguous()
    if be == "reference":
        if bits == 32:
            pn, m, v = ref.adamw_ref(pc, gc, state["exp_avg"], state["exp_avg_sq"], s)
            state["exp_avg"].copy_(m)
            state["exp_avg_sq"].copy_(v)
        else:
            pn, qm, am, qv, av = ref.adamw8bit_ref(pc, gc, state["exp_avg_q"], state["exp_avg_absmax"],
                                                   state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], s, rounding)
            for k, t in zip(STATE_KEYS_8, (qm, am, qv, av)):
                state[k].copy_(t)
        pc.copy_(pn)
    elif bits == 32:
        call(be, "adamw32", pc.data_ptr(), DTYPE_ID[p.dtype], gc.data_ptr(), DTYPE_ID[g.dtype],
             state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr(), p.numel(), *s)
    else:
        call(be, "adamw8", pc.data_ptr(), DTYPE_ID[p.dtype], gc.data_ptr(), DTYPE_ID[g.dtype],
             state["exp_avg_q"].data_ptr(), state["exp_avg_absmax"].data_ptr(), state["exp_avg_sq_q"].data_ptr(),
             state["exp_avg_sq_absmax"].data_ptr(), p.numel(), *s, rid)
    if pc.data_ptr() != p.data_ptr():
        p.copy_(pc)


class ManagedMemory:
    """CUDA managed memory (``cudaMallocManaged``) of backend ``"cuda"`` — or host memory from the same
    calls on ``"sim"`` — for :class:`lowbit.optim.PagePool`. RuntimeError at construction when the
    backend's module is unavailable."""

    def __init__(self, backend: str):
        if backend not in ("cuda", "sim"):
            raise ValueError(f"managed pages need backend 'cuda' or 'sim', got backend={backend!r}")
        self.backend = backend
        self._mod = module(backend)

    def alloc(self, nbytes: int) -> int:
        """Address of ``nbytes`` fresh managed bytes."""
        return self._mod.managed_alloc(nbytes)

    def prefetch(self, address: int, nbytes: int, device: int, stream: int) -> None:
        """Migrate ``nbytes`` at ``address`` to CUDA device ``device`` on ``stream``."""
        self._mod.managed_prefetch(address, nbytes, device, stream)

    def free(self, address: int) -> None:
        self._mod.managed_free(address)
