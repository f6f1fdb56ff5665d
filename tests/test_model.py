"""Model surgery (lowbit.model): the one target/skip matcher on a list of names, and the one loop."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.model import matches, select_modules
from lowbit.nn import LoRALinear, QuantLinear

NAMES = [
    "lm_head", "model.lm_head", "lm_head_2", "model.embed_tokens",
    "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
    "model.vision.blocks.0.q_proj", "model.my_vision.q_proj",
]


@pytest.mark.parametrize("skip, skipped", [
    (("lm_head",), ["lm_head", "model.lm_head"]),                                 # whole component, never a prefix
    (("model.lm_head",), ["model.lm_head"]),                                      # a dotted name
    (("vision",), ["model.vision.blocks.0.q_proj"]),                              # a subtree, not "my_vision"
    (("layers.0.mlp",), ["model.layers.0.mlp.down_proj"]),                        # a run inside the name
    (("mlp.down_proj", "lm_head"), ["lm_head", "model.lm_head", "model.layers.0.mlp.down_proj",
                                    "model.layers.1.mlp.down_proj"]),
    ("lm_head", ["lm_head", "model.lm_head"]),                                    # a str is one entry
    ((), []),
])
def test_skip_rule_on_a_name_list(skip, skipped):
    assert [n for n in NAMES if not matches(n, None, skip)] == skipped


def test_target_rule_is_the_last_component():
    assert [n for n in NAMES if matches(n, ("q_proj",))] == ["model.layers.0.self_attn.q_proj",
                                                             "model.vision.blocks.0.q_proj", "model.my_vision.q_proj"]
    assert [n for n in NAMES if matches(n, "down_proj", skip=("layers.1",))] == ["model.layers.0.mlp.down_proj"]
    assert not matches("model.layers.0.self_attn", ("self_attn.q_proj",))  # components, not dotted suffixes


def _tree():
    torch.manual_seed(0)
    layer = lambda: torch.nn.ModuleDict({"q_proj": torch.nn.Linear(64, 64), "down_proj": torch.nn.Linear(64, 64)})  # noqa: E731
    return torch.nn.ModuleDict({"layers": torch.nn.ModuleList([layer(), layer()]), "lm_head": torch.nn.Linear(64, 10)})


def test_every_surgery_uses_the_same_matcher():
    q = _tree()
    report = lowbit.quantize_model(q, "nf4", 64, skip=("layers.1", "lm_head"), progress=False)
    assert report["replaced"] == ["layers.0.q_proj", "layers.0.down_proj"]
    assert report["skipped"] == ["layers.1.q_proj", "layers.1.down_proj", "lm_head"]
    lora = _tree()
    assert lowbit.add_lora(lora, 4, target_modules=("q_proj",), skip=("layers.1",)) == ["layers.0.q_proj"]
    qwha = _tree()
    assert lowbit.add_qwha(qwha, 2, target_modules=("q_proj", "down_proj"), skip=("layers.0",)) == [
        "layers.1.q_proj", "layers.1.down_proj"]


def test_adapters_wrap_once_and_quantize_model_reaches_their_bases():
    model = _tree()
    lowbit.add_lora(model, 4, target_modules=None, skip=("lm_head",))
    assert select_modules(model, torch.nn.Linear, None, into_adapters=False) == ["lm_head"]
    # a second adapter goes into the same LoRALinear, not around it or around its base
    assert lowbit.add_lora(model, 2, target_modules=("q_proj",), adapter_name="second") == [
        "layers.0.q_proj", "layers.1.q_proj"]
    assert isinstance(model["layers"][0]["q_proj"].base, torch.nn.Linear)
    assert set(model["layers"][0]["q_proj"].lora_A) == {"default", "second"}
    report = lowbit.quantize_model(model, "nf4", 64, skip=("lm_head",), progress=False)
    assert "layers.0.q_proj.base" in report["replaced"]
    assert isinstance(model["layers"][0]["q_proj"], LoRALinear)
    assert isinstance(model["layers"][0]["q_proj"].base, QuantLinear)


def test_add_lora_and_add_qwha_check_blocks_before_changing_anything():
    model = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(64, 8), "down_proj": torch.nn.Linear(96, 8)})
    with pytest.raises(ValueError, match="down_proj: in_features=96 is not a multiple of block_size=64"):
        lowbit.add_lora(model, 4, target_modules=("q_proj", "down_proj"), fmt="nf4")
    assert isinstance(model["q_proj"], torch.nn.Linear)


def test_convert_quantize_model_is_a_deprecated_alias():
    model = _tree()
    with pytest.warns(DeprecationWarning, match="lowbit.convert.quantize_model is deprecated; use lowbit.quantize_model"):
        report = lowbit.convert.quantize_model(model, "nf4", 64, progress=False)
    assert report["replaced"] == ["layers.0.q_proj", "layers.0.down_proj", "layers.1.q_proj", "layers.1.down_proj"]
    assert lowbit.convert.to_bnb is lowbit.formats.to_bnb is lowbit.to_bnb
    assert lowbit.convert.from_bnb is lowbit.formats.from_bnb is lowbit.from_bnb
