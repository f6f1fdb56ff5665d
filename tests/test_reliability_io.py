"""Regression tests for issue 14, findings 7 (save_tensors accepts what load_tensors refuses) and
8 (malformed checkpoints load as other numbers; QuantLinear.load_state_dict is not atomic)."""

import json

import pytest
import torch

import lowbit
from lowbit.nn import QuantLinear


def weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g)


# ------------------------------------------------------------------------- finding 7
@pytest.mark.parametrize("comp", ["codes", "scale", "zero", "scale_q", "scale_nested", "scale_offset"])
def test_f7_plain_tensor_named_like_a_component_is_refused_at_save(tmp_path, comp):
    qt = lowbit.quantize(weight(8, 64), "nf4", 64)  # nf4: no zero, no scale_q... still reserved names
    with pytest.raises(ValueError, match=f"'w.{comp}' is reserved .* quantized tensor 'w'"):
        lowbit.save_tensors({"w": qt, f"w.{comp}": torch.zeros(2)}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_f7_reserved_lowbit_metadata_key_is_refused(tmp_path):
    qt = lowbit.quantize(weight(8, 64), "nf4", 64)
    with pytest.raises(ValueError, match="metadata key 'lowbit' is reserved"):
        lowbit.save_tensors({"w": qt}, tmp_path / "x.safetensors", metadata={"lowbit": "mine"})
    with pytest.raises(TypeError, match="metadata entries must be str"):
        lowbit.save_tensors({"w": qt}, tmp_path / "x.safetensors", metadata={"step": 5})
    with pytest.raises(ValueError, match="'__metadata__' is reserved"):
        lowbit.save_tensors({"__metadata__": torch.zeros(2)}, tmp_path / "x.safetensors")


def test_f7_what_save_accepts_load_returns_exactly(tmp_path):
    """Names next to the reserved ones (other quantized tensors, non-component suffixes) round-trip."""
    a = lowbit.quantize(weight(8, 64, 1), "nf4", 64, True)
    b = lowbit.quantize(weight(8, 64, 2), "int4", 32)
    c = lowbit.quantize(weight(8, 64, 3), "fp4", 64)
    tensors = {"a": a, "a.codes": b, "a.zero": c, "a.extra": torch.arange(3.0), "b.codes": torch.ones(2),
               "": torch.zeros(1)}
    path = tmp_path / "x.safetensors"
    lowbit.save_tensors(tensors, path, metadata={"note": "kept"})
    out = lowbit.load_tensors(path)
    assert set(out) == set(tensors)
    for k, v in tensors.items():
        assert out[k].equal(v) if isinstance(v, lowbit.QuantizedTensor) else torch.equal(out[k], v)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["note"] == "kept"


# ------------------------------------------------------------------------- finding 8: from_bnb
def _bnb_sd(dq=True, fmt="nf4"):
    return lowbit.quantize(weight(8, 512), fmt, 64, dq).to_bnb("m.")


def _with_state(sd, **changes):
    key = next(k for k in sd if ".quant_state." in k)
    state = json.loads(bytes(sd[key].tolist()))
    state.update(changes)
    sd = dict(sd)
    sd[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return sd


def test_f8_float_absmax_with_nested_is_refused():
    sd = _bnb_sd(dq=True)
    sd["m.weight.absmax"] = sd["m.weight.absmax"].float() + 0.7  # 2.7 would have been read as 2
    with pytest.raises(TypeError, match=r"m.weight.absmax.dtype=torch.float32.*uint8"):
        lowbit.from_bnb(sd, "m.")


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool, torch.int32, torch.float64])
def test_f8_packed_weight_of_a_non_storage_dtype_is_refused(dtype):
    sd = _bnb_sd(dq=False)
    sd["m.weight"] = sd["m.weight"].to(dtype)
    with pytest.raises(TypeError, match=f"m.weight.dtype={dtype}"):
        lowbit.from_bnb(sd, "m.")


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_f8_float_storage_is_reinterpreted_and_byte_count_checked(storage):
    sd = _bnb_sd(dq=False)
    qt = lowbit.from_bnb(sd, "m.")
    sd["m.weight"] = sd["m.weight"].reshape(-1).view(storage).reshape(-1, 1)
    assert lowbit.from_bnb(sd, "m.").equal(qt)
    sd["m.weight"] = sd["m.weight"][:-1]
    with pytest.raises(ValueError, match=r"m.weight holds \d+ bytes; shape=\[8, 512\]"):
        lowbit.from_bnb(sd, "m.")


