"""gpu_check: one command that proves lowbit's CUDA kernels on a lent GPU (docs/gpu.md).

Phases (each timed against its budget; --only picks some, so a rerun after a fix is cheap):
  env       Python / torch / CUDA device / nvcc; Python packages missing are reported, never fetched
  build     cmake + ninja in build/gpucheck, in place (python/lowbit/*.so), only the card's own arch,
            against the torch that is there
  test      tests/test_cuda_device.py on the device: every kernel family against the reference, at the
            simulator's shapes and at real model shapes (LOWBIT_REQUIRE_BACKENDS=cuda: no silent skip)
  sanitize  compute-sanitizer memcheck on the small cases, racecheck on the shared-memory kernels
  bench     bench/gpu_bench.py: speed against the card's own copy and bf16-matmul ceilings

    bash bench/gpu_check.sh [--only env,build,test,sanitize,bench] [--out DIR] [--quick]
    bash bench/gpu_check.sh --dry-run      # no GPU: the same phases on the simulator (CI runs this)
    python -m lowbit gpucheck ...          # the same, from a source checkout

Exit code 0 only if every phase run passed. The summary table is printed last and written, with
every phase's output, to DIR (default gpu_check_out/).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("env", "build", "test", "sanitize", "bench")
# Seconds each phase may take on an H100 (docs/gpu.md derives them); a phase over budget is reported,
# not failed: the whole run must fit the 8-minute window of a lent machine.
BUDGET = {"env": 20, "build": 150, "test": 120, "sanitize": 90, "bench": 120}
REQUIRED_PKGS = ("torch", "numpy", "pybind11", "pytest")
OPTIONAL_PKGS = ("safetensors", "scipy", "hypothesis")
SANITIZE = [  # (tool, pytest -k expression): small cases only, the sanitizers slow kernels 10-100x
    ("memcheck", "small and (quant or gemm or adamw)"),        # "quant" also selects test_svdquant_linear
    ("racecheck", "small and (gemm or lowrank or hadamard or svdquant)"),
]


def run(cmd: list[str], log, env=None, timeout=None) -> int:
    """Run cmd from the repository root, teeing its output to stdout and the phase log."""
    print("$ " + " ".join(cmd), flush=True)
    log.write("$ " + " ".join(cmd) + "\n")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in p.stdout:
            sys.stdout.write(line)
            log.write(line)
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return 124


def py_env(args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    env["LOWBIT_GPU_BACKEND"] = "sim" if args.dry_run else "cuda"
    env["LOWBIT_REQUIRE_BACKENDS"] = "sim" if args.dry_run else "cuda"
    return env


def cuda_arch() -> str:
    """The card's own arch for LOWBIT_CUDA_ARCHS (e.g. '90-real' on an H100), from torch."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}-real"


def phase_env(args, log) -> tuple[bool, str]:
    missing = [m for m in REQUIRED_PKGS if importlib.util.find_spec(m) is None]
    absent = [m for m in OPTIONAL_PKGS if importlib.util.find_spec(m) is None]
    lines = [f"python {sys.version.split()[0]} at {sys.executable}"]
    if "torch" not in missing:
        import torch

        lines.append(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                     f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
        if not args.dry_run and not torch.cuda.is_available():
            missing.append("a CUDA device visible to torch (use --dry-run without a GPU)")
    nvcc = shutil.which("nvcc")
    lines.append(f"nvcc {'at ' + nvcc if nvcc else 'not found'}; cmake {'found' if shutil.which('cmake') else 'not found'}; "
                 f"ninja {'found' if shutil.which('ninja') else 'not found'}")
    if not args.dry_run and not nvcc:
        missing.append("nvcc")
    if absent:
        lines.append(f"optional packages absent (the tests that need them skip): {absent}")
    if missing:
        lines.append(f"MISSING (not fetched: this machine has no registry): {missing}")
    for line in lines:
        print(line)
        log.write(line + "\n")
    return not missing, "; ".join(lines[1:2] + [f"missing {missing}"] if missing else lines[1:2])


def phase_build(args, log) -> tuple[bool, str]:
    import pybind11

    cuda = "OFF" if args.dry_run else "ON"
    arch = args.archs or ("none" if args.dry_run else cuda_arch())
    build = os.path.join("build", "gpucheck-dry" if args.dry_run else "gpucheck")
    cfg = ["cmake", "-S", ".", "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DLOWBIT_INPLACE=ON",
           f"-DLOWBIT_WITH_CUDA={cuda}", f"-DLOWBIT_WITH_SIM={'ON' if args.dry_run else 'OFF'}",
           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"]
    if not args.dry_run:
        cfg.append(f"-DLOWBIT_CUDA_ARCHS={arch}")
    t0 = time.perf_counter()
    rc = run(cfg, log) or run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2)], log)
    took = time.perf_counter() - t0
    return rc == 0, f"build {'_C + _sim' if args.dry_run else '_C + _cuda for ' + arch} in {took:.0f} s (rc {rc})"


