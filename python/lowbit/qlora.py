"""QLoRA on a real model, end to end: quantize, attach adapters, train, evaluate — and the same
run through PEFT + bitsandbytes for a parity check.

Used by ``examples/finetune_qlora.py``, the real-model tests and ``bench/bench_lowrank.py``.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Optional

import torch

from .formats import from_bnb
from .model import TARGETS, add_lora, replace_modules, select_modules
from .nn import QuantLinear, lora_layers
from .optim import AdamW


def token_batches(ids: torch.Tensor, seq_len: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """``steps`` windows of ``seq_len + 1`` tokens at seeded random offsets (inputs + next tokens)."""
    if ids.numel() < seq_len + 2:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len - 1, (steps,), generator=g)
    return [ids[s:s + seq_len + 1] for s in starts.tolist()]


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[None, :-1]).logits[0]
    return torch.nn.functional.cross_entropy(logits.float(), batch[1:])


def train(model, batches, optimizer, log: Optional[Callable[[int, float, float], None]] = None) -> list[float]:
    """One optimizer step per batch; returns the losses (before each step)."""
    model.train()
    losses = []
    for i, b in enumerate(batches):
        t = time.perf_counter()
        loss = lm_loss(model, b)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log:
            log(i, losses[-1], time.perf_counter() - t)
    model.eval()
    return losses


def bnb_quantize_targets(model, targets=TARGETS, block_size: int = 64, double_quant: bool = True):
    """A copy of ``model`` whose target Linears are bitsandbytes ``Linear4bit`` (nf4)."""
    import bitsandbytes as bnb

    bmodel = copy.deepcopy(model)

    def build(name, m):
        l4 = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                               compute_dtype=m.weight.dtype, quant_type="nf4", compress_statistics=double_quant)
        l4.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                      compress_statistics=double_quant, blocksize=block_size)
        l4.weight._quantize("cpu")
        if m.bias is not None:
            l4.bias = torch.nn.Parameter(m.bias.data.clone())
        return l4

    replace_modules(bmodel, select_modules(bmodel, torch.nn.Linear, targets), build)
    return bmodel


def lowbit_from_bnb_model(model, bmodel, targets=TARGETS):
    """A copy of the dense ``model`` whose target Linears are QuantLinears holding exactly the
    weights of ``bmodel``'s Linear4bit layers (read through ``lowbit.from_bnb``)."""
    lmodel = copy.deepcopy(model)

    def build(name, m):
        l4 = bmodel.get_submodule(name)
        qt = from_bnb({k: v for k, v in l4.state_dict().items() if k.startswith("weight")}, "")
        q = QuantLinear(m.in_features, m.out_features, m.bias is not None, qt.fmt, qt.block_size,
                        qt.double_quant, dtype=qt.dtype)
        q.set_weight(qt)
        if m.bias is not None:
            q.bias = torch.nn.Parameter(m.bias.data.clone())
        return q

    replace_modules(lmodel, select_modules(lmodel, torch.nn.Linear, targets), build)
    return lmodel


def peft_parity(model, batches, r: int = 16, alpha: float = 32, lr: float = 5e-4, targets=TARGETS,
                optimizer: str = "torch", log=None) -> dict:
    """Train LoRA on the same nf4 base twice — lowbit (QuantLinear + LoRALinear) and PEFT over
    bitsandbytes Linear4bit — from identical adapter weights on identical batches, and return both
    loss curves. ``optimizer``: "torch" (torch.optim.AdamW for both) or "lowbit" (lowbit.optim.AdamW
    for lowbit, torch's for PEFT)."""
    import peft

    torch.manual_seed(0)
    bmodel = bnb_quantize_targets(model, targets)
    lmodel = lowbit_from_bnb_model(model, bmodel, targets)
    add_lora(lmodel, r=r, alpha=alpha, target_modules=targets)
    pm = peft.get_peft_model(bmodel, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                      lora_dropout=0.0))
    with torch.no_grad():
        for name, layer in lora_layers(lmodel).items():
            p = pm.base_model.model.get_submodule(name)
            p.lora_A["default"].weight.copy_(layer.lora_A["default"])
            p.lora_B["default"].weight.copy_(layer.lora_B["default"])
    lparams = [p for p in lmodel.parameters() if p.requires_grad]
    if optimizer == "lowbit":
        lopt = AdamW(lparams, lr=lr)
    else:
        lopt = torch.optim.AdamW(lparams, lr=lr)
    popt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    ours = train(lmodel, batches, lopt, log and (lambda i, l, t: log("lowbit", i, l, t)))
    theirs = train(pm, batches, popt, log and (lambda i, l, t: log("peft+bnb", i, l, t)))
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]
    return {"lowbit": ours, "peft_bnb": theirs, "max_rel_diff": max(rel)}
