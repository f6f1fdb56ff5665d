"""The fuzz campaign (issue 14): hypothesis mutates valid objects — views, expands, transposes, wrong
dtypes, truncations, metadata edits, NaN scalars — for linear / lowrank / hadamard (every tensor
argument, weight components through QuantizedTensor), from_bnb, load_tensors, the optimizers'
load_state_dict and use_backend. The cases live in tests/fuzz_cases.py (oracles: a dense float64
product on the dequantized weight, the reference backend, the unmutated object, a twin optimizer)
and run in one worker process (tests/fuzz_worker.py) for many examples: a crash fails the example
that caused it (hypothesis then shrinks it, restarting the worker) instead of the session.

Budget: ``LOWBIT_FUZZ_EXAMPLES`` examples in all (default 2100: CI, ~2 min on 2 cores), split
over the targets by ``SHARES``; the last test prints ``fuzz: N examples ...`` and fails if any target
ran fewer than its share (nothing silently skipped). Examples are derandomized (a fixed seed per
test: a CI failure reproduces); ``LOWBIT_FUZZ_RANDOM=1`` draws new ones. The long run (docs/testing
notes in README "Security"):

    LOWBIT_FUZZ_EXAMPLES=50000 LOWBIT_FUZZ_RANDOM=1 PYTHONPATH=python python -m pytest -q tests/test_fuzz.py

(measured on the 2-core dev machine, lightly loaded: 2100 examples in 18 s; 50000 random ones in 260 s,
all passing, after it had found three oracle gaps that the fixed-seed run had not reached.)
"""

from __future__ import annotations

import math
import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit import _native

from conftest import require_backend
from fuzz_cases import MUTATIONS

TOTAL = int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", "2100"))
SHARES = {"linear": 0.30, "lowrank": 0.12, "hadamard": 0.10, "from_bnb": 0.15, "load_tensors": 0.13,
          "optim_load": 0.10, "use_backend": 0.10}
BUDGET = {name: max(1, round(TOTAL * share)) for name, share in SHARES.items()}
COUNTS = {name: 0 for name in SHARES}
STARTED = time.monotonic()
BACKENDS = ["reference", "cpu", "sim"]


def _settings(name):
    return settings(max_examples=BUDGET[name], derandomize=os.environ.get("LOWBIT_FUZZ_RANDOM") != "1",
                    database=None, deadline=None, print_blob=True, suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------------------------------ the worker
class Worker:
    """One process running many cases; restarted after a crash."""

    def __init__(self):
        self.proc = None

    def _start(self):
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(lowbit.__file__)))  # the lowbit this session imported
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
        # The cases are tiny: one thread each for torch and lowbit's OpenMP (a thread pool's wake-ups
        # cost more than the work, ~10x on a loaded 2-core machine; the pools have their own tests).
        env["OMP_NUM_THREADS"] = "1"
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "fuzz_worker.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env)

    def _read(self, n, deadline):
        buf = b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.proc.stdout.fileno(), n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def run(self, name: str, kwargs: dict, timeout: float = 300.0) -> tuple[str, str]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        data = pickle.dumps((name, kwargs))
        try:
            self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
            self.proc.stdin.flush()
            deadline = time.monotonic() + timeout
            n = struct.unpack("<Q", self._read(8, deadline))[0]
            return pickle.loads(self._read(n, deadline))
        except (EOFError, BrokenPipeError, TimeoutError) as e:
            hung = isinstance(e, TimeoutError)
            self.proc.kill()
            rc = self.proc.wait()
            self.err.seek(0)
            tail = self.err.read()[-4000:].decode("utf-8", "replace")
            self.proc = None
            return ("crash", f"worker {'hung (killed after %ds)' % timeout if hung else 'died'} with exit status "
                             f"{rc}{' (signal %d)' % -rc if rc < 0 else ''}; its stderr:\n{tail}")


_worker = Worker()


def run_case(name: str, **kwargs) -> None:
    COUNTS[name] += 1
    status, text = _worker.run(name, kwargs)
    assert status == "ok", f"{name}({kwargs}) -> {status}:\n{text}"


@pytest.fixture(scope="module", autouse=True)
def _backends():
    for be in ("cpu", "sim"):
        require_backend(be)


backends = st.sampled_from([b for b in BACKENDS if _native.has(b)])
mutations = st.sampled_from(MUTATIONS)
scalars = st.one_of(st.floats(-4, 4, allow_nan=False), st.sampled_from([math.nan, math.inf, -math.inf, 1e300, 0.0]))


# ------------------------------------------------------------------------------------------ kernels
@_settings("linear")
@given(backend=backends, seed=st.integers(0, 2 ** 16), fmt=st.sampled_from(["nf4", "fp4", "int4", "int2"]),
       block=st.sampled_from([32, 64]), dq=st.booleans(), n=st.integers(1, 9), kb=st.integers(1, 3),
       m=st.sampled_from([1, 2, 3, 5, 17, 33]), dtype=st.sampled_from(["float32", "float32", "bfloat16", "float16"]),
       target=st.sampled_from(["x", "x", "bias", "codes", "scale", "zero", "scale_q", "scale_nested", "scale_offset"]),
       kind=mutations, with_bias=st.booleans(), nan=st.booleans())
