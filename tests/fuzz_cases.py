"""The fuzz campaign's cases (tests/test_fuzz.py): each builds a valid object from a seed, mutates it as
a hostile checkpoint or a careless caller would, runs lowbit on it and checks the outcome against an
oracle. Pure functions of plain data (ints, floats, strings), so they run in a worker process
(:mod:`fuzz_worker`): a case that crashed the process is a failed example, not a dead test session.

Every case returns None (the oracle held) or raises AssertionError. The rule for every target:
bad input is a ValueError/TypeError; accepted input computes what the oracle computes — a dense
float64 product on the dequantized weight, the reference backend, or the unmutated object.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import tempfile

import torch

import lowbit
from lowbit import _native
from lowbit.formats import QuantizedTensor

from conftest import assert_close, cpu_route_bound

REFUSED = (ValueError, TypeError)

# -------------------------------------------------------------------------------- mutations of a tensor
# A mutation either keeps the tensor's values and meaning (a view of the same numbers: the kernels must
# read it by its strides or copy it) or breaks it (dtype, length, shape): then lowbit must refuse it.
SAME = ("none", "transposed", "strided", "expand_row", "offset", "noncontig_clone")
BROKEN = ("float64", "int32", "bool", "complex", "truncate", "extend", "add_dim", "empty", "shrunk_storage")
MUTATIONS = SAME + BROKEN


def same_values_view(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A tensor laid out differently from ``t`` (kind in SAME); equal to ``t`` elementwise except for
    "expand_row", whose rows all equal the first (a stride-0 view: compare against its own values)."""
    if kind == "none" or t.dim() == 0:
        return t
    if kind == "transposed":  # a transposed copy transposed back: strides reversed
        return t.reshape(t.shape[0], -1).T.contiguous().T.reshape(t.shape)
    if kind == "strided":  # every other element of a buffer twice as wide
        big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "expand_row":
        return t[:1].expand(t.shape) if t.shape[0] >= 1 else t
    if kind == "offset":  # a view at a nonzero storage offset
        big = torch.zeros((t.numel() + 3,), dtype=t.dtype)
        big[3:] = t.reshape(-1)
        return big[3:].view(t.shape)
    if kind == "noncontig_clone":
        return t.clone().unsqueeze(-1).expand(*t.shape, 2)[..., 0]
    raise AssertionError(kind)


