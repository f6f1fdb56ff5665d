"""Hugging Face front door (lowbit.hf): quantize on load, save_pretrained / from_pretrained, bitsandbytes 4-bit
checkpoints, PEFT LoRA on QuantLinears; and lowbit.save_model / load_model for any nn.Module.

A tiny llama (2 layers, hidden 128, attention biases on) built in the test; references are independent of the
code under test: bitsandbytes' own dequantize_4bit, PEFT's own layers and outputs, lowbit.reference's pure-torch
dequantization with float64 products. A SmolLM2 round trip through a fresh process runs where the real model is
installed (marked real_model).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit import reference as ref
from lowbit.model import replace_modules, select_modules
from lowbit.nn import QuantLinear

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("lowbit.hf")

FORMATS = [("nf4", True), ("fp4", False), ("int4", True), ("int2", False)]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PYTHONPATH = os.path.dirname(os.path.dirname(lowbit.__file__))  # the lowbit this session imported


def tiny_config(**kw):
    base = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, tie_word_embeddings=False)
    base.update(kw)
    return transformers.LlamaConfig(**base)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(dense fp32 tiny llama, the directory it was saved to with save_pretrained, token ids)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config()).eval()
    with torch.no_grad():  # non-trivial biases
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0, 0.05)
    d = tmp_path_factory.mktemp("tiny") / "fp32"
    model.save_pretrained(d)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    return model, str(d), ids


def quant_layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------ quantize on load
@pytest.mark.parametrize("fmt,dq", FORMATS)
def test_quantize_on_load_equals_quantize_model(tiny, fmt, dq):
    """from_pretrained(quantization_config=LowbitConfig) gives the weights lowbit.quantize gives the dense
    weights, bit for bit, on the same modules (lm_head left dense); biases loaded exactly."""
    dense, path, ids = tiny
    q = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=hf.LowbitConfig(fmt, 64, dq))
    layers = quant_layers(q)
    assert sorted(layers) == sorted(select_modules(dense, torch.nn.Linear, TARGETS))
    assert type(q.lm_head) is torch.nn.Linear and torch.equal(q.lm_head.weight, dense.lm_head.weight)
    for name, m in layers.items():
        lin = dense.get_submodule(name)
        assert m.weight.equal(lowbit.quantize(lin.weight.detach(), fmt, 64, double_quant=dq)), name
        assert (m.bias is None) == (lin.bias is None)
        if lin.bias is not None:
            assert torch.equal(m.bias, lin.bias)
    expected = copy.deepcopy(dense)
    lowbit.quantize_model(expected, fmt, 64, dq, progress=False)
    assert torch.equal(logits(q, ids), logits(expected, ids))
    assert q.config.quantization_config.modules.keys() == layers.keys()


def test_quantize_on_load_bf16_and_skip(tiny):
    """dtype=bfloat16 quantizes the bf16 weights (the weight's dtype is recorded); skip and target_modules
    choose the modules with lowbit's one matcher."""
    dense, path, _ = tiny
    cfg = hf.LowbitConfig("nf4", 64, False, skip=("lm_head", "layers.1.mlp"), target_modules=("q_proj", "down_proj"))
    q = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16)
    assert sorted(quant_layers(q)) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                                       "model.layers.1.self_attn.q_proj"]
    w = dense.model.layers[0].self_attn.q_proj.weight.detach().to(torch.bfloat16)
    got = q.model.layers[0].self_attn.q_proj.weight
    assert got.dtype == torch.bfloat16 and got.equal(lowbit.quantize(w, "nf4", 64))
    assert type(q.model.layers[1].mlp.down_proj) is torch.nn.Linear


