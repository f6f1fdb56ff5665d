"""gpu_bench: lowbit's CUDA kernels against the card's own ceilings, measured in the same run.

Ceilings first: a device-to-device copy (bytes read + written per second: the HBM roofline of a
streaming kernel) and torch's bf16 matmul at 8192^3 (the tensor-core rate cuBLAS reaches). Then,
each validated against the reference before it is timed:
  gemm nf4 / int4 / int2 x bf16 / fp16: GEMV (M = 1, 16) as % of the copy rate (weight bytes as
  stored / time) and GEMM (M = 512) as % of the bf16 matmul rate, next to torch dense F.linear
  (cuBLAS) in the same dtype; fused lowrank vs the unfused composition; hadamard vs a copy of the
  same tensor; AdamW / AdamW8bit steps vs torch.optim.AdamW(fused=True); quantize / dequantize GB/s;
  svdquant W4A4 (fused act pass + int8 tensor-core GEMM, r = 32) vs lowbit's W4A16 int4 GEMM and dense
  bf16 F.linear, its int8 TOP/s, and the fused branch's overhead over the plain W4A4 GEMM (r = 0).
Timing: CUDA events, warm-up, medians; weights and activations rotate over copies that together
exceed 2x the L2 (50 MB on an H100), so every call reads HBM.

    python bench/gpu_bench.py [--out DIR] [--quick]
    python bench/gpu_bench.py --dry-run        # no GPU: the same code on the simulator, tiny shapes,
                                               # wall-clock timers; the figures mean nothing
Prints one short table last and writes everything to DIR/gpu_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import lowbit
from lowbit.optim.functional import adamw_step, init_state

ROTATE_BYTES = 128 << 20  # > 2x the 50 MB L2 of an H100 (60 MB on an H200)


class Timer:
    """Median seconds of fn() over reps, after warm-up: CUDA events on a GPU, wall clock in a dry run."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn, reps: int = 20, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts)


