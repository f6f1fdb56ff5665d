"""lowrank family: y = x·dequant(W)ᵀ + s·(x·Aᵀ)·Bᵀ on every backend against float64; its
gradients; LoRALinear / add_lora; PEFT adapter files both ways; error-reconstructing inits."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit import init, ops
from lowbit.nn import LoRALinear, QuantLinear

from conftest import assert_close, cpu_route_bound


def make(n, k, fmt="nf4", block=64, dq=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    with lowbit.use_backend("reference"):
        qt = lowbit.quantize(w, fmt, block, dq)
        w64 = qt.dequantize(torch.float32).double()
    return w, qt, w64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("m, r", [(1, 1), (3, 16), (33, 7), (128, 64)])
def test_lowrank_matches_float64(backend, dtype, m, r):
    if backend == "sim" and m * r > 200:
        pytest.skip("simulator: small cases only")
    n, k = 192, 256
    _, qt, w64 = make(n, k, "int4" if r % 2 else "nf4", 64, True, seed=r)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype)
    a = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype)
    b = (torch.randn(n, r, generator=g) / r ** 0.5).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    y = ops.lowrank(x, qt, a, b, 0.5, bias)
    x64, a64, b64 = x.double(), a.double(), b.double()
    expected = x64 @ w64.T + 0.5 * (x64 @ a64.T) @ b64.T + bias.double()
    scale = x64.abs() @ w64.abs().T + 0.5 * (x64.abs() @ a64.abs().T) @ b64.abs().T
    extra = cpu_route_bound(x, w64) if backend == "cpu" else 0.0
    assert_close(y, expected, dtype=dtype, k=k + r, scale=scale, factor=8 if dtype == torch.bfloat16 else 4, extra=extra)


def test_lowrank_gradcheck_reference():
    _, qt, _ = make(64, 128)
    x = torch.randn(3, 128, dtype=torch.float64, requires_grad=True)
    a = torch.randn(5, 128, dtype=torch.float64, requires_grad=True)
    b = torch.randn(64, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(64, dtype=torch.float64, requires_grad=True)
    with lowbit.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda *t: ops.lowrank(t[0], qt, t[1], t[2], 0.7, t[3]), (x, a, b, bias))


def test_lowrank_grads_match_autograd_of_dense(kernel_backend):
    """Backward formulas (dx, dA, dB, dbias) against torch autograd through a dense float64 model."""
    _, qt, w64 = make(96, 128, "int2", 32, False)
    x = torch.randn(4, 128, requires_grad=True)
    a = torch.randn(6, 128, requires_grad=True)
    b = torch.randn(96, 6, requires_grad=True)
    bias = torch.randn(96, requires_grad=True)
    gy = torch.randn(4, 96)
    ops.lowrank(x, qt, a, b, 2.0, bias).backward(gy)
    def dense_grads(sign):  # float64 autograd; with sign=abs it gives the sums of |terms| (error scale)
        leaves = [sign(t.detach().double()).requires_grad_() for t in (x, a, b, bias)]
        x6, a6, b6, bias6 = leaves
        (x6 @ sign(w64).T + 2.0 * (x6 @ a6.T) @ b6.T + bias6).backward(sign(gy.double()))
        return [t.grad for t in leaves]

    want, scale = dense_grads(lambda t: t), dense_grads(torch.abs)
    for got, w_, s_, name in zip((x.grad, a.grad, b.grad, bias.grad), want, scale, "x A B bias".split()):
        assert_close(got, w_, dtype=torch.float32, k=200, scale=s_, name=f"grad {name}")


def test_lowrank_opcheck():
    _, qt, _ = make(64, 128)
    x = torch.randn(3, 128, requires_grad=True)
    a = torch.randn(4, 128, requires_grad=True)
    b = torch.randn(64, 4, requires_grad=True)
    for be in ("reference", "cpu"):
        with lowbit.use_backend(be):
            torch.library.opcheck(torch.ops.lowbit.lowrank.default,
                                  (x, *ops.weight_args(qt), a, b, 0.5, torch.randn(64), 64, 128, 64, "nf4"))


def test_lowrank_errors():
    _, qt, _ = make(64, 128)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="lora_A .4, 100. / lora_B"):
        ops.lowrank(x, qt, torch.randn(4, 100), torch.randn(64, 4))
    with pytest.raises(ValueError, match="rank r=300"):
        ops.lowrank(x, qt, torch.randn(300, 128), torch.randn(64, 300))
    with pytest.raises(TypeError, match="lora_B"):
        ops.lowrank(x, qt, torch.randn(4, 128), [[0.0]])


# ------------------------------------------------------------------------- LoRALinear
def test_lora_linear_starts_at_base_and_trains_only_adapters():
    base = QuantLinear.from_linear(torch.nn.Linear(128, 64), "nf4", 64, True)
    layer = LoRALinear(base, r=8, alpha=16)
    x = torch.randn(5, 128)
    assert torch.equal(layer(x), base(x))  # B = 0
    assert layer.scaling["default"] == 2.0 and layer.lora_A["default"].shape == (8, 128)
    # PEFT / nn.Linear init: Kaiming-uniform with a = sqrt(5) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    a_max = layer.lora_A["default"].abs().max().item()
    assert 0.9 * 128 ** -0.5 < a_max <= 128 ** -0.5
    layer(x).sum().backward()
    assert layer.lora_B["default"].grad is not None and base.bias.grad is None


def test_lora_merge_unmerge_and_multiple_adapters():
    base = QuantLinear.from_linear(torch.nn.Linear(128, 64), "int4", 32, False)
    layer = LoRALinear(base, r=4, alpha=8)
    layer.add_adapter("second", r=2, alpha=1)
    with torch.no_grad():
        for n in ("default", "second"):
            layer.lora_B[n].normal_(0, 0.05)
    x = torch.randn(3, 128)
    layer.set_adapter(["default", "second"])
    y_both = layer(x)
    w64, x64 = base.weight.dequantize(torch.float32).double(), x.double()
    branch = sum(layer.scaling[n] * (x64 @ layer.lora_A[n].double().T) @ layer.lora_B[n].double().T
                 for n in ("default", "second"))
    expected = x64 @ w64.T + base.bias.double() + branch
    scale = x64.abs() @ w64.abs().T + base.bias.abs().double() + branch.abs()
    assert_close(y_both, expected, dtype=torch.float32, k=132, scale=scale, extra=cpu_route_bound(x, w64))
    before = base.weight.clone()
    err = layer.merge()
    assert 0 < err < 0.2 and layer.merged is not None
    assert_close(layer(x), y_both.double(), dtype=torch.float32, k=128, scale=y_both.abs().double() + 1, factor=2e5)
    layer.unmerge()
    assert base.weight.equal(before)
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_adapter("third")


def test_lora_linear_is_the_public_fused_product():
    qt = lowbit.quantize(torch.randn(64, 128) * 0.05, "nf4", 64, True)
    x = torch.randn(5, 128, requires_grad=True)
    a = (torch.randn(8, 128) * 0.1).requires_grad_()
    b = (torch.randn(64, 8) * 0.1).requires_grad_()
    bias = torch.randn(64, requires_grad=True)
    y = lowbit.lora_linear(x, qt, a, b, scale=0.5, bias=bias)
    assert lowbit.lora_linear is lowbit.functional.lora_linear
    assert torch.equal(y, ops.lowrank(x, qt, a, b, 0.5, bias))
    y.sum().backward()
    assert all(t.grad is not None for t in (x, a, b, bias))


def test_nn_add_lora_is_a_deprecated_alias():
    model = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(64, 64)})
    with pytest.warns(DeprecationWarning, match="lowbit.nn.add_lora is deprecated; use lowbit.add_lora"):
        assert lowbit.nn.add_lora(model, r=4, target_modules=("q_proj",)) == ["q_proj"]
    from lowbit.nn import add_lora

    assert add_lora is lowbit.nn.lora.add_lora is lowbit.nn.add_lora


def test_add_lora_freezes_everything_else():
    model = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(64, 64), "mlp": torch.nn.Linear(64, 32)})
    wrapped = lowbit.add_lora(model, r=4, target_modules=("q_proj",))
    assert wrapped == ["q_proj"] and isinstance(model["q_proj"], LoRALinear)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["q_proj.lora_A.default", "q_proj.lora_B.default"]
    with pytest.raises(ValueError, match="no Linear"):
        lowbit.add_lora(model, target_modules=("nothing",))


# ------------------------------------------------------------------------- PEFT interop
def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_peft_adapter_loads_into_lowbit(tmp_path):
    peft = pytest.importorskip("peft")
    base = _tiny_llama()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                 init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    loaded = lowbit.load_adapter(ours, tmp_path)
    assert len(loaded) == 14
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert_close(ours(ids).logits, pm(ids).logits.double(), dtype=torch.float32, k=128, scale=1.0)
        assert not torch.allclose(ours(ids).logits, base(ids).logits)  # the adapter does something


def test_lowbit_adapter_loads_into_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = _tiny_llama()
    ours = copy.deepcopy(base)
    lowbit.add_lora(ours, r=4, alpha=8, target_modules=TARGETS)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    lowbit.save_adapter(ours, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert_close(pm(ids).logits, ours(ids).logits.double(), dtype=torch.float32, k=128, scale=1.0)


# ------------------------------------------------------------------------- initialisations
def _correlated_activations(k, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k ** 0.5)
    x[:, :8] *= 10  # outlier channels, as LLM activations have
    return x


@pytest.mark.parametrize("fmt", ["int2", "int4", "nf4"])
def test_inits_reduce_error_and_qera_beats_loftq_on_output(fmt):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(192, 256, generator=g) * 0.02
    x = _correlated_activations(256)
    plain = init.output_error(w, lowbit.quantize(w, fmt, 64), None, None, x)
    e_svd = init.output_error(w, *init.svd_init(w, 16, fmt=fmt), x)
    e_loftq = init.output_error(w, *init.loftq(w, 16, fmt=fmt, iters=3), x)
    e_qera = init.output_error(w, *init.qera(w, 16, fmt=fmt, calib_x=x), x)
    e_lq = init.output_error(w, *init.lq_lora(w, 16, fmt=fmt, iters=4), x)
    assert e_svd < plain and e_loftq < plain and e_lq < plain
    assert e_qera < e_loftq < plain


def test_loftq_weight_error_decreases_with_iterations():
    w = torch.randn(128, 256) * 0.02
    errs = []
    for it in (1, 5):
        qt, a, b = init.loftq(w, 8, fmt="int2", iters=it)
        errs.append(float((w - qt.dequantize() - b @ a).norm()))
    assert errs[1] < errs[0]


def _two_linears_and_int2_copy():
    """A model, inputs, its outputs, and a plain int2 copy (the error an init must beat)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    x = torch.randn(256, 128)
    ref = model(x)
    plain = copy.deepcopy(model)
    lowbit.quantize_model(plain, "int2", 64, progress=False)
    return model, x, ref, plain