def test_config_validation():
    with pytest.raises(ValueError, match="fmt='nf3'"):
        hf.LowbitConfig(fmt="nf3")
    with pytest.raises(ValueError, match="block_size=48"):
        hf.LowbitConfig(block_size=48)
    with pytest.raises(TypeError, match="double_quant"):
        hf.LowbitConfig(double_quant="yes")
    with pytest.raises(ValueError, match="precision='fast'"):
        hf.LowbitConfig(precision="fast")
    with pytest.raises(TypeError, match="skip"):
        hf.LowbitConfig(skip=[1])
    with pytest.raises(ValueError, match="unknown fields"):
        hf.LowbitConfig(blocksize=64)
    with pytest.raises(ValueError, match="checkpoint_format"):
        hf.LowbitConfig(checkpoint_format="gguf")
    with pytest.raises(ValueError, match="format_version"):
        hf.LowbitConfig(format_version=2)
    with pytest.raises(TypeError, match="must be a dict"):
        hf.LowbitConfig(modules=["x"])
    with pytest.raises(TypeError, match=r"modules\['x'\]: double_quant=1"):
        hf.LowbitConfig(modules={"x": {"fmt": "nf4", "block_size": 64, "double_quant": 1, "shape": [8, 64],
                                       "dtype": "float32"}})
    cfg = hf.LowbitConfig("int2", 32, False, skip="lm_head", target_modules=["q_proj"], precision="medium")
    again = hf.LowbitConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict() and again.skip == ["lm_head"]


def test_precision_field(tiny):
    """precision= sets lowbit's matmul precision policy when the model loads — or says this build has none."""
    _, path, _ = tiny
    cfg = hf.LowbitConfig("nf4", 64, True, precision="highest")
    if not hasattr(lowbit.ops, "set_matmul_precision"):
        with pytest.raises(ValueError, match="precision='highest'"):
            transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)
        return
    old = lowbit.ops.get_matmul_precision()
    try:
        transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)
        assert lowbit.ops.get_matmul_precision() == "highest"
    finally:
        lowbit.ops.set_matmul_precision(old)


# ------------------------------------------------------------------------------ save and reload
@pytest.mark.parametrize("fmt,dq", FORMATS)
def test_save_pretrained_reload_bit_exact(tiny, tmp_path, fmt, dq):
    """save_pretrained writes the exact bytes (codes under X.weight as uint8, scales under X.weight.<c>) and the
    config; from_pretrained rebuilds the same QuantLinears — every component equal — without quantizing
    anything (lowbit.ops.quantize is made to fail during the reload)."""
    from safetensors import safe_open

    _, path, ids = tiny
    q = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=hf.LowbitConfig(fmt, 64, dq))
    q.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "lowbit" and cfg["checkpoint_format"] == "lowbit"
    assert cfg["modules"] == {n: m.weight.metadata() for n, m in quant_layers(q).items()}
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        name = "model.layers.0.mlp.down_proj"
        codes = f.get_tensor(f"{name}.weight")
        assert codes.dtype == torch.uint8 and torch.equal(codes, q.get_submodule(name).weight.codes)
        assert not any(k.endswith((".codes", "._extra_state")) for k in f.keys())

    real_quantize = lowbit.ops.quantize

    def refuse(*a, **k):
        raise AssertionError("a reload must not quantize")

    lowbit.ops.quantize = refuse
    try:
        r = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    finally:
        lowbit.ops.quantize = real_quantize
    a, b = quant_layers(q), quant_layers(r)
    assert a.keys() == b.keys()
    for n in a:
        assert b[n].weight.equal(a[n].weight), n
        assert (a[n].bias is None and b[n].bias is None) or torch.equal(a[n].bias, b[n].bias)
    assert torch.equal(logits(r, ids), logits(q, ids))
    # and once more: what was reloaded saves to the same checkpoint
    r.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"] == cfg


