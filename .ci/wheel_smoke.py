"""Smoke test of an installed lowbit wheel (run from outside the checkout, in a fresh environment).

Used by .ci/run's wheel stage and by cibuildwheel's test-command. Checks that
* lowbit is imported from the environment, not from a source tree, with its compiled CPU module;
* quantize + linear agree with a dense product on the reference dequantization (the pure-torch spec),
  and the quantization error of a Gaussian matrix is what the format gives (an independent figure);
* the process holds exactly one OpenMP runtime, torch's own (lowbit's _C binds to it).
Prints one line per check and "smoke: N passed, 0 failed" at the end; exits 1 on a failure.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    import torch

    import lowbit

    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append((name, bool(ok), detail))
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)

    here = os.path.realpath(os.path.dirname(lowbit.__file__))
    check("imported from the environment", here.startswith(os.path.realpath(sys.prefix)) and "site-packages" in here,
          here)
    info = lowbit.info()
    check("compiled CPU module", info["modules"]["_C"], f"modules {info['modules']}, cpu path {info.get('cpu_path')}")

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 1024, generator=g)  # (N, K)
    x = torch.randn(40, 1024, generator=g)   # (M, K)
    # Expected ||W - W_hat|| / ||W|| for N(0, 1) weights, block 64 (measured with the reference; the
    # bounds leave room for the sample, not for a wrong format).
    bounds = {"nf4": (0.08, 0.11), "int4": (0.08, 0.13), "int2": (0.35, 0.55)}
    for fmt, (lo, hi) in bounds.items():
        qt = lowbit.quantize(w, fmt, block_size=64)
        with lowbit.use_backend("reference"):
            w_ref = qt.dequantize(torch.float32)  # pure torch: the spec
        rel = ((w_ref - w).norm() / w.norm()).item()
        check(f"{fmt} quantization error", lo <= rel <= hi, f"{rel:.4f} in [{lo}, {hi}]")
        check(f"{fmt} dequantize == reference", torch.equal(qt.dequantize(torch.float32), w_ref))
        for m in (5, 40):  # a decode GEMV and a prefill GEMM
            y = lowbit.linear(x[:m], qt)
            ref = x[:m].double() @ w_ref.double().T
            # the default precision policy ("high"): <= 2e-4 of sum |x| |w| per output
            scale = x[:m].double().abs() @ w_ref.double().abs().T
            err = ((y.double() - ref).abs() / scale).max().item()
            check(f"{fmt} linear vs dense, M={m}", err <= 2e-4, f"max error {err:.2e} of sum|x||w| (bound 2e-4)")

    # A model: the module layer and its progress bar (tqdm, a dependency) on a fresh install.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    with torch.no_grad():
        y_dense = model(x)
        report = lowbit.quantize_model(model, "nf4", block_size=64, skip=())
        y_q = model(x)
    rel = ((y_q - y_dense).norm() / y_dense.norm()).item()
    check("quantize_model", len(report["replaced"]) == 2 and rel < 0.2, f"2 Linears replaced, output error {rel:.3f}")

    # One OpenMP runtime: torch's libgomp, mapped once, also serving lowbit's kernels.
    torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
    gomp = sorted({line.split()[-1] for line in open("/proc/self/maps") if "gomp" in line.rsplit("/", 1)[-1]})
    bundled = [f for f in os.listdir(os.path.dirname(here)) if f.startswith("lowbit") and f.endswith(".libs")]
    check("one OpenMP runtime", len(gomp) <= 1, f"{gomp or 'none mapped'}")
    if gomp and os.path.exists(os.path.join(torch_lib, "libgomp.so.1")):  # torch ships its own: it must be that one
        check("it is torch's", os.path.realpath(gomp[0]).startswith(torch_lib), gomp[0])
    check("no bundled shared libraries (lowbit.libs)", not bundled, str(bundled))

    failed = sum(not ok for _, ok, _ in checks)
    print(f"smoke: {len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