def test_add_lora_with_init():
    """add_lora(init=...) quantizes each dense target and initialises its adapter from the error."""
    model, x, ref, plain = _two_linears_and_int2_copy()
    names = lowbit.add_lora(model, 16, 32, target_modules=None, init="qera", fmt="int2", block_size=64, calib=x)
    assert names == ["0", "2"] and isinstance(model[0], LoRALinear) and isinstance(model[0].base, QuantLinear)
    with torch.no_grad():
        assert (model(x) - ref).norm() < 0.8 * (plain(x) - ref).norm()
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "0.lora_A.default", "0.lora_B.default", "2.lora_A.default", "2.lora_B.default"]
    with pytest.raises(ValueError, match="calib"):
        lowbit.add_lora(torch.nn.Sequential(torch.nn.Linear(64, 64)), target_modules=None, init="qera", fmt="nf4")
    with pytest.raises(ValueError, match="give fmt="):
        lowbit.add_lora(torch.nn.Sequential(torch.nn.Linear(64, 64)), target_modules=None, init="svd")
    with pytest.raises(ValueError, match="needs the dense weight"):
        lowbit.add_lora(plain, target_modules=None, init="svd", fmt="int2")
    with pytest.raises(ValueError, match="init='dora'"):
        lowbit.add_lora(torch.nn.Sequential(torch.nn.Linear(64, 64)), target_modules=None, init="dora", fmt="nf4")