def test_quantize_model_then_save_pretrained(tiny, tmp_path):
    """The issue's case: a model quantized in memory by lowbit.quantize_model saves and reloads exactly (it
    used to reload as random weights with a warning)."""
    dense, _, ids = tiny
    q = copy.deepcopy(dense)
    lowbit.quantize_model(q, "int4", 64, True, progress=False)
    q.save_pretrained(tmp_path)
    r = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert quant_layers(r).keys() == quant_layers(q).keys()
    assert all(quant_layers(r)[n].weight.equal(m.weight) for n, m in quant_layers(q).items())
    assert torch.equal(logits(r, ids), logits(q, ids))


def test_reload_in_a_new_process_and_without_lowbit(tiny, tmp_path):
    """In a fresh process: without lowbit imported, from_pretrained of a lowbit checkpoint fails (the codes'
    shape fits no dense Linear) instead of returning random weights; after `import lowbit.hf` the same call
    returns logits bit-identical to the saved model's."""
    _, path, ids = tiny
    q = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=hf.LowbitConfig("nf4", 64, True))
    q.save_pretrained(tmp_path / "q")
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})
    print("LOADED WITHOUT LOWBIT")
    sys.exit(3)
except RuntimeError as e:
    assert "mismatch" in str(e), e
import lowbit.hf
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})
with torch.no_grad():
    torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
