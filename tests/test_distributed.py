"""lowbit under torch.distributed (CPU, gloo, 2 processes spawned here): DDP, FSDP2, DCP.

References are single-process runs of the same model on the same global batch (the two ranks' halves
together), with the same optimizer: losses and adapters must agree within fp32 reduction-order
tolerance. Every spawn has a deadline: on expiry its processes are killed and the test fails (no hang).
"""

from __future__ import annotations

import copy
import math
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch

import lowbit
from lowbit.nn import LoRALinear, QuantLinear

transformers = pytest.importorskip("transformers")

WORLD = 2
STEPS = 10
SEQ = 16
LR = 2e-3
SGD_LR = 0.2
TIMEOUT_S = 240  # per spawn; a run takes ~10-45 s on 2 cores shared with other jobs
# The tolerance is the fp32 reduction-order spread, measured: the same single process run once on the
# whole batch and once accumulating the two rows' gradients (what the ranks compute, summed in another
# order, and with other product shapes: M = 16 rows instead of 32). A distributed run may differ from
# the whole-batch run by twice that spread, plus 16 fp32 ulps of the values' scale.
ULPS = 16 * 2.0 ** -23


# ----------------------------------------------------------------------------- the model and the data
def tiny_model(fmt: str = "nf4", double_quant: bool = True, r: int = 8, seed: int = 0):
    """A 2-layer llama (hidden 64) with every decoder Linear quantized and LoRA on all of them."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    lowbit.quantize_model(model, fmt, block_size=64, double_quant=double_quant, progress=False)
    torch.manual_seed(seed + 1)
    lowbit.add_lora(model, r=r, alpha=16)
    with torch.no_grad():  # B = 0 at init would make step 0's gradient of A vanish: start from a non-zero B
        for layer in (m for m in model.modules() if isinstance(m, LoRALinear)):
            layer.lora_B["default"].normal_(0, 0.02)
    return model


TEXT = os.path.join(os.path.dirname(lowbit.__file__), "data", "pride_and_prejudice_opening.txt")


def batches(steps: int = STEPS, world: int = WORLD) -> list[torch.Tensor]:
    """``steps`` global batches of ``world`` windows of seq + 1 bytes of English text (ASCII: token ids < 128,
    learnable), at seeded offsets: rank i trains on row i."""
    with open(TEXT, "rb") as f:
        ids = torch.tensor(list(f.read()), dtype=torch.long) % 128
    g = torch.Generator().manual_seed(7)
    starts = torch.randint(0, ids.numel() - SEQ - 1, (steps, world), generator=g)
    return [torch.stack([ids[s:s + SEQ + 1] for s in row.tolist()]) for row in starts]


def loss_of(model, b: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=b[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))


def adapters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def make_opt(kind: str, params):
    params = [p for p in params if p.requires_grad]
    if kind == "sgd":  # linear in the gradient: rounding differences stay rounding differences
        return torch.optim.SGD(params, lr=SGD_LR)
    if kind == "torch":
        return torch.optim.AdamW(params, lr=LR)
    if kind == "adamw8bit":
        return lowbit.optim.AdamW8bit(params, lr=LR, min_8bit_size=0)
    if kind == "paged8bit":
        return lowbit.optim.PagedAdamW8bit(params, lr=LR, min_8bit_size=0)
    raise ValueError(kind)


def single_process(opt_kind: str = "sgd", steps: int = STEPS, split: bool = False) -> tuple[list[float], dict]:
    """The reference: one process, the whole global batch per step (``split``: the gradient accumulated
    over the batch's rows one at a time, each loss / rows, for the reduction-order spread)."""
    model = tiny_model()
    opt = make_opt(opt_kind, model.parameters())
    losses = []
    for b in batches(steps):
        if split:
            loss = sum(loss_of(model, b[i:i + 1]).div(len(b)) for i in range(len(b)))
        else:
            loss = loss_of(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, adapters(model)


# ----------------------------------------------------------------------------- spawning
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on two cores
    result = None
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        result = ("ok", fn(rank, world, *args))
    except BaseException as e:  # the parent reports it (type, message, traceback)
        result = ("error", type(e).__name__, str(e), traceback.format_exc())
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def spawn(fn, *args, world: int = WORLD, timeout: float = TIMEOUT_S) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes; return each rank's result, or raise
    RuntimeError with a rank's traceback. Past ``timeout`` seconds every process is killed: a hang fails."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:  # say what the others raised: a rank that fails alone leaves its peers waiting in a collective
            done = {r: torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False)[:3]
                    for r in range(world) if os.path.exists(os.path.join(out, f"rank{r}.pt"))}
            raise TimeoutError(f"ranks {hung} still running after {timeout} s: killed; finished ranks: {done}")
        results = []
        for r in range(world):
            path = os.path.join(out, f"rank{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            results.append(torch.load(path, weights_only=False))
    return results


def ok(results) -> list:
    for r, res in enumerate(results):
        if res[0] != "ok":
            raise RuntimeError(f"rank {r} raised {res[1]}: {res[2]}\n{res[3]}")
    return [res[1] for res in results]


def flat(adapters_: dict) -> torch.Tensor:
    return torch.cat([adapters_[k].flatten().double() for k in sorted(adapters_)])


def max_diff(a, e) -> float:
    d = (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(e, dtype=torch.float64)).abs().max().item()
    return d if math.isfinite(d) else math.inf


def assert_close(actual, expected, spread: float, what: str):
    """|actual - expected| <= 2 x spread + 16 ulps of expected's scale (see ULPS)."""
    diff = max_diff(actual, expected)
    bound = 2 * spread + ULPS * torch.as_tensor(expected, dtype=torch.float64).abs().max().item()
    print(f"{what}: max |diff| = {diff:.3e} (bound {bound:.3e}: 2 x reduction-order spread {spread:.3e} + 16 ulps)")
    assert diff <= bound, f"{what}: max |diff| {diff} > {bound}"


# ----------------------------------------------------------------------------- workers (run in the ranks)
def _global_loss(loss: torch.Tensor) -> float:
    """The mean of the ranks' losses (for reporting only; the gradients are synchronised by DDP/FSDP2)."""
    t = loss.detach().clone()
    torch.distributed.all_reduce(t)
    return t.item() / torch.distributed.get_world_size()


def _train(model, opt, rank, steps, start: int = 0):
    losses = []
    for b in batches(start + steps)[start:]:
        loss = loss_of(model, b[rank:rank + 1])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(_global_loss(loss))
    return losses


def _ddp_worker(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    # rank 1 builds different quantized weights: DDP's broadcast at construction must make them rank 0's
    model = lowbit.distributed.prepare_model(tiny_model(seed=0 if rank == 0 else 99))
    reduced = []

    def hook(state, bucket):  # every element DDP all-reduces goes through its comm hook
        reduced.append(bucket.buffer().numel())
        t = bucket.buffer() / world
        return torch.distributed.all_reduce(t, async_op=True).get_future().then(lambda f: f.value()[0])

    ddp = DDP(model)
    ddp.register_comm_hook(None, hook)
    codes = {n: m.codes.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    losses = _train(ddp, make_opt("sgd", ddp.parameters()), rank, STEPS)
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    unchanged = all(torch.equal(codes[n], m.codes) for n, m in model.named_modules() if isinstance(m, QuantLinear))
    return {"losses": losses, "adapters": adapters(model), "reduced_per_step": sum(reduced) / STEPS,
            "adapter_numel": n_adapter, "codes": codes if rank == 1 else None, "codes_unchanged": unchanged}


def _fsdp_worker(rank, world, opt_kind, mp_bf16):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = tiny_model()
    whole = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mp_bf16 else None
    lowbit.distributed.fully_shard(model, mp_policy=policy)
    local, total = lowbit.distributed.quantized_bytes(model)
    opt = make_opt(opt_kind, model.parameters())
    losses = _train(model, opt, rank, STEPS)
    stats = opt.memory_stats() if hasattr(opt, "memory_stats") else None
    full = lowbit.distributed.full_state_dict(model)
    out = {"losses": losses, "local_bytes": local, "total_bytes": total, "opt_stats": stats}
    if rank == 0:  # the gathered weights are the bytes quantized before sharding (training never touches them)
        out["adapters"] = {k: v for k, v in full.items() if ".lora_" in k}
        out["weights_intact"] = all(
            torch.equal(full[f"{n}.{c}"], t) for n, w in whole.items() for c, t in w.components().items())
    return out


# ----------------------------------------------------------------------------- tests
def test_prepare_model_keeps_outputs_and_checkpoint_format(tmp_path):
    """prepare_model (one process): components become frozen parameters under the same keys; outputs,
    state dict and lowbit.save_model files are those of the unprepared model."""
    plain, prepared = tiny_model(), lowbit.distributed.prepare_model(tiny_model())
    q = prepared.model.layers[0].self_attn.q_proj.base
    assert isinstance(q.codes, torch.nn.Parameter) and not q.codes.requires_grad and "codes" not in q._buffers
    assert isinstance(q.scale_offset, torch.Tensor) and "scale_offset" in q._buffers  # 0-d: stays a buffer
    sd1, sd2 = plain.state_dict(), prepared.state_dict()
    assert list(sd1) == list(sd2) and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    b = batches(1)[0]
    assert torch.equal(loss_of(plain, b), loss_of(prepared, b))
    lowbit.save_model(plain, tmp_path / "plain")
    lowbit.save_model(prepared, tmp_path / "prepared")
    skel = transformers.LlamaForCausalLM(plain.config)
    r1 = lowbit.load_model(tmp_path / "plain", skel).state_dict()
    r2 = lowbit.load_model(tmp_path / "prepared", transformers.LlamaForCausalLM(plain.config)).state_dict()
    assert list(r1) == list(r2) and all(torch.equal(r1[k], r2[k]) for k in r1)
    assert [n for n, p in prepared.named_parameters() if p.requires_grad] == \
        [n for n, p in plain.named_parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"world_size=3 does not divide .*q_proj.base.*out_features=64"):
        lowbit.distributed.check_shardable(prepared, 3)
    with pytest.raises(ValueError, match=r"world_size=0"):
        lowbit.distributed.check_shardable(prepared, 0)


@pytest.fixture(scope="module")
def reference():
    """(losses, adapters) of the whole-batch run, and the spread to the row-accumulated run."""
    losses, ad = single_process("sgd")
    losses2, ad2 = single_process("sgd", split=True)
    spread = {"losses": max_diff(losses2, losses), "adapters": max_diff(flat(ad2), flat(ad)),
              "split": (losses2, ad2)}
    print(f"reduction-order spread (1 process, whole batch vs rows accumulated): losses {spread['losses']:.3e}, "
          f"adapters {spread['adapters']:.3e}")
    return losses, ad, spread


def assert_like_rows_accumulated(losses, ad, spread, what: str):
    """Tighter: a distributed run computes what the row-accumulated single process does (each rank one row,
    the average by a collective): within 16 ulps of it, no spread allowed."""
    assert_close(losses, spread["split"][0], 0.0, f"{what} losses vs 1 process rows accumulated")
    assert_close(flat(ad), flat(spread["split"][1]), 0.0, f"{what} adapters vs 1 process rows accumulated")


def test_ddp_matches_single_process_and_syncs_only_adapters(reference):
    ref_losses, ref_adapters, spread = reference
    res = ok(spawn(_ddp_worker))
    for r in range(WORLD):
        assert_close(res[r]["losses"], ref_losses, spread["losses"], f"DDP rank {r} losses vs 1 process")
        assert_close(flat(res[r]["adapters"]), flat(ref_adapters), spread["adapters"], f"DDP rank {r} adapters")
        assert_like_rows_accumulated(res[r]["losses"], res[r]["adapters"], spread, f"DDP rank {r}")
    # only adapters are all-reduced, each element once per step
    print(f"DDP all-reduced elements per step: {res[0]['reduced_per_step']:.0f}; adapter elements: "
          f"{res[0]['adapter_numel']}")
    assert res[0]["reduced_per_step"] == res[0]["adapter_numel"]
    # rank 1 quantized other weights (seed 99); after DDP's construction it held rank 0's, and kept them
    ref_codes = {n: m.codes for n, m in tiny_model(seed=0).named_modules() if isinstance(m, QuantLinear)}
    assert all(torch.equal(res[1]["codes"][n], c) for n, c in ref_codes.items())
    assert res[0]["codes_unchanged"] and res[1]["codes_unchanged"]


def _fsdp_both(rank, world):
    """One spawn, two runs: fp32 with SGD (the equality run), bf16 policy with PagedAdamW8bit."""
    return {"fp32": _fsdp_worker(rank, world, "sgd", False), "bf16": _fsdp_worker(rank, world, "paged8bit", True)}


@pytest.fixture(scope="module")
def fsdp_runs():
    return ok(spawn(_fsdp_both))


def test_fsdp2_matches_single_process_and_shards_quantized_bytes(reference, fsdp_runs):
    ref_losses, ref_adapters, spread = reference
    res = [r["fp32"] for r in fsdp_runs]
    for r in range(WORLD):
        assert_close(res[r]["losses"], ref_losses, spread["losses"], f"FSDP2 rank {r} losses vs 1 process")
    assert_close(flat(res[0]["adapters"]), flat(ref_adapters), spread["adapters"], "FSDP2 adapters (gathered)")
    assert_like_rows_accumulated(res[0]["losses"], res[0]["adapters"], spread, "FSDP2")
    assert res[0]["weights_intact"]
    for r in range(WORLD):
        frac = res[r]["local_bytes"] / res[r]["total_bytes"]
        print(f"FSDP2 rank {r}: quantized weight bytes held {res[r]['local_bytes']} of {res[r]['total_bytes']} "
              f"= {frac:.4f}")
        assert frac <= 0.55


def test_fsdp2_bf16_mixed_precision_with_paged_8bit_adamw(reference, fsdp_runs):
    """MixedPrecisionPolicy(param_dtype=bf16): the quantized bytes stay exact, the first loss (before any
    update) is the fp32 loss within bf16 rounding, training stays finite; 8-bit state <= 2.04 bytes/param."""
    ref_losses, _, _ = reference
    res = [r["bf16"] for r in fsdp_runs]
    assert res[0]["weights_intact"]
    # bf16 activations and adapters: relative error per product ~2^-8; through 2 layers and the head, 8 of them
    assert abs(res[0]["losses"][0] - ref_losses[0]) <= 8 * 2.0 ** -8 * abs(ref_losses[0])
    assert all(math.isfinite(x) for x in res[0]["losses"])
    first, last = res[0]["losses"][:3], res[0]["losses"][-3:]
    assert sum(last) < sum(first)  # it trains
    for r in range(WORLD):
        s = res[r]["opt_stats"]
        print(f"FSDP2 bf16 rank {r}: 8-bit state {s['state_bytes']} bytes for {s['params_with_state']} local "
              f"parameters = {s['state_bytes_per_param']:.4f} bytes/param")
        assert s["state_bytes_per_param"] <= 2.04


# ----------------------------------------------------------------------------- checkpoints
def _sharded(fmt: str = "nf4", r: int = 8):
    model = tiny_model(fmt, r=r)
    lowbit.distributed.fully_shard(model)
    return model


def _dcp_first(rank, world, path):
    """Train 10 steps with AdamW8bit, saving a DCP checkpoint after step 5: the uninterrupted run."""
    model = _sharded()
    opt = make_opt("adamw8bit", model.parameters())
    losses = _train(model, opt, rank, 5)
    lowbit.distributed.save_checkpoint(path, model, opt, extra={"step": 5})
    losses += _train(model, opt, rank, STEPS - 5, start=5)
    full = lowbit.distributed.full_state_dict(model)
    return {"losses": losses, "adapters": {k: v for k, v in full.items() if ".lora_" in k}}


def _dcp_resume(rank, world, path, export_dir):
    """New processes, a new model and optimizer: load the step-5 checkpoint, train to step 10, export."""
    model = _sharded()
    opt = make_opt("adamw8bit", model.parameters())
    extra = lowbit.distributed.load_checkpoint(path, model, opt)
    losses = _train(model, opt, rank, STEPS - extra["step"], start=extra["step"])
    full = lowbit.distributed.full_state_dict(model)
    lowbit.distributed.export(model, os.path.join(export_dir, "model"))
    lowbit.distributed.export(model, os.path.join(export_dir, "adapter"), adapter="default")
    return {"losses": losses, "adapters": {k: v for k, v in full.items() if ".lora_" in k}, "extra": extra,
            "weights": {k: v for k, v in full.items() if ".lora_" not in k}}


def test_dcp_round_trip_resumes_identically(tmp_path):
    path, export_dir = str(tmp_path / "ckpt"), str(tmp_path / "export")
    first = ok(spawn(_dcp_first, path))
    second = ok(spawn(_dcp_resume, path, export_dir))
    assert second[0]["extra"] == {"step": 5}
    for r in range(WORLD):  # the same trajectory, bit for bit
        d = max_diff(second[r]["losses"], first[r]["losses"][5:])
        print(f"DCP round trip rank {r}: steps 6-10 losses max |diff| = {d:.3e}")
        assert second[r]["losses"] == first[r]["losses"][5:]
    a, b = first[0]["adapters"], second[0]["adapters"]
    print(f"DCP round trip: adapters after step 10 max |diff| = {max_diff(flat(b), flat(a)):.3e}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the consolidated single-process files hold the sharded run's tensors
    skeleton = tiny_model()
    single = lowbit.load_model(os.path.join(export_dir, "model"), transformers.LlamaForCausalLM(skeleton.config))
    sd = single.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in b.items())
    assert all(torch.equal(sd[k], v) for k, v in second[0]["weights"].items() if not k.endswith("_extra_state"))
    from safetensors.torch import load_file

    peft = load_file(os.path.join(export_dir, "adapter", "adapter_model.safetensors"))
    assert len(peft) == len(b)
    for k, v in b.items():  # model.layers.0...lora_A.default -> base_model.model.model.layers.0...lora_A.weight
        assert torch.equal(peft["base_model.model." + k.replace(".default", ".weight")], v)


def _bad_inputs(rank, world, path):
    """Each bad input raises the same error on every rank, before any collective: no hang."""
    errors = {}

    def catch(name, fn):
        try:
            fn()
            errors[name] = None
        except (ValueError, TypeError) as e:
            errors[name] = f"{type(e).__name__}: {e}"

    # rows that do not split into equal shards of whole blocks
    odd = torch.nn.Sequential(torch.nn.Linear(64, 33), torch.nn.Linear(33, 64, bias=False))
    lowbit.quantize_model(odd, "nf4", block_size=64, progress=False)  # the 33-input Linear stays dense
    catch("world_size", lambda: lowbit.distributed.fully_shard(odd))
    # a checkpoint of nf4 layers, loaded into an fp4 model / a model whose adapters have another rank
    model = _sharded()
    opt = make_opt("adamw8bit", model.parameters())
    _train(model, opt, rank, 1)
    lowbit.distributed.save_checkpoint(path, model, opt, extra={"step": 1})
    catch("format", lambda: lowbit.distributed.load_checkpoint(path, _sharded("fp4")))
    catch("adapters", lambda: lowbit.distributed.load_checkpoint(path, _sharded(r=4)))
    catch("not_a_checkpoint", lambda: lowbit.distributed.load_checkpoint(os.path.dirname(path), model))
    torch.distributed.barrier()  # every rank is still here: nothing hung
    saved = {k: v for k, v in lowbit.distributed.full_state_dict(model).items() if ".lora_" in k}
    return {"errors": errors, "saved": saved}


def _other_world(rank, world, path):
    """One process loads a checkpoint saved by two: the model reshards, the 8-bit optimizer state does not."""
    model = _sharded()
    opt = make_opt("adamw8bit", model.parameters())
    errors = {}
    try:
        lowbit.distributed.load_checkpoint(path, model, opt)
        errors["world_size"] = None
    except ValueError as e:
        errors["world_size"] = f"ValueError: {e}"
    lowbit.distributed.load_checkpoint(path, model)
    return {"errors": errors, "adapters": {k: v for k, v in lowbit.distributed.full_state_dict(model).items()
                                           if ".lora_" in k}}


def test_bad_inputs_raise_clear_errors_without_hanging(tmp_path):
    path = str(tmp_path / "ckpt")
    res2 = ok(spawn(_bad_inputs, path))
    for r in range(WORLD):
        e = res2[r]["errors"]
        print(f"rank {r}:", *(f"\n  {k}: {v}" for k, v in e.items()))
        assert e["world_size"].startswith("ValueError") and "world_size=2" in e["world_size"] \
            and "out_features=33" in e["world_size"] and "'0'" in e["world_size"]
        assert e["format"].startswith("ValueError") and "'fmt': 'nf4'" in e["format"] and "'fmt': 'fp4'" in e["format"]
        assert e["adapters"].startswith("ValueError") and "{'default': 8}" in e["adapters"] \
            and "{'default': 4}" in e["adapters"]
        assert e["not_a_checkpoint"].startswith("ValueError") and "lowbit_distributed.json" in e["not_a_checkpoint"]
    res = ok(spawn(_other_world, path, world=1))[0]
    print("1 rank:", res["errors"]["world_size"])
    assert "world_size=2" in res["errors"]["world_size"] and "world_size=1" in res["errors"]["world_size"]
    saved = res2[0]["saved"]  # the model alone loads on 1 rank (DCP reshards it): the adapters saved by 2
    assert saved.keys() == res["adapters"].keys() and all(torch.equal(saved[k], res["adapters"][k]) for k in saved)