def phase_test(args, log) -> tuple[bool, str]:
    out = os.path.join(args.out, "junit_test.xml")
    rc = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda_device.py",
              f"--junitxml={out}"], log, env=py_env(args))
    return rc == 0, f"pytest tests/test_cuda_device.py rc {rc}" + (" (simulator, small shapes)" if args.dry_run else "")


def phase_sanitize(args, log) -> tuple[bool, str]:
    if args.dry_run:
        msg = ("skipped in a dry run: compute-sanitizer needs a GPU (the simulator has its own ASan stage in "
               ".ci/run)")
        print(msg)
        return True, msg
    tool = shutil.which("compute-sanitizer")
    if not tool:
        return False, "compute-sanitizer not found"
    results = []
    for name, expr in SANITIZE:
        rc = run([tool, "--tool", name, "--error-exitcode", "1", sys.executable, "-m", "pytest", "-q", "-x",
                  "-p", "no:cacheprovider", "tests/test_cuda_device.py", "-k", expr], log, env=py_env(args))
        results.append((name, rc))
    return all(rc == 0 for _, rc in results), ", ".join(f"{n} rc {rc}" for n, rc in results)


def phase_bench(args, log) -> tuple[bool, str]:
    cmd = [sys.executable, "bench/gpu_bench.py", "--out", args.out] + (["--dry-run"] if args.dry_run else []) + \
          (["--quick"] if args.quick else [])
    rc = run(cmd, log, env=py_env(args))
    return rc == 0, f"bench rc {rc}; table in {os.path.join(args.out, 'gpu_bench.json')}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases of {PHASES}")
    ap.add_argument("--out", default=os.path.join(ROOT, "gpu_check_out"), help="folder for logs and JSON")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: build _C + _sim and run the phases on the simulator")
    ap.add_argument("--quick", action="store_true", help="bench: 4096x4096 gemm shapes only")
    ap.add_argument("--archs", default=None, help="LOWBIT_CUDA_ARCHS for the build (default: the card's own)")
    args = ap.parse_args(argv)
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in only if p not in PHASES]
    if bad:
        ap.error(f"--only: unknown phase(s) {bad}; choose from {PHASES}")
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    summary, ok_all = [], True
    for name in only:
        print(f"\n===== gpu_check phase {name} (budget {BUDGET[name]} s){' [dry run]' if args.dry_run else ''}", flush=True)
        t0 = time.perf_counter()
        with open(os.path.join(args.out, f"{name}.log"), "w") as log:
            try:
                ok, what = globals()[f"phase_{name}"](args, log)
            except Exception as e:  # a broken phase is a failed phase, and the next ones still run
                ok, what = False, f"{type(e).__name__}: {e}"
        took = time.perf_counter() - t0
        summary.append({"phase": name, "ok": ok, "seconds": round(took, 1), "budget": BUDGET[name], "detail": what})
        ok_all &= ok
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump({"dry_run": args.dry_run, "phases": summary}, f, indent=1)
    print("\n===== gpu_check summary" + (" (dry run: simulator, no GPU figures)" if args.dry_run else ""))
    for s in summary:
        over = "  OVER BUDGET" if s["seconds"] > s["budget"] else ""
        print(f"{s['phase']:<9} {'PASS' if s['ok'] else 'FAIL'} {s['seconds']:>6.1f} s / {s['budget']:>3} s{over}  {s['detail']}")
    total = sum(s["seconds"] for s in summary)
    print(f"total {total:.0f} s; logs and JSON in {args.out}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