def broken(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` made wrong (kind in BROKEN)."""
    if kind == "float64":
        return t.double() if t.dtype != torch.float64 else t.float()
    if kind == "int32":
        return t.to(torch.int32) if t.dtype != torch.int32 else t.float()
    if kind == "bool":
        return t != 0
    if kind == "complex":
        return t.to(torch.complex64)
    if kind == "truncate":
        return t.reshape(-1)[:-1] if t.numel() > 1 else t.reshape(-1)[:0]
    if kind == "extend":
        return torch.cat([t.reshape(-1), t.reshape(-1)[:1]])
    if kind == "add_dim":
        return t.unsqueeze(0).expand(2, *t.shape)
    if kind == "empty":
        return t.reshape(-1)[:0]
    if kind == "shrunk_storage":  # a view whose storage was shrunk afterwards (native code would read past it)
        c = t.clone()
        c.untyped_storage().resize_(max(c.untyped_storage().nbytes() // 2, 0))
        return c
    raise AssertionError(kind)


def mutate(t: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(mutated tensor, the values it stands for when valid, whether it is valid)."""
    if kind in SAME:
        v = same_values_view(t, kind)
        return v, v.contiguous(), True
    return broken(t, kind), t, False


def expect_refused(fn, what: str):
    try:
        fn()
    except REFUSED:
        return
    raise AssertionError(f"{what}: accepted (expected ValueError/TypeError)")


# -------------------------------------------------------------------------------- oracles
def dense_ref(x: torch.Tensor, qt: QuantizedTensor, bias=None) -> torch.Tensor:
    with lowbit.use_backend("reference"):
        w = qt.dequantize(torch.float32).double()
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def check_product(y, x, qt, expected, what):
    w = qt.dequantize(torch.float32) if isinstance(qt, QuantizedTensor) else qt
    x2 = x.reshape(-1, x.shape[-1]).float()
    scale = x2.double().abs() @ w.double().abs().T
    exp = expected.reshape(-1, expected.shape[-1])
    extra = cpu_route_bound(x2, w)
    if x.dtype != torch.float32:
        extra = extra + scale * 2.0 ** -7  # the activation rounded to bf16/fp16 on the kernel's way in
    assert_close(y.reshape(exp.shape).float(), exp, dtype=x.dtype, k=x.shape[-1], scale=scale, extra=extra, name=what)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _weight(seed, n, k, fmt, block, dq):
    w = torch.randn(n, k, generator=_g(seed))
    return lowbit.quantize(w, fmt, block, dq)


# -------------------------------------------------------------------------------- targets
def case_linear(backend: str, seed: int, fmt: str, block: int, dq: bool, n: int, kb: int, m: int, dtype: str,
                target: str, kind: str, with_bias: bool, nan: bool) -> None:
    """lowbit.linear with one tensor argument (x, bias, or a weight component) mutated."""
    k = kb * block
    dt = getattr(torch, dtype)
    with lowbit.use_backend(backend, **_sim_kw(backend)):
        qt = _weight(seed, n, k, fmt, block, dq)
        x = torch.randn(m, k, generator=_g(seed + 1)).to(dt)
        bias = torch.randn(n, generator=_g(seed + 2)) if with_bias else None
        if nan and target == "x":
            x[0, 0] = float("nan")
        if target == "x":
            xm, xv, ok = mutate(x, kind)
            run = lambda: lowbit.linear(xm, qt, bias)  # noqa: E731
            if kind == "add_dim" or (kind == "float64" and backend == "reference"):
                ok, xv = True, xm  # a leading (batch) dimension is a valid x; float64 runs on the reference only
            if not ok:
                return expect_refused(run, f"linear x {kind}")
            y = run().reshape(-1, n)
            x2 = xv.reshape(-1, k)
            exp = dense_ref(x2 if x2.dtype == torch.float64 else x2.float(), qt, bias)
            # NaN propagates to the rows of y whose x row holds it, and only to those
            rows = torch.isnan(x2.double()).any(-1)
            assert torch.isnan(y[rows]).all() and not torch.isnan(y[~rows]).any(), \
                "a NaN in x must give NaN in its row only"
            if (~rows).any():
                check_product(y[~rows], x2[~rows], qt, exp[~rows], f"linear x {kind}")
            return
        if target == "bias":
            if bias is None:
                bias = torch.randn(n, generator=_g(seed + 2))
            bm, bv, ok = mutate(bias, kind)
            run = lambda: lowbit.linear(x, qt, bm)  # noqa: E731
            if not ok:
                if kind == "float64":  # a float64 bias is accepted (cast to x's dtype) by design
                    y = run()
                    return check_product(y, x, qt, dense_ref(x.float(), qt, bias.to(dt).float()), "linear bias f64")
                return expect_refused(run, f"linear bias {kind}")
            y = run()
            return check_product(y, x, qt, dense_ref(x.float(), qt, bv.to(dt).float()), f"linear bias {kind}")
        # a weight component
        comps = qt.components()
        if target not in comps:
            return
        cm, cv, ok = mutate(comps[target], kind)
        build = lambda: QuantizedTensor(qt.spec, qt.shape, qt.dtype, **{**comps, target: cm})  # noqa: E731
        if not ok:
            return expect_refused(lambda: lowbit.linear(x, build(), bias), f"linear weight.{target} {kind}")
        qm = build()
        want = QuantizedTensor(qt.spec, qt.shape, qt.dtype, **{**comps, target: cv})
        y = lowbit.linear(x, qm, bias)
        check_product(y, x, want, dense_ref(x.float(), want, bias), f"linear weight.{target} {kind}")


def case_lowrank(backend: str, seed: int, fmt: str, block: int, n: int, kb: int, m: int, r: int, target: str,
                 kind: str, scale: float) -> None:
    """lowbit.functional.lora_linear with x, lora_A, lora_B or bias mutated; scale may be NaN/inf."""
    k = kb * block
    with lowbit.use_backend(backend, **_sim_kw(backend)):
        qt = _weight(seed, n, k, fmt, block, False)
        x = torch.randn(m, k, generator=_g(seed + 1))
        a = torch.randn(r, k, generator=_g(seed + 2)) * 0.1
        b = torch.randn(n, r, generator=_g(seed + 3)) * 0.1
        bias = torch.randn(n, generator=_g(seed + 4))
        args = {"x": x, "lora_A": a, "lora_B": b, "bias": bias}
        tm, tv, ok = mutate(args[target], kind)
        good_scale = math.isfinite(scale) and abs(scale) < 3e38
        call = dict(args, **{target: tm})
        def run():
            return lowbit.functional.lora_linear(call["x"], qt, call["lora_A"], call["lora_B"], scale, call["bias"])
        if kind == "float64" and (target != "x" or backend == "reference"):
            ok, tv = True, tm  # float64 A / B / bias are cast to x's dtype; a float64 x runs on the reference only
        if kind == "add_dim" and target == "x":
            ok, tv = True, tm  # a leading (batch) dimension is a valid x (..., K)
        if not ok:
            return expect_refused(run, f"lowrank {target} {kind}")
        if not good_scale:
            return expect_refused(run, f"lowrank scale={scale}")
        y = run()
        vals = dict(args, **{target: tv if tv.dtype == torch.float64 and target == "x" else tv.float()})
        xa = vals["x"].double() @ vals["lora_A"].double().T
        exp = dense_ref(vals["x"], qt, vals["bias"]) + scale * xa @ vals["lora_B"].double().T
        check_product(y, vals["x"], qt, exp, f"lowrank {target} {kind}")


def _hadamard_size(x: torch.Tensor) -> bool:
    from lowbit.reference import hadamard_split
    if x.dim() == 0:
        return False
    try:
        hadamard_split(x.shape[-1])
    except ValueError:
        return False
    return True


def case_hadamard(backend: str, seed: int, rows: int, n: int, target: str, kind: str, scale: float) -> None:
    """lowbit.hadamard with x or out mutated; scale may be NaN/inf."""
    from lowbit.reference import hadamard_matrix

    with lowbit.use_backend(backend, **_sim_kw(backend)):
        x = torch.randn(rows, n, generator=_g(seed))
        good_scale = math.isfinite(scale) and abs(scale) < 3e38
        if target == "x":
            xm, xv, ok = mutate(x, kind)
            run = lambda: lowbit.hadamard(xm, scale)  # noqa: E731
            if kind in ("add_dim", "extend", "truncate", "empty") and good_scale and _hadamard_size(xm):
                xv, ok = xm.contiguous(), True  # another leading shape or a supported length: a valid x
            if not ok and kind != "float64":
                return expect_refused(run, f"hadamard x {kind}")
            if not ok or not good_scale:  # float64 runs on the reference backend only
                if backend == "reference" and ok is False and good_scale:
                    run()
                    return
                return expect_refused(run, f"hadamard x {kind} scale={scale}")
            y = run()
        else:  # out=
            out = torch.empty(rows, n)
            om, _, ok = mutate(out, kind)
            run = lambda: lowbit.hadamard(x, scale, out=om)  # noqa: E731
            contiguous_view = ok and om.is_contiguous()
            if not contiguous_view or not good_scale:
                return expect_refused(run, f"hadamard out {kind} scale={scale}")
            y = run()
            assert y.data_ptr() == om.data_ptr()
            xv = x
        h = hadamard_matrix(xv.shape[-1]).double()
        exp = xv.double() @ h * scale
        bound = xv.double().abs().sum(-1, keepdim=True) * abs(scale)
        assert_close(y.double(), exp, dtype=torch.float32, k=xv.shape[-1], scale=bound, name=f"hadamard {target} {kind}")


# -------------------------------------------------------------------------------- checkpoints
def _json_value(choice: int, depth: int = 0):
    """A JSON value of many kinds, chosen by an int (the strategies draw the int)."""
    vals = [0, -1, 1, 64, 63, 64.0, 64.5, 2 ** 31, 2 ** 63, 10 ** 30, -(10 ** 30), float("nan"), float("inf"),
            "64", "", "nf4", "fp4", "float32", True, False, None, [], {}, [8, 64], [64, 8], [8.0, 64], [-8, 64],
            [8, 64, 1], {"a": 1}, 1e-45, 3.5e38, "x" * 1000]
    if choice >= len(vals):
        nest = choice - len(vals) + 1
        return json.loads("[" * nest * 50 + "]" * nest * 50)
    return vals[choice]


def case_from_bnb(seed: int, fmt: str, dq: bool, storage: str, key: str, kind: str, field: str, value: int,
                  backend: str) -> None:
    """from_bnb on a valid bitsandbytes state dict with one entry mutated (a view, a dtype, a length)
    or one quant-state field replaced. Oracle: refused, or loads as the original weight bit for bit
    (value-preserving mutations), or loads self-consistently (linear == dense product)."""
    qt = _weight(seed, 8, 256, fmt, 64, dq)
    sd = qt.to_bnb("m.")
    if storage != "uint8":  # bitsandbytes' quant_storage: the packed bytes as another dtype
        sd["m.weight"] = sd["m.weight"].reshape(-1).view(getattr(torch, storage)).reshape(-1, 1)
    qs_key = next(k for k in sd if ".quant_state." in k)
    keys = sorted(k for k in sd if k != qs_key)
    changed_values = False
    if key == "quant_state":
        state = json.loads(bytes(sd[qs_key].tolist()))
        state[field] = _json_value(value)
        raw = json.dumps(state, allow_nan=True).encode()
        sd[qs_key] = torch.tensor(list(raw), dtype=torch.uint8)
        changed_values = True
    elif key == "drop":
        del sd[keys[value % len(keys)]]
        changed_values = True
    else:
        name = keys[value % len(keys)]
        t, tv, ok = mutate(sd[name], kind)
        if kind == "expand_row" and t.dim() >= 1:
            changed_values = True
        sd[name] = t
        changed_values = changed_values or not ok
    try:
        got = lowbit.from_bnb(sd, "m.")
    except REFUSED:
        return
    if not changed_values:
        assert got.equal(qt), f"from_bnb {key} {kind}: loaded other numbers"
    _self_consistent(got, backend, f"from_bnb {key} {kind} {field}")


def _self_consistent(qt: QuantizedTensor, backend: str, what: str) -> None:
    """A weight that loaded must compute what its dequantized numbers give, on the kernels too."""
    n, k = qt.shape
    x = torch.randn(3, k, generator=_g(5))
    with lowbit.use_backend("reference"):
        w = qt.dequantize(torch.float32)
    if not torch.isfinite(w).all():
        return  # a checkpoint that says NaN/inf loads as NaN/inf: no kernel claim to check
    if qt.block_size not in (32, 64, 128, 256):
        return
    with lowbit.use_backend(backend, **_sim_kw(backend)):
        y = lowbit.linear(x, qt)
    check_product(y, x, w, x.double() @ w.double().T, what)


def case_load_tensors(seed: int, fmt: str, dq: bool, how: str, pos: int, byte: int, field: str, value: int,
                      backend: str) -> None:
    """load_tensors on a save_tensors file with its bytes truncated / flipped, its lowbit metadata
    edited, or a tensor entry replaced. Oracle as for from_bnb."""
    from safetensors.torch import save_file as st_save

    qt = _weight(seed, 8, 256, fmt, 64, dq)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "w.safetensors")
        lowbit.save_tensors({"w": qt, "b": torch.arange(4.0)}, path)
        data = bytearray(open(path, "rb").read())
        changed = True
        if how == "truncate":
            data = data[: pos % (len(data) + 1)]
        elif how == "flip":
            i = pos % len(data)
            data[i] ^= (byte % 255) + 1
        elif how == "header_len":
            data[:8] = struct.pack("<Q", [0, 1, len(data), 2 ** 63, 2 ** 64 - 1, pos][byte % 6])
        elif how in ("meta", "component"):
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            info = json.loads(meta["lowbit"])
            if how == "meta":
                info["quantized"]["w"][field] = _json_value(value)
                meta["lowbit"] = json.dumps(info)
            else:
                names = sorted(k for k in tensors if k.startswith("w."))
                name = names[value % len(names)]
                kind = MUTATIONS[pos % len(MUTATIONS)]
                if kind == "shrunk_storage":  # a file holds whole buffers: its analogue is a short one
                    kind = "truncate"
                t, _, ok = mutate(tensors[name], kind)
                tensors[name] = t.contiguous()  # safetensors stores dense tensors only
                changed = not ok or kind == "expand_row"  # an expand repeats the first row: other numbers
            try:
                st_save(tensors, path, metadata=meta)
            except (ValueError, TypeError):  # a dtype safetensors cannot store: nothing to load
                return
            data = bytearray(open(path, "rb").read())
        else:
            changed = False
        open(path, "wb").write(bytes(data))
        try:
            got = lowbit.load_tensors(path)
        except REFUSED:
            return
    assert isinstance(got, dict)
    if not changed:
        assert got["w"].equal(qt) and torch.equal(got["b"], torch.arange(4.0))
    for v in got.values():
        if isinstance(v, QuantizedTensor):
            _self_consistent(v, backend, f"load_tensors {how}")


# -------------------------------------------------------------------------------- optimizers
def case_optim_load(bits: int, paged: bool, seed: int, entry: str, kind: str, scalar: int) -> None:
    """AdamW.load_state_dict of a mutated state dict. Oracle: refused with the optimizer unchanged (its
    next step equals an untouched twin's), or accepted and stepping like a twin loaded with the same
    values as dense tensors."""
    from lowbit.optim import AdamW

    def make():
        p = torch.nn.Parameter(torch.randn(4100, generator=_g(seed)))
        opt = AdamW([p], lr=1e-2, optim_bits=bits, min_8bit_size=0, paged=paged)
        p.grad = torch.randn(4100, generator=_g(seed + 1))
        opt.step()
        return p, opt

    p, opt = make()
    twin_p, twin = make()
    sd = copy.deepcopy(opt.state_dict())
    st = sd["state"][0]
    value_kept = True
    if entry == "step":
        st["step"] = _json_value(scalar)
        value_kept = False
    elif entry in ("lr", "eps", "weight_decay", "betas"):
        sd["param_groups"][0][entry] = _json_value(scalar) if entry != "betas" else [_json_value(scalar), 0.999]
        value_kept = False
    else:
        names = sorted(k for k, v in st.items() if isinstance(v, torch.Tensor))
        name = names[scalar % len(names)]
        t, tv, ok = mutate(st[name], kind)
        st[name] = t
        value_kept = ok
        if ok:
            twin_sd = copy.deepcopy(sd)
            twin_sd["state"][0][name] = tv
    try:
        opt.load_state_dict(sd)
        loaded = True
    except REFUSED:
        loaded = False
    g = torch.randn(4100, generator=_g(seed + 2))
    if loaded and value_kept:
        twin.load_state_dict(twin_sd)
    elif loaded:  # a changed hyperparameter / step was accepted: it must be a valid one
        return _valid_after_load(opt, p, g, bits, paged, seed, make)
    p.grad, twin_p.grad = g.clone(), g.clone()
    opt.step()
    twin.step()
    assert torch.equal(p, twin_p), f"optim {entry} {kind}: stepped differently from its twin"


def _valid_after_load(opt, p, g, bits, paged, seed, make):
    """Accepted hyperparameters are ones the constructor accepts too, and step as they would there."""
    from lowbit.optim import AdamW

    grp = opt.param_groups[0]
    for name in ("lr", "eps", "weight_decay"):
        v = grp[name]
        assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0, (name, v)
    assert len(grp["betas"]) == 2 and all(0 <= b < 1 for b in grp["betas"]), grp["betas"]
    twin_p, twin = make()
    step = opt.state[p]["step"]
    twin.param_groups[0].update({k: grp[k] for k in ("lr", "eps", "weight_decay", "betas")})
    twin.state[twin_p]["step"] = step
    AdamW([torch.nn.Parameter(torch.zeros(1))], lr=grp["lr"], betas=grp["betas"], eps=grp["eps"],
          weight_decay=grp["weight_decay"])  # the constructor takes them as well
    p.grad, twin_p.grad = g.clone(), g.clone()
    opt.step()
    twin.step()
    assert torch.equal(p, twin_p) or (torch.isnan(p) == torch.isnan(twin_p)).all() and torch.equal(
        p.nan_to_num(), twin_p.nan_to_num()), "accepted hyperparameters stepped differently from a twin given them"


# -------------------------------------------------------------------------------- use_backend
def case_use_backend(ops: list) -> None:
    """A sequence of nested use_backend blocks with valid and invalid settings, exceptions thrown
    inside and generators abandoned inside. Oracle: bad settings are ValueError/TypeError, results
    inside equal the reference, and after every block the backend, the sim settings and the
    process-wide simulator configuration are what they were."""
    sim = _native.module("sim") if _native.has("sim") else None
    process_wide = sim.get_config() if sim else None
    w = torch.randn(8, 64, generator=_g(0))
    with lowbit.use_backend("reference"):
        want = lowbit.quantize(w, "nf4", 32)

    def run(i):
        if i >= len(ops):
            got = lowbit.quantize(w, "nf4", 32)
            assert got.equal(want), "inside use_backend: another result than the reference"
            return
        name, schedule, threads, exit_how = ops[i]
        before = (_native._backend.get(), _native._sim_config.get())
        valid_sched = schedule is None or (isinstance(schedule, str) and (
            schedule in ("forward", "reverse") or (schedule.startswith("random:") and schedule[7:].isdigit()
                                                   and int(schedule[7:]) < 2 ** 64 and len(schedule) <= 27)))
        valid_threads = threads is None or (type(threads) is int and 0 <= threads <= 256)
        valid = (name in ("reference", "cpu") and schedule is None and threads is None) or (
            name == "sim" and valid_sched and valid_threads)
        if name in ("cpu", "sim") and not _native.has(name):
            return
        try:
            if exit_how == "generator":
                def gen():
                    with lowbit.use_backend(name, schedule=schedule, threads=threads):
                        yield
                g = gen()
                next(g)
                run(i + 1)
                g.close()
            else:
                with lowbit.use_backend(name, schedule=schedule, threads=threads):
                    run(i + 1)
                    if exit_how == "raise":
                        raise KeyError("inside")
        except KeyError:
            pass
        except REFUSED as e:
            assert not valid, f"use_backend({name!r}, schedule={schedule!r}, threads={threads!r}) refused: {e}"
        else:
            assert valid, f"use_backend({name!r}, schedule={schedule!r}, threads={threads!r}) accepted"
        assert (_native._backend.get(), _native._sim_config.get()) == before, "use_backend left its settings behind"
        if sim:
            assert sim.get_config() == process_wide, "use_backend changed the process-wide simulator configuration"

    run(0)


def _sim_kw(backend: str) -> dict:
    return {"schedule": "random:1", "threads": 1} if backend == "sim" else {}


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}

__all__ = ["CASES", "MUTATIONS", "SAME", "BROKEN"]
