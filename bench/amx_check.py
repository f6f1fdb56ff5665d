"""amx_check: issue 13's AMX measurements in one command, for the session that gets an AMX Xeon.

Every AMX target of the matrix-engine issue has stayed "not measured" because the sessions that had time
for it ran on Zen 3 / Zen 4. This runs, in order, what an AMX session has to run and prints the targets
table from the benches' own JSON (nothing is re-timed here):

  machine   lscpu's model and matrix flags, lowbit's CPU path and AMX status; without AMX (CPU, OS or
            process permission) it stops with the reason (exit 2) unless --dry-run
  test      pytest of the engines (tests/test_gemm_engines.py: real 'amx' next to 'amx-emulated' and
            'avx512bf16'), the lowrank and SVDQuant CPU tests
  bench     bench_gemm.py --bf16 and --crossover, bench_lowrank.py --quick and --train-shapes,
            bench_train.py (each validates before it times; JSON into --out)
  summary   the issue's targets against those JSON files: MET / NOT MET with the figure, and where the
            GEMV should hand over to the engine against where gemm_route does now; summary.md

    python bench/amx_check.py [--out DIR] [--only machine,test,bench,summary] [--threads 2] [--dry-run]

--dry-run runs on any machine (no AMX needed): the engine tests, bench_gemm --bf16 --quick and
bench_lowrank --quick only (minutes, not the ≈ 15 of a full run), and a summary that says which CPU path
the figures came from. Exit code: 0 when every phase that ran passed (NOT MET targets do not fail it:
they are the measurement), 1 when a test or a bench's validation failed, 2 when AMX is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PHASES = ("machine", "test", "bench", "summary")
TESTS = ["tests/test_gemm_engines.py", "tests/test_lowrank_cpu.py", "tests/test_svdquant_cpu.py"]
# issue 13's targets on an AMX CPU: speed-up over torch dense bf16 by M (forward, both shapes and formats)
GEMM_GOALS = {8: 1.5, 32: 1.5, 128: 1.2, 512: 1.0, 2048: 1.0}
GEMM_T_GOAL = (512, 1.0)
TRAIN_STEP_GOAL, WHOLE_MODEL_GOAL = 2.0, 1.5


def lscpu_facts() -> dict:
    """Model name and the matrix-engine flags lscpu reports ('' where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    facts = {"model": "", "flags": []}
    for line in out.splitlines():
        key, _, val = line.partition(":")
        if key.strip() == "Model name":
            facts["model"] = val.strip()
        elif key.strip() == "Flags":
            facts["flags"] = [f for f in val.split() if f.startswith(("amx", "avx512_bf16", "avx512_fp16"))]
    return facts


def machine(args) -> int:
    import lowbit

    facts = lscpu_facts()
    info = lowbit.info()
    status = info.get("amx_status") or ""
    print(f"machine: {facts['model'] or 'unknown CPU'}; matrix flags: {' '.join(facts['flags']) or 'none'}")
    print(f"lowbit CPU paths {info.get('cpu_paths')}, in use {info.get('cpu_path')}; AMX: {status or 'available'}")
    with open(os.path.join(args.out, "machine.json"), "w") as f:
        json.dump({**facts, "cpu_path": info.get("cpu_path"), "cpu_paths": info.get("cpu_paths"), "amx_status": status,
                   "dry_run": args.dry_run}, f, indent=1)
    if status and not args.dry_run:
        print(f"amx_check: no AMX in this process ({status}): nothing here can measure the AMX targets. "
              "--dry-run exercises the kit on this CPU.", file=sys.stderr)
        return 2
    return 0


def run(cmd: list[str], log: str) -> int:
    """A step as a subprocess from the repository root, its output echoed and kept in ``log``."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), HERE,
                                                       os.environ.get("PYTHONPATH", "")]))
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in p.stdout:
            sys.stdout.write(line)
            f.write(line)
        rc = p.wait()
    print(f"[{rc}] in {time.perf_counter() - t0:.0f} s", flush=True)
    return rc


def test(args) -> int:
    return 1 if run([sys.executable, "-m", "pytest", "-q", *TESTS], os.path.join(args.out, "test.log")) else 0


def bench(args) -> int:
    py, th, out = sys.executable, ["--threads", str(args.threads)], args.out
    steps = [([py, "bench/bench_gemm.py", "--bf16", *th, "--json", f"{out}/gemm_bf16.json"]
              + (["--quick"] if args.dry_run else []), "gemm_bf16"),
             ([py, "bench/bench_gemm.py", "--crossover", *th, "--json", f"{out}/crossover.json"]
              + (["--quick", "--ms-bf16", "1,3,4,8,13", "--ab-rounds", "7"] if args.dry_run
                 else ["--ms-bf16", "1,2,3,4,5,6,8,12,16,24,32,40,64,128"]), "crossover"),  # the rows form to 128
             ([py, "bench/bench_lowrank.py", "--quick", *th, "--json", f"{out}/lowrank.json"], "lowrank")]
    if not args.dry_run:
        steps += [([py, "bench/bench_lowrank.py", "--train-shapes", *th, "--json", f"{out}/train_shapes.json"],
                   "train_shapes"),
                  ([py, "bench/bench_train.py", *th, "--json", f"{out}/train.json"], "train")]
    rc = 0
    for cmd, name in steps:
        rc = max(rc, 1 if run(cmd, os.path.join(out, f"{name}.log")) else 0)
    return rc


def _load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def targets(out: str) -> list[tuple[str, str, float | None, float]]:
    """(target, row, measured, goal) from the JSON files in ``out``; measured None = not in this run."""
    rows = []
    g = _load(os.path.join(out, "gemm_bf16.json")) or {"rows": []}
    for r in g["rows"]:
        if not r["impl"].startswith("lowbit"):
            continue
        shape, m = "x".join(map(str, r["shape"])), r["m"]
        if r["product"] == "gemm" and m in GEMM_GOALS:
            rows.append(("gemm vs torch dense bf16", f"M={m} {shape} {r['impl']}", r["vs_dense"], GEMM_GOALS[m]))
        if r["product"] == "gemm_t" and m == GEMM_T_GOAL[0]:
            rows.append(("gemm_t vs torch dense bf16", f"M={m} {shape} {r['impl']}", r["vs_dense"], GEMM_T_GOAL[1]))
    lr = _load(os.path.join(out, "lowrank.json")) or {}
    step = lr.get("train_step", {}).get("bf16", {})
    rows.append(("training step vs bnb + LoRA", "nf4+dq 4096² r=16 M=512 bf16", step.get("speedup"), TRAIN_STEP_GOAL))
    tr = _load(os.path.join(out, "train.json")) or {}
    rows.append(("whole model vs PEFT + bnb", "SmolLM2-135M bf16 512 tokens", tr.get("speedup"), WHOLE_MODEL_GOAL))
    return rows


def routing(out: str) -> list[str]:
    """Per product of crossover.json: whether gemm_route's kernel is (within 10%) the fastest at every M."""
    lines = []
    for c in (_load(os.path.join(out, "crossover.json")) or {}).get("crossover", []):
        verdict = "OK" if not c["retune_m"] else f"RETUNE at M = {', '.join(map(str, c['retune_m']))}"
        lines.append(f"| {c['dtype'].replace('torch.', '')} {c['precision']} {c['fmt']} "
                     f"{'x'.join(map(str, c['shape']))} | {', '.join(c['kernels'])} ({c['engine']}) | {verdict} |")
    return lines


def summary(args) -> int:
    m = _load(os.path.join(args.out, "machine.json")) or {}
    head = (f"machine: {m.get('model') or 'unknown'}; flags {' '.join(m.get('flags', [])) or 'none'}; lowbit path "
            f"{m.get('cpu_path')}; AMX {m.get('amx_status') or 'available'}"
            + ("; DRY RUN (not AMX figures)" if m.get("dry_run") else ""))
    lines = [head, "", "| target | row | measured | goal | |", "|---|---|---|---|---|"]
    for name, row, got, goal in targets(args.out):
        verdict = "not run" if got is None else ("MET" if got >= goal else "NOT MET")
        shown = "-" if got is None else f"{got:.2f}x"
        lines.append(f"| {name} | {row} | {shown} | >= {goal:g}x | {verdict} |")
    route = routing(args.out)
    if route:
        lines += ["", "Small-M routing (bench_gemm.py --crossover; the constants in csrc/cpu/gemm_avx2.cpp):", "",
                  "| product | kernels timed | routed kernel the fastest? |", "|---|---|---|"] + route
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "amxcheck"), help="logs, JSON and summary.md")
    ap.add_argument("--only", default=",".join(PHASES), help="comma list of phases")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="any CPU: tests and the quick benches, labelled as such")
    args = ap.parse_args(argv)
    phases = args.only.split(",")
    for p in phases:
        if p not in PHASES:
            ap.error(f"--only: {p!r} is not one of {PHASES}")
    os.makedirs(args.out, exist_ok=True)
    rc = 0
    for name in PHASES:
        if name in phases:
            r = {"machine": machine, "test": test, "bench": bench, "summary": summary}[name](args)
            if r == 2:
                return 2
            rc = max(rc, r)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
