"""Command line: ``python -m lowbit {info,bench,gpucheck,demo,quantize}``."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    import lowbit

    d = lowbit.info()
    kernels = d.pop("cuda_kernels", [])
    if args.json:
        d["cuda_kernels"] = kernels
        print(json.dumps(d, indent=2, default=str))
        return 0
    width = max(len(k) for k in d)
    for k, v in d.items():
        print(f"{k:<{width}}  {v}")
    if kernels:
        print(f"\nCUDA kernels compiled ({len(kernels)} kernel x arch entries, from ptxas -v):")
        print(f"  {'arch':<7} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6}  kernel")
        for e in kernels:
            print(f"  {e['arch']:<7} {e['registers'] or 0:>4} {e['spill_stores']:>5}/{e['spill_loads']:<5} "
                  f"{e['stack']:>5} {e['smem']:>6}  {e['kernel'][:110]}")
    return 0


def _run_checkout_script(name: str, argv: list[str]) -> int:
    """Run bench/<name>.py's main(argv): the bench scripts and the GPU check kit live in the source
    tree, not in the wheel, so this works from a checkout (the current directory or the one this
    package was imported from)."""
    import importlib.util
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.getcwd(), os.path.join(here, "..", "..")):
        path = os.path.join(root, "bench", f"{name}.py")
        if os.path.exists(path):
            sys.path.insert(0, os.path.dirname(path))  # the scripts share bench/_timing.py
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return int(mod.main(argv) or 0)
    print(f"bench/{name}.py not found: run from a lowbit checkout", file=sys.stderr)
    return 2


def _bench(args) -> int:
    return _run_checkout_script(f"bench_{args.family}", args.rest)


def _gpucheck(args) -> int:
    return _run_checkout_script("gpu_check", args.rest)


def _demo(args) -> int:
    from .demo import main as demo_main

    return int(demo_main(args.rest) or 0)


def _quantize(args) -> int:
    import torch

    import lowbit

    try:  # the block-size rule of lowbit.formats, checked before reading the input
        spec = lowbit.QuantSpec(args.fmt, args.block_size, args.double_quant)
    except (TypeError, ValueError) as e:
        print(f"python -m lowbit quantize: {e}", file=sys.stderr)
        return 2
    d = lowbit.load_tensors(args.input) if args.input.endswith(".safetensors") else torch.load(args.input)
    out = {}
    for name, t in d.items():
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point() and t.shape[1] % spec.block_size == 0:
            out[name] = lowbit.quantize(t, spec)
        else:
            out[name] = t
    lowbit.save_tensors(out, args.output)
    print(f"wrote {args.output}: {sum(isinstance(v, lowbit.QuantizedTensor) for v in out.values())} tensors quantized")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("info", help="build and run-time facts (modules, CPU path, CUDA, kernels)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=_info)
    a = sub.add_parser("bench", help="run bench/bench_<family>.py (quant, gemm, ...)")
    a.add_argument("family")
    a.add_argument("rest", nargs=argparse.REMAINDER)
    a.set_defaults(fn=_bench)
    a = sub.add_parser("gpucheck", help="the GPU check kit (docs/gpu.md): build, device tests, sanitizers, bench")
    a.add_argument("rest", nargs=argparse.REMAINDER)
    a.set_defaults(fn=_gpucheck)
    a = sub.add_parser("demo", help="quantize a real model and compare fp32 / nf4 / int4 / int2")
    a.add_argument("rest", nargs=argparse.REMAINDER)
    a.set_defaults(fn=_demo)
    a = sub.add_parser("quantize", help="quantize every 2-D float tensor of a checkpoint")
    a.add_argument("input")
    a.add_argument("output")
    a.add_argument("--fmt", default="nf4")
    a.add_argument("--block-size", type=int, default=64, help="nf4/fp4: 32..4096, int4/int2: 32..256 (powers of 2)")
    a.add_argument("--double-quant", action="store_true")
    a.set_defaults(fn=_quantize)
    args, unknown = p.parse_known_args(argv)
    if args.cmd in ("bench", "demo", "gpucheck"):
        args.rest = unknown + list(args.rest)  # options of the sub-tool pass through
    elif unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