"""
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), logits(q, ids))


def test_broken_checkpoints_raise(tiny, tmp_path):
    """A lowbit checkpoint with an entry missing, or whose config disagrees with its tensors, raises: never
    a model with uninitialised layers."""
    from safetensors.torch import load_file, save_file

    _, path, _ = tiny
    q = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=hf.LowbitConfig("nf4", 64, True))
    q.save_pretrained(tmp_path / "ok")
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    for case in ("missing_scale", "config_fmt"):
        d = tmp_path / case
        os.makedirs(d)
        cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
        broken = dict(sd)
        if case == "missing_scale":
            del broken["model.layers.1.self_attn.k_proj.weight.scale_q"]
        else:
            cfg["quantization_config"]["modules"]["model.layers.0.self_attn.q_proj"]["fmt"] = "int4"
        save_file(broken, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises((RuntimeError, ValueError)):
            transformers.AutoModelForCausalLM.from_pretrained(d)


def test_lowbit_adapters_are_not_saved_as_a_base(tiny, tmp_path):
    """save_pretrained of a model carrying lowbit adapters refuses (it would drop them) and names the way out."""
    dense, _, _ = tiny
    m = copy.deepcopy(dense)
    lowbit.add_lora(m, 4, 8, fmt="nf4")
    with pytest.raises(ValueError, match="save_adapter"):
        m.save_pretrained(tmp_path)


def test_dequantize_gives_the_dense_model(tiny):
    """transformers' model.dequantize(): each QuantLinear becomes an nn.Linear holding the reference
    dequantization of its weight."""
    _, path, ids = tiny
    q = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=hf.LowbitConfig("int4", 64, True))
    expected = {n: ref.dequantize_qt_ref(m.weight, torch.float32) for n, m in quant_layers(q).items()}
    d = q.dequantize()
    assert not quant_layers(d)
    for n, w in expected.items():
        assert type(d.get_submodule(n)) is torch.nn.Linear and torch.equal(d.get_submodule(n).weight, w), n


# ------------------------------------------------------------------------------ bitsandbytes checkpoints
@pytest.mark.parametrize("quant_type,dq", [("nf4", True), ("fp4", False)])
def test_bnb_checkpoint_loads_bit_exactly(tiny, tmp_path, quant_type, dq):
    """A checkpoint written by transformers + bitsandbytes (quantized on CPU here) loads into QuantLinears
    through lowbit.hf.from_pretrained: every weight dequantizes bit-identically to bitsandbytes'
    dequantize_4bit, the model's logits on lowbit's reference backend equal those of the dense model holding
    those dequantized weights exactly, and through lowbit's CPU kernels within the int16 path's error."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    _, path, ids = tiny
    bcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=torch.float32)
    bq = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bcfg, device_map="cpu")
    bq.save_pretrained(tmp_path / "bnb")
    # before any bitsandbytes forward: its CPU path may repack the weights in place on first use
    expected = {n: F.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                for n, m in bq.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(expected) == 14

    lq = hf.from_pretrained(tmp_path / "bnb")
    layers = quant_layers(lq)
    assert layers.keys() == expected.keys()
    for n, m in layers.items():
        assert m.weight.fmt == quant_type and m.weight.double_quant == dq
        assert torch.equal(m.weight.dequantize(torch.float32), expected[n]), n

    dense = copy.deepcopy(lq)

    def build(name, q):
        lin = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        lin.weight.data = expected[name]
        if q.bias is not None:
            lin.bias.data = q.bias.data.clone()
        return lin

    replace_modules(dense, list(expected), build)
    want = logits(dense, ids)
    with lowbit.use_backend("reference"):
        assert torch.equal(logits(lq, ids), want)
    got = logits(lq, ids)
    assert (got - want).abs().max() <= 1e-3 * want.abs().max(), (got - want).abs().max()
    # and the lowbit checkpoint it saves reloads to the same bytes
    lq.save_pretrained(tmp_path / "lowbit")
    r = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lowbit")
    assert all(quant_layers(r)[n].weight.equal(m.weight) for n, m in layers.items())


def test_from_pretrained_dispatch(tiny, tmp_path):
    """lowbit.hf.from_pretrained quantizes a dense checkpoint saved from a GGUF-loaded model (its config keeps
    quant_method "gguf", which transformers' from_pretrained will not combine with a LowbitConfig) and refuses
    checkpoints of other quantization methods."""
    import shutil

    dense, path, ids = tiny
    d = tmp_path / "from_gguf"
    shutil.copytree(path, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    (d / "config.json").write_text(json.dumps(cfg))
    q = hf.from_pretrained(d, quantization_config=hf.LowbitConfig("int4", 64, False))
    expected = copy.deepcopy(dense)
    lowbit.quantize_model(expected, "int4", 64, False, progress=False)
    assert torch.equal(logits(q, ids), logits(expected, ids))

    d = tmp_path / "gptq"
    os.makedirs(d)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        hf.from_pretrained(d)
    with pytest.raises(TypeError, match="LowbitConfig"):
        hf.from_pretrained(path, quantization_config={"fmt": "nf4"})
    with pytest.raises(ValueError, match="load_in_4bit"):
        hf.LowbitConfig.from_bnb({"load_in_8bit": True})


# ------------------------------------------------------------------------------ PEFT
@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def _lowbit_base(tiny):
    _, path, _ = tiny
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=hf.LowbitConfig("nf4", 64, True))


def test_peft_lora_on_lowbit_layers(tiny, peft, monkeypatch):
    """get_peft_model wraps QuantLinears in lowbit's PEFT layer; its forward is one fused lowrank op and equals
    deq(W) x + b + s·B·A x computed in float64 from the reference dequantization; gradients reach the LoRA
    factors only."""
    _, _, ids = tiny
    base = _lowbit_base(tiny)
    cfg = hf.register_peft(peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                           lora_dropout=0.0))
    pm = peft.get_peft_model(base, cfg)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "LowbitLoraLinear" and isinstance(layer.get_base_layer(), QuantLinear)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = torch.randn(3, 5, 128)
    calls = []
    real = lowbit.ops.lowrank
    monkeypatch.setattr(hf.ops, "lowrank", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = layer(x)
    assert calls, "the PEFT layer did not use lowbit's fused low-rank op"
    q = layer.get_base_layer()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    w = ref.dequantize_qt_ref(q.weight, torch.float32).double()
    want = x.double() @ w.T + q.bias.double() + layer.scaling["default"] * (x.double() @ a.T) @ b.T
    assert (y.double() - want).abs().max() <= 1e-4 * want.abs().max()
    pm.train()
    out = pm(ids).logits.float().logsumexp(-1).mean()
    out.backward()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if n in trainable)