@pytest.mark.parametrize("offset", [float("nan"), float("inf"), float("-inf"), 1e300, "0.5", True, None])
def test_f8_nested_offset_must_be_a_finite_number(offset):
    with pytest.raises((ValueError, TypeError), match="nested_offset"):
        lowbit.from_bnb(_with_state(_bnb_sd(dq=True), nested_offset=offset), "m.")


@pytest.mark.parametrize("field, value", [("blocksize", 64.9), ("blocksize", "64"), ("blocksize", 64.0),
                                          ("blocksize", True), ("shape", [8.0, 512]), ("shape", ["8", 512]),
                                          ("shape", [8, 512, 1]), ("shape", "8x512"), ("shape", [-8, -512]),
                                          ("shape", [2 ** 40, 2 ** 40]), ("nested_blocksize", "256"),
                                          ("nested_dtype", "float16"), ("quant_type", ["nf4"]), ("dtype", ["x"])])
def test_f8_bnb_quant_state_needs_json_ints(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        lowbit.from_bnb(_with_state(_bnb_sd(dq=True), **{field: value}), "m.")


def test_f8_bnb_quant_state_must_be_uint8_bytes():
    sd = _bnb_sd(dq=False)
    key = "m.weight.quant_state.bitsandbytes__nf4"
    sd[key] = sd[key].float() + 0.5
    with pytest.raises(TypeError, match=f"{key}.dtype=torch.float32"):
        lowbit.from_bnb(sd, "m.")


def test_f8_bnb_valid_checkpoint_still_loads_bit_exactly():
    for dq in (False, True):
        qt = lowbit.quantize(weight(8, 512), "fp4", 64, dq)
        assert lowbit.from_bnb(qt.to_bnb("m."), "m.").equal(qt)


# ------------------------------------------------------------------------- finding 8: load_tensors
def _rewrite_meta(tmp_path, **changes):
    from safetensors.torch import save_file as st_save
    qt = lowbit.quantize(weight(8, 64), "nf4", 64, False)
    m = qt.metadata()
    m.update(changes)
    path = tmp_path / "x.safetensors"
    st_save({f"w.{k}": v for k, v in qt.components().items()}, str(path),
            metadata={"lowbit": json.dumps({"version": 1, "quantized": {"w": m}})})
    return path


@pytest.mark.parametrize("field, value", [("double_quant", "false"), ("double_quant", 0), ("double_quant", "true"),
                                          ("block_size", 64.0), ("block_size", "64"), ("block_size", True),
                                          ("shape", [8.0, 64]), ("shape", ["8", "64"]), ("shape", [-8, -64]),
                                          ("dtype", 1), ("fmt", 4)])
def test_f8_load_tensors_metadata_needs_real_json_types(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field}"):
        lowbit.load_tensors(_rewrite_meta(tmp_path, **{field: value}))


@pytest.mark.parametrize("meta", ['[1, 2]', '{"version": 1, "quantized": [1]}', '{"version": true, "quantized": {}}',
                                  '{"version": 1, "quantized": {"w": 5}}'])
def test_f8_load_tensors_corrupt_lowbit_metadata_is_a_value_error(tmp_path, meta):
    from safetensors.torch import save_file as st_save
    path = tmp_path / "x.safetensors"
    st_save({"w.codes": torch.zeros(8, 32, dtype=torch.uint8)}, str(path), metadata={"lowbit": meta})
    with pytest.raises(ValueError):
        lowbit.load_tensors(path)


def test_f8_load_tensors_name_both_plain_and_quantized_is_refused(tmp_path):
    from safetensors.torch import save_file as st_save
    qt = lowbit.quantize(weight(8, 64), "nf4", 64)
    path = tmp_path / "x.safetensors"
    st_save({"w": torch.zeros(2), **{f"w.{k}": v for k, v in qt.components().items()}}, str(path),
            metadata={"lowbit": json.dumps({"version": 1, "quantized": {"w": qt.metadata()}})})
    with pytest.raises(ValueError, match="both plain and quantized"):
        lowbit.load_tensors(path)


# ------------------------------------------------------------------------- finding 8: QuantLinear
def _layer(fmt="nf4", dq=True, seed=0):
    torch.manual_seed(seed)
    return QuantLinear.from_linear(torch.nn.Linear(128, 32), fmt, 64, dq)


def _corruptions():
    good = _layer(seed=1).state_dict()
    yield "scale_q_float", {**good, "scale_q": good["scale_q"].float()}, TypeError
    yield "scale_nested_short", {**good, "scale_nested": good["scale_nested"][:0]}, ValueError
    yield "codes_short", {**good, "codes": good["codes"][:-1]}, ValueError
    yield "missing_scale_q", {k: v for k, v in good.items() if k != "scale_q"}, ValueError
    yield "bias_shape", {**good, "bias": torch.zeros(31)}, ValueError
    spec = json.loads(bytes(good["_extra_state"].tolist()))
    yield "dq_string", {**good, "_extra_state": torch.tensor(list(json.dumps({**spec, "double_quant": "false"}).encode()),
                                                              dtype=torch.uint8)}, TypeError
    yield "other_spec", _layer("nf4", dq=False, seed=1).state_dict(), ValueError


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("name", ["scale_q_float", "scale_nested_short", "codes_short", "missing_scale_q",
                                  "bias_shape", "dq_string", "other_spec"])
def test_f8_failed_quant_linear_load_state_dict_leaves_the_layer_unchanged(name, assign):
    sd, exc = {n: (sd, exc) for n, sd, exc in _corruptions()}[name]
    layer = _layer(seed=0)
    x = torch.randn(3, 128)
    before, y = layer.weight.clone(), layer(x)
    bias = layer.bias.detach().clone()
    with pytest.raises((exc, RuntimeError)):
        layer.load_state_dict(sd, strict=True, assign=assign)
    assert layer.weight.equal(before), name
    assert torch.equal(layer.bias, bias) and torch.equal(layer(x), y), name


def test_f8_quant_linear_load_is_all_or_nothing_and_still_loads(tmp_path):
    src, dst = _layer(seed=1), _layer(seed=0)
    x = torch.randn(2, 128)
    # strict=False without the weight at all: the bias loads, the weight stays, the weight's keys are missing
    w0 = dst.weight.clone()
    r = dst.load_state_dict({"bias": src.bias.detach()}, strict=False)
    assert dst.weight.equal(w0) and torch.equal(dst.bias, src.bias)
    assert sorted(r.missing_keys) == ["_extra_state", "codes", "scale_nested", "scale_offset", "scale_q"]
    assert r.unexpected_keys == []
    with pytest.raises(RuntimeError, match="Missing key.*codes"):
        dst.load_state_dict({"bias": src.bias.detach()}, strict=True)
    for assign in (False, True):
        d = _layer(seed=0)
        d.load_state_dict(src.state_dict(), strict=True, assign=assign)
        assert d.weight.equal(src.weight) and torch.equal(d(x), src(x))
    # a flat codes tensor with the right byte count is accepted and stored in the canonical shape
    sd = dict(src.state_dict())
    sd["codes"] = sd["codes"].reshape(-1)
    d = _layer(seed=0)
    d.load_state_dict(sd)
    assert d.codes.shape == (32, 64) and d.weight.equal(src.weight)


# ------------------------------------------------------------------------- finding 9: exception types
# Hostile checkpoints raised RecursionError (deeply nested JSON), OverflowError (an int past a double),
# RuntimeError / AttributeError / KeyError / IndexError: now ValueError / TypeError naming the entry.
_DEEP = "[" * 100_000 + "]" * 100_000


def test_f9_deeply_nested_json_in_a_bnb_quant_state_is_a_value_error():
    sd = _bnb_sd()
    key = next(k for k in sd if ".quant_state." in k)
    sd[key] = torch.tensor(list(_DEEP.encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="quant_state.*nested too deeply"):
        lowbit.from_bnb(sd, "m.")


def test_f9_deeply_nested_json_in_lowbit_metadata_is_a_value_error(tmp_path):
    from safetensors.torch import save_file as st_save
    path = tmp_path / "x.safetensors"
    st_save({"w.codes": torch.zeros(8, 32, dtype=torch.uint8)}, str(path), metadata={"lowbit": _DEEP})
    with pytest.raises(ValueError, match="lowbit metadata.*nested too deeply"):
        lowbit.load_tensors(path)


def test_f9_deeply_nested_json_in_quant_linear_extra_state_is_a_value_error():
    layer = _layer()
    sd = layer.state_dict()
    sd["_extra_state"] = torch.tensor(list(_DEEP.encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="extra state.*nested too deeply"):
        layer.load_state_dict(sd)


@pytest.mark.parametrize("offset", [10 ** 400, -(10 ** 400)], ids=["1e400", "-1e400"])
def test_f9_nested_offset_beyond_a_double_is_a_value_error(offset):
    with pytest.raises(ValueError, match="nested_offset"):
        lowbit.from_bnb(_with_state(_bnb_sd(), nested_offset=offset), "m.")


def test_f9_bnb_state_dict_with_non_str_keys_still_loads():
    sd = _bnb_sd()
    want = lowbit.from_bnb(sd, "m.")
    got = lowbit.from_bnb({**sd, 5: torch.zeros(1), ("a",): 1}, "m.")
    assert got.equal(want)
    with pytest.raises(TypeError, match="prefix"):
        lowbit.from_bnb(sd, prefix=5)


def test_f9_bnb_components_on_the_meta_device_are_refused():
    sd = _bnb_sd()
    for key in [k for k in sd if k in ("m.weight", "m.weight.absmax") or ".quant_state." in k]:
        with pytest.raises((ValueError, TypeError), match="meta|weight"):
            lowbit.from_bnb({**sd, key: sd[key].to("meta")}, "m.")


@pytest.mark.parametrize("shape, exc", [((-8, -64), ValueError), ((8.0, 64), TypeError), ((True, 64), TypeError),
                                        ("ab", ValueError), (None, ValueError), ((8, 64, 1), ValueError)])
def test_f9_quantized_tensor_shape_is_checked_by_name(shape, exc):
    from lowbit.formats import QuantizedTensor, QuantSpec
    qt = lowbit.quantize(weight(8, 64), "nf4", 64)
    with pytest.raises(exc, match="shape"):
        QuantizedTensor(QuantSpec("nf4", 64), shape, torch.float32, qt.codes, scale=qt.scale)


def _adapter_dir(tmp_path, config):
    from safetensors.torch import save_file as st_save
    st_save({"base_model.model.0.lora_A.weight": torch.zeros(2, 64),
             "base_model.model.0.lora_B.weight": torch.zeros(8, 2)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("config", [_DEEP, [1, 2], {}, {"lora_alpha": 10 ** 400}, {"lora_alpha": "16"},
                                    {"lora_alpha": 16, "lora_dropout": float("nan")},
                                    {"lora_alpha": 16, "use_rslora": "false"}, "\xff\xfe"],
                         ids=["deep", "list", "empty", "alpha_1e400", "alpha_str", "dropout_nan", "rslora_str",
                              "not_utf8"])
def test_f9_peft_adapter_config_errors_are_value_errors(tmp_path, config):
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    with pytest.raises(ValueError, match="adapter_config.json"):
        lowbit.load_adapter(model, _adapter_dir(tmp_path, config))


def test_f9_peft_adapter_still_loads(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 8))
    assert lowbit.load_adapter(model, _adapter_dir(tmp_path, {"lora_alpha": 16, "r": 2})) == ["0"]
