"""SVDQuant for users: lowbit.init.svdquant, lowbit.nn.SVDQuantLinear, quantize_model("w4a4"), LoRA on top.

Every check is against independent float64 math on the same operands:
- the decomposition: the smoothing formula re-derived with numpy, W'·diag(1/λ) = W, the branch = the best rank-r
  approximation (numpy SVD), the residual's codes and scales = the reference quantizer of W' − L1·L2, bit for bit;
- the module's forward: the float64 product of the *quantized* operands (the reference activation quantizer,
  the unpacked residual) plus the branch and bias, within fp32/bf16 accumulation error;
- the backward: the straight-through formula gx = gy · (L1·L2 + dequant(R)) · diag(1/λ) in float64;
- state_dict / save_model round trips bit for bit; LoRA merged into the branch == unmerged;
- quantize_model on a tiny Llama with outlier channels: smoothing and the branch lower the error of naive W4A4.
The kernels themselves are tested in tests/test_svdquant.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import reference as ref
from lowbit.nn import LoRALinear, SVDQuantLinear

from conftest import assert_close, eps


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _outlier_x(m, k, seed=0):
    """Activations with a few outlier channels (what smoothing is for)."""
    x = _rand(m, k, seed=seed)
    x[:, torch.arange(0, k, max(1, k // 5))] *= 30.0
    return x


def _linear(k, n, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(_rand(n, k, seed=seed + 100, scale=0.05))
        lin.weight[:, 3] *= 8.0  # a weight outlier column the branch should absorb
    return lin


def _deq_residual(qw, sw):
    n, k = qw.shape[0], qw.shape[1] * 2
    q = ref.svdquant_unpack_ref(qw).double().reshape(n, k // 64, 64)
    return (q * sw.double()[..., None]).reshape(n, k)


def _expected_forward(m: SVDQuantLinear, x: torch.Tensor):
    """float64 product of the quantized operands: Q(x/λ)·R̂ᵀ + (x/λ)·L2ᵀ·L1ᵀ + b, and a bound of Σ|terms|."""
    k = m.in_features
    x2 = x.reshape(-1, k)
    xs = x2.float() * m.inv_smooth                      # the kernel's fp32 multiply
    qx, sx = ref.svdquant_quantize_ref(xs)
    xq = (qx.double().reshape(-1, k // 64, 64) * sx.double()[..., None]).reshape(-1, k)
    r_hat = _deq_residual(m.qw, m.sw)
    l1, l2 = m.l1.to(x.dtype).double(), m.l2.to(x.dtype).double()
    y = xq @ r_hat.T + (xs.double() @ l2.T) @ l1.T
    scale = xq.abs() @ r_hat.abs().T + (xs.double().abs() @ l2.abs().T) @ l1.abs().T
    if m.bias is not None:
        b = m.bias.to(x.dtype).double()
        y, scale = y + b, scale + b.abs()
    n = m.out_features
    return y.reshape(*x.shape[:-1], n), scale.reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------------------ the decomposition
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_decomposition_against_float64_math(alpha):
    n, k, r = 96, 192, 12
    w = _rand(n, k, seed=1, scale=0.05)
    x = _outlier_x(300, k, seed=2)
    p = lowbit.init.svdquant(w, r, calib_x=x.reshape(3, 100, k), alpha=alpha)
    # smoothing: SmoothQuant's formula, re-derived with numpy in float64
    wn, xn = w.numpy().astype(np.float64), x.numpy().astype(np.float64)
    lam = np.maximum(np.abs(xn).max(0), 1e-5) ** alpha / np.maximum(np.abs(wn).max(0), 1e-5) ** (1 - alpha)
    np.testing.assert_allclose(p.inv_smooth.numpy(), 1.0 / lam, rtol=2 * 2.0**-24)
    np.testing.assert_allclose(p.smooth.numpy(), lam, rtol=4 * 2.0**-24)
    assert p.smooth.dtype == p.inv_smooth.dtype == p.sw.dtype == torch.float32 and p.qw.dtype == torch.uint8
    # the smoothed weight W' = W·diag(λ) with λ = 1 / inv_smooth: W'·diag(1/λ) = W
    ws = wn / p.inv_smooth.numpy().astype(np.float64)
    np.testing.assert_allclose(ws * p.inv_smooth.numpy().astype(np.float64), wn, rtol=1e-15, atol=0)
    # the branch is the best rank-r approximation of W' (numpy's SVD); L2 has orthonormal rows
    u, s, vh = np.linalg.svd(ws, full_matrices=False)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    lr = p.l1.double().numpy() @ p.l2.double().numpy()
    assert np.abs(lr - best).max() <= 1e-5 * np.abs(best).max()
    np.testing.assert_allclose(p.l2.double().numpy() @ p.l2.double().numpy().T, np.eye(r), atol=1e-6)
    # the residual is the reference quantizer of W' − L1·L2 (against the branch as stored), bit for bit
    resid = torch.from_numpy(ws - lr).float()
    q, sw = ref.svdquant_quantize_ref(resid)
    assert torch.equal(ref.svdquant_unpack_ref(p.qw), q) and torch.equal(p.sw, sw)
    # and what it stands for is W within the 4-bit residual's error
    err = (p.dequantize() - w.double()).norm() / w.double().norm()
    assert err < 0.1, err


def test_without_calibration_no_smoothing_and_rank_lowers_error():
    w = _rand(128, 256, seed=5, scale=0.05)
    w[:, 7] *= 20.0
    errs = []
    for r in (0, 8, 32):
        p = lowbit.init.svdquant(w, r)
        assert torch.equal(p.smooth, torch.ones(256)) and torch.equal(p.inv_smooth, torch.ones(256))
        assert p.l1.shape == (128, r) and p.l2.shape == (r, 256) and p.rank == r
        if r == 0:
            q, s = ref.svdquant_quantize_ref(w)
            assert torch.equal(ref.svdquant_unpack_ref(p.qw), q) and torch.equal(p.sw, s)
        errs.append(float((p.dequantize() - w.double()).norm() / w.double().norm()))
    assert errs[0] > errs[1] > errs[2], errs


def test_branch_dtype_bf16_is_absorbed_by_the_residual():
    w = _rand(64, 128, seed=6, scale=0.05)
    p = lowbit.init.svdquant(w, 8, dtype=torch.bfloat16)
    assert p.l1.dtype == p.l2.dtype == torch.bfloat16
    resid = (w.double() - p.l1.double() @ p.l2.double()).float()
    q, s = ref.svdquant_quantize_ref(resid)
    assert torch.equal(ref.svdquant_unpack_ref(p.qw), q) and torch.equal(p.sw, s)


@pytest.mark.parametrize("case, match", [
    (lambda: lowbit.init.svdquant(torch.full((8, 64), float("nan")), 2), "non-finite"),
    (lambda: lowbit.init.svdquant(_rand(8, 96), 2), "K=96"),
    (lambda: lowbit.init.svdquant(_rand(8, 64), 9), "r=9"),
    (lambda: lowbit.init.svdquant(_rand(8, 64), -1), "r=-1"),
    (lambda: lowbit.init.svdquant(_rand(8, 64), 2, calib_x=_rand(5, 63)), "width 63"),
    (lambda: lowbit.init.svdquant(_rand(8, 64), 2, calib_x=torch.full((2, 64), float("inf"))), "non-finite"),
    (lambda: lowbit.init.svdquant(_rand(8, 64), 2, alpha=1.5), "alpha=1.5"),
    (lambda: SVDQuantLinear(100, 8), "in_features=100"),
    (lambda: SVDQuantLinear(64, 8, rank=9), "rank=9"),
    (lambda: SVDQuantLinear.from_linear(nn.Linear(64, 8), r=2)(_rand(3, 128)), "K=128"),
    (lambda: SVDQuantLinear.from_linear(nn.Conv1d(64, 8, 1)), "nn.Linear"),
])
def test_bad_input_is_refused_with_the_value(case, match):
    with pytest.raises((ValueError, TypeError), match=match):
        case()


# ------------------------------------------------------------------------------ the module
@pytest.mark.parametrize("shape", [(0, 192), (1, 192), (7, 192), (2, 3, 192)])
@pytest.mark.parametrize("r", [0, 16])
def test_forward_matches_float64_of_the_quantized_operands(shape, r):
    lin = _linear(192, 80, seed=r)
    m = SVDQuantLinear.from_linear(lin, r=r, calib_x=_outlier_x(64, 192, seed=3))
    x = _outlier_x(int(np.prod(shape[:-1])), 192, seed=4).reshape(shape)
    y = m(x)
    assert y.shape == (*shape[:-1], 80) and y.dtype == torch.float32
    exp, scale = _expected_forward(m, x)
    assert_close(y, exp, dtype=torch.float32, k=192, scale=scale, name="svdquant forward")


def test_bf16_and_fp16_inputs_and_to_bf16():
    lin = _linear(128, 64, seed=7)
    m = SVDQuantLinear.from_linear(lin, r=8, calib_x=_outlier_x(32, 128))
    x = _outlier_x(5, 128, seed=8)
    for dt in (torch.bfloat16, torch.float16):  # fp32 layer, 16-bit input: branch and bias cast to x's dtype
        y = m(x.to(dt))
        assert y.dtype == dt
        exp, scale = _expected_forward(m, x.to(dt))
        assert_close(y, exp, dtype=dt, k=128, scale=scale, name=f"{dt} input")
    before = {n: t.clone() for n, t in m.state_dict().items()}
    mb = copy.deepcopy(m).to(torch.bfloat16)
    for n in ("qw", "sw", "smooth", "inv_smooth"):  # the kernel's contract: never cast
        assert torch.equal(mb.state_dict()[n], before[n]), n
    assert mb.l1.dtype == mb.l2.dtype == mb.bias.dtype == torch.bfloat16
    y = mb(x.bfloat16())
    exp, scale = _expected_forward(mb, x.bfloat16())
    assert_close(y, exp, dtype=torch.bfloat16, k=128, scale=scale, name="to(bf16)")
    assert "bits_per_weight" in repr(mb) and "rank=8" in repr(mb)
    # bits/weight: 4 (codes) + 32/64 (scales) + branch (N + K)·r·16 + 2·K·32 smoothing bits, over N·K
    expect = 4 + 0.5 + (64 + 128) * 8 * 16 / (64 * 128) + 2 * 128 * 32 / (64 * 128)
    assert abs(mb.bits_per_weight() - expect) < 1e-9


def test_backward_is_the_straight_through_formula():
    lin = _linear(192, 72, seed=11)
    m = SVDQuantLinear.from_linear(lin, r=16, calib_x=_outlier_x(64, 192, seed=12))
    x = _outlier_x(2 * 5, 192, seed=13).reshape(2, 5, 192).requires_grad_()
    g = _rand(2, 5, 72, seed=14)
    with lowbit.matmul_precision("highest"):  # fp32-exact packed products (the default "high" is <= 2e-4 rel.)
        (m(x) * g).sum().backward()
    w_eff = (m.l1.double() @ m.l2.double() + _deq_residual(m.qw, m.sw)) * m.inv_smooth.double()
    g2 = g.reshape(-1, 72).double()
    exp = (g2 @ w_eff).reshape(2, 5, 192)
    scale = (g2.abs() @ w_eff.abs()).reshape(2, 5, 192)
    assert_close(x.grad, exp, dtype=torch.float32, k=72 + 16, scale=scale, name="gx")
    assert_close(m.bias.grad, g2.sum(0), dtype=torch.float32, k=10, scale=g2.abs().sum(0), name="gbias")
    # no parameter of the quantized base is trainable: only the bias takes a gradient
    assert [n for n, _ in m.named_parameters()] == ["bias"]


def test_state_dict_save_model_and_save_tensors_round_trip_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(_linear(128, 64, seed=1), nn.ReLU(), _linear(64, 64, seed=2, bias=False), nn.ReLU(),
                          _linear(64, 32, seed=3))
    skeleton = copy.deepcopy(model)
    x = _outlier_x(6, 128, seed=4)
    model[0] = SVDQuantLinear.from_linear(model[0], r=16, calib_x=x)
    model[2] = SVDQuantLinear.from_linear(model[2], r=0)          # plain W4A4: empty branch tensors
    lowbit.add_lora(model, r=4, target_modules=["4"])             # a LoRA over a dense layer beside them
    y = model(x)
    # state_dict into a fresh layer
    fresh = SVDQuantLinear(128, 64, True, 16)
    fresh.load_state_dict(model[0].state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model[0].state_dict().values()))
    assert torch.equal(fresh(x), model[0](x))
    # lowbit.save_tensors / load_tensors of the whole state dict (lowbit.save_file / load_file: deprecated names)
    sd = model.state_dict()
    lowbit.save_tensors(sd, tmp_path / "sd.safetensors")
    back = lowbit.load_tensors(tmp_path / "sd.safetensors")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    # lowbit.save_model / load_model onto the skeleton of plain Linears
    lowbit.save_model(model, tmp_path / "m")
    loaded = lowbit.load_model(tmp_path / "m", skeleton)
    assert isinstance(loaded[0], SVDQuantLinear) and loaded[0].rank == 16 and loaded[2].rank == 0
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert torch.equal(loaded(x), y)


# ------------------------------------------------------------------------------ LoRA on an SVDQuant base
def test_lora_on_svdquant_trains_and_merges_into_the_branch(tmp_path):
    lin = _linear(192, 80, seed=21)
    calib = _outlier_x(64, 192, seed=22)
    base = SVDQuantLinear.from_linear(lin, r=16, calib_x=calib)
    layer = LoRALinear(base, r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B["default"].copy_(_rand(80, 8, seed=23, scale=0.05))
    s = layer.scaling["default"]
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    x = _outlier_x(9, 192, seed=24).requires_grad_()
    g = _rand(9, 80, seed=25)
    with lowbit.matmul_precision("highest"):
        y = layer(x)
        (y * g).sum().backward()
    # gradients: the adapter's in float64 on the same x, and x's through base (STE) + adapter
    x64, g64, a64, b64 = x.detach().double(), g.double(), a.detach().double(), b.detach().double()
    xa = x64 @ a64.T
    assert_close(b.grad, s * g64.T @ xa, dtype=torch.float32, k=9 * 192, name="gB",
                 scale=s * g64.abs().T @ (x64.abs() @ a64.abs().T))
    assert_close(a.grad, s * (g64 @ b64).T @ x64, dtype=torch.float32, k=9 * 80, name="gA",
                 scale=s * (g64.abs() @ b64.abs()).T @ x64.abs())
    w_eff = base.dequantize() + s * b64 @ a64
    assert_close(x.grad, g64 @ w_eff, dtype=torch.float32, k=80 + 16 + 8, name="gx",
                 scale=g64.abs() @ w_eff.abs())
    # merged (one svdquant_linear call, branch rank 16 + 8) == unmerged
    x = x.detach()
    with torch.no_grad():
        y0 = layer(x)
        l1, l2 = base.l1.clone(), base.l2.clone()
        err = layer.merge()
        assert base.rank == 24 and err < 1e-6
        y1 = layer(x)
        y1b = base(x)
        assert torch.equal(y1, y1b)  # merged: the layer is its base
        xs = x.double() * base.inv_smooth.double()
        bound = (xs.abs() @ base.l2.double().abs().T) @ base.l1.double().abs().T + (x.double().abs() @ a64.abs().T) @ \
            (s * b64.abs()).T
        assert_close(y1, y0.double(), dtype=torch.float32, k=192, scale=bound, name="merged vs unmerged")
        layer.unmerge()
        assert torch.equal(base.l1, l1) and torch.equal(base.l2, l2)
        assert torch.equal(layer(x), y0)


def test_add_lora_on_a_w4a4_model_and_save_model(tmp_path):
    model = nn.Sequential(_linear(128, 128, seed=31), nn.ReLU(), _linear(128, 64, seed=32))
    skeleton = copy.deepcopy(model)
    calib = _outlier_x(32, 128, seed=33)
    report = lowbit.quantize_model(model, "w4a4", method="svdquant", r=8, calib=[{"input": calib}], skip=(),
                                   progress=False)
    assert report["replaced"] == ["0", "2"] and report["r"] == 8
    names = lowbit.add_lora(model, r=4, target_modules=None)
    assert names == ["0", "2"] and all(isinstance(model[i].base, SVDQuantLinear) for i in (0, 2))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A.default", "0.lora_B.default", "2.lora_A.default", "2.lora_B.default"]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, t = _outlier_x(16, 128, seed=34), _rand(16, 64, seed=35)
    losses = []
    for _ in range(5):
        loss = ((model(x) - t) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    lowbit.save_model(model, tmp_path / "m")
    loaded = lowbit.load_model(tmp_path / "m", skeleton)
    assert isinstance(loaded[0], LoRALinear) and isinstance(loaded[0].base, SVDQuantLinear)
    assert torch.equal(loaded(x), model(x))


# ------------------------------------------------------------------------------ quantize_model
def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a few outlier channels in the normalised activations, as trained LLMs have
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.tensor([5, 40, 77])] = 25.0
    return model


def test_quantize_model_w4a4_on_a_tiny_llama():
    model = _tiny_llama()
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    calib = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_logits = model(ids).logits.double()
    errors = {}
    for label, kw in {"rtn": dict(method="rtn"), "smoothquant": dict(method="smoothquant", calib=calib),
                      "svdquant r=32": dict(method="svdquant", r=32, calib=calib)}.items():
        q = copy.deepcopy(model)
        report = lowbit.quantize_model(q, "w4a4", progress=False, **kw)
        assert len(report["replaced"]) == 14 and report["skipped"] == ["lm_head"]
        assert sum(isinstance(m, SVDQuantLinear) for m in q.modules()) == 14
        assert isinstance(q.lm_head, nn.Linear)
        with torch.no_grad():
            logits = q(ids).logits.double()
        errors[label] = float((logits - ref_logits).norm() / ref_logits.norm())
    assert errors["svdquant r=32"] < errors["smoothquant"] < errors["rtn"], errors
    assert errors["svdquant r=32"] < 0.6 * errors["rtn"], errors


def test_save_pretrained_refuses_w4a4_layers_instead_of_writing_a_broken_checkpoint(tmp_path):
    model = _tiny_llama()
    lowbit.quantize_model(model, "w4a4", method="rtn", progress=False)
    with pytest.raises(ValueError, match="save_model"):
        model.save_pretrained(tmp_path / "hf")


def test_quantize_model_w4a4_refuses_bad_combinations():
    model = nn.Sequential(nn.Linear(64, 64))
    for kw, match in [(dict(method="gptq"), "method='gptq'"), (dict(method="rtn", r=4), "r=4"),
                      (dict(method="smoothquant"), "needs calib"), (dict(method="rtn", calib=torch.zeros(1, 2)), "rtn"),
                      (dict(r=65), "r=65"), (dict(block_size=128), "block_size=128")]:
        with pytest.raises(ValueError, match=match):
            lowbit.quantize_model(model, "w4a4", skip=(), progress=False, **kw)
    with pytest.raises(ValueError, match="fmt='w4a4'"):
        lowbit.quantize_model(model, "nf4", method="svdquant", skip=(), progress=False)
    assert type(model[0]) is nn.Linear  # nothing was replaced by a refused call


# ------------------------------------------------------------------------------ the real model (slow)
@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_w4a4_branch_recovers_perplexity(smollm2):
    """SmolLM2-135M, first 256 tokens of the embedded Pride and Prejudice: W4A4 round-to-nearest degrades,
    SVDQuant r = 32 (smoothing from the same text's next 256 tokens) recovers most of the gap to fp32."""
    from lowbit.demo import perplexity

    _, model, ids = smollm2
    ev, calib = ids[:257], ids[257:513]
    ppl = {"fp32": perplexity(model, ev, 256)}
    for label, kw in {"rtn": dict(method="rtn"), "svdquant": dict(method="svdquant", r=32, calib=calib[None])}.items():
        q = copy.deepcopy(model)
        lowbit.quantize_model(q, "w4a4", progress=False, **kw)
        ppl[label] = perplexity(q, ev, 256)
        del q
    assert ppl["fp32"] < ppl["svdquant"] < ppl["rtn"], ppl
    assert ppl["svdquant"] - ppl["fp32"] < 0.5 * (ppl["rtn"] - ppl["fp32"]), ppl
