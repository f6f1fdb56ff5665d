"""gemm family through the public API on every backend: y = x · dequant(W)ᵀ (+ bias) and the
transposed product, compared with a float64 matmul on the *dequantized* weight (so only
accumulation error remains); autograd, opcheck, torch.compile, QuantLinear, quantize_model."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

import lowbit
from lowbit import ops
from lowbit.nn import QuantLinear

from conftest import assert_close, cpu_route_t_bound, cpu_route_bound, require_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = ["nf4", "fp4", "int4", "int2"]


def make(n, k, fmt, block, dq, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, ::13] *= 6.0
    with lowbit.use_backend("reference"):
        qt = lowbit.quantize(w.to(dtype), fmt, block, dq)
        w64 = qt.dequantize(torch.float32).double()
    return qt, w64


def check_gemm(x, qt, w64, bias=None, name=""):
    y = lowbit.linear(x, qt, bias)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], qt.shape[0])
    x64 = x.double()
    expected = x64 @ w64.T + (bias.double() if bias is not None else 0)
    scale = x64.abs() @ w64.abs().T  # bound on sum |x_i w_i| per output
    extra = cpu_route_bound(x, w64).reshape(y.shape) if lowbit._native.backend_for(x) == "cpu" else 0.0
    assert_close(y, expected, dtype=x.dtype, k=qt.shape[1], scale=scale, name=f"gemm {name}", extra=extra)
    gy = torch.randn(*x.shape[:-1], qt.shape[0], generator=torch.Generator().manual_seed(1)).to(x.dtype)
    gx = ops.gemm_t(gy, qt)
    exp_t = gy.double() @ w64
    extra_t = cpu_route_t_bound(gy, w64, qt.block_size) if lowbit._native.backend_for(x) == "cpu" else 0.0
    if torch.is_tensor(extra_t):
        extra_t = extra_t.reshape(gx.shape)
    assert_close(gx, exp_t, dtype=x.dtype, k=qt.shape[0], scale=gy.double().abs() @ w64.abs(), name=f"gemm_t {name}",
                 extra=extra_t)


# M covers GEMV (1..8), odd tails and the tiled path; N odd multiples of the block; K up to 4096.
CASES = [  # (m, n_blocks, k_blocks)
    (1, 1, 1), (2, 3, 2), (3, 5, 1), (7, 1, 4), (8, 3, 3), (16, 7, 2), (33, 3, 5), (128, 5, 2),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_gemm_matches_dense_on_dequantized_weight(backend, fmt, dtype):
    sim = backend == "sim"
    for i, (m, nb, kb) in enumerate(CASES):
        if sim and m * nb * kb > 200:
            continue  # the simulator runs ~1 M threads/s: keep its cases small
        block = (32, 64, 128, 256)[i % 4]
        dq = bool(i % 2)
        qt, w64 = make(nb * block, kb * block, fmt, block, dq, seed=i)
        x = torch.randn(m, kb * block, generator=torch.Generator().manual_seed(100 + i)).to(dtype)
        bias = torch.randn(nb * block).to(dtype) if i % 3 == 0 else None
        check_gemm(x, qt, w64, bias, name=f"{fmt} {dtype} m={m} n={nb * block} k={kb * block} block={block} dq={dq}")


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int2"])
def test_gemm_k4096(kernel_backend, fmt):
    """Real-model K: long accumulations (K = 4096), M = 1 and M = 33."""
    if kernel_backend == "sim":
        ms = (1,)
    else:
        ms = (1, 33)
    qt, w64 = make(3 * 64, 4096, fmt, 64, True, seed=7)
    for m in ms:
        x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(m))
        check_gemm(x, qt, w64, name=f"{fmt} m={m} k=4096")


def test_leading_dims_and_noncontiguous_x(backend):
    qt, w64 = make(96, 128, "nf4", 32, False)
    x = torch.randn(4, 3, 256)[..., ::2]  # (4, 3, 128), non-contiguous
    check_gemm(x, qt, w64, name="3-D non-contiguous x")


# ------------------------------------------------------------------------- autograd
def test_gradcheck_reference_fp64():
    qt, _ = make(64, 64, "nf4", 32, True)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    b = torch.randn(64, dtype=torch.float64, requires_grad=True)
    with lowbit.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda x, b: lowbit.linear(x, qt, b), (x, b))
        assert torch.autograd.gradgradcheck(lambda x, b: lowbit.linear(x, qt, b), (x, b))


def test_grads_equal_across_backends(kernel_backend):
    qt, w64 = make(96, 128, "int4", 64, True)
    x = torch.randn(5, 128, requires_grad=True)
    b = torch.randn(96, requires_grad=True)
    y = lowbit.linear(x, qt, b)
    gy = torch.randn_like(y)
    y.backward(gy)
    with lowbit.use_backend("reference"):
        x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        lowbit.linear(x2, qt, b2).backward(gy)
    assert_close(x.grad, x2.grad.double(), dtype=torch.float32, k=96, scale=gy.abs().double() @ w64.abs(), name="grad x")
    assert_close(b.grad, b2.grad.double(), dtype=torch.float32, k=5, name="grad bias")


@pytest.mark.parametrize("be", ["reference", "cpu"])
def test_opcheck(be):
    require_backend(be)
    qt, _ = make(64, 128, "nf4", 64, True)
    qt_int, _ = make(64, 128, "int2", 32, False)
    with lowbit.use_backend(be):
        for q in (qt, qt_int):
            x = torch.randn(3, 128, requires_grad=True)
            args = (x, *ops.weight_args(q), torch.randn(64), 64, 128, q.block_size, q.fmt)
            torch.library.opcheck(torch.ops.lowbit.gemm.default, args)
            gy = torch.randn(3, 64, requires_grad=True)
            torch.library.opcheck(torch.ops.lowbit.gemm_t.default, (gy, *ops.weight_args(q), 64, 128, q.block_size, q.fmt))


def test_torch_compile_fullgraph():
    lin = torch.nn.Linear(128, 64)
    model = torch.nn.Sequential(QuantLinear.from_linear(lin, "nf4", 64, True), torch.nn.GELU())
    x = torch.randn(4, 128)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), model(x))


# ------------------------------------------------------------------------- modules
def test_quant_linear_state_dict_round_trip_exact():
    lin = torch.nn.Linear(256, 96, dtype=torch.bfloat16)
    q = QuantLinear.from_linear(lin, "nf4", 64, True)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    q2 = QuantLinear(256, 96, bias=True, fmt="nf4", block_size=64, double_quant=True)
    q2.load_state_dict(torch.load(buf), strict=True)
    assert q2.weight.equal(q.weight) and q2.weight.dtype == torch.bfloat16
    assert torch.equal(q2.bias, q.bias)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(q2(x), q(x))
    wrong = QuantLinear(256, 96, fmt="int4", block_size=64)
    with pytest.raises(ValueError, match="state dict holds a .96, 256. QuantSpec.fmt='nf4'"):
        wrong.load_state_dict(q.state_dict(), strict=True)


def test_quant_linear_dtype_cast_keeps_format():
    q = QuantLinear.from_linear(torch.nn.Linear(128, 64), "int4", 32, True)
    before = q.weight.clone()
    q.half()
    assert q.bias.dtype == torch.float16 and q.weight.equal(before)
    y = q(torch.randn(2, 128, dtype=torch.float16))
    assert y.dtype == torch.float16
    assert "fmt='int4'" in repr(q) and "bits_per_weight" in repr(q)


def test_quantize_model_replaces_linears_and_matches_reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 96),
                                torch.nn.Linear(96, 10))  # 96 % 64 != 0 -> stays dense
    model.lm_head = torch.nn.Linear(10, 10)
    x = torch.randn(5, 64)
    report = lowbit.quantize_model(model, "nf4", 64, progress=False)
    assert report["replaced"] == ["0", "2"] and report["incompatible"] == ["3"] and report["skipped"] == ["lm_head"]
    assert report["bytes_after"] < report["bytes_before"]
    assert isinstance(model[0], QuantLinear) and isinstance(model[3], torch.nn.Linear)
    w0, w2 = (model[i].weight.dequantize(torch.float32).double() for i in (0, 2))
    h = torch.relu(x.double() @ w0.T + model[0].bias.double())
    ref = h @ w2.T + model[2].bias.double()
    scale = (x.double().abs() @ w0.abs().T + model[0].bias.double().abs()) @ w2.abs().T + model[2].bias.double().abs()
    assert_close(model[2](torch.relu(model[0](x))), ref, dtype=torch.float32, k=128, scale=scale, factor=8)


# ------------------------------------------------------------------------- errors
def test_gemm_bad_inputs():
    qt, _ = make(64, 128, "nf4", 64, False)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=100 does not match in_features K=128"):
        lowbit.linear(torch.randn(2, 100), qt)
    with pytest.raises(TypeError, match="x.dtype=torch.int64"):
        lowbit.linear(torch.ones(2, 128, dtype=torch.int64), qt)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        lowbit.linear(torch.randn(2, 128), torch.randn(64, 128))
    with pytest.raises(ValueError, match="bias"):
        lowbit.linear(torch.randn(2, 128), qt, torch.randn(63))
    with pytest.raises(ValueError, match=r"gy.shape\[-1\]=128 does not match out_features N=64"):
        ops.gemm_t(torch.randn(2, 128), qt)
    big, _ = make(8, 1024, "nf4", 1024, False)
    with pytest.raises(ValueError, match="block_size=1024"):
        lowbit.linear(torch.randn(1, 1024), big)
    with pytest.raises(ValueError, match="in_features=100 is not a multiple of block_size=64"):
        QuantLinear(100, 10, block_size=64)
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(torch.nn.Conv1d(3, 3, 1))


def test_eager_inference_skips_the_op_with_the_same_result():
    """Plain eager inference on the CPU kernels calls the kernel without the torch.library op (its
    dispatch costs ≈ 40 µs a call); the result is the op's, bit for bit, and every case the op must see
    (autograd, a dispatch mode, another backend, a tensor subclass) still goes through it."""
    require_backend("cpu")
    from torch.utils._python_dispatch import TorchDispatchMode

    from lowbit.ops._common import weight_args
    from lowbit.ops.gemm import _eager_kernel_call

    qt = lowbit.quantize(torch.randn(96, 128), "nf4", 64, True)
    w = weight_args(qt)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 128).to(dtype)
        bias = torch.randn(96).to(dtype)
        with torch.no_grad():
            y = ops.gemm(x, qt, bias)
        y_op = torch.ops.lowbit.gemm(x, *w, bias, 96, 128, 64, "nf4", "cpu")
        assert torch.equal(y, y_op)
    x = torch.randn(5, 128)
    assert _eager_kernel_call("cpu", x, None, w)
    assert not _eager_kernel_call("reference", x, None, w)
    assert not _eager_kernel_call("sim", x, None, w)
    xg = x.clone().requires_grad_()
    assert not _eager_kernel_call("cpu", xg, None, w)
    with torch.no_grad():
        assert _eager_kernel_call("cpu", xg, None, w)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as mode:
        assert not _eager_kernel_call("cpu", x, None, w)
        ops.gemm(x, qt)
    assert any("lowbit.gemm" in o for o in mode.ops), mode.ops

    class Sub(torch.Tensor):
        pass

    assert not _eager_kernel_call("cpu", x.as_subclass(Sub), None, w)
    # and autograd still flows through the op
    y = ops.gemm(xg, qt)
    y.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape


def test_quant_linear_inference_calls_the_kernel_from_its_components(monkeypatch):
    """QuantLinear's eager inference (ops.gemm_inference) builds no QuantizedTensor per call, gives
    lowbit.linear's bits for every dtype, bias or not, any leading shape; grad recording, the reference
    backend and a tensor subclass take linear(); the kernel door still checks each component per call."""
    require_backend("cpu")
    from lowbit import formats

    built = []
    real_check = formats.QuantizedTensor._check
    monkeypatch.setattr(formats.QuantizedTensor, "_check", lambda self: built.append(1) or real_check(self))
    for bias in (True, False):
        layer = QuantLinear.from_linear(torch.nn.Linear(128, 96, bias=bias), "nf4", 64, True)
        qt = layer.weight
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(2, 3, 128).to(dtype)
            want = lowbit.linear(x, qt, layer.bias)
            for ctx in (torch.no_grad, torch.inference_mode):
                n = len(built)
                with ctx():
                    y = layer(x)
                assert len(built) == n, "a QuantizedTensor was built: the fast path was not taken"
                assert y.dtype == dtype and y.shape == (2, 3, 96) and torch.equal(y, want)
    # the fast path declines: grads recorded, another backend, a subclass -> linear() (builds the weight)
    class Sub(torch.Tensor):
        pass

    xg = torch.randn(4, 128, requires_grad=True)
    for what, run in (("grad recording", lambda: layer(xg).sum().backward()),
                      ("the reference backend", lambda: layer(xg.detach())),
                      ("a subclass", lambda: layer(torch.randn(1, 128).as_subclass(Sub)))):
        n = len(built)
        with (lowbit.use_backend("reference") if what == "the reference backend" else contextlib.nullcontext()):
            run()
        assert len(built) > n, f"{what}: the fast path was taken"
    assert xg.grad is not None
    # the door: a component whose storage no longer holds it is refused, not read past
    layer.scale_q.untyped_storage().resize_(10)
    with torch.no_grad(), pytest.raises(ValueError, match="scale_q spans"):
        layer(torch.randn(1, 128))


def test_quant_linear_in_a_fresh_process_without_torch_distributed_tensor():
    """A QuantLinear's forward in a process that never imported torch.distributed.tensor (the eager
    path no longer imports it through the op's machinery): the FSDP check must not need that module."""
    require_backend("cpu")
    import subprocess
    import sys

    code = ("import sys, torch, lowbit\n"
            "m = torch.nn.Sequential(torch.nn.Linear(128, 64))\n"
            "x = torch.randn(3, 128)\n"
            "with torch.no_grad():\n"
            "    lowbit.quantize_model(m, 'nf4', block_size=64, skip=())\n"
            "    y = m(x)\n"
            "opt = lowbit.optim.AdamW8bit([torch.nn.Parameter(torch.randn(4096))])\n"
            "opt.param_groups[0]['params'][0].grad = torch.randn(4096)\n"
            "opt.step()\n"
            "print(tuple(y.shape), 'torch.distributed.tensor' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["(3,", "64)"], out.stdout
