"""bench_svdquant: the SVDQuant W4A4 forward on the CPU (lowbit.ops.svdquant_linear = the activation pass
+ the W4A4 GEMM with the fused low-rank branch), against torch dense F.linear (bf16 and fp32) and lowbit's
own W4A16 GEMV at M = 1, in one run.

Validates first (the SVDQuant output against the float64 product of the reference's quantized operands,
within the fp32 bound of tests/test_svdquant_cpu.py; the W4A16 GEMV against its dequantized weight), then
times medians of, per shape (N, K) and M:
  svdq r=32   ops.svdquant_linear with rank-32 branch (L1, L2) and smoothing, bf16 x
  svdq r=0    the same without the branch (plain W4A4): their ratio is the fused branch's overhead
  torch bf16  F.linear(x, W) dense bf16;  torch fp32  the same in fp32
  W4A16 nf4 / int4 (M = 1 only)  lowbit.ops.gemm of a 4-bit QuantizedTensor: the same weight bytes
The r=32 / r=0 pair is timed alternately (bench/_timing.timeit_pair) and its ratio is the per-pair median.
Prints the CPU features, the CPU path lowbit runs, ms, GOP/s (2·M·N·K / s), and the issue-18 targets.
The machine is shared and noisy: compare the ratios measured in the same run.

    python bench/bench_svdquant.py [--quick] [--threads 2] [--cpu-time] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import _timing
import lowbit
from lowbit import ops, reference as ref

SHAPES = [(4096, 4096), (11008, 4096)]  # (N, K) = (out, in)
MS = [1, 8, 32, 128, 512, 2048]
RANK = 32
CLOCK = [time.perf_counter]


def _median_time(fn, budget: float, min_reps: int = 3, max_reps: int = 25) -> float:
    t0 = CLOCK[0]()
    fn()  # warm-up, sizes the repetition count
    first = CLOCK[0]() - t0
    reps = int(min(max_reps, max(min_reps, budget / max(first, 1e-6))))
    ts = []
    for _ in range(reps):
        t0 = CLOCK[0]()
        fn()
        ts.append(CLOCK[0]() - t0)
    return statistics.median(ts)


def _pair(fa, fb, budget: float):
    t0 = CLOCK[0]()
    fa(), fb()
    first = CLOCK[0]() - t0
    reps = int(min(25, max(3, budget / max(first, 1e-6))))
    ta, tb = [], []
    for _ in range(reps):
        t0 = CLOCK[0]()
        fa()
        t1 = CLOCK[0]()
        fb()
        t2 = CLOCK[0]()
        ta.append(t1 - t0), tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb), statistics.median([b / a for a, b in zip(ta, tb)])


class Layer:
    """An SVDQuant layer's operands (random: timing only needs the shapes; validation compares with the
    reference on the very same operands)."""

    def __init__(self, n: int, k: int, r: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=g)
        q, self.sw = ref.svdquant_quantize_ref(w)
        self.qw = ref.svdquant_pack_ref(q)
        self.inv = (torch.rand(k, generator=g) + 0.5).float()
        self.l1 = (torch.randn(n, r, generator=g) * 0.05).bfloat16()
        self.l2 = (torch.randn(r, k, generator=g) * 0.05).bfloat16()
        self.w_bf16 = w.bfloat16()
        self.w_f32 = w
        self.n, self.k = n, k

    def run(self, x, branch: bool = True):
        if branch:
            return ops.svdquant_linear(x, self.qw, self.sw, self.inv, self.l1, self.l2)
        return ops.svdquant_linear(x, self.qw, self.sw, self.inv)


def validate(layer: Layer, qts: dict, m: int = 3) -> None:
    x = torch.randn(m, layer.k).bfloat16()
    y = layer.run(x).double()
    qx, sx, down = ref.svdquant_act_ref(x, layer.inv, layer.l2)
    n, k = layer.n, layer.k
    w = (ref.svdquant_unpack_ref(layer.qw).double().reshape(n, k // 64, 64) * layer.sw.double()[..., None]).reshape(n, k)
    xq = (qx.double().reshape(m, k // 64, 64) * sx.double()[..., None]).reshape(m, k)
    exp = xq @ w.T + down.double() @ layer.l1.double().T
    bound = xq.abs() @ w.abs().T + down.double().abs() @ layer.l1.double().abs().T
    tol = bound * (k // 64 + RANK + 4) * 2 ** -23 + exp.abs() * 2.0 ** -8 + 1e-30
    err = (y - exp).abs()
    if not (err <= tol).all():
        raise SystemExit(f"svdquant_linear {n}x{k}: max err {float(err.max()):.3g} over the bound")
    y0 = layer.run(x, branch=False).double()
    if not ((y0 - xq @ w.T).abs() <= tol).all():
        raise SystemExit(f"svdquant_linear r=0 {n}x{k}: over the bound")
    for name, qt in qts.items():
        x1 = x[:1]
        yq = lowbit.ops.gemm(x1, qt).double()
        yd = x1.double() @ lowbit.dequantize(qt).double().T
        rel = float((yq - yd).abs().max() / yd.abs().max())
        if rel > 2e-2:
            raise SystemExit(f"W4A16 {name} {n}x{k}: rel err {rel:.3g}")
    print(f"validated {n}x{k}: svdquant r={RANK} max |err| / bound {float((err / tol).max()):.3g} (<= 1), "
          f"W4A16 {', '.join(qts)} ok")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, M = 1, 32, 512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true",
                    help="median CPU time of this process instead of wall time (use with --threads 1: OpenMP "
                         "workers spinning after a parallel region count as CPU time)")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,11008x4096 (N x K)")
    ap.add_argument("--ms", default=None, help="e.g. 1,8,512")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK[0] = time.process_time
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else (
        SHAPES[:1] if args.quick else SHAPES)
    ms = [int(v) for v in args.ms.split(",")] if args.ms else ([1, 32, 512] if args.quick else MS)
    budget = 0.5 if args.quick else 1.5
    print(_timing.machine_line())
    print(f"cpu features: {_timing.cpu_features()}")
    path = lowbit._C.cpu_path()
    amx = path == "amx"
    print(f"lowbit {lowbit.__version__}, cpu path {path} (svdquant GEMM: "
          f"{'AMX-INT8 tdpbsud for M >= 16, VNNI below' if amx else 'AVX-512 VNNI vpdpbusd' if path in ('avx512', 'avx512bf16') else path}), "
          f"{args.threads} thread(s), torch {torch.__version__}, "
          f"timing: median {'CPU' if args.cpu_time else 'wall'} time")
    rows = []
    for n, k in shapes:
        layer = Layer(n, k, RANK)
        qts = {f: lowbit.quantize(layer.w_f32, f, 64, False) for f in ("nf4", "int4")}
        validate(layer, qts)
        print(f"\n{n}x{k} (N x K), r = {RANK}: ms (GOP/s)")
        print(f"{'M':>5} {'svdq r=32':>16} {'svdq r=0':>16} {'branch':>7} {'torch bf16':>16} {'torch fp32':>16} "
              f"{'bf16/svdq':>9} {'fp32/svdq':>9} {'W4A16 nf4':>10} {'W4A16 int4':>10} {'int4/svdq':>9}")
        for m in ms:
            x = torch.randn(m, k).bfloat16()
            xf = x.float()
            t_0, t_r, ratio = _pair(lambda: layer.run(x, False), lambda: layer.run(x, True), budget)  # r=0, r=32
            t_bf = _median_time(lambda: F.linear(x, layer.w_bf16), budget)
            t_fp = _median_time(lambda: F.linear(xf, layer.w_f32), budget)
            row = {"n": n, "k": k, "m": m, "svdq_r32_ms": t_r * 1e3, "svdq_r0_ms": t_0 * 1e3,
                   "branch_overhead": ratio - 1, "torch_bf16_ms": t_bf * 1e3, "torch_fp32_ms": t_fp * 1e3}
            w4 = {}
            if m == 1:
                for f, qt in qts.items():
                    w4[f] = _median_time(lambda qt=qt: lowbit.ops.gemm(x, qt), budget)
                    row[f"w4a16_{f}_ms"] = w4[f] * 1e3
            rows.append(row)
            gop = lambda t: 2 * m * n * k / t / 1e9
            fmt = lambda t: f"{t * 1e3:8.3f} ({gop(t):5.0f})"
            w4s = (f"{w4['nf4'] * 1e3:10.3f} {w4['int4'] * 1e3:10.3f} {w4['int4'] / t_r:9.2f}" if w4 else
                   f"{'':>10} {'':>10} {'':>9}")
            print(f"{m:>5} {fmt(t_r):>16} {fmt(t_0):>16} {100 * (ratio - 1):6.1f}% {fmt(t_bf):>16} {fmt(t_fp):>16} "
                  f"{t_bf / t_r:9.2f} {t_fp / t_r:9.2f} {w4s}")
            sys.stdout.flush()
    print("\nissue-18 targets (this run):")
    for r in rows:
        if r["m"] == 512:
            ok = r["branch_overhead"] <= 0.15
            print(f"  fused branch overhead at M = 512, {r['n']}x{r['k']}: {100 * r['branch_overhead']:.1f}% "
                  f"(target <= 15%): {'met' if ok else 'NOT met'}")
        if r["m"] == 1:
            best = min(r["w4a16_nf4_ms"], r["w4a16_int4_ms"])
            print(f"  M = 1, {r['n']}x{r['k']}: svdq r=32 {r['svdq_r32_ms']:.3f} ms vs W4A16 GEMV nf4 "
                  f"{r['w4a16_nf4_ms']:.3f} / int4 {r['w4a16_int4_ms']:.3f} ms (target: at least as fast): "
                  f"{'met' if r['svdq_r32_ms'] <= best else 'NOT met'}")
    print(f"  svdq r=32 >= 1.3x torch dense bf16 at M = 512/2048 on AMX: "
          f"{'see the rows above' if amx else 'not measured (no AMX on this machine: the VNNI ratios are above)'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _timing.machine_line(), "threads": args.threads, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
