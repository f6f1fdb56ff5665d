"""Command line: ``python -m lowbit {info,bench,gpucheck,demo,quantize}`` (also installed as ``lowbit``)."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# The bench scripts ship inside the wheel (pyproject.toml maps bench/ to lowbit/bench); a checkout
# has them in bench/. The GPU check kit builds the extension, so it needs a checkout.


def bench_dirs() -> tuple[str, ...]:
    """Where bench scripts are looked for: the package, the tree lowbit was imported from, the current directory."""
    return os.path.join(HERE, "bench"), os.path.join(HERE, "..", "..", "bench"), os.path.join(os.getcwd(), "bench")


def _version() -> str:
    import torch

    import lowbit

    built = " ".join(m for m, ok in lowbit.info()["modules"].items() if ok) or "none"
    return f"lowbit {lowbit.__version__} (torch {torch.__version__}; modules built: {built}; {HERE})"


def _info(args) -> int:
    import lowbit

    d = lowbit.info()
    if args.json:  # machine-readable: everything lowbit.info() returns
        print(json.dumps(d, indent=2, default=str))
        return 0
    kernels = d.pop("cuda_kernels", [])
    errors = d.pop("import_errors", {})
    if not d.get("modules", {}).get("_cuda"):
        errors.pop("cuda", None)  # cuda_status says why
    if errors:
        d["import_errors"] = errors
    width = max(len(k) for k in d)
    for k, v in d.items():
        print(f"{k:<{width}}  {v}")
    if not kernels:
        return 0
    if not args.kernels:
        spills = sum(1 for e in kernels if e["spill_stores"] or e["spill_loads"])
        print(f"{'cuda_kernels':<{width}}  {len(kernels)} kernel x arch entries from ptxas -v, {spills} spilling "
              f"(the table: python -m lowbit info --kernels)")
        return 0
    print(f"\nCUDA kernels compiled ({len(kernels)} kernel x arch entries, from ptxas -v):")
    print(f"  {'arch':<7} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6}  kernel")
    for e in kernels:
        print(f"  {e['arch']:<7} {e['registers'] or 0:>4} {e['spill_stores']:>5}/{e['spill_loads']:<5} "
              f"{e['stack']:>5} {e['smem']:>6}  {e['kernel'][:110]}")
    return 0


def _find_script(name: str) -> str | None:
    for d in bench_dirs():
        path = os.path.join(d, f"{name}.py")
        if os.path.exists(path):
            return os.path.normpath(path)
    return None


def _run_script(path: str, argv: list[str], prog: str) -> int:
    """Run the script's main(argv) with ``prog`` as its name in --help and errors."""
    import importlib.util

    sys.path.insert(0, os.path.dirname(path))  # the bench scripts share _timing.py
    sys.argv[0] = prog  # argparse takes the program name from here
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return int(mod.main(argv) or 0)


def bench_families() -> list[str]:
    for d in bench_dirs():
        found = sorted(os.path.basename(p)[len("bench_"):-3] for p in glob.glob(os.path.join(d, "bench_*.py")))
        if found:
            return found
    return []


def _bench(args) -> int:
    families = bench_families()
    if not args.rest or args.rest[0] in ("-h", "--help"):
        print("usage: python -m lowbit bench FAMILY [options]\n\n"
              "Validate every implementation of a kernel family against the reference, then time it against its\n"
              "peers (medians). Options of a family: python -m lowbit bench FAMILY --help\n")
        print(f"families: {', '.join(families)}" if families else
              "no bench scripts found (neither in the installed package nor in a checkout's bench/)")
        return 0 if args.rest else 2
    family, rest = args.rest[0], args.rest[1:]
    path = _find_script(f"bench_{family}")
    if path is None:
        print(f"python -m lowbit bench: unknown family {family!r}; families: {', '.join(families) or 'none found'}",
              file=sys.stderr)
        return 2
    return _run_script(path, rest, f"python -m lowbit bench {family}")


def _gpucheck(args) -> int:
    # gpu_check builds lowbit for the card it runs on, from the source tree: only a checkout has it.
    for root in (os.path.join(HERE, "..", ".."), os.getcwd()):
        path = os.path.join(root, "bench", "gpu_check.py")
        if os.path.exists(path) and os.path.exists(os.path.join(root, "CMakeLists.txt")):
            return _run_script(os.path.normpath(path), args.rest, "python -m lowbit gpucheck")
    print("python -m lowbit gpucheck builds lowbit from source for the GPU it runs on: run it from a lowbit "
          "checkout (git clone ...; cd lowbit; python -m lowbit gpucheck), see docs/gpu.md", file=sys.stderr)
    return 2