def test_quantize_model_with_lora_init():
    """The deprecated spelling: quantize_model(lora_init=...) still works, with a warning."""
    model, x, ref, plain = _two_linears_and_int2_copy()
    with pytest.warns(DeprecationWarning, match="quantize_model\\(lora_init=...\\) is deprecated; use lowbit.add_lora"):
        report = lowbit.quantize_model(model, "int2", 64, lora_init="qera", r=16, calib=x, progress=False)
    assert sorted(report["init_error"]) == ["0", "2"] and isinstance(model[0], LoRALinear)
    with torch.no_grad():
        assert (model(x) - ref).norm() < 0.8 * (plain(x) - ref).norm()
    with pytest.raises(ValueError, match="calib"), pytest.warns(DeprecationWarning):
        lowbit.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), "nf4", 64, lora_init="qera", progress=False)


def test_apply_init_is_a_deprecated_alias():
    model = torch.nn.Sequential(torch.nn.Linear(128, 64))
    with pytest.warns(DeprecationWarning, match="apply_init is deprecated; use lowbit.add_lora"):
        errors = lowbit.init.apply_init(model, "svd", "nf4", 8, progress=False)
    assert list(errors) == ["0"] and 0 < errors["0"] < 0.2 and isinstance(model[0], LoRALinear)


