"""amx_proxy: the AMX kernels' work around their tile operations, timed on a CPU without AMX.

No AMX CPU has run lowbit's AMX kernels yet (issue 13). At small M their time is the decode of W and the
packing around the tiles — ordinary AVX-512 code that any AVX-512 BF16 CPU runs. This script builds the
extension once more with -DLOWBIT_TILE_PROXY=ON (into build/amx-proxy; never installed): the emulated AMX
engine compiled with the AMX build's AVX-512 decode, and tile operations that do nothing when
LOWBIT_TILE_ELIDE=1. It validates both small-M forms of the AMX path with the tiles emulated (a child
process, against float64), then times the rows form (csrc/cpu/gemm_amx.h, route amx_rows) against
the panel engine (route amx) with the tiles elided, alternated in one process (medians, ratios); M up to
128 (the rows form's m-blocks; its route's default stops at 32).

What the figure is: decode + packing + epilogue of each form. What it is not: the tile products (on AMX
one tdpbf16ps, 16 x 16 x 32 MACs, per ~16 cycles per core) nor the cost of real tile loads. A ratio from
here says how much of the engine's non-tile work the rows form removes; only an AMX CPU says what that is
worth (bench/amx_check.py's crossover).

    python bench/amx_proxy.py [--shapes 4096x4096,11008x4096] [--ms 1,8,16,32] [--rounds 9] [--threads 2]
                              [--json F]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import _timing  # noqa: E402
import lowbit  # noqa: E402
from bench_gemm import kernel_call, load_build  # noqa: E402

BUILD = os.path.join(ROOT, "build", "amx-proxy")
# route hooks (csrc/cpu/gemm_avx2.cpp, read per call): every M on the AMX engines, the rows form on or off
FORMS = {"rows": "128", "engine": "0"}


def build() -> str:
    """Configure and build the proxy extension (incremental after the first time); its _C*.so."""
    import pybind11

    gen = ["-G", "Ninja"] if subprocess.run(["ninja", "--version"], capture_output=True).returncode == 0 else []
    subprocess.run(["cmake", "-S", ROOT, "-B", BUILD, *gen, "-DLOWBIT_TILE_PROXY=ON", "-DLOWBIT_WITH_CUDA=OFF",
                    "-DCMAKE_BUILD_TYPE=Release", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", BUILD, "--target", "_C", "-j", str(os.cpu_count() or 2)], check=True,
                   stdout=subprocess.DEVNULL)
    found = glob.glob(os.path.join(BUILD, "**", "_C*.so"), recursive=True)
    if not found:
        raise SystemExit(f"amx_proxy: no _C*.so under {BUILD}")
    return found[0]


def operands(shapes, ms):
    gen = torch.Generator().manual_seed(0)
    for n, k in shapes:
        for fmt, dq in (("nf4", True), ("int4", False)):
            qt = lowbit.quantize(torch.randn(n, k, generator=gen) * 0.02, fmt, 64, dq)
            for m in ms:
                yield n, k, fmt + ("+dq" if dq else ""), qt, m, torch.randn(m, k, generator=gen).to(torch.bfloat16)


def with_form(fn, rows):
    def call():
        os.environ["LOWBIT_AMX_ROWS_MAX_M"] = rows
        fn()
    return call


def validate(so: str, shapes, ms) -> int:
    """Child process, tiles emulated: each form against float64 on its operands (bf16 x, dequantize(bf16))."""
    mod = load_build(so)
    mod.set_cpu_path("amx-emulated")
    for n, k, label, qt, m, x in operands(shapes, ms):
        ref = x.double() @ qt.dequantize(torch.bfloat16).double().T
        for form, rows in FORMS.items():
            y = torch.empty(m, n, dtype=torch.bfloat16)
            with_form(kernel_call(mod, "gemm", x, qt, y), rows)()
            err = float((y.double() - ref).abs().max() / ref.abs().max())
            if not err <= 1e-2:
                print(f"VALIDATION FAILED: {form} {label} {n}x{k} M={m}: max|err|/max|ref| {err:.2e}")
                return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--ms", default="1,8,16,32")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--validate-only", default=None, help=argparse.SUPPRESS)  # the child: the .so to validate
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    if any(m > 128 for m in ms):
        raise SystemExit("--ms: the rows form takes M <= 128")
    torch.set_num_threads(args.threads)
    os.environ["LOWBIT_GEMV_MAX_M"] = "0"  # no GEMV: the AMX forms at every M
    if args.validate_only:
        return validate(args.validate_only, shapes[:1], ms)
    if "avx512bf16" not in lowbit.info()["cpu_paths"]:
        raise SystemExit("amx_proxy: needs an AVX-512 BF16 CPU (the AMX build's decode)")
    so = build()
    child = subprocess.run([sys.executable, __file__, "--validate-only", so, "--shapes", args.shapes, "--ms", args.ms,
                            "--threads", str(args.threads)], env={**os.environ, "LOWBIT_TILE_ELIDE": "0"})
    if child.returncode:
        return 1
    os.environ["LOWBIT_TILE_ELIDE"] = "1"  # read once, at the proxy module's first tile operation
    mod = load_build(so)
    mod.set_cpu_path("amx-emulated")
    print(_timing.machine_line())
    print(f"AMX kernels with their tile operations elided (bench/amx_proxy.py; not AMX timings), bf16 x, "
          f"{args.threads} thread(s), {args.rounds} alternated rounds (medians); validated with the tiles emulated")
    rows_out = []
    for n, k, label, qt, m, x in operands(shapes, ms):
        fns = [with_form(kernel_call(mod, "gemm", x, qt, torch.empty(m, n, dtype=torch.bfloat16)), rows)
               for rows in FORMS.values()]
        for f in fns:
            f()
        (t_rows, t_engine), _ = _timing.timeit_group(fns, args.rounds, swap=True)
        rows_out.append({"shape": [n, k], "fmt": label, "m": m, "rows_ms": t_rows * 1e3, "engine_ms": t_engine * 1e3})
        print(f"{n}x{k} {label:<7} M={m:<3} rows form {t_rows * 1e3:8.3f} ms  engine {t_engine * 1e3:8.3f} ms  "
              f"engine / rows {t_engine / t_rows:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _timing.machine_line(), "threads": args.threads, "rows": rows_out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
