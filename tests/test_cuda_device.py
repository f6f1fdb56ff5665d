"""Every kernel family on a real CUDA device, against the reference (docs/gpu.md, bench/gpu_check.py).

The simulator tests (test_*_cuda.py, test_simt.py) prove the CUDA source at small shapes; this file
runs the same families on the card the GPU check kit finds, at the simulator's shapes ("small")
and at real model shapes the simulator cannot reach ("real": 4096x4096, 11008x4096, 8192x28672,
M in {1, 16, 64, 512}). Products are compared with a float64 product on the dequantized weight
(conftest.assert_close), quantize / dequantize / AdamW steps bit for bit with the reference.

The backend comes from LOWBIT_GPU_BACKEND: "cuda" (default: tensors on the GPU) or "sim" (the
kit's --dry-run: the same tests, small shapes only, on the simulator over CPU tensors). With no
CUDA device the module is skipped as a whole, with the reason — unless LOWBIT_REQUIRE_BACKENDS
names cuda, where that is a failure.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import lowbit
from lowbit import _native
from lowbit.optim.functional import adamw_step, init_state

from conftest import REQUIRED, assert_close, require_backend

BACKEND = os.environ.get("LOWBIT_GPU_BACKEND", "cuda")
if BACKEND not in ("cuda", "sim"):
    raise ValueError(f"LOWBIT_GPU_BACKEND={BACKEND!r} must be 'cuda' or 'sim'")
if BACKEND == "cuda":
    _ok, _why = _native.cuda_status()
    if not _ok:
        if "cuda" in REQUIRED:
            raise RuntimeError(f"LOWBIT_REQUIRE_BACKENDS names cuda but no CUDA device is usable: {_why}")
        pytest.skip(f"no CUDA device ({_why}); bench/gpu_check.py runs this file on a GPU, "
                    "LOWBIT_GPU_BACKEND=sim on the simulator", allow_module_level=True)
DEVICE = "cuda" if BACKEND == "cuda" else "cpu"

FORMATS = ["nf4", "fp4", "int4", "int2"]
HALF = [torch.bfloat16, torch.float16]
# (n, k, block): the simulator tests' kinds of shape — N odd or not a tile multiple, K one block or a
# half k-tile tail — and the real model shapes of docs/kernels.md.
SMALL_W = [(96, 64, 64), (160, 96, 32), (33, 256, 128), (64, 512, 256)]
REAL_W = [(4096, 4096, 64), (11008, 4096, 64), (8192, 28672, 64)]
SMALL_M = [1, 3, 9, 33]
REAL_M = [1, 16, 64, 512]


def cases(small, real):
    """(id, value) params: small ones everywhere, real ones only on the device (marked 'real')."""
    out = [pytest.param(v, id=f"small-{i}") for i, v in enumerate(small)]
    skip = pytest.mark.skipif(BACKEND != "cuda", reason="real model shapes run on a GPU only (simulator: small)")
    out += [pytest.param(v, id=f"real-{i}", marks=skip) for i, v in enumerate(real)]
    return out


def on_device():
    """Run the public API on the chosen backend (for cuda: device placement chooses it)."""
    if BACKEND == "sim":
        require_backend("sim")
        return lowbit.use_backend("sim", schedule="random:5", threads=2)
    return contextlib.nullcontext()


def weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, ::13] *= 6.0  # outlier columns: blocks with very different scales
    return w.to(DEVICE)


def ref_quant(w, fmt, block, dq):
    with lowbit.use_backend("reference"):
        qt = lowbit.quantize(w, fmt, block, dq)
        return qt, qt.dequantize(torch.float32)


# ------------------------------------------------------------------------------------ quant
@pytest.mark.parametrize("shape", cases(SMALL_W, REAL_W))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=str)
def test_quant_bit_exact(shape, fmt, wdtype):
    n, k, block = shape
    w = weight(n, k, seed=n + k).to(wdtype)
    for dq in (False, True):
        want, want_w = ref_quant(w, fmt, block, dq)
        with on_device():
            got = lowbit.quantize(w, fmt, block, dq)
            got_w = got.dequantize(torch.float32)
        assert got.equal(want), f"quantize {fmt} {tuple(w.shape)} dq={dq}: codes/scales differ from the reference"
        assert torch.equal(got_w, want_w), f"dequantize {fmt} {tuple(w.shape)} dq={dq} differs from the reference"


# ------------------------------------------------------------------------------------- gemm
@pytest.mark.parametrize("shape", cases(SMALL_W, REAL_W))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=str)
def test_gemm_forward_and_backward(shape, fmt, dtype):
    n, k, block = shape
    w = weight(n, k, seed=n)
    qt, w32 = ref_quant(w, fmt, block, fmt in ("nf4", "fp4"))
    w64 = w32.double()
    ms = SMALL_M if n * k < 1 << 20 else REAL_M
    for m in ms:
        g = torch.Generator().manual_seed(m)
        x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
        gy = torch.randn(m, n, generator=g).to(DEVICE, dtype)
        bias = torch.randn(n, generator=g).to(DEVICE, dtype)
        with on_device():
            y = lowbit.linear(x, qt, bias)
            gx = lowbit.ops.gemm_t(gy, qt)
        x64, gy64 = x.double(), gy.double()
        name = f"{fmt} {dtype} m={m} n={n} k={k}"
        assert_close(y, x64 @ w64.T + bias.double(), dtype=dtype, k=k, scale=x64.abs() @ w64.abs().T,
                     name="gemm " + name)
        assert_close(gx, gy64 @ w64, dtype=dtype, k=n, scale=gy64.abs() @ w64.abs(), name="gemm_t " + name)


# ---------------------------------------------------------------------------------- lowrank
@pytest.mark.parametrize("shape", cases(SMALL_W[:2], REAL_W[:2]))
@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_lowrank_fused(shape, r, dtype):
    n, k, block = shape
    qt, w32 = ref_quant(weight(n, k, seed=r), "nf4", block, True)
    w64 = w32.double()
    for m in (SMALL_M if n * k < 1 << 20 else REAL_M):
        g = torch.Generator().manual_seed(m + r)
        x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
        a = (torch.randn(r, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
        b = (torch.randn(n, r, generator=g) / r ** 0.5).to(DEVICE, dtype)
        with on_device():
            y = lowbit.ops.lowrank(x, qt, a, b, 0.5)
        x64, a64, b64 = x.double(), a.double(), b.double()
        exp = x64 @ w64.T + 0.5 * (x64 @ a64.T) @ b64.T
        scale = x64.abs() @ w64.abs().T + 0.5 * (x64.abs() @ a64.abs().T) @ b64.abs().T
        assert_close(y, exp, dtype=dtype, k=k, scale=scale, name=f"lowrank r={r} {dtype} m={m} n={n} k={k}")


# --------------------------------------------------------------------------------- hadamard
@pytest.mark.parametrize("n", cases([32, 128, 12 * 16, 40 * 8], [4096, 16384, 28 * 512, 172 * 128]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hadamard(n, dtype):
    rows = 7 if n <= 512 else 64
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n)).to(DEVICE, dtype)
    with lowbit.use_backend("reference"):
        exp = lowbit.hadamard(x.double(), n ** -0.5)
    with on_device():
        y = lowbit.hadamard(x, n ** -0.5)
    assert_close(y, exp, dtype=dtype, k=n, scale=x.double().abs().sum(-1, keepdim=True) * n ** -0.5,
                 name=f"hadamard n={n} {dtype}")


# --------------------------------------------------------------------------------- svdquant
# (m, n, k, r): the simulator's kinds of shape (tests/test_svdquant_mma.py: partial 64 x 128 tiles, N and
# K odd multiples of 64, every rank class of the act kernel) and real ones (4096 x 4096, 11008 x 4096).
SVDQ_SMALL = [(1, 192, 320, 16), (9, 64, 64, 0), (33, 320, 192, 40), (70, 192, 128, 1)]
SVDQ_REAL = [(1, 4096, 4096, 32), (16, 11008, 4096, 32), (512, 4096, 4096, 32), (512, 11008, 4096, 128)]
_svdq_weights = {}


def svdq_weight(n, k):
    """The packed residual (N, K/2) and its scales, quantized once per shape by the reference (on the CPU)."""
    if (n, k) not in _svdq_weights:
        g = torch.Generator().manual_seed(n + k)
        q, s = lowbit.reference.svdquant_quantize_ref(torch.randn(n, k, generator=g))
        _svdq_weights[(n, k)] = (lowbit.reference.svdquant_pack_ref(q), s)
    return _svdq_weights[(n, k)]


@pytest.mark.parametrize("case", cases(SVDQ_SMALL, SVDQ_REAL))
@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=str)
def test_svdquant_linear(case, dtype):
    # The fast kernels (fused act pass, int8 tensor-core GEMM): codes and scales bit-exact with the
    # reference (run on the CPU), down and y within the fp32 bound of float64 (computed on the device).
    from lowbit import reference as ref
    m, n, k, r = case
    g = torch.Generator().manual_seed(m + n + r)
    x = torch.randn(m, k, generator=g)
    x[:, 5::37] *= 8.0
    x = x.to(dtype)
    inv = torch.rand(k, generator=g) + 0.5
    l1 = (torch.randn(n, r, generator=g) * 0.1).to(dtype) if r else None
    l2 = (torch.randn(r, k, generator=g) * 0.1).to(dtype) if r else None
    bias = torch.randn(n, generator=g).to(dtype)
    qw, sw = svdq_weight(n, k)
    dev = [t.to(DEVICE) if t is not None else None for t in (x, inv, l1, l2, bias, qw, sw)]
    xd, invd, l1d, l2d, biasd, qwd, swd = dev
    with on_device():
        qx, sx, down = lowbit.ops.svdquant_act(xd, invd, l2d)
        y = lowbit.ops.svdquant_gemm(qx, sx, qwd, swd, down if r else None, l1d, biasd, dtype)
    rq, rs, _ = ref.svdquant_act_ref(x, inv, l2)
    name = f"svdquant {dtype} m={m} n={n} k={k} r={r}"
    assert torch.equal(qx.cpu(), rq) and torch.equal(sx.cpu(), rs), f"{name}: codes / scales differ from the reference"
    x64 = (xd.double() * invd.double()).float().double()
    if r:
        exp_d = x64 @ l2d.double().T
        bound_d = x64.abs() @ l2d.double().abs().T * k * 2.0 ** -23 + 1e-30
        assert ((down.double() - exp_d).abs() <= bound_d).all(), f"{name}: down out of the fp32 bound"
    w = (lowbit.reference.svdquant_unpack_ref(qwd).double().reshape(n, k // 64, 64) * swd.double()[..., None]).reshape(n, k)
    xq = (qx.double().reshape(m, k // 64, 64) * sx.double()[..., None]).reshape(m, k)
    exp, bound = xq @ w.T + biasd.double(), xq.abs() @ w.abs().T + biasd.double().abs()
    if r:
        exp, bound = exp + down.double() @ l1d.double().T, bound + down.double().abs() @ l1d.double().abs().T
    tol = bound * (k // 64 + r + 4) * 2.0 ** -23 + exp.abs() * (0.0 if dtype == torch.float32 else 2.0 ** -8)
    err = (y.double() - exp).abs()
    assert (err <= tol + 1e-30).all(), f"{name}: max error {float(err.max()):.3g} out of the fp32 bound"


# ------------------------------------------------------------------------------------ optim
@pytest.mark.parametrize("size", cases([257, 4133], [50_000_000]))
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adamw_step_bit_exact(size, bits, dtype):
    g = torch.Generator().manual_seed(size % 1000)
    p0 = (torch.randn(size, generator=g) * 0.1).to(DEVICE, dtype)
    grads = [(torch.randn(size, generator=g) * 1e-2).to(DEVICE, dtype) for _ in range(3)]
    out = []
    for ctx in (lowbit.use_backend("reference"), on_device()):
        p, st = p0.clone(), init_state(p0, bits)
        with ctx:
            for t, gr in enumerate(grads, 1):
                adamw_step(p, gr, st, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, step=t)
        out.append((p, st))
    (p_ref, st_ref), (p_dev, st_dev) = out
    assert torch.equal(p_dev.view(torch.uint8), p_ref.view(torch.uint8)), f"AdamW{bits} params differ"
    for key in st_ref:
        if isinstance(st_ref[key], torch.Tensor):
            assert torch.equal(st_dev[key], st_ref[key]), f"AdamW{bits} state {key!r} differs"