def test_fuzz_linear(**case):
    run_case("linear", **case)


@_settings("lowrank")
@given(backend=backends, seed=st.integers(0, 2 ** 16), fmt=st.sampled_from(["nf4", "int4"]),
       block=st.sampled_from([32, 64]), n=st.integers(1, 9), kb=st.integers(1, 2), m=st.sampled_from([1, 2, 7, 33]), r=st.integers(1, 5),
       target=st.sampled_from(["x", "lora_A", "lora_B", "bias"]), kind=mutations, scale=scalars)
def test_fuzz_lowrank(**case):
    run_case("lowrank", **case)


@_settings("hadamard")
@given(backend=backends, seed=st.integers(0, 2 ** 16), rows=st.integers(1, 9),
       n=st.sampled_from([1, 2, 8, 12, 32, 40, 64, 96]), target=st.sampled_from(["x", "x", "out"]), kind=mutations,
       scale=scalars)
def test_fuzz_hadamard(**case):
    run_case("hadamard", **case)


# ------------------------------------------------------------------------------------------ checkpoints
_BNB_FIELDS = ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset",
               "extra"]
_META_FIELDS = ["fmt", "block_size", "double_quant", "shape", "dtype", "extra"]


@_settings("from_bnb")
@given(seed=st.integers(0, 2 ** 16), fmt=st.sampled_from(["nf4", "fp4"]), dq=st.booleans(),
       storage=st.sampled_from(["uint8", "bfloat16", "float32"]),
       key=st.sampled_from(["entry", "entry", "quant_state", "drop"]),
       kind=mutations, field=st.sampled_from(_BNB_FIELDS), value=st.integers(0, 36), backend=backends)
def test_fuzz_from_bnb(**case):
    run_case("from_bnb", **case)


@_settings("load_tensors")
@given(seed=st.integers(0, 2 ** 16), fmt=st.sampled_from(["nf4", "int4"]), dq=st.booleans(),
       how=st.sampled_from(["none", "truncate", "flip", "flip", "header_len", "meta", "meta", "component"]),
       pos=st.integers(0, 2 ** 20), byte=st.integers(0, 255), field=st.sampled_from(_META_FIELDS),
       value=st.integers(0, 36), backend=backends)
def test_fuzz_load_tensors(**case):
    run_case("load_tensors", **case)


# ------------------------------------------------------------------------------------------ optimizers
@_settings("optim_load")
@given(bits=st.sampled_from([32, 8]), paged=st.booleans(), seed=st.integers(0, 2 ** 16),
       entry=st.sampled_from(["tensor", "tensor", "tensor", "step", "lr", "eps", "weight_decay", "betas"]),
       kind=mutations, scalar=st.integers(0, 36))
def test_fuzz_optim_load(**case):
    run_case("optim_load", **case)


# ------------------------------------------------------------------------------------------ use_backend
_schedules = st.sampled_from([None, None, "forward", "reverse", "random:7", "random:18446744073709551615",
                              "random:18446744073709551616", "random:", "random:-1", "", "bogus", 7])
_threads = st.sampled_from([None, None, 0, 1, 2, 3, 256, 257, -1, 1.5, True, "2", 2 ** 40])
_blocks = st.tuples(st.sampled_from(["reference", "cpu", "sim", "sim", "sim", "bogus"]), _schedules, _threads,
                    st.sampled_from(["normal", "raise", "generator"]))


@_settings("use_backend")
@given(ops=st.lists(_blocks, min_size=1, max_size=4))
def test_fuzz_use_backend(ops):
    run_case("use_backend", ops=ops)


# ------------------------------------------------------------------------------------------ summary
def test_fuzz_budget_was_spent(request, capsys):
    """Every target ran its share (a target that ran fewer examples was skipped or cut short)."""
    total, secs = sum(COUNTS.values()), time.monotonic() - STARTED
    line = (f"fuzz: {total} examples in {secs:.0f} s (LOWBIT_FUZZ_EXAMPLES={TOTAL}): "
            + ", ".join(f"{k} {v}" for k, v in COUNTS.items()))
    with capsys.disabled():  # the summary line shows in CI's log, -q or not
        print(f"\n{line}")
    ran = [k for k, v in COUNTS.items() if v]
    if len(ran) < len(COUNTS) and request.config.option.keyword:
        pytest.skip(f"a -k selection ran only {ran}")
    short = {k: (COUNTS[k], BUDGET[k]) for k in COUNTS if COUNTS[k] < BUDGET[k]}
    assert not short, f"targets that ran fewer examples than their budget (ran, budget): {short}"