def _demo(args) -> int:
    from .demo import main as demo_main

    return int(demo_main(args.rest) or 0)


def _quantize(args) -> int:
    import torch

    import lowbit

    prog = "python -m lowbit quantize"
    try:  # the block-size rule of lowbit.formats, checked before reading the input
        spec = lowbit.QuantSpec(args.fmt, args.block_size, args.double_quant)
    except (TypeError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if not os.path.isfile(args.input):
        print(f"{prog}: input file {args.input!r} does not exist"
              f"{' (it is a directory)' if os.path.isdir(args.input) else ''}", file=sys.stderr)
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        print(f"{prog}: the output's directory {out_dir!r} does not exist", file=sys.stderr)
        return 2
    try:
        d = lowbit.load_tensors(args.input) if args.input.endswith(".safetensors") else torch.load(args.input)
    except Exception as e:  # a file that is not a checkpoint: say which file and why, no traceback
        print(f"{prog}: cannot read {args.input!r} as a checkpoint (.safetensors, or a torch.save'd dict of "
              f"tensors): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 2
    if not isinstance(d, dict):
        print(f"{prog}: {args.input!r} holds a {type(d).__name__}, not a dict of tensors", file=sys.stderr)
        return 2
    out = {}
    for name, t in d.items():
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_floating_point() and t.shape[1] % spec.block_size == 0:
            out[name] = lowbit.quantize(t, spec)
        else:
            out[name] = t
    lowbit.save_tensors(out, args.output)
    print(f"wrote {args.output}: {sum(isinstance(v, lowbit.QuantizedTensor) for v in out.values())} tensors quantized")
    return 0


class _Version(argparse.Action):
    """--version: computed only when asked (it imports the compiled modules)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lowbit", description="lowbit's command line: low-bit weights, "
                                "packed kernels, their benchmarks and a demo on a real model.",
                                epilog="python -m lowbit COMMAND --help shows the options of a command.")
    p.add_argument("--version", action=_Version, help="lowbit and torch versions, the modules built, where lowbit is")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    a = sub.add_parser("info", help="build and run-time facts: modules, CPU path, CUDA status (short)",
                       description="Build and run-time facts: modules built, CPU path and threads, CUDA status.")
    a.add_argument("--kernels", action="store_true",
                   help="also the registers / spills / shared memory of every compiled CUDA kernel (ptxas -v)")
    a.add_argument("--json", action="store_true", help="everything lowbit.info() returns, as JSON")
    a.set_defaults(fn=_info)
    # bench, gpucheck and demo hand their arguments (--help included) to the tool itself, so its
    # --help lists its real options.
    a = sub.add_parser("bench", add_help=False, help="validate, then time a kernel family against its peers "
                       "(bench FAMILY --help for its options)")
    a.set_defaults(fn=_bench)
    a = sub.add_parser("gpucheck", add_help=False, help="the GPU check kit (docs/gpu.md; from a checkout)")
    a.set_defaults(fn=_gpucheck)
    a = sub.add_parser("demo", add_help=False, help="quantize SmolLM2-135M and compare fp32 / nf4 / int4 / int2 "
                       "(demo --help for its options)")
    a.set_defaults(fn=_demo)
    a = sub.add_parser("quantize", help="quantize every 2-D float tensor of a checkpoint",
                       description="Quantize every 2-D floating tensor whose columns are a multiple of the block "
                                   "size; the rest is copied. Writes a lowbit .safetensors file.")
    a.add_argument("input", help="a .safetensors file, or a torch.save'd dict of tensors")
    a.add_argument("output", help="the .safetensors file to write")
    a.add_argument("--fmt", default="nf4", help="nf4 | fp4 | int4 | int2 (default nf4)")
    a.add_argument("--block-size", type=int, default=64, help="nf4/fp4: 32..4096, int4/int2: 32..256 (powers of 2)")
    a.add_argument("--double-quant", action="store_true", help="compress the block scales as bitsandbytes does")
    a.set_defaults(fn=_quantize)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args, unknown = p.parse_known_args(argv)
    if args.cmd in ("bench", "demo", "gpucheck"):
        args.rest = unknown  # everything after the command belongs to the tool
    elif unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
