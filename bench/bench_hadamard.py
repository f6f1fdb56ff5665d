"""bench_hadamard: the Walsh–Hadamard transform, lowbit vs torch peers, in one run.

Validates first (lowbit and the torch butterfly against a float64 reference), then times medians of:
  lowbit      lowbit.hadamard(x, s)            (allocates its output, like the peers)
  lowbit out= lowbit.hadamard(x, s, out=buf)   (no allocation)
  clone       torch.clone(x): memcpy, the roofline of a transform that reads and writes each element once
  copy_       buf.copy_(x): the same without the allocation (page faults); the roofline of out=
  butterfly   torch: log2(l) reshaped add/sub stages (+ the m × m mix for n = m·2^k), fp32
  dense       x @ H_n in x's dtype (n ≤ 4096; timed on a slice of rows and scaled: GEMM time is linear in rows)
on ~64 MB of data per dtype. GB/s count bytes read + written (2 × size of x).
Targets (issue 5): lowbit ≤ 1.3× clone (and out= ≤ 1.3× copy_) for n ≤ 4096, ≤ 2× for n ≥ 16384; ≥ 10× faster than the butterfly.

    python bench/bench_hadamard.py [--quick] [--threads N] [--mb 64] [--json out.json]
    python -m lowbit bench hadamard
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import lowbit
from _timing import machine_line, timeit  # bench/_timing.py: medians after warm-up
from lowbit import reference as ref

SIZES = [256, 1024, 4096, 16384, 28672]
DTYPES = [torch.float32, torch.bfloat16]


def torch_butterfly(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The peer a user would write in torch: log2(l) reshaped add/sub stages in fp32, then the m × m mix."""
    n = x.shape[-1]
    m, l = ref.hadamard_split(n)
    y = x.float().reshape(-1, m, l)
    h = 1
    while h < l:
        y = y.view(-1, m, l // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.cat([a + b, a - b], dim=-1).view(-1, m, l)
        h *= 2
    if m > 1:
        y = torch.einsum("ral,ab->rbl", y, ref.hadamard_matrix(m))
    return (y * scale).reshape(x.shape).to(x.dtype)


def validate() -> None:
    for n in (64, 1024, 12 * 64, 28 * 1024, 172 * 64):
        x = torch.randn(8, n)
        s = n ** -0.5
        e = ref.hadamard_ref(x.double(), s)
        for name, y in (("lowbit", lowbit.hadamard(x, s)), ("butterfly", torch_butterfly(x, s))):
            err = ((y.double() - e).abs().max() / e.abs().max()).item()
            assert err < 1e-5, f"{name} n={n}: relative error {err:.2e} against the float64 reference"
        yb = lowbit.hadamard(x.bfloat16(), s).double()
        eb = ref.hadamard_ref(x.bfloat16().double(), s)
        assert ((yb - eb).abs().max() / eb.abs().max()).item() < 1e-2, f"lowbit bf16 n={n}"
    print("validated: lowbit (fp32, bf16) and the torch butterfly == float64 reference "
          "(n = 64, 1024, 768, 28672, 11008)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n = 1024 and 16384 only, fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--mb", type=float, default=64.0, help="MB of data per case")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    print(machine_line())
    torch.set_num_threads(args.threads)
    validate()
    sizes = [1024, 16384] if args.quick else SIZES
    dtypes = DTYPES[:1] if args.quick else DTYPES
    rows_out = []
    print(f"\nthreads={args.threads}, {args.mb:.0f} MB per case, medians of {args.reps}; "
          f"ratios: lowbit time / clone time, and peer time / lowbit time")
    hdr = (f"{'n':>6} {'dtype':>5} {'rows':>6} {'lowbit ms':>9} {'GB/s':>6} {'out= ms':>8} {'clone ms':>8} {'GB/s':>6} "
           f"{'vs clone':>8} {'copy_ ms':>8} {'out=/copy_':>10} {'butterfly ms':>12} {'speedup':>8} {'dense ms':>9} {'speedup':>8}")
    print(hdr)
    for dtype in dtypes:
        for n in sizes:
            esz = torch.finfo(dtype).bits // 8
            rows = max(1, int(args.mb * 1e6) // (n * esz))
            x = torch.randn(rows, n).to(dtype)
            s = n ** -0.5
            gb = 2 * x.numel() * esz / 1e9
            out = torch.empty_like(x)
            t_lb = timeit(lambda: lowbit.hadamard(x, s), args.reps)
            t_out = timeit(lambda: lowbit.hadamard(x, s, out=out), args.reps)
            t_cl = timeit(lambda: x.clone(), args.reps)
            t_cp = timeit(lambda: out.copy_(x), args.reps)
            t_bf = timeit(lambda: torch_butterfly(x, s), max(1, args.reps // 3))
            t_dn = None
            if n <= 4096:
                h = ref.hadamard_matrix(n, dtype)
                part = max(1, rows // 8)
                xs = x[:part]
                t_dn = timeit(lambda: xs @ h, 1) * rows / part
            r = {"n": n, "dtype": str(dtype)[6:], "rows": rows, "lowbit_ms": t_lb * 1e3, "lowbit_gbs": gb / t_lb,
                 "lowbit_out_ms": t_out * 1e3, "clone_ms": t_cl * 1e3, "clone_gbs": gb / t_cl,
                 "lowbit_over_clone": t_lb / t_cl, "copy_ms": t_cp * 1e3,
                 "out_over_copy": t_out / t_cp, "butterfly_ms": t_bf * 1e3, "speedup_vs_butterfly": t_bf / t_lb,
                 "dense_ms": t_dn * 1e3 if t_dn else None, "speedup_vs_dense": t_dn / t_lb if t_dn else None}
            rows_out.append(r)
            dn = f"{t_dn * 1e3:9.1f} {t_dn / t_lb:7.1f}x" if t_dn else f"{'-':>9} {'-':>8}"
            print(f"{n:>6} {r['dtype']:>5} {rows:>6} {t_lb * 1e3:9.2f} {gb / t_lb:6.1f} {t_out * 1e3:8.2f} "
                  f"{t_cl * 1e3:8.2f} {gb / t_cl:6.1f} {t_lb / t_cl:7.2f}x {t_cp * 1e3:8.2f} {t_out / t_cp:9.2f}x {t_bf * 1e3:12.1f} {t_bf / t_lb:7.1f}x {dn}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "mb": args.mb, "rows": rows_out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