def test_init_functions_old_argument_order_warns():
    w = torch.randn(64, 128) * 0.02
    new = init.loftq(w, 8, fmt="int4", iters=2)
    with pytest.warns(DeprecationWarning, match=r"loftq\(w, fmt, r, iters\) is deprecated"):
        old = init.loftq(w, "int4", 8, 2)
    assert all(torch.equal(p, q) for p, q in zip(new[1:], old[1:])) and new[0].equal(old[0])
    for fn in (init.svd_init, init.qera, init.lq_lora):
        with pytest.warns(DeprecationWarning, match=fn.__name__):
            kw = {"calib_x": torch.randn(32, 128)} if fn is init.qera else {}
            old = fn(w, "nf4", 4, **kw)
        assert old[0].equal(fn(w, 4, fmt="nf4", **kw)[0])
    with pytest.raises(TypeError, match="multiple values"):
        init.svd_init(w, "nf4", 4, r=4)


def test_fp32_adapters_with_bf16_activations(kernel_backend):
    """LoRALinear keeps fp32 adapters; bf16 inputs must not be misread by the kernels."""
    base = QuantLinear.from_linear(torch.nn.Linear(128, 64), "nf4", 64, True)
    layer = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.1)
    x = torch.randn(3, 128).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    a = layer.lora_A["default"].to(torch.bfloat16).double()
    b = (layer.lora_B["default"] * layer.scaling["default"]).to(torch.bfloat16).double()
    w64 = base.weight.dequantize(torch.float32).double()
    x64 = x.double()
    expected = x64 @ w64.T + (x64 @ a.T) @ b.T + base.bias.to(torch.bfloat16).double()
    scale = x64.abs() @ w64.abs().T + (x64.abs() @ a.abs().T) @ b.abs().T
    # the bf16 routes multiply dequantize(bf16) (torch's bf16 matmul): cpu_route_bound adds that rounding
    assert_close(y, expected, dtype=torch.bfloat16, k=132, scale=scale, factor=8, extra=cpu_route_bound(x, w64))
    y.float().sum().backward()
    assert layer.lora_B["default"].grad.dtype == torch.float32


# ------------------------------------------------------------------------- LoRALinear inference fast path
# forward() with no autograd graph, fp32 x on the "cpu" backend calls the raw lowrank kernel with a cached
# stacked (A, s·B): it must give the op path's bits, and the cache must never be stale.
def _two_adapter_layer(r, bias=True, seed=0, n=192, k=256):
    torch.manual_seed(seed)
    base = QuantLinear.from_linear(torch.nn.Linear(k, n, bias=bias), "nf4", 64, True)
    layer = LoRALinear(base, r=r, alpha=2 * r)
    layer.add_adapter("second", r=5, alpha=3)
    with torch.no_grad():
        for name in ("default", "second"):
            layer.lora_B[name].normal_(0, 0.05)
    layer.set_adapter(["default", "second"])
    return layer


def _op_path(layer, x):
    """The module's op path (grad recording: the adapters require grad), detached."""
    with torch.enable_grad():
        y = layer(x)
    assert y.grad_fn is not None, "expected the op path (an autograd graph)"
    return y.detach()


def _dense_reference(layer, x):
    """float64 x·deq(W)ᵀ + Σ s·(x·Aᵀ)·Bᵀ (+ bias) and its error scale Σ|terms|."""
    w64, x64 = layer.base.weight.dequantize(torch.float32).double(), x.double()
    expected, scale = x64 @ w64.T, x64.abs() @ w64.abs().T
    for name in layer.active:
        a, b, s = layer.lora_A[name].detach().double(), layer.lora_B[name].detach().double(), layer.scaling[name]
        expected = expected + s * (x64 @ a.T) @ b.T
        scale = scale + s * (x64.abs() @ a.abs().T) @ b.abs().T
    if layer.base.bias is not None:
        expected, scale = expected + layer.base.bias.double(), scale + layer.base.bias.abs().double()
    return expected, scale, w64


