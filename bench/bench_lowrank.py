"""bench_lowrank: LoRA on a quantized base — lowbit's lowrank op vs the unfused and the PEFT-style paths.

Validates every path against the reference first, then times in one run (medians, 2 threads):
  lowbit lowrank   ops.lowrank: one op (fused kernel where the backend has one)
  lowbit unfused   QuantLinear forward + two torch matmuls for the branch
  lowbit base      QuantLinear forward alone (the floor: what the branch's overhead is measured against;
                   timed alternately with lowbit lowrank, overhead = median of the per-pair ratios)
  torch dense      F.linear(fp32 dense W) + lora_B(lora_A(x)) — PEFT over an unquantized base
  bnb + LoRA       bitsandbytes Linear4bit (nf4) + lora_B(lora_A(x)) — PEFT over bitsandbytes
and a training step (forward + backward to x, A, B) of one layer: lowbit vs bnb + LoRA.
Module rows (decode, torch.no_grad()): the LoRALinear module over a QuantLinear (nf4, block 64, double
quant) divided by the QuantLinear module alone, M = 1 and 8 — what a token-by-token decoder pays per
layer for the adapter (LoRALinear's inference fast path; the op's own overhead is the column above).

    python bench/bench_lowrank.py [--quick] [--json out.json]
    python bench/bench_lowrank.py --train-shapes    # the training step at SmolLM2-135M's projection shapes
    python bench/bench_lowrank.py --init-table      # perplexity of LoftQ / QERA corrections on SmolLM2
    python -m lowbit bench lowrank
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import lowbit
from _timing import machine_line, timeit, timeit_pair  # bench/_timing.py: medians after warm-up; paired ratios
from lowbit import ops
from lowbit.formats import DTYPE_ID
from lowbit.ops.lowrank import fused_backward_applies
from lowbit.nn import LoRALinear, QuantLinear


def bnb_layer(w: torch.Tensor, dtype: torch.dtype = torch.float32):
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    l4 = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=dtype, quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
    l4.weight._quantize("cpu")
    return l4


def init_table(args) -> int:
    """Perplexity on Pride and Prejudice (first 4096 tokens, windows of 1024) of SmolLM2 with its
    210 decoder Linears quantized (int2 / int4 / nf4, block 64) and corrected by a rank-r adapter
    initialised plain (no adapter), with LoftQ (5 iterations) or with QERA (calibration: 1024 tokens
    of Emma). Also the mean relative layer-output error on the calibration activations."""
    import copy
    import os

    from lowbit.demo import TEXT, load_smollm2, perplexity
    from lowbit.init import calibration_covariances

    tok, model = load_smollm2()
    ids = tok(open(TEXT, encoding="utf-8").read(), return_tensors="pt").input_ids[0][: args.tokens]
    emma = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "austen", "emma.txt")
    calib_text = open(emma, encoding="utf-8").read()[:20000] if os.path.exists(emma) else open(TEXT).read()[-20000:]
    calib = tok(calib_text, return_tensors="pt").input_ids[:, :1024]
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    covs = calibration_covariances(model, calib, names)

    def out_err(qmodel):
        errs = []
        for n in names:
            layer, dense = qmodel.get_submodule(n), model.get_submodule(n)
            w = dense.weight.detach().double()
            if isinstance(layer, lowbit.nn.LoRALinear):
                w_hat = layer.base.weight.dequantize(torch.float32).double() + layer.delta_weight().double()
            else:
                w_hat = layer.weight.dequantize(torch.float32).double()
            e, c = w - w_hat, covs[n]
            errs.append(float(torch.trace(e @ c @ e.T) / torch.trace(w @ c @ w.T)) ** 0.5)
        return sum(errs) / len(errs)

    print(f"fp32 perplexity: {perplexity(model, ids, 1024):.2f}  ({ids.numel()} tokens)")
    print(f"\n{'fmt':>5} {'init':>6} {'r':>3} {'perplexity':>11} {'output err':>11}")
    results = []
    for fmt in ("int2", "int4", "nf4"):
        for method, r in [("plain", 0)] + [(m, r) for r in (16, 64) for m in ("loftq", "qera")]:
            q = copy.deepcopy(model)
            if method == "plain":
                lowbit.quantize_model(q, fmt, 64, progress=False)
            else:
                lowbit.add_lora(q, r, r, target_modules=None, skip=("lm_head",), init=method, fmt=fmt,
                                block_size=64, calib=calib if method == "qera" else None)
            ppl, err = perplexity(q, ids, 1024), out_err(q)
            results.append({"fmt": fmt, "init": method, "r": r, "perplexity": ppl, "output_error": err})
            print(f"{fmt:>5} {method:>6} {r:>3} {ppl:11.2f} {err:11.4f}", flush=True)
            del q
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def module_rows(shapes, ranks, reps: int) -> list[dict]:
    """LoRALinear module ÷ QuantLinear module under torch.no_grad(), M = 1 and 8, timed alternately
    (the ratio: median over 3 rounds of the median of the per-pair ratios). Validated first: the module
    against a float64 x·deq(W)ᵀ + s·(x·Aᵀ)·Bᵀ."""
    print("\nmodules, torch.no_grad() (nf4 block 64 double quant): LoRALinear / QuantLinear")
    print(f"{'N x K':>11} {'r':>3} {'M':>4} {'x':>5} {'QuantLinear':>12} {'LoRALinear':>11} {'ratio':>7}   (ms)")
    out = []
    for n, k in shapes:
        g = torch.Generator().manual_seed(1)
        lin = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) * 0.02)
        base = QuantLinear.from_linear(lin, "nf4", 64, True)
        w64 = base.weight.dequantize(torch.float32).double()
        for r in ranks:
            layer = LoRALinear(base, r=r, alpha=2 * r)
            with torch.no_grad():
                layer.lora_B["default"].copy_(torch.randn(n, r, generator=g) / r ** 0.5)
            a64, b64 = layer.lora_A["default"].detach().double(), layer.lora_B["default"].detach().double()
            for m, dtype in ((1, torch.float32), (8, torch.float32), (1, torch.bfloat16), (8, torch.bfloat16)):
                x = torch.randn(m, k, generator=g).to(dtype)
                tol = 1e-3 if dtype == torch.float32 else 1e-2  # bf16: products of bf16 operands, bf16 output
                with torch.no_grad():
                    x64 = x.double()
                    ref = x64 @ w64.T + layer.scaling["default"] * (x64 @ a64.T) @ b64.T
                    assert (layer(x).double() - ref).abs().max() <= tol * ref.abs().max(), "LoRALinear != reference"
                    # three rounds of paired medians, their median: one burst of load skews one round only
                    rounds = [timeit_pair(lambda: base(x), lambda: layer(x), 2 * reps) for _ in range(3)]
                    t_q, t_l, ratio = (statistics.median(c) for c in zip(*rounds))
                dn = "fp32" if dtype == torch.float32 else "bf16"
                out.append({"n": n, "k": k, "r": r, "m": m, "dtype": dn, "quantlinear_ms": t_q * 1e3,
                            "loralinear_ms": t_l * 1e3, "module_ratio": ratio})
                print(f"{n:>5}x{k:<5} {r:>3} {m:>4} {dn:>5} {t_q * 1e3:12.3f} {t_l * 1e3:11.3f} {ratio:6.3f}x", flush=True)
    return out


# SmolLM2-135M's decoder projections (N x K) and how many of each one layer has: q/o, k/v, gate/up, down.
SMOLLM2_SHAPES = [(576, 576, 2), (192, 576, 2), (1536, 576, 2), (576, 1536, 1)]


def train_shape_rows(threads: int, m: int = 512, r: int = 16, rounds: int = 21) -> list[dict]:
    """The training step (forward + backward to x, A, B) of one nf4 + dq layer with LoRA r, bf16 x, fp32
    adapters (as LoRALinear and PEFT keep them), at SmolLM2-135M's shapes: lowbit ``ops.lowrank`` vs
    bitsandbytes ``Linear4bit`` + LoRA in fp32 (PEFT's branch), alternated step by step (median of the
    per-pair ratios). Validated first: lowbit's grad_x against float64 on its dequantized weight. The last
    line weighs the shapes as one decoder layer has them (the projections' share of a model's step)."""
    print(f"\ntraining step per shape (bf16 x, fp32 adapters, nf4 + dq, r = {r}, M = {m}, {threads} threads; "
          f"lowbit backward: {'fused' if fused_backward_applies(torch.zeros(1, 1, dtype=torch.bfloat16)) else 'composed'})")
    print(f"{'N x K':>11} {'lowbit':>9} {'bnb+LoRA':>9} {'speed-up':>9}   (ms)")
    rows, tot_l, tot_b = [], 0.0, 0.0
    for n, k, count in SMOLLM2_SHAPES:
        g = torch.Generator().manual_seed(n + k)
        w = torch.randn(n, k, generator=g) * 0.02
        qt = lowbit.quantize(w, "nf4", 64, True)
        l4 = bnb_layer(w, torch.bfloat16)
        x = torch.randn(m, k, generator=g).to(torch.bfloat16).requires_grad_()
        a = (torch.randn(r, k, generator=g) / k ** 0.5).requires_grad_()
        b = (torch.randn(n, r, generator=g) / r ** 0.5).requires_grad_()
        gy = torch.randn(m, n, generator=g).to(torch.bfloat16)
        ops.lowrank(x, qt, a, b, 2.0).backward(gy)
        wd, ab, bb = qt.dequantize().double(), a.detach().to(torch.bfloat16).double(), b.detach().to(torch.bfloat16).double()
        ref = gy.double() @ wd + 2.0 * (gy.double() @ bb) @ ab
        err = float((x.grad.double() - ref).abs().max() / ref.abs().max())
        if not err <= 1e-2:
            raise SystemExit(f"VALIDATION FAILED: lowbit training step {n}x{k}: grad_x {err:.2e}")
        x.grad = a.grad = b.grad = None

        def step_lowbit():
            ops.lowrank(x, qt, a, b, 2.0).backward(gy)
            x.grad = a.grad = b.grad = None

        row = {"n": n, "k": k, "m": m, "r": r, "count": count, "validation_grad_x": err}
        if l4 is None:
            row["lowbit_ms"] = timeit(step_lowbit, rounds, 2) * 1e3
            print(f"{n:>5}x{k:<5} {row['lowbit_ms']:9.3f} {'-':>9} {'-':>9}", flush=True)
        else:
            def step_bnb():
                (l4(x) + 2.0 * F.linear(F.linear(x.to(a.dtype), a), b).to(x.dtype)).backward(gy)
                x.grad = a.grad = b.grad = None

            t_b, t_l, ratio = timeit_pair(step_bnb, step_lowbit, rounds)
            row.update(lowbit_ms=t_l * 1e3, bnb_ms=t_b * 1e3, speedup=1.0 / ratio)
            tot_l, tot_b = tot_l + count * t_l, tot_b + count * t_b
            print(f"{n:>5}x{k:<5} {t_l * 1e3:9.3f} {t_b * 1e3:9.3f} {1.0 / ratio:8.2f}x", flush=True)
        rows.append(row)
    if tot_l:
        print(f"one decoder layer's 7 projections: lowbit {tot_l * 1e3:.2f} ms, bnb + LoRA {tot_b * 1e3:.2f} ms: "
              f"{tot_b / tot_l:.2f}x (sums of medians)")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init-table", action="store_true", help="perplexity table of the initialisations on SmolLM2")
    ap.add_argument("--tokens", type=int, default=4096, help="--init-table: evaluation tokens")
    ap.add_argument("--quick", action="store_true", help="4096x4096, r=16 only")
    ap.add_argument("--train-shapes", action="store_true", help="only the training step at SmolLM2-135M's shapes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    print(machine_line())
    torch.set_num_threads(args.threads)
    if args.init_table:
        return init_table(args)
    if args.train_shapes:
        rows = train_shape_rows(args.threads)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"threads": args.threads, "train_shapes": rows}, f, indent=1)
        return 0
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    ranks = [16] if args.quick else [16, 64]
    ms = [1, 32, 512]
    rows = []
    print(f"lowrank backend: {'fused kernel' if ops.has_kernel('cpu', 'lowrank') else 'composed (gemm + 2 matmuls)'}")
    print(f"\n{'N x K':>11} {'r':>3} {'M':>4} {'lowrank':>8} {'unfused':>8} {'base':>8} {'dense':>8} {'bnb+LoRA':>9}"
          f" {'overhead':>9} {'vs unfused':>10} {'vs bnb':>7}   (ms)")
    for n, k in shapes:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g) * 0.02
        qt = lowbit.quantize(w, "nf4", 64)
        l4 = bnb_layer(w)
        for r in ranks:
            a = torch.randn(r, k, generator=g) / k ** 0.5
            b = torch.randn(n, r, generator=g) / r ** 0.5
            s = 2.0
            for m in ms:
                x = torch.randn(m, k, generator=g)
                # ---- validate every path against the reference
                with lowbit.use_backend("reference"):
                    ref = ops.lowrank(x, qt, a, b, s)
                tol = 1e-3 * ref.abs().max().item()
                y = ops.lowrank(x, qt, a, b, s)
                unfused = lambda: lowbit.linear(x, qt) + s * ((x @ a.T) @ b.T)  # noqa: E731
                assert (y - ref).abs().max() <= tol, "lowrank != reference"
                assert (unfused() - ref).abs().max() <= tol, "unfused != reference"
                if l4 is not None:
                    assert (l4(x) + s * F.linear(F.linear(x, a), b) - ref).abs().max() <= 10 * tol
                # ---- time
                reps = args.reps if m < 512 else max(3, args.reps // 3)
                # lowrank and base timed alternately: the overhead column is the median of the
                # per-pair ratios (robust to the other jobs of a shared machine)
                t_base, t_lr, ratio = timeit_pair(lambda: lowbit.linear(x, qt), lambda: ops.lowrank(x, qt, a, b, s),
                                                  3 * reps if m < 512 else reps)
                t = {
                    "lowrank": t_lr,
                    "unfused": timeit(unfused, reps),
                    "base": t_base,
                    "dense": timeit(lambda: F.linear(x, w) + s * F.linear(F.linear(x, a), b), reps),
                }
                if l4 is not None and (m <= 32 or not args.quick):
                    t["bnb"] = timeit(lambda: l4(x) + s * F.linear(F.linear(x, a), b), max(2, reps // 3), 1)
                row = {"n": n, "k": k, "r": r, "m": m, **{f"{key}_ms": v * 1e3 for key, v in t.items()},
                       "overhead_vs_base": ratio - 1, "speedup_vs_unfused": t["unfused"] / t["lowrank"]}
                if "bnb" in t:
                    row["speedup_vs_bnb"] = t["bnb"] / t["lowrank"]
                rows.append(row)
                bnb_s = f"{t['bnb'] * 1e3:9.2f}" if "bnb" in t else f"{'-':>9}"
                vs_bnb = f"{row['speedup_vs_bnb']:6.1f}x" if "bnb" in t else f"{'-':>7}"
                print(f"{n:>5}x{k:<5} {r:>3} {m:>4} {t['lowrank'] * 1e3:8.3f} {t['unfused'] * 1e3:8.3f} "
                      f"{t['base'] * 1e3:8.3f} {t['dense'] * 1e3:8.3f} {bnb_s} {100 * row['overhead_vs_base']:8.1f}% "
                      f"{row['speedup_vs_unfused']:9.2f}x {vs_bnb}")
    modules = module_rows(shapes, ranks, args.reps)
    # ---- training step of one layer (forward + backward to x, A, B), M = 512, fp32 and bf16
    n, k, r, m = 4096, 4096, 16, 512
    w = torch.randn(n, k) * 0.02
    qt = lowbit.quantize(w, "nf4", 64, True)
    train = {}
    for dtype in (torch.float32, torch.bfloat16):
        dn = "fp32" if dtype == torch.float32 else "bf16"
        g = torch.Generator().manual_seed(1)
        x = torch.randn(m, k, generator=g).to(dtype).requires_grad_()
        a = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype).requires_grad_()
        b = (torch.randn(n, r, generator=g) / r ** 0.5).to(dtype).requires_grad_()
        gy = torch.randn(m, n, generator=g).to(dtype)

        def step_lowbit():
            ops.lowrank(x, qt, a, b, 2.0).backward(gy)
            x.grad = a.grad = b.grad = None

        l4 = bnb_layer(w, dtype)
        # validate first: lowbit's forward and grad_x against the dense product on its own weight
        # (float64), and bitsandbytes' against its own (both nf4 block 64; lowbit with double quant)
        with torch.no_grad():
            wd = qt.dequantize().double()
            ref = x.double() @ wd.T + 2.0 * (x.double() @ a.double().T) @ b.double().T
            err = float((ops.lowrank(x, qt, a, b, 2.0).double() - ref).abs().max() / ref.abs().max())
        y = ops.lowrank(x, qt, a, b, 2.0)
        y.backward(gy)
        gx_ref = gy.double() @ wd + 2.0 * (gy.double() @ b.detach().double()) @ a.detach().double()
        errg = float((x.grad.double() - gx_ref).abs().max() / gx_ref.abs().max())
        x.grad = a.grad = b.grad = None
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
        if not (err <= tol and errg <= tol):
            raise SystemExit(f"VALIDATION FAILED: lowbit training step {dn}: forward {err:.2e}, grad_x {errg:.2e}")
        row = {"validation_fwd": err, "validation_grad_x": errg,
               "routes": {"gemm": lowbit._C.gemm_route(DTYPE_ID[dtype], m, False),
                          "gemm_t": lowbit._C.gemm_route(DTYPE_ID[dtype], m, True)}}
        print(f"\ntraining step ({dn}, fwd + bwd, nf4 {n}x{k}, r={r}, M={m}; lowbit on {row['routes']}): ", end="")
        if l4 is not None:
            def step_bnb():
                (l4(x) + 2.0 * F.linear(F.linear(x, a), b)).backward(gy)
                x.grad = a.grad = b.grad = None

            # alternated step by step: the speed-up is the median of the per-pair ratios
            t_bnb, t_ours, ratio = timeit_pair(step_bnb, step_lowbit, 5, 2)
            row.update(lowbit_ms=t_ours * 1e3, bnb_ms=t_bnb * 1e3, speedup=1.0 / ratio)
            print(f"lowbit {t_ours * 1e3:.1f} ms, bitsandbytes + LoRA {t_bnb * 1e3:.1f} ms: {1.0 / ratio:.2f}x "
                  f"(median of 5 alternated pairs; target >= 2x in bf16)")
        else:
            t_ours = timeit(step_lowbit, 3, 1)
            row["lowbit_ms"] = t_ours * 1e3
            print(f"lowbit {t_ours * 1e3:.1f} ms")
        train[dn] = row
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows, "module_rows": modules, "train_step": train}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