def rotating(make, nbytes: int, device: str):
    """A function returning the next of enough copies of make() to exceed ROTATE_BYTES (1 copy in a dry run)."""
    n = 1 if device != "cuda" else max(1, -(-ROTATE_BYTES // max(nbytes, 1)))
    items = [make() for _ in range(n)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % n
        return items[state["i"]]
    return nxt


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def ceilings(t: Timer, device: str) -> dict:
    nbytes = (1 << 30) if device == "cuda" else (4 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = t(lambda: dst.copy_(src), reps=10)
    n = 8192 if device == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_s = t(lambda: a @ b, reps=10)
    return {"copy_GBps": 2 * nbytes / copy_s / 1e9, "bf16_matmul_TFLOPs": 2 * n ** 3 / mm_s / 1e12}


def bench_gemm(t: Timer, device: str, ceil: dict, quick: bool) -> list[dict]:
    shapes = [(4096, 4096), (8192, 28672)] if device == "cuda" else [(128, 256)]
    if quick and device == "cuda":
        shapes = [(4096, 4096)]
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k, device=device) * 0.05
        for fmt in ("nf4", "int4", "int2"):
            dq = fmt == "nf4"
            qt0 = lowbit.quantize(w, fmt, 64, dq)
            w_hat = qt0.dequantize(torch.float32)
            next_qt = rotating(lambda: qt0.clone(), qt0.nbytes, device)
            for dtype in (torch.bfloat16, torch.float16):
                wd = w_hat.to(dtype)
                next_wd = rotating(lambda: wd.clone(), wd.numel() * wd.element_size(), device)
                for m in ((1, 16, 512) if device == "cuda" else (1, 16, 33)):
                    x = torch.randn(m, k, device=device, dtype=dtype)
                    err = rel_err(lowbit.linear(x, qt0), x.double() @ w_hat.double().T)
                    if err > 2e-2:
                        raise AssertionError(f"gemm {fmt} {dtype} M={m} {n}x{k}: error {err:.2e} before timing")
                    lb = t(lambda: lowbit.linear(x, next_qt()))
                    dense = t(lambda: F.linear(x, next_wd()))
                    row = {"kernel": "gemm", "fmt": fmt, "dtype": str(dtype)[6:], "M": m, "N": n, "K": k,
                           "lowbit_ms": lb * 1e3, "dense_ms": dense * 1e3, "speedup_vs_dense": dense / lb,
                           "max_rel_err": err}
                    if m <= 16:
                        row["weight_GBps"] = qt0.nbytes / lb / 1e9
                        row["pct_of_copy"] = 100 * row["weight_GBps"] / ceil["copy_GBps"]
                    else:
                        row["TFLOPs"] = 2 * m * n * k / lb / 1e12
                        row["pct_of_bf16_mm"] = 100 * row["TFLOPs"] / ceil["bf16_matmul_TFLOPs"]
                    rows.append(row)
    return rows


def bench_lowrank(t: Timer, device: str) -> list[dict]:
    n = k = 4096 if device == "cuda" else 128
    r = 16
    w = torch.randn(n, k, device=device) * 0.05
    qt = lowbit.quantize(w, "nf4", 64, True)
    rows = []
    for m in ((1, 512) if device == "cuda" else (1, 33)):
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        a = torch.randn(r, k, device=device, dtype=torch.bfloat16) / k ** 0.5
        b = torch.randn(n, r, device=device, dtype=torch.bfloat16) / r ** 0.5
        fused = lambda: lowbit.ops.lowrank(x, qt, a, b, 0.5)  # noqa: E731
        unfused = lambda: lowbit.linear(x, qt) + 0.5 * ((x @ a.T) @ b.T)  # noqa: E731
        err = rel_err(fused(), unfused())
        if err > 2e-2:
            raise AssertionError(f"lowrank M={m}: fused differs from unfused by {err:.2e}")
        tf, tu = t(fused), t(unfused)
        rows.append({"kernel": "lowrank", "M": m, "N": n, "K": k, "r": r, "fused_ms": tf * 1e3,
                     "unfused_ms": tu * 1e3, "speedup_vs_unfused": tu / tf})
    return rows


def bench_hadamard(t: Timer, device: str) -> list[dict]:
    rows = []
    for n in ((4096, 14336) if device == "cuda" else (256,)):
        for dtype in (torch.bfloat16, torch.float32):
            numel = (64 << 20) // torch.tensor([], dtype=dtype).element_size() if device == "cuda" else 4 * n
            x = torch.randn(numel // n, n, device=device, dtype=dtype)
            with lowbit.use_backend("reference"):
                ref = lowbit.hadamard(x[:4].double(), n ** -0.5)
            err = rel_err(lowbit.hadamard(x, n ** -0.5)[:4], ref)
            if err > 2e-2:
                raise AssertionError(f"hadamard n={n} {dtype}: error {err:.2e} before timing")
            th, tc = t(lambda: lowbit.hadamard(x, n ** -0.5)), t(lambda: x.clone())
            rows.append({"kernel": "hadamard", "n": n, "dtype": str(dtype)[6:], "rows": x.shape[0],
                         "hadamard_ms": th * 1e3, "copy_ms": tc * 1e3, "ratio_vs_copy": th / tc})
    return rows


def bench_optim(t: Timer, device: str) -> list[dict]:
    numel = 50_000_000 if device == "cuda" else 100_000
    p = torch.randn(numel, device=device) * 0.1
    g = torch.randn(numel, device=device) * 1e-2
    rows = []
    tp = torch.nn.Parameter(p.clone())
    tp.grad = g.clone()
    topt = torch.optim.AdamW([tp], lr=1e-3, fused=device == "cuda")
    t_torch = t(topt.step, reps=10)
    for bits in (32, 8):
        q, st = p.clone(), init_state(p, bits)
        step = {"i": 0}

        def one():
            step["i"] += 1
            adamw_step(q, g, st, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, step=step["i"])
        tl = t(one, reps=10)
        rows.append({"kernel": f"adamw{bits}", "numel": numel, "lowbit_ms": tl * 1e3, "torch_fused_ms": t_torch * 1e3,
                     "ratio_vs_torch_fused": tl / t_torch})
    return rows


def bench_quant(t: Timer, device: str) -> list[dict]:
    n, k = (8192, 28672) if device == "cuda" else (64, 256)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.05
    rows = []
    for fmt in ("nf4", "int4"):
        qt = lowbit.quantize(w, fmt, 64, fmt == "nf4")
        out = torch.empty(n, k, device=device, dtype=torch.bfloat16)
        tq = t(lambda: lowbit.quantize(w, fmt, 64, fmt == "nf4"), reps=10)
        td = t(lambda: qt.dequantize(torch.bfloat16, out=out), reps=10)
        moved = w.numel() * 2 + qt.nbytes  # bf16 in/out + the packed side
        rows.append({"kernel": "quant", "fmt": fmt, "N": n, "K": k, "quantize_GBps": moved / tq / 1e9,
                     "dequantize_GBps": moved / td / 1e9})
    return rows


def bench_svdquant(t: Timer, device: str, quick: bool) -> list[dict]:
    """W4A4 + low-rank branch (bf16 x, r = 32): validated against float64 of the same quantized operands,
    then timed whole (act + gemm), per kernel, without the branch (r = 0), against lowbit's W4A16 int4
    GEMM (group 64) and dense bf16 F.linear on the same (N, K)."""
    from lowbit import reference as ref

    shapes = ([(4096, 4096)] if quick else [(4096, 4096), (11008, 4096)]) if device == "cuda" else [(192, 256)]
    ms = (1, 16, 512, 2048) if device == "cuda" else (1, 33)
    dtype, r = torch.bfloat16, 32
    rows = []
    for n, k in shapes:
        g = torch.Generator().manual_seed(n + k)
        w = torch.randn(n, k, generator=g) * 0.05
        q, sw = ref.svdquant_quantize_ref(w)
        qw = ref.svdquant_pack_ref(q).to(device)
        sw = sw.to(device)
        l1 = (torch.randn(n, r, generator=g) * 0.05).to(device, dtype)
        l2 = (torch.randn(r, k, generator=g) / k ** 0.5).to(device, dtype)
        inv = (torch.rand(k, generator=g) + 0.5).to(device)
        w_bytes = qw.numel() + sw.numel() * 4
        next_w = rotating(lambda: (qw.clone(), sw.clone()), w_bytes, device)
        qt = lowbit.quantize(w.to(device), "int4", 64, False)
        next_qt = rotating(lambda: qt.clone(), qt.nbytes, device)
        wd = w.to(device, dtype)
        next_wd = rotating(lambda: wd.clone(), wd.numel() * 2, device)
        wq = (ref.svdquant_unpack_ref(qw).double().reshape(n, k // 64, 64) * sw.double()[..., None]).reshape(n, k)
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=dtype)
            qx, sx, down = lowbit.ops.svdquant_act(x, inv, l2)
            y = lowbit.ops.svdquant_gemm(qx, sx, qw, sw, down, l1, None, dtype)
            xq = (qx.double().reshape(m, k // 64, 64) * sx.double()[..., None]).reshape(m, k)
            err = rel_err(y, xq @ wq.T + down.double() @ l1.double().T)
            if err > 2e-2:
                raise AssertionError(f"svdquant M={m} {n}x{k}: error {err:.2e} before timing")

            def whole():
                a, b = next_w()
                q_, s_, d_ = lowbit.ops.svdquant_act(x, inv, l2)
                return lowbit.ops.svdquant_gemm(q_, s_, a, b, d_, l1, None, dtype)

            def gemm(branch):
                a, b = next_w()
                return lowbit.ops.svdquant_gemm(qx, sx, a, b, down if branch else None, l1 if branch else None,
                                                None, dtype)
            t_all, t_g32, t_g0 = t(whole), t(lambda: gemm(True)), t(lambda: gemm(False))
            t_act = t(lambda: lowbit.ops.svdquant_act(x, inv, l2))
            t_w4a16 = t(lambda: lowbit.linear(x, next_qt()))
            t_dense = t(lambda: F.linear(x, next_wd()))
            rows.append({"kernel": "svdquant", "M": m, "N": n, "K": k, "r": r, "dtype": "bfloat16",
                         "svdquant_ms": t_all * 1e3, "act_ms": t_act * 1e3, "gemm_r32_ms": t_g32 * 1e3,
                         "gemm_r0_ms": t_g0 * 1e3, "w4a16_ms": t_w4a16 * 1e3, "dense_ms": t_dense * 1e3,
                         "speedup_vs_w4a16": t_w4a16 / t_all, "speedup_vs_dense": t_dense / t_all,
                         "branch_overhead": t_g32 / t_g0 - 1.0, "gemm_int8_TOPs": 2 * m * n * k / t_g0 / 1e12,
                         "weight_GBps": w_bytes / t_g0 / 1e9, "max_rel_err": err})
    return rows


def table(res: dict) -> str:
    """The short table printed last: one line per kernel, lowbit and its peer in ms, their ratio."""
    c = res["ceilings"]
    lines = [f"device: {res['device']}  copy {c['copy_GBps']:.0f} GB/s  bf16 matmul {c['bf16_matmul_TFLOPs']:.0f} TFLOP/s",
             f"{'kernel':<28}{'lowbit ms':>11}{'peer ms':>10}{'ratio':>8}  meaning"]

    def line(label, ours_ms, peer_ms, ratio, meaning):
        lines.append(f"{label:<28}{ours_ms:>11.3f}{peer_ms:>10.3f}{ratio:>8.2f}  {meaning}")
    first_n = res["gemm"][0]["N"] if res["gemm"] else None
    for r in res["gemm"]:
        if r["M"] in (1, 512) and r["N"] == first_n:
            roof = f"{r['pct_of_copy']:.0f}% of copy" if "pct_of_copy" in r else f"{r['pct_of_bf16_mm']:.0f}% of bf16 mm"
            line(f"gemm {r['fmt']} {r['dtype']} M={r['M']}", r["lowbit_ms"], r["dense_ms"], r["speedup_vs_dense"],
                 f"x faster than dense F.linear; {roof}")
    for r in res["lowrank"]:
        line(f"lowrank fused M={r['M']}", r["fused_ms"], r["unfused_ms"], r["speedup_vs_unfused"], "x faster than unfused")
    for r in res["hadamard"]:
        line(f"hadamard n={r['n']} {r['dtype']}", r["hadamard_ms"], r["copy_ms"], r["ratio_vs_copy"], "x the copy's time")
    for r in res["optim"]:
        line(r["kernel"], r["lowbit_ms"], r["torch_fused_ms"], r["ratio_vs_torch_fused"], "x torch fused AdamW's time")
    for r in res.get("svdquant", []):
        if r["N"] == res["svdquant"][0]["N"]:
            line(f"svdquant r=32 M={r['M']}", r["svdquant_ms"], r["w4a16_ms"], r["speedup_vs_w4a16"],
                 f"x faster than W4A16 int4; {r['speedup_vs_dense']:.2f}x dense; {r['gemm_int8_TOPs']:.0f} int8 "
                 f"TOP/s; branch +{100 * r['branch_overhead']:.0f}%")
    for r in res["quant"]:
        lines.append(f"{'quant ' + r['fmt']:<28}{r['quantize_GBps']:>9.0f} GB/s quantize, {r['dequantize_GBps']:.0f} GB/s dequantize")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check_out", help="folder for gpu_bench.json")
    ap.add_argument("--quick", action="store_true", help="4096x4096 gemm shapes only")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: run on the simulator, tiny shapes")
    args = ap.parse_args(argv)
    if args.dry_run:
        device, ctx = "cpu", lowbit.use_backend("sim", threads=2)
        print("gpu_bench --dry-run: the simulator over tiny shapes with wall-clock timers; the figures "
              "below check that the bench runs, they measure nothing", flush=True)
    else:
        ok, why = lowbit._native.cuda_status()
        if not ok:
            print(f"gpu_bench: no usable CUDA device ({why}); use --dry-run on a machine without one")
            return 2
        device, ctx = "cuda", torch.no_grad()
    t = Timer(device)
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "simulator (dry run)",
           "torch": torch.__version__, "lowbit": lowbit.__version__, "dry_run": args.dry_run}
    with ctx, torch.no_grad():
        res["ceilings"] = ceilings(t, device)
        for name, fn in (("gemm", lambda: bench_gemm(t, device, res["ceilings"], args.quick)),
                         ("lowrank", lambda: bench_lowrank(t, device)),
                         ("hadamard", lambda: bench_hadamard(t, device)),
                         ("optim", lambda: bench_optim(t, device)),
                         ("quant", lambda: bench_quant(t, device)),
                         ("svdquant", lambda: bench_svdquant(t, device, args.quick))):
            t0 = time.perf_counter()
            res[name] = fn()
            print(f"gpu_bench: {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
