"""bench_quant: quantize / dequantize throughput, lowbit vs bitsandbytes (CPU), in one run.

Validates first (lowbit == reference bit for bit; lowbit nf4 == bitsandbytes nf4), then times
medians. Reports GB/s of dense weight bytes (fp32 read for quantize, written for dequantize) and
the speed ratio against bitsandbytes' CPU quantize_4bit / dequantize_4bit.

    python bench/bench_quant.py [--quick] [--threads N] [--json out.json]
    python -m lowbit bench quant
"""

from __future__ import annotations

import argparse
import json

import torch

import lowbit
from _timing import machine_line, timeit, timeit_pair  # bench/_timing.py: medians after warm-up; alternated pairs

SHAPES = [(4096, 4096), (8192, 28672)]


def validate() -> None:
    w = torch.randn(256, 1024)
    for fmt in ("nf4", "int4", "int2"):
        for dq in (False, True):
            a = lowbit.quantize(w, fmt, 64, dq)
            with lowbit.use_backend("reference"):
                b = lowbit.quantize(w, fmt, 64, dq)
                db = b.dequantize()
            assert a.equal(b) and torch.equal(a.dequantize(), db), f"{fmt} dq={dq}: lowbit != reference"
    try:
        import bitsandbytes.functional as F
    except ImportError:
        return
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    qt = lowbit.quantize(w, "nf4", 64)
    assert torch.equal(qt.codes.reshape(-1), packed.reshape(-1)) and torch.equal(qt.scale, state.absmax)
    assert torch.equal(qt.dequantize(), F.dequantize_4bit(packed, state))
    print("validated: lowbit == reference (bit-exact) and lowbit nf4 == bitsandbytes nf4 (bit-exact)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    print(machine_line())
    torch.set_num_threads(args.threads)
    validate()
    try:
        import bitsandbytes.functional as F
    except ImportError:
        F = None
        print("bitsandbytes not installed: no peer column")
    rows = []
    shapes = SHAPES[:1] if args.quick else SHAPES
    print(f"\n{'shape':>12} {'fmt':>5} {'op':>12} {'lowbit ms':>10} {'GB/s':>7} {'bnb ms':>9} {'bnb GB/s':>8} {'speedup':>8}")
    for n, k in shapes:
        w = torch.randn(n, k)
        gb = w.numel() * 4 / 1e9
        for fmt in ("nf4", "int4", "int2"):
            qt = lowbit.quantize(w, fmt, 64)
            buf = torch.empty_like(w)
            reps = args.reps * (4 if n * k <= 4096 * 4096 else 1)
            quant = lambda: lowbit.quantize(w, fmt, 64)  # noqa: E731
            deq = lambda: qt.dequantize(torch.float32)  # noqa: E731
            t_o = timeit(lambda: qt.dequantize(torch.float32, out=buf), reps)
            if F is not None and fmt == "nf4":
                # lowbit and bitsandbytes alternated call by call: the speedup is the median of the
                # per-pair ratios, robust to load from other processes on a shared machine.
                packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
                t_q, b_q, s_q = timeit_pair(quant, lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4"), reps, 2)
                t_d, b_d, s_d = timeit_pair(deq, lambda: F.dequantize_4bit(packed, state), reps, 2)
            else:
                t_q, t_d, (b_q, s_q, b_d, s_d) = timeit(quant, reps), timeit(deq, reps), (None,) * 4
            # "dequantize" allocates the output (first-touch page faults of 4-8 bytes/weight are
            # part of the cost); "dequant out=" writes into a reused workspace (bitsandbytes 0.50.2
            # has no CPU kernel for dequantize_4bit.out, so that row has no peer).
            for op, t, tb, sp in (("quantize", t_q, b_q, s_q), ("dequantize", t_d, b_d, s_d),
                                  ("dequant out=", t_o, None, None)):
                r = {"shape": [n, k], "fmt": fmt, "op": op, "lowbit_ms": t * 1e3, "lowbit_gbs": gb / t,
                     "bnb_ms": tb * 1e3 if tb else None, "speedup_vs_bnb": sp}
                rows.append(r)
                bnb_cols = f"{tb * 1e3:9.2f} {gb / tb:8.2f} {sp:7.1f}x" if tb else f"{'-':>9} {'-':>8} {'-':>8}"
                print(f"{n:>5}x{k:<6} {fmt:>5} {op:>12} {t * 1e3:10.2f} {gb / t:7.2f} {bnb_cols}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
