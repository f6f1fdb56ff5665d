"""bench_distributed: what QLoRA under DDP / FSDP2 costs on this machine, and what FSDP2 moves at scale.

Part 1 (measured): the same nf4 (block 64, double quant) + LoRA r=16 model trained with lowbit.optim.AdamW8bit
by 1 process (the whole global batch; with 2 threads and with 1), 2 DDP processes and 2 FSDP2 processes (lowbit.distributed.fully_shard),
one sequence of --seq tokens per process per step (global batch = world x seq). Validates first: the loss
of step 1 (before any update) of every distributed run equals the 1-process loss on the same global batch
within 1e-5 relative (fp32 reduction order). Then reports the median tokens/s over --steps steps after
2 warm-up steps (global tokens per step / step time), and per rank: the peak RSS (ru_maxrss: the whole
process, interpreter and model included) and the quantized-weight bytes the rank holds between steps.

Part 2 (computed from lowbit's layouts, no run): bytes FSDP2 all-gathers per decoder layer per step for
Llama-2-7B and Llama-3-70B shapes, nf4 (block 64, double quant: the components a QuantLinear holds) vs
bf16 weights: the forward gathers each layer once, the backward again (reshard_after_forward=True).

    python bench/bench_distributed.py [--model tiny|smollm2] [--seq 128] [--steps 6]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import socket
import statistics
import sys
import tempfile
import time

import torch

import lowbit
import lowbit.distributed as lbd
from lowbit.nn import QuantLinear

from _timing import machine_line

HERE = os.path.dirname(os.path.abspath(__file__))
EMMA = os.path.join(HERE, "..", "..", "shared", "data", "austen", "emma.txt")
RUNS = (("single", 1), ("single1t", 1), ("ddp", 2), ("fsdp", 2))  # (mode, processes)


def build(name: str):
    import transformers

    if name == "smollm2":
        from lowbit.demo import load_smollm2

        tok, model = load_smollm2()
        text = open(EMMA, encoding="utf-8").read()[:100_000] if os.path.exists(EMMA) else open(lowbit.demo.TEXT).read()
        ids = tok(text, return_tensors="pt").input_ids[0]
    else:
        from lowbit.demo import TEXT

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
        ids = torch.tensor(list(open(TEXT, "rb").read()), dtype=torch.long) % 128
    lowbit.quantize_model(model, "nf4", block_size=64, double_quant=True, progress=False)
    torch.manual_seed(1)
    lowbit.add_lora(model, r=16, alpha=32)
    return model, ids


def worker(rank, world, port, mode, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # one thread per process when 2 share 2 cores; "single" uses all cores, "single1t" one (the per-process
    # share that each distributed rank gets)
    torch.set_num_threads(1 if mode == "single1t" else max(1, (os.cpu_count() or 1) // world))
    if not mode.startswith("single"):
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model, ids = build(args.model)
    g = torch.Generator().manual_seed(0)
    n_steps = args.steps + 2
    starts = torch.randint(0, ids.numel() - args.seq - 1, (n_steps, 2), generator=g)
    run = model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        run = DDP(lbd.prepare_model(model))
    elif mode == "fsdp":
        lbd.fully_shard(model)
    opt = lowbit.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-3, min_8bit_size=0)
    local, total = lbd.quantized_bytes(model)
    losses, times = [], []
    for step in range(n_steps):
        rows = range(2) if mode.startswith("single") else [rank]  # the global batch is always the same 2 windows
        b = torch.stack([ids[starts[step, i]:starts[step, i] + args.seq + 1] for i in rows])
        t = time.perf_counter()
        logits = run(input_ids=b[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    if not mode.startswith("single"):
        lt = torch.tensor(losses)
        torch.distributed.all_reduce(lt)
        losses = (lt / world).tolist()
        torch.distributed.destroy_process_group()
    torch.save({"losses": losses, "times": times, "local": local, "total": total,
                "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                "state_bytes_per_param": opt.memory_stats()["state_bytes_per_param"]},
               os.path.join(out, f"{mode}{rank}.pt"))


def launch(mode: str, world: int, args) -> list[dict]:
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=worker, args=(r, world, port, mode, args, out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(args.timeout)
            if p.is_alive():
                p.kill()
                raise SystemExit(f"{mode}: rank timed out after {args.timeout} s")
        return [torch.load(os.path.join(out, f"{mode}{r}.pt")) for r in range(world)]


def gathered_bytes() -> None:
    """Part 2: bytes of one decoder layer's weights, which FSDP2 all-gathers (the whole layer arrives on
    every rank; a rank receives (world-1)/world of it) per forward and again per backward."""
    shapes = {"Llama-2-7B": [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)],
              "Llama-3-70B": [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192)]
              + [(28672, 8192)] * 2 + [(8192, 28672)]}
    print("\nFSDP2 all-gather per decoder layer (computed from the layouts; x2 per step with reshard_after_forward):")
    print(f"{'model':12s} {'params/layer':>13s} {'bf16 MB':>9s} {'nf4+dq MB':>10s} {'nf4 MB':>8s} {'bf16/nf4+dq':>12s}")
    for name, layer in shapes.items():
        n = sum(a * b for a, b in layer)
        nf4dq = sum(sum(t.numel() * t.element_size() for t in QuantLinear(k, o, False, "nf4", 64, True,
                                                                          device="meta")._components().values())
                    for o, k in layer)
        nf4 = sum(sum(t.numel() * t.element_size() for t in QuantLinear(k, o, False, "nf4", 64, False,
                                                                        device="meta")._components().values())
                  for o, k in layer)
        print(f"{name:12s} {n / 1e6:12.1f}M {2 * n / 1e6:9.1f} {nf4dq / 1e6:10.1f} {nf4 / 1e6:8.1f} {2 * n / nf4dq:12.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args(argv)
    print(machine_line())
    print(f"model {args.model}, nf4 block 64 double quant, LoRA r=16, AdamW8bit, {2 * args.seq} tokens per global step")
    results = {mode: launch(mode, world, args) for mode, world in RUNS}
    ref = results["single"][0]["losses"][0]
    for mode in ("ddp", "fsdp"):
        got = results[mode][0]["losses"][0]
        if abs(got - ref) > 1e-5 * abs(ref):
            print(f"FAIL: {mode} step-1 loss {got} != 1-process loss {ref}")
            return 1
    print(f"validated: step-1 loss {ref:.6f} (1 process) = ddp {results['ddp'][0]['losses'][0]:.6f} "
          f"= fsdp {results['fsdp'][0]['losses'][0]:.6f} within 1e-5 relative")
    print(f"\n{'run':14s} {'tokens/s':>9s} {'peak RSS MiB per rank':>24s} {'quantized bytes held per rank':>32s} "
          f"{'8-bit state B/param':>20s}")
    for mode, world in RUNS:
        rs = results[mode]
        step_t = statistics.median(max(r["times"][i] for r in rs) for i in range(2, len(rs[0]["times"])))
        held = ", ".join(f"{r['local']} ({r['local'] / r['total']:.3f})" for r in rs)
        rss = ", ".join(f"{r['rss_mib']:.0f}" for r in rs)
        print(f"{mode + f' x{world}':14s} {2 * args.seq / step_t:9.1f} {rss:>24s} "
              f"{held:>32s} {rs[0]['state_bytes_per_param']:20.3f}")
    gathered_bytes()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    raise SystemExit(main())
