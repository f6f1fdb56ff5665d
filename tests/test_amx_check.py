"""bench/amx_check.py, the AMX session's one command: its machine gate and the targets table it reads
from the benches' JSON (synthetic files here; the benches themselves are tested elsewhere)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import amx_check  # noqa: E402

lowbit = pytest.importorskip("lowbit")


def test_machine_gate(tmp_path):
    """Without AMX the kit stops with exit 2 (nothing it could measure), unless --dry-run."""
    args = argparse.Namespace(out=str(tmp_path), dry_run=False)
    amx = not lowbit.info().get("amx_status")
    assert amx_check.machine(args) == (0 if amx else 2)
    facts = json.loads((tmp_path / "machine.json").read_text())
    assert facts["cpu_path"] == lowbit.info()["cpu_path"] and facts["dry_run"] is False
    args.dry_run = True
    assert amx_check.machine(args) == 0


def test_targets_table_from_bench_json(tmp_path):
    rows = [{"shape": [4096, 4096], "m": 8, "product": "gemm", "impl": "lowbit nf4+dq", "vs_dense": 1.6},
            {"shape": [4096, 4096], "m": 8, "product": "gemm", "impl": "torch dense bf16", "vs_dense": 1.0},
            {"shape": [4096, 4096], "m": 128, "product": "gemm", "impl": "lowbit int4", "vs_dense": 1.1},
            {"shape": [4096, 4096], "m": 512, "product": "gemm_t", "impl": "lowbit int4", "vs_dense": 1.02},
            {"shape": [4096, 4096], "m": 32, "product": "gemm_t", "impl": "lowbit int4", "vs_dense": 9.0}]
    (tmp_path / "gemm_bf16.json").write_text(json.dumps({"threads": 2, "rows": rows}))
    (tmp_path / "lowrank.json").write_text(json.dumps({"train_step": {"bf16": {"speedup": 2.1}}}))
    (tmp_path / "machine.json").write_text(json.dumps({"model": "Xeon", "flags": ["amx_bf16"], "cpu_path": "amx",
                                                      "amx_status": "", "dry_run": False}))
    got = {(t, r): (v, goal) for t, r, v, goal in amx_check.targets(str(tmp_path))}
    assert got[("gemm vs torch dense bf16", "M=8 4096x4096 lowbit nf4+dq")] == (1.6, 1.5)
    assert got[("gemm vs torch dense bf16", "M=128 4096x4096 lowbit int4")] == (1.1, 1.2)
    assert got[("gemm_t vs torch dense bf16", "M=512 4096x4096 lowbit int4")] == (1.02, 1.0)
    assert got[("training step vs bnb + LoRA", "nf4+dq 4096² r=16 M=512 bf16")] == (2.1, 2.0)
    assert got[("whole model vs PEFT + bnb", "SmolLM2-135M bf16 512 tokens")] == (None, 1.5)  # no train.json
    assert len(got) == 5  # torch rows and gemm_t at M != 512 are not targets
    cross = [{"dtype": "torch.bfloat16", "precision": "high", "fmt": "nf4+dq", "shape": [4096, 4096],
              "engine": "amx", "kernels": ["gemv_i16", "engine"], "retune_m": [2, 3]},
             {"dtype": "torch.float32", "precision": "medium", "fmt": "int4", "shape": [4096, 4096],
              "engine": "amx", "kernels": ["gemv_i16", "engine"], "retune_m": []}]
    (tmp_path / "crossover.json").write_text(json.dumps({"threads": 2, "rows": [], "crossover": cross}))
    args = argparse.Namespace(out=str(tmp_path))
    assert amx_check.summary(args) == 0
    table = (tmp_path / "summary.md").read_text()
    assert "| bfloat16 high nf4+dq 4096x4096 | gemv_i16, engine (amx) | RETUNE at M = 2, 3 |" in table
    assert "| float32 medium int4 4096x4096 | gemv_i16, engine (amx) | OK |" in table
    assert "| M=8 4096x4096 lowbit nf4+dq | 1.60x | >= 1.5x | MET |" in table
    assert "| M=128 4096x4096 lowbit int4 | 1.10x | >= 1.2x | NOT MET |" in table
    assert "| SmolLM2-135M bf16 512 tokens | - | >= 1.5x | not run |" in table