def _spy_op_path(monkeypatch):
    """Counts the module's calls of ops.lowrank (the op path); the fast path does not call it."""
    calls = []
    real = ops.lowrank
    monkeypatch.setattr(ops, "lowrank", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", [1, 16, 64])
@pytest.mark.parametrize("m", [1, 3, 8, 33])
def test_lora_fast_path_bit_identical_to_op_path(m, r, dtype, monkeypatch):
    calls = _spy_op_path(monkeypatch)
    cpu = lowbit._native.module("cpu")
    for bias in (True, False):
        layer = _two_adapter_layer(r, bias, seed=m * 100 + r)
        x = torch.randn(2, m, 256).to(dtype)  # leading dims are flattened like the op path does
        for path, active in (("avx2", ["default", "second"]), ("portable", ["default", "second"]),
                             ("avx2", ["default"])):  # one fp32 adapter: its A is used without a copy
            cpu.set_cpu_path(path)
            layer.set_adapter(active)
            try:
                y_op = _op_path(layer, x)
                for ctx in (torch.no_grad, torch.inference_mode):
                    n_calls = len(calls)
                    with ctx():
                        y = layer(x)
                    assert len(calls) == n_calls, f"{ctx.__name__}: the op path was taken"
                    assert y.shape == (2, m, 192) and y.dtype == dtype
                    assert torch.equal(y, y_op), f"bias={bias} {path} {active} {ctx.__name__}: fast path != op path"
            finally:
                cpu.set_cpu_path("auto")
            if dtype != torch.float32:  # the op path's bf16 / fp16 accuracy: test_lowrank_cpu.py, test_gemm_engines.py
                continue
            expected, scale, w64 = _dense_reference(layer, x.reshape(-1, 256))
            assert_close(y.reshape(-1, 192), expected, dtype=torch.float32, k=256 + r + 5, scale=scale,
                         extra=cpu_route_bound(x, w64))


def test_lora_fast_path_cache_follows_every_change():
    layer = _two_adapter_layer(16)
    x = torch.randn(3, 256)

    def check(what, expect_change=True):
        with torch.no_grad():
            y = layer(x)
        assert torch.equal(y, _op_path(layer, x)), f"after {what}: fast path != op path"
        expected, scale, w64 = _dense_reference(layer, x)
        assert_close(y, expected, dtype=torch.float32, k=256 + 21, scale=scale, extra=cpu_route_bound(x, w64),
                     name=what)
        if expect_change:
            assert not torch.equal(y, check.last), f"after {what}: output did not change"
        check.last = y

    with torch.no_grad():
        check.last = layer(x)
    # an optimizer step on lora_B (op path forward + backward, then an in-place update)
    opt = torch.optim.SGD([layer.lora_B["default"]], lr=0.5)
    layer(x).square().sum().backward()
    opt.step()
    check("an SGD step on lora_B")
    with torch.inference_mode():
        layer.lora_A["second"].mul_(1.5)  # in-place under inference mode bumps the version too
    check("an in-place update under inference_mode")
    layer.set_adapter("second")
    check("set_adapter('second')")
    layer.set_adapter(["default", "second"])
    check("set_adapter(both)")
    layer.scaling["second"] = 4.0
    check("a scaling change")
    layer.lora_B["second"].data = torch.randn(192, 5) * 0.05  # swaps the storage: no version bump
    check("a .data assignment")
    layer.lora_B["default"] = torch.nn.Parameter(torch.randn(192, 16) * 0.05)
    check("replacing a Parameter")
    layer.load_state_dict({k: v * 0.5 if "lora_A" in k else v for k, v in layer.state_dict().items()})
    check("load_state_dict")
    layer.add_adapter("third", r=3)  # not active: the output stays
    check("add_adapter", expect_change=False)
    with torch.no_grad():
        layer.merge()
        assert torch.equal(layer(x), layer.base(x))
        layer.unmerge()
    check("merge + unmerge", expect_change=False)
    layer.to(torch.bfloat16)  # adapters and bias in bf16; x stays fp32 (the op path casts A, s·B to fp32)
    check("module.to(bfloat16)")
    layer.to(torch.float32)  # back: the adapters keep their bf16 rounding, the cache must not be the bf16 one
    check("module.to(float32)", expect_change=False)
    layer.lora_B["default"].requires_grad_(False)  # grad recording of a frozen module: fast path too
    copy_ = copy.deepcopy(layer)
    assert copy_._lowrank_cache is None
    with torch.no_grad():
        assert torch.equal(copy_(x), layer(x))


def test_lora_fast_path_cache_follows_the_dtype_of_x(monkeypatch):
    """The cached stacked pair is in x's dtype: fp32, bf16, fp16 and fp32 again alternate in one layer,
    each bit-identical to the op path, with no op call."""
    calls = _spy_op_path(monkeypatch)
    layer = _two_adapter_layer(8)
    x = torch.randn(5, 256)
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16):
        xd = x.to(dt)
        want = _op_path(layer, xd)
        n_calls = len(calls)
        with torch.no_grad():
            y = layer(xd)
        assert len(calls) == n_calls and y.dtype == dt and torch.equal(y, want), dt
        assert layer._lowrank_cache[0][0] == dt