def test_peft_and_lowbit_adapters_interchange(tiny, peft, tmp_path):
    """PEFT's save_pretrained -> lowbit.load_adapter and lowbit.save_adapter -> PeftModel.from_pretrained give
    the same model outputs as the PEFT model; save_adapter records the base model's path for PEFT's loaders."""
    _, path, ids = tiny
    base = _lowbit_base(tiny)
    pm = peft.get_peft_model(copy.deepcopy(base), hf.register_peft(peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["k_proj", "o_proj", "up_proj"], lora_dropout=0.0)))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    pm.eval()
    want = logits(pm, ids)
    pm.save_pretrained(tmp_path / "peft")

    ours = copy.deepcopy(base)
    loaded = lowbit.load_adapter(ours, tmp_path / "peft")
    assert len(loaded) == 6
    assert torch.equal(logits(ours, ids), want)

    lowbit.save_adapter(ours, tmp_path / "lowbit")
    saved = json.loads((tmp_path / "lowbit" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == path == base.config.name_or_path
    cfg = hf.register_peft(peft.LoraConfig.from_pretrained(tmp_path / "lowbit"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lowbit", config=cfg)
    assert torch.equal(logits(back, ids), want)


def test_peft_merge_and_unload_gives_the_dense_model(tiny, peft):
    """merge_and_unload() returns nn.Linears holding deq(W) + s·B·A (float64 reference, fp32 rounding); unmerge
    before that puts the very QuantLinear back."""
    _, _, ids = tiny
    base = _lowbit_base(tiny)
    pm = peft.get_peft_model(base, hf.register_peft(peft.LoraConfig(r=8, lora_alpha=32, target_modules=["gate_proj"])))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    layer = pm.base_model.model.model.layers[1].mlp.gate_proj
    q = layer.get_base_layer()
    layer.merge()
    assert type(layer.get_base_layer()) is torch.nn.Linear
    layer.unmerge()
    assert layer.get_base_layer() is q
    want = {}
    for i in range(2):
        lay = pm.base_model.model.model.layers[i].mlp.gate_proj
        qq = lay.get_base_layer()
        a, b = lay.lora_A["default"].weight.double(), lay.lora_B["default"].weight.double()
        want[i] = ref.dequantize_qt_ref(qq.weight, torch.float32).double() + lay.scaling["default"] * b @ a
    before = logits(pm, ids)
    merged = pm.merge_and_unload()
    for i in range(2):
        lin = merged.model.layers[i].mlp.gate_proj
        assert type(lin) is torch.nn.Linear
        err = (lin.weight.double() - want[i]).abs()
        assert (err <= 2 * torch.finfo(torch.float32).eps * want[i].abs() + 1e-7).all(), err.max()
    after = logits(merged, ids)
    assert (after - before).abs().max() <= 1e-3 * before.abs().max()


def test_register_peft_validates(peft):
    with pytest.raises(TypeError, match="peft.LoraConfig"):
        hf.register_peft({"r": 8})


def test_save_adapter_base_model_name_type(tiny, tmp_path):
    dense, _, _ = tiny
    m = copy.deepcopy(dense)
    lowbit.add_lora(m, 4, 8, target_modules=["q_proj"])
    with pytest.raises(TypeError, match="base_model_name_or_path"):
        lowbit.save_adapter(m, tmp_path, base_model_name_or_path=3)


# ------------------------------------------------------------------------------ save_model / load_model
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 64)
        self.a = torch.nn.Linear(64, 128)
        self.b = torch.nn.Linear(128, 64, bias=False)
        self.c = torch.nn.Linear(64, 64)
        self.d = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 50, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, i):
        h = torch.relu(self.a(self.emb(i)))
        return self.head(self.d(self.c(self.b(h))))


def test_save_model_load_model_round_trip(tmp_path):
    """Any nn.Module: QuantLinears (two formats), LoRA with two adapters (one inactive), a QWHA adapter and a
    tied head come back on a meta skeleton with bit-identical tensors, the same adapters, scales, active
    set, trainable parameters and tying — and the same outputs."""
    torch.manual_seed(0)
    m = _Net()
    lowbit.quantize_model(m, "int4", 64, True, skip=("head", "d"), progress=False)
    lowbit.add_lora(m, 4, 8, target_modules=["a", "c"])
    lowbit.add_lora(m, 2, 3, target_modules=["a"], adapter_name="other")
    lowbit.add_qwha(m, 2, target_modules=["d"], fmt="nf4")
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    m.a.set_adapter("default")
    lowbit.save_model(m, tmp_path)
    with torch.device("meta"):
        skeleton = _Net()
    r = lowbit.load_model(tmp_path, skeleton)
    assert r is skeleton and r.head.weight is r.emb.weight
    sd1, sd2 = m.state_dict(), r.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    assert r.a.active == ["default"] and r.a.scaling == m.a.scaling and r.c.scaling == m.c.scaling
    assert r.d.scale == m.d.scale and isinstance(r.d.base, QuantLinear) and r.d.base.weight.equal(m.d.base.weight)
    assert [n for n, p in r.named_parameters() if p.requires_grad] == \
        [n for n, p in m.named_parameters() if p.requires_grad]
    i = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        assert torch.equal(r(i), m(i))


def test_load_model_refuses_what_does_not_fit(tmp_path):
    torch.manual_seed(0)
    m = _Net()
    lowbit.quantize_model(m, "nf4", 64, skip=("head",), progress=False)
    lowbit.save_model(m, tmp_path)
    other = _Net()
    other.b = torch.nn.Linear(64, 64, bias=False)  # another shape where a QuantLinear was
    with pytest.raises(ValueError, match="does not fit"):
        lowbit.load_model(tmp_path, other)
    other = _Net()
    other.c = torch.nn.Conv1d(64, 64, 1)
    with pytest.raises(ValueError, match="expected the original nn.Linear"):
        lowbit.load_model(tmp_path, other)
    other = _Net()
    other.extra = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="missing"):
        lowbit.load_model(tmp_path, other)
    lowbit.save_tensors({"x": torch.zeros(2)}, tmp_path / "plain" / "model.safetensors") \
        if os.makedirs(tmp_path / "plain") is None else None
    with pytest.raises(ValueError, match="not written by lowbit.save_model"):
        lowbit.load_model(tmp_path / "plain", _Net())
    with pytest.raises(TypeError, match="model_skeleton"):
        lowbit.load_model(tmp_path, "model")


# ------------------------------------------------------------------------------ SmolLM2 (real model)
@pytest.mark.real_model
def test_smollm2_quantize_on_load_save_reload_in_new_process(smollm2, tmp_path):
    """SmolLM2: quantize on load (nf4, double quant) gives the weights quantize_model gives; saved and reloaded
    in a fresh process, the perplexity on 256 tokens is the same to the last digit."""
    from lowbit.demo import perplexity

    tok, model, ids = smollm2
    ids = ids[:257]
    model.save_pretrained(tmp_path / "fp32")  # dense fp32, with the GGUF loader's stale quant_method "gguf"
    q = hf.from_pretrained(tmp_path / "fp32", quantization_config=hf.LowbitConfig("nf4", 64, True))
    assert len(quant_layers(q)) == 210
    sample = "model.layers.7.mlp.down_proj"
    assert q.get_submodule(sample).weight.equal(
        lowbit.quantize(model.get_submodule(sample).weight.detach(), "nf4", 64, double_quant=True))
    ppl = perplexity(q, ids, 256)
    q.save_pretrained(tmp_path / "nf4")
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import torch, lowbit.hf
from transformers import AutoModelForCausalLM
from lowbit.demo import perplexity
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'nf4')!r})
print(repr(perplexity(m, torch.load({str(tmp_path / 'ids.pt')!r}), 256)))
"""
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip().splitlines()[-1] == repr(ppl)
