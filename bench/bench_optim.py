"""bench_optim: one AdamW step over 50 M fp32 parameters — lowbit vs torch vs bitsandbytes, one run.

Validates first (lowbit AdamW / AdamW8bit == the reference bit for bit on a small tensor; lowbit
AdamW vs torch.optim.AdamW <= 1e-6 after 10 steps), then times the median step of
lowbit AdamW, lowbit AdamW8bit, torch AdamW(foreach=True), torch AdamW(fused=True) when the CPU
build supports it, and bitsandbytes AdamW8bit. Reports ms/step, GB/s of bytes touched (param,
grad and state read + param and state written) and state bytes per parameter.

    python bench/bench_optim.py [--numel N] [--reps R] [--threads T] [--json out.json]
    python -m lowbit bench optim
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import lowbit
from lowbit.optim.functional import adamw_step, init_state

from _timing import machine_line  # bench/_timing.py: the machine a run was taken on


def validate() -> None:
    gen = torch.Generator().manual_seed(0)
    for bits in (32, 8):
        p0, g = torch.randn(5000, generator=gen), torch.randn(5000, generator=gen) * 1e-3
        out = []
        for be in ("reference", "cpu"):
            p, st = p0.clone(), init_state(p0, bits)
            with lowbit.use_backend(be):
                for t in (1, 2, 3):
                    adamw_step(p, g * t, st, lr=1e-3, weight_decay=0.01, step=t)
            out.append((p, st))
        (pr, sr), (pc, sc) = out
        assert torch.equal(pr, pc) and all(torch.equal(sr[k], sc[k]) for k in sr), f"{bits}-bit: cpu != reference"
    a, b = torch.nn.Parameter(torch.randn(10000, generator=gen)), None
    b = torch.nn.Parameter(a.detach().clone())
    oa, ob = lowbit.optim.AdamW([a], lr=1e-3), torch.optim.AdamW([b], lr=1e-3)
    for _ in range(10):
        g = torch.randn(10000, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    rel = float((a - b).detach().norm() / b.detach().norm())
    assert rel <= 1e-6, rel
    print(f"validated: lowbit AdamW/AdamW8bit == reference (bit-exact); lowbit AdamW vs torch after 10 steps: {rel:.1e}")


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=50_000_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes (slow: ~seconds per step)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    print(machine_line())
    torch.set_num_threads(args.threads)
    validate()
    n = args.numel
    g = torch.randn(n) * 1e-3
    p0 = torch.randn(n) * 0.02

    peers = [("lowbit AdamW", lambda ps: lowbit.optim.AdamW(ps, lr=1e-4)),
             ("lowbit AdamW8bit", lambda ps: lowbit.optim.AdamW8bit(ps, lr=1e-4)),
             ("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True))]
    try:  # fused AdamW on CPU exists in recent torch builds
        q = torch.nn.Parameter(torch.zeros(8))
        q.grad = torch.zeros(8)
        torch.optim.AdamW([q], fused=True).step()
        peers.append(("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)))
    except (RuntimeError, ValueError) as e:
        print(f"torch AdamW(fused=True) unavailable on CPU: {e}")
    if not args.no_bnb:
        try:
            import bitsandbytes as bnb

            peers.append(("bnb AdamW8bit (CPU)", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)))
        except ImportError:
            print("bitsandbytes not installed: no 8-bit peer")

    rows = []
    print(f"\none AdamW step over {n / 1e6:.0f} M fp32 params, {args.threads} threads, median of {args.reps}")
    print(f"{'optimizer':>22} {'ms/step':>9} {'GB/s':>6} {'state B/param':>14}")
    for name, make in peers:
        p = torch.nn.Parameter(p0.clone())
        p.grad = g
        opt = make([p])
        opt.step()  # allocates the state (first touch) outside the timing
        reps = args.reps if "bnb" not in name else max(2, args.reps // 2)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            opt.step()
            ts.append(time.perf_counter() - t0)
        t = statistics.median(ts)
        sb = state_bytes(opt) / n
        touched = n * (4 + 4 + 4) + 2 * n * sb  # read p, g; write p; read + write state
        rows.append({"optimizer": name, "ms": t * 1e3, "GBps": touched / t / 1e9, "state_bytes_per_param": sb})
        print(f"{name:>22} {t * 1e3:9.1f} {touched / t / 1e9:6.1f} {sb:14.3f}")
        del opt, p
    by = {r["optimizer"]: r["ms"] for r in rows}
    if "lowbit AdamW" in by and "torch AdamW foreach" in by:
        print(f"\nlowbit AdamW vs torch foreach: {by['torch AdamW foreach'] / by['lowbit AdamW']:.2f}x faster (target >= 1.5x)")
    if "lowbit AdamW8bit" in by:
        print(f"lowbit AdamW8bit / lowbit AdamW time: {by['lowbit AdamW8bit'] / by['lowbit AdamW']:.2f} (target <= 1.3)")
        if "bnb AdamW8bit (CPU)" in by:
            print(f"lowbit AdamW8bit vs bnb AdamW8bit: {by['bnb AdamW8bit (CPU)'] / by['lowbit AdamW8bit']:.1f}x faster "
                  f"(target >= 5x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