def test_lora_fast_path_not_taken_when_recording_grads(monkeypatch):
    """Under grad recording the op path runs: backward works and the gradients are torch autograd's of
    the dense float64 model; frozen adapters with x not requiring grad take the fast path."""
    calls = _spy_op_path(monkeypatch)
    layer = _two_adapter_layer(16)
    x = torch.randn(4, 256, requires_grad=True)
    gy = torch.randn(4, 192)
    layer(x).backward(gy)
    assert len(calls) == 1
    w64 = layer.base.weight.dequantize(torch.float32).double()
    leaves = {"x": x.detach().double().requires_grad_()}
    for name in ("default", "second"):
        leaves["A_" + name] = layer.lora_A[name].detach().double().requires_grad_()
        leaves["B_" + name] = layer.lora_B[name].detach().double().requires_grad_()
    y64 = leaves["x"] @ w64.T + layer.base.bias.double()
    for name in ("default", "second"):
        y64 = y64 + layer.scaling[name] * (leaves["x"] @ leaves["A_" + name].T) @ leaves["B_" + name].T
    y64.backward(gy.double())
    got = {"x": x.grad, **{f"{t}_{n}": getattr(layer, f"lora_{t}")[n].grad
                           for t in "AB" for n in ("default", "second")}}
    for key, g in got.items():
        want = leaves[key].grad
        assert_close(g, want, dtype=torch.float32, k=400, scale=want.abs().max().item(), name=f"grad {key}")
    # nothing requires grad (frozen adapters, plain x) in grad mode: no graph to record -> fast path
    layer.requires_grad_(False)
    y = layer(x.detach())
    assert y.grad_fn is None and len(calls) == 1
    # bf16 x takes the fast path too; the reference backend the op path even under no_grad
    with torch.no_grad():
        layer(x.detach().bfloat16())
        assert len(calls) == 1
        with lowbit.use_backend("reference"):
            layer(x.detach())
        assert len(calls) == 2


def test_lora_fast_path_dropout_and_compile():
    """Dropout in eval mode is inactive (fused op / fast path, equal to the reference); in training it
    is applied. Under torch.compile (fullgraph) the op path is traced, not the raw kernel call."""
    torch.manual_seed(0)
    base = QuantLinear.from_linear(torch.nn.Linear(256, 192), "nf4", 64, True)
    layer = LoRALinear(base, r=8, alpha=16, dropout=0.5)
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.1)
    x = torch.randn(5, 256)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y, _op_path(layer, x))
    expected, scale, w64 = _dense_reference(layer, x)
    assert_close(y, expected, dtype=torch.float32, k=264, scale=scale, extra=cpu_route_bound(x, w64))
    layer.train()
    with torch.no_grad():
        assert not torch.equal(layer(x), y)  # half of x's entries dropped in the branch
    layer.dropout["default"] = torch.nn.Hardtanh(-0.1, 0.1)  # any other module is applied to the branch's x
    with torch.no_grad():
        clipped = layer(x)
    layer.dropout["default"] = torch.nn.Identity()
    with torch.no_grad():
        want = layer(torch.nn.functional.hardtanh(x, -0.1, 0.1)) - layer.base(x.clamp(-0.1, 0.1)) + layer.base(x)
    assert_close(clipped, want, dtype=torch.float32, k=264, scale=scale, extra=2 * cpu_route_bound(x, w64))
    layer.dropout["default"] = torch.nn.Dropout(0.5)
    layer.eval()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), y)
