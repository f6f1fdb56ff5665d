"""Known-answer tests of the simt simulator (lowbit._sim) and of the CUDA quant kernels run on it.

Every expected value here is computed independently of the simulator: shuffle/vote semantics from
the CUDA programming guide's description, tensor-core fragments from the PTX ISA layout tables
and a float64 numpy matmul, conversions from torch, quant outputs from the CPU kernels (lowbit._C).
"""

from __future__ import annotations

import importlib
import re

import numpy as np
import pytest
import torch

from lowbit import reference as ref

try:
    _sim = importlib.import_module("lowbit._sim")
except ImportError as e:  # pragma: no cover - depends on the build
    pytest.skip(f"lowbit._sim is not built ({e}); build it with cmake --build <dir> --target _sim",
                allow_module_level=True)

SCHEDULES = ["forward", "reverse", "random:1", "random:2"]


@pytest.fixture(autouse=True)
def _default_config():
    _sim.configure("forward", 2)
    yield
    _sim.configure("forward", 0)


def run(name, arrays, ints=()):
    _sim.simt_test(name, [a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr() for a in arrays], list(ints))


# ---------------------------------------------------------------------------- shuffles
def _shfl_expected(mode: str, width: int, lane: int, a: int) -> int:
    """Source lane per the CUDA C++ programming guide, "Warp Shuffle Functions"."""
    seg = (lane // width) * width
    if mode == "idx":
        return seg + (a % width)
    if mode == "up":
        return lane - a if (lane % width) - a >= 0 else lane
    if mode == "down":
        return lane + a if (lane % width) + a < width else lane
    j = lane ^ a  # xor: may read an earlier segment, never a later one
    return j if j < seg + width else lane


@pytest.mark.parametrize("wide", [0, 1], ids=["b32", "b64"])
@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("mode", ["idx", "up", "down", "xor"])
def test_shfl_width_and_clamp(mode, width, wide):
    rng = np.random.default_rng(width * 7 + wide)
    n = 64  # two warps: values must never cross a warp
    if mode == "idx":
        arg = rng.integers(-40, 40, n).astype(np.int32)  # outside [0, width) too: taken modulo width
    else:
        arg = rng.integers(0, min(width + 2, 32), n).astype(np.int32)  # per-lane offsets, some past the segment
    out = np.zeros(n, np.int64)
    run("shfl", [arg, out], [["idx", "up", "down", "xor"].index(mode), width, wide, n])
    for t in range(n):
        warp, lane = divmod(t, 32)
        src = _shfl_expected(mode, width, lane, int(arg[t]))
        v = 1000 * warp + src
        want = (v << 32) | 0x5A5A5A5A if wide else v
        assert out[t] == want, f"{mode} width={width} lane={t} arg={arg[t]}: got {out[t]}, want lane {src}"


def test_shfl_bad_width_is_an_error():
    arg = np.zeros(32, np.int32)
    out = np.zeros(32, np.int64)
    with pytest.raises(RuntimeError, match=r"width 3 is not a power of 2"):
        run("shfl", [arg, out], [0, 3, 0, 32])


# ---------------------------------------------------------------------------- votes and reductions
def test_ballot_any_all_reduce_and_block_votes():
    rng = np.random.default_rng(3)
    n = 96
    pred = (rng.random(n) < 0.5).astype(np.int32)
    pred[32:64] = 1  # warp 1: all true
    pred[64:80] = 0  # warp 2, low half: all false
    out = np.zeros(9 * n, np.uint32)
    run("vote", [pred, out], [n])
    out = out.reshape(n, 9)
    for t in range(n):
        w0 = (t // 32) * 32
        h0 = w0 + (16 if t % 32 >= 16 else 0)
        warp_bits = sum(int(pred[w0 + i] != 0) << i for i in range(32))
        half_bits = sum(int(pred[w0 + i] != 0) << i for i in range(32) if (w0 + i) // 16 == h0 // 16)
        half = pred[h0:h0 + 16]
        expected = [
            warp_bits, int(warp_bits != 0), int(warp_bits == 0xFFFFFFFF),
            half_bits, int(half.any()), int(half.all()),
            sum(range(w0, w0 + 32)), sum(range(h0, h0 + 16)),
            int(pred.astype(bool).sum()) | (int(pred.all()) << 16) | (int(pred.any()) << 17),
        ]
        assert list(out[t]) == expected, f"thread {t}"


# ---------------------------------------------------------------------------- atomics
def test_atomics_under_two_os_threads():
    _sim.configure("random:5", 2)
    blocks, threads = 64, 128
    n = blocks * threads
    i = np.array([0, -1, 0, 0], np.int32)
    u = np.array([0, 0, 0], np.uint32)
    ull = np.zeros(2, np.uint64)
    f = np.zeros(1, np.float32)
    d = np.zeros(1, np.float64)
    run("atomics", [i, u, ull, f, d], [blocks, threads])
    assert list(i) == [n, n - 1, -(n - 1), -2 * n]
    assert list(u) == [0xFFFFFFFF, 3 * n, 77]
    assert int(ull[0]) == n * (n - 1) // 2 and int(ull[1]) == (n - 1) << 33
    assert f[0] == n and d[0] == 0.5 * n


# ---------------------------------------------------------------------------- tensor cores
def _mma_inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(16, 8, generator=g).to(dtype)
    c = torch.randn(16, 8, generator=g)
    return a, b, c


def _mma_check(d, a, b, c):
    want = a.double().numpy() @ b.double().numpy() + c.double().numpy()
    bound = np.abs(a.double().numpy()) @ np.abs(b.double().numpy()) + np.abs(c.double().numpy())
    # fp32 accumulation of 16 exact products: a few fp32 ulps of the magnitude (hardware order and
    # truncation are unspecified; the simulator rounds once).
    np.testing.assert_array_less(np.abs(d.double().numpy() - want), 16 * 2.0**-24 * bound + 1e-30)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_mma_m16n8k16_fragments(dtype):
    a, b, c = _mma_inputs(dtype, 11)
    d = torch.zeros(16, 8)
    run("mma_f16" if dtype == torch.float16 else "mma_bf16", [a, b, c, d])
    _mma_check(d, a, b, c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_mma_fed_by_ldmatrix(dtype):
    a, b, _ = _mma_inputs(dtype, 12)
    d = torch.zeros(16, 8)
    run("mma_ldmatrix_f16" if dtype == torch.float16 else "mma_ldmatrix_bf16", [a, b, d])
    _mma_check(d, a, b, torch.zeros(16, 8))


def _mma_s8_inputs(seed, extreme=False):
    g = np.random.default_rng(seed)
    a = g.integers(-128, 128, (16, 32), dtype=np.int64).astype(np.int8)
    b = g.integers(-128, 128, (32, 8), dtype=np.int64).astype(np.int8)
    c = g.integers(-2**20, 2**20, (16, 8), dtype=np.int64).astype(np.int32)
    if extreme:  # the largest products: every sum is ±32·2^14 = 2^19 plus c, still exact in int32
        a[:] = -128
        b[:, ::2] = -128
        b[:, 1::2] = 127
    return a, b, c


@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme"])
def test_mma_m16n8k32_s8_fragments(extreme):
    # PTX ISA "Matrix Fragments for mma.m16n8k32" (.s8): the kernel gathers fragments from row-major
    # A (16x32), B (32x8) and C with that layout; the answer is an exact int64 numpy product.
    a, b, c = _mma_s8_inputs(21, extreme)
    d = np.zeros((16, 8), np.int32)
    run("mma_s8", [a, b, c, d])
    assert np.array_equal(d.astype(np.int64), a.astype(np.int64) @ b.astype(np.int64) + c)


def test_mma_s8_fed_by_ldmatrix():
    # A row-major and B K-major (N x K) bytes in shared memory, ldmatrix.x4 / .x2 (b16, not
    # transposed) straight into the s8 fragments: the svdquant GEMM's loads.
    a, b, _ = _mma_s8_inputs(22)
    d = np.zeros((16, 8), np.int32)
    run("mma_s8_ldmatrix", [a, np.ascontiguousarray(b.T), d])
    assert np.array_equal(d.astype(np.int64), a.astype(np.int64) @ b.astype(np.int64))


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("num", [1, 2, 4])
def test_ldmatrix_layout(num, trans):
    src = np.arange(num * 64, dtype=np.uint16) + 1000  # matrix i, row r, col c -> i*64 + r*8 + c + 1000
    out = np.zeros(32 * num, np.uint32)
    run("ldmatrix", [src, out], [num, int(trans)])
    mats = src.reshape(num, 8, 8)
    for lane in range(32):
        for i in range(num):
            r, c = lane // 4, 2 * (lane % 4)  # PTX ISA ldmatrix: row lane/4, columns 2*(lane%4) +0/+1
            lo, hi = (mats[i, c, r], mats[i, c + 1, r]) if trans else (mats[i, r, c], mats[i, r, c + 1])
            assert out[lane * num + i] == int(lo) | (int(hi) << 16), f"lane {lane} matrix {i}"


# ---------------------------------------------------------------------------- reported faults
def _fault(name, ints=(), n=32):
    buf = np.zeros(n, np.int32)
    with pytest.raises(RuntimeError) as e:
        run(name, [buf], ints)
    return str(e.value)


def test_divergent_barrier_names_both_lines():
    msg = _fault("divergent_barrier")
    assert re.search(r"kernel .*divergent_barrier_kernel.*block \(0,0,0\), thread \(16,0,0\): divergent __syncthreads", msg)
    lines = re.findall(r"simt\.cuh:(\d+)", msg)
    assert len(set(lines)) == 2, msg


def test_deadlock_names_warp_mask_and_lanes():
    msg = _fault("deadlock_shfl")
    assert "deadlock" in msg and "warp 0: lanes 0-15 wait in __shfl_sync(mask=0xffffffff)" in msg, msg
    assert "lanes 16-31 never arrive (16-31: exited)" in msg, msg


def test_mismatched_collectives():
    msg = _fault("mismatch")
    assert "mismatched warp collective" in msg and "__ballot_sync" in msg and "__shfl_sync" in msg, msg


def test_barrier_against_warp_collective_deadlock():
    msg = _fault("barrier_vs_warp")
    assert "lanes 5 never arrive (5: at __syncthreads" in msg, msg


@pytest.mark.parametrize("use_assert", [0, 1], ids=["trap", "assert"])
def test_trap_and_assert_raise_with_kernel_block_thread(use_assert):
    with pytest.raises(RuntimeError) as e:
        _sim.simt_test("trap", [], [3, 64, 2, 17, use_assert])
    msg = str(e.value)
    assert "trap_kernel" in msg and "block (2,0,0), thread (17,0,0)" in msg, msg
    assert ("assertion failed" if use_assert else "__trap()") in msg, msg


def test_spin_wait_without_progress_is_reported():
    flag = np.zeros(1, np.int32)
    with pytest.raises(RuntimeError, match="spin-wait"):
        run("spin_forever", [flag])


@pytest.mark.parametrize("ints, code", [
    ((1, 1025, 1, 1, 0, 0), "invalid configuration"),
    ((1, 8, 8, 32, 0, 0), "invalid configuration"),   # 2048 threads
    ((1, 1, 1, 65, 0, 0), "invalid configuration"),   # z > 64
    ((0, 32, 1, 1, 0, 0), "invalid configuration"),   # empty grid
    ((1, 32, 1, 1, 64 * 1024, 0), "invalid argument"),  # > 48 KiB without opt-in
    ((1, 32, 1, 1, 64 * 1024, 200 * 1024), "invalid argument"),  # opt-in over the arch limit
])
def test_launch_errors(ints, code):
    with pytest.raises(RuntimeError, match=code):
        _sim.simt_test("launch", [], list(ints))


def test_launch_with_smem_opt_in():
    _sim.simt_test("launch", [], [2, 32, 1, 1, 64 * 1024, 64 * 1024])


# ---------------------------------------------------------------------------- per-block shared memory
# Rules of cudaLaunchKernel / cudaFuncSetAttribute (CUDA C++ programming guide, "Shared Memory" in
# the compute capability tables, and the cudaFuncAttributeMaxDynamicSharedMemorySize reference):
# static + dynamic shared memory of a block is at most 48 KiB unless the kernel opted in, and an
# opt-in may not take static + dynamic past the device's per-block maximum (99 KiB, the smallest
# among the default archs). static_smem_kernel declares 16 KiB of static shared memory.
STATIC_SMEM = 16 * 1024


def _static_smem(threads, dyn, optin):
    out = np.zeros(threads, np.float32)
    run("static_smem", [out], [threads, dyn, optin])
    t = np.arange(threads)
    np.testing.assert_array_equal(out, (4095 - t) + 2 * (threads - 1 - t))


@pytest.mark.parametrize("dyn, optin", [
    (48 * 1024 - STATIC_SMEM, 0),            # exactly 48 KiB in all
    (64 * 1024, 64 * 1024),                  # opted in: 80 KiB in all
    (99 * 1024 - STATIC_SMEM, 99 * 1024 - STATIC_SMEM),  # exactly the opt-in maximum
])
def test_static_plus_dynamic_shared_memory_within_the_limit(dyn, optin):
    _static_smem(32, dyn, optin)


@pytest.mark.parametrize("dyn, optin", [
    (48 * 1024 - STATIC_SMEM + 4, 0),        # dynamic alone is under 48 KiB, static + dynamic is not
    (64 * 1024, 99 * 1024 - STATIC_SMEM + 4),  # the opt-in itself is over the maximum with static
    (64 * 1024 + 4, 64 * 1024),              # over the kernel's opted-in dynamic size
])
def test_static_shared_memory_counts_against_the_launch_limit(dyn, optin):
    with pytest.raises(RuntimeError, match=r"invalid argument.*static shared memory"):
        _static_smem(32, dyn, optin)


def test_static_shared_memory_figures_agree_with_ptxas():
    # The simulator reads a kernel's static shared memory from the module's symbol table; ptxas
    # (the _cuda build of the same source) reports it per kernel in its -v log: the independent
    # figure. ptxas may pad between variables (nanosleep_kernel: two ints, 16 bytes), never less.
    import pathlib
    import lowbit
    from lowbit._ptxas import parse_ptxas_log
    log = pathlib.Path(lowbit.__file__).with_name("ptxas_resource_usage.log")
    if not log.exists():
        pytest.skip("no ptxas log: build _cuda (nvcc) next to _sim")
    ptxas = {}
    for e in parse_ptxas_log(str(log)):
        ptxas.setdefault(e["kernel"], set()).add(e["smem"])
    sim = _sim.static_smem()
    with_smem = {k: max(v) for k, v in ptxas.items() if max(v) > 0}
    assert len(with_smem) >= 20 and "void lowbit::simt_tests::static_smem_kernel<0>(float*)" in with_smem
    exact = 0
    for kernel, smem in with_smem.items():
        assert kernel in sim, f"{kernel}: ptxas reports {smem} bytes of static shared memory, simt counts none"
        assert 0 <= smem - sim[kernel] < 16, f"{kernel}: ptxas {smem} bytes, simt {sim[kernel]}"
        exact += smem == sim[kernel]
    assert exact >= len(with_smem) - 2, f"only {exact} of {len(with_smem)} agree exactly"
    for kernel in sim:  # and simt counts nothing ptxas does not see
        if kernel.startswith(("void lowbit::", "lowbit::")) and "_kernel" in kernel:
            assert kernel in with_smem, f"{kernel}: simt counts {sim[kernel]} bytes, ptxas none"


# ---------------------------------------------------------------------------- fiber stacks
def _deep_stack_want(blocks, threads, n):
    g = np.arange(blocks * threads, dtype=np.int64)
    return (3 * ((7 * np.arange(n)) % n)).sum() + n * g


_OVERFLOW_SCRIPT = r"""
import faulthandler, sys
import numpy as np
faulthandler.enable()  # as under pytest: simt must still get the fault first
from lowbit import _sim
_sim.configure("forward", 2)
out = np.zeros(4 * 32, np.int32)
for attempt in range(2):  # twice: the first recovery must leave the fault handling armed
    try:
        _sim.simt_test("deep_stack", [out.ctypes.data], [4, 32, 8192])
        print("NO ERROR")
    except RuntimeError as e:
        print("RAISED", e)
x = np.arange(4 * 256, dtype=np.int32)
y = np.zeros_like(x)
_sim.simt_test("reduce", [x.ctypes.data, y.ctypes.data], [4, 256])
xb = x.reshape(4, 256).astype(np.int64)
want = np.roll(xb, -1, axis=1) * 3
want[:, 0] += xb.sum(axis=1)
print("REDUCE", "OK" if np.array_equal(y.reshape(4, 256), want) else "WRONG")
sys.stdout.flush()
"""


def test_fiber_stack_overflow_raises_instead_of_crashing():
    # A 32 KiB stack frame on 16 KiB fiber stacks: a segmentation fault that killed the process
    # before; now a RuntimeError naming the kernel and the stack size, and the simulator (both OS
    # threads) keeps working. In a subprocess so that a regression cannot take the test run down.
    import os
    import subprocess
    import sys
    env = dict(os.environ, SIMT_STACK_KB="16")
    r = subprocess.run([sys.executable, "-c", _OVERFLOW_SCRIPT], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, f"process died with {r.returncode}: {r.stdout[-2000:]} {r.stderr[-3000:]}"
    raised = [line for line in r.stdout.splitlines() if line.startswith("RAISED")]
    assert len(raised) == 2, r.stdout
    for line in raised:
        assert "deep_stack_kernel" in line and "stack overflow" in line and "16 KiB" in line, line
        assert re.search(r"block \(\d+,0,0\), thread \(\d+,0,0\)", line), line
    assert "REDUCE OK" in r.stdout, r.stdout


def test_fiber_stack_size_is_configurable():
    old = _sim.stack_kb()
    # the documented defaults (SIMT_STACK_KB unset in the test environment): ASan frames carry redzones
    assert old == (256 if getattr(_sim, "sanitized", False) else 64)
    try:
        for kb in (48, 256):  # a 32 KiB frame fits both
            _sim.set_stack_kb(kb)
            assert _sim.stack_kb() == kb
            out = np.zeros(3 * 64, np.int32)
            run("deep_stack", [out], [3, 64, 8000])
            np.testing.assert_array_equal(out, _deep_stack_want(3, 64, 8000))
        for bad in (0, 7, -1, 1 << 21):
            with pytest.raises(ValueError, match="stack_kb"):
                _sim.set_stack_kb(bad)
    finally:
        _sim.set_stack_kb(old)


# ---------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_deterministic_kernel_same_under_every_schedule(schedule):
    _sim.configure(schedule, 2)
    blocks, n = 4, 256
    x = np.random.default_rng(0).integers(-1000, 1000, blocks * n).astype(np.int32)
    out = np.zeros_like(x)
    run("reduce", [x, out], [blocks, n])
    xb = x.reshape(blocks, n).astype(np.int64)
    want = np.roll(xb, -1, axis=1) * 3
    want[:, 0] += xb.sum(axis=1)
    assert np.array_equal(out.reshape(blocks, n), want)


def test_missing_syncthreads_is_caught_by_some_schedule():
    n = 128
    want = (np.arange(n) + 1) % n + 1  # s[(t+1) % n] after every thread wrote s[t] = t+1
    wrong = []
    for schedule in SCHEDULES:
        _sim.configure(schedule, 1)
        out = np.zeros(n, np.int32)
        run("racy", [out], [1, n])
        assert np.array_equal(out, want), f"with the barrier, {schedule} must be right"
        run("racy", [out], [0, n])
        wrong.append(not np.array_equal(out, want))
    assert any(wrong), "a removed __syncthreads went unnoticed under every schedule"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_nanosleep_yields_to_the_producer(schedule):
    _sim.configure(schedule, 1)
    out = np.zeros(1, np.int32)
    run("nanosleep", [out], [64])
    assert out[0] == 4242


# ---------------------------------------------------------------------------- memory and indices
def test_dynamic_shared_memory_is_poisoned_then_usable():
    n = 64
    out = np.zeros(2 * n, np.float32)
    run("dynsmem", [out], [n, n * 4])
    assert np.isnan(out[:n]).all()
    assert np.array_equal(out[n:], np.arange(n)[::-1].astype(np.float32))


def test_indices_and_dims():
    grid, block = (2, 3, 2), (4, 2, 3)
    nb, nt = int(np.prod(grid)), int(np.prod(block))
    out = np.full(12 * nb * nt, -1, np.int32)
    run("index", [out], [*grid, *block])
    out = out.reshape(nb, nt, 12)
    for bz in range(grid[2]):
        for by in range(grid[1]):
            for bx in range(grid[0]):
                bl = bx + grid[0] * (by + grid[1] * bz)
                for tz in range(block[2]):
                    for ty in range(block[1]):
                        for tx in range(block[0]):
                            tl = tx + block[0] * (ty + block[1] * tz)
                            assert list(out[bl, tl]) == [tx, ty, tz, bx, by, bz, *block, *grid]


def test_cp_async_copies_16_bytes():
    src = np.arange(64 * 4, dtype=np.uint32)
    dst = np.zeros_like(src)
    run("cp_async", [src, dst])
    assert np.array_equal(dst.reshape(64, 4), src.reshape(64, 4)[::-1])


# ---------------------------------------------------------------------------- numerics and bits
def test_half_and_bfloat16_conversions_round_to_nearest_even():
    special = [0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 1e6, -1e6, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
               2.0**-14, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.4e38, 1e-40,
               float("inf"), float("-inf")]
    x = torch.cat([torch.tensor(special), torch.randn(4000) * 10.0 ** torch.randint(-8, 6, (4000,)).float()])
    n = x.numel()
    f16 = torch.zeros(n, dtype=torch.int16)
    bf16 = torch.zeros(n, dtype=torch.int16)
    back = torch.zeros(2 * n)
    run("convert", [x, f16, bf16, back], [n])
    assert torch.equal(f16, x.to(torch.float16).view(torch.int16))
    assert torch.equal(bf16, x.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(back[0::2], x.to(torch.float16).float())
    assert torch.equal(back[1::2], x.to(torch.bfloat16).float())


def _prmt(a: int, b: int, s: int) -> int:
    """PTX ISA prmt.b32 default mode: bytes 0-3 of a, 4-7 of b; selector nibble = index | sign bit."""
    src = [(a >> (8 * k)) & 0xFF for k in range(4)] + [(b >> (8 * k)) & 0xFF for k in range(4)]
    r = 0
    for k in range(4):
        sel = (s >> (4 * k)) & 0xF
        byte = src[sel & 7]
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        r |= byte << (8 * k)
    return r


def test_lop3_and_prmt():
    rng = np.random.default_rng(9)
    n = 300
    a, b, c = (rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32) for _ in range(3))
    out = np.zeros(6 * n, np.uint32)
    run("bits", [a, b, c, out], [n])
    out = out.reshape(n, 6)
    m = 0xFFFFFFFF
    for k in range(n):
        x, y, z = int(a[k]), int(b[k]), int(c[k])
        assert out[k, 0] == x ^ y ^ z
        assert out[k, 1] == (x & y) | (x & z) | (y & z)
        assert out[k, 2] == ((x & y) | (~x & z)) & m
        assert out[k, 3] == _prmt(x, y, 0x5140)
        assert out[k, 4] == _prmt(x, y, z & 0xFFFF)
        assert out[k, 5] == _prmt(x, y, 0x8888)


# ---------------------------------------------------------------------------- quant kernels vs _C
try:
    _C = importlib.import_module("lowbit._C")
except ImportError:  # pragma: no cover
    _C = None
need_C = pytest.mark.skipif(_C is None, reason="lowbit._C (the CPU kernels, the bit-exact comparison) is not built")

FMT = {"nf4": 0, "fp4": 1, "int4": 2, "int2": 3}  # lowbit::Fmt
DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # lowbit::DType


def _quantize(mod, w, block, fmt, offset=0, **kw):
    """Run mod.quantize on a view of w starting `offset` bytes into a fresh buffer (alignment)."""
    numel = w.numel()
    bits = 2 if fmt == "int2" else 4
    codes_buf = torch.zeros(numel * bits // 8 + 16, dtype=torch.uint8)
    codes = codes_buf[offset:offset + numel * bits // 8]
    scale = torch.zeros(numel // block)
    zero = torch.zeros(numel // block)
    mod.quantize(w.data_ptr(), DT[w.dtype], numel, block, FMT[fmt], codes.data_ptr(), scale.data_ptr(),
                 zero.data_ptr() if fmt.startswith("int") else 0, **kw)
    return codes, scale, zero


def _shifted(t, elems):
    """t copied into a buffer at an element offset (to break 16-byte alignment)."""
    buf = torch.zeros(t.numel() + elems, dtype=t.dtype)
    v = buf[elems:]
    v.copy_(t.reshape(-1))
    return v


def _weights(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3
    w.view(-1)[:: 7] = 0.0  # exact zeros (midpoint / zero-point edge cases)
    return w.to(dtype)


SHAPES = [(1, 64), (3, 96), (7, 128), (16, 256), (2, 4096)]


@need_C
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int4", "int2"])
def test_quant_bit_exact_with_cpu(fmt, dtype):
    _C.set_cpu_path("portable")  # the reference rules written out (first minimum in element order)
    try:
        for si, shape in enumerate(SHAPES):
            for block in (32, 64, 128, 256):
                if shape[1] % block:
                    continue
                w = _weights(shape, dtype, 100 * si + block)
                want = _quantize(_C, w, block, fmt)
                for shift in (0, 1):  # aligned (16-byte vector path) and misaligned (scalar path)
                    got = _quantize(_sim, _shifted(w, shift), block, fmt, offset=shift)
                    for g, e, what in zip(got, want, ("codes", "scale", "zero")):
                        assert torch.equal(g.view(torch.int32) if g.dtype == torch.float32 else g,
                                           e.view(torch.int32) if e.dtype == torch.float32 else e), \
                            f"{fmt} {dtype} {shape} block={block} shift={shift}: {what} differ"
                codes, scale, zero = want
                for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
                    outs = []
                    for mod, shift in ((_C, 0), (_sim, 0), (_sim, 1)):
                        out = _shifted(torch.zeros(w.numel(), dtype=out_dtype), shift)
                        c = _shifted(codes, shift)
                        mod.dequantize(c.data_ptr(), scale.data_ptr(), zero.data_ptr() if fmt.startswith("int") else 0,
                                       0, 0, 0.0, out.data_ptr(), DT[out_dtype], w.numel(), block, FMT[fmt])
                        outs.append(out.view(torch.int16 if out_dtype != torch.float32 else torch.int32).clone())
                    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0]), \
                        f"dequantize {fmt} {dtype}->{out_dtype} {shape} block={block}"
    finally:
        _C.set_cpu_path("auto")


@need_C
def test_int_zero_point_keeps_the_sign_of_the_first_zero_minimum():
    _C.set_cpu_path("portable")
    try:
        w = torch.zeros(2, 64)
        w[0, 5] = -0.0
        w[0, 9:] = torch.rand(55)  # block 0: min is a zero, first zero at index 0 is +0
        w[1, 0] = -0.0             # block 1: first zero is -0
        w[1, 1:] = torch.rand(63)
        for fmt in ("int4", "int2"):
            want = _quantize(_C, w, 64, fmt)
            got = _quantize(_sim, w, 64, fmt)
            for g, e in zip(got, want):
                assert torch.equal(g.view(torch.uint8), e.view(torch.uint8))
    finally:
        _C.set_cpu_path("auto")


@need_C
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_quant_same_under_every_schedule(schedule):
    _sim.configure(schedule, 2)
    w = _weights((8, 512), torch.bfloat16, 5)
    for fmt in ("nf4", "int4"):
        want = _quantize(_C, w, 64, fmt) if fmt == "nf4" else None
        got = _quantize(_sim, w, 64, fmt)
        if want is not None:
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@need_C
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel, block", [(1, 256), (255, 256), (1000, 256), (513, 64), (4096, 2048)])
def test_quantize8_dequantize8_bit_exact(numel, block, signed):
    g = torch.Generator().manual_seed(numel + block)
    x = torch.rand(numel, generator=g) * 4 + (0 if signed else 0.1)
    offset = float(x.mean()) if signed else 0.0
    nb = (numel + block - 1) // block
    res = []
    for mod in (_C, _sim):
        q = torch.zeros(numel, dtype=torch.uint8)
        amax = torch.zeros(nb)
        mod.quantize8(x.data_ptr(), numel, block, signed, offset, q.data_ptr(), amax.data_ptr())
        out = torch.zeros(numel)
        mod.dequantize8(q.data_ptr(), amax.data_ptr(), numel, block, signed, offset, out.data_ptr())
        res.append((q, amax.view(torch.int32), out.view(torch.int32)))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def _c_quantize8(x, block, signed, offset):
    """lowbit._C.quantize8 with the reference's signature (for ref.double_quant_ref)."""
    q = torch.zeros(x.numel(), dtype=torch.uint8)
    absmax = torch.zeros(-(-x.numel() // block))
    _C.quantize8(x.data_ptr(), x.numel(), block, signed, offset, q.data_ptr(), absmax.data_ptr())
    return q, absmax


@need_C
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_dequantize_double_quant_bit_exact(fmt):
    w = _weights((64, 256), torch.bfloat16, 77)
    block = 32
    codes, absmax, _ = _quantize(_C, w, block, fmt)  # 512 blocks -> 2 nested blocks
    q, nested, offset = ref.double_quant_ref(absmax, _c_quantize8)  # the rule's one home, the CPU kernel
    offset = float(offset)
    outs = []
    for mod in (_C, _sim):
        out = torch.zeros(w.numel(), dtype=torch.bfloat16)
        mod.dequantize(codes.data_ptr(), 0, 0, q.data_ptr(), nested.data_ptr(), offset, out.data_ptr(),
                       DT[torch.bfloat16], w.numel(), block, FMT[fmt])
        outs.append(out.view(torch.int16))
    assert torch.equal(outs[0], outs[1])


def test_quant_rejects_block_not_multiple_of_8():
    w = torch.zeros(40)
    with pytest.raises(ValueError, match="block=20"):  # the launcher's own check (include/lowbit/check.h)
        _quantize(_sim, w, 20, "nf4")


def test_stats_count_simulated_threads():
    _sim.reset_stats()
    _quantize(_sim, torch.randn(4, 256), 64, "nf4")
    s = _sim.stats()
    assert s["launches"] == 1 and s["threads"] == 256 and s["blocks"] == 1 and s["seconds"] > 0


@pytest.mark.skipif(not getattr(_sim, "sanitized", False),
                    reason="needs the sanitizer build of _sim (docs/simt.md, 'Sanitizer build')")
def test_asan_reports_out_of_bounds_write_with_its_line():
    import subprocess
    import sys
    code = ("import numpy as np; from lowbit import _sim; a = np.zeros(37, np.int32); "
            "_sim.simt_test('oob_write', [a.ctypes.data], [37])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "heap-buffer-overflow" in r.stderr and "oob_write_kernel" in r.stderr, r.stderr[-3000:]
    assert re.search(r"simt\.cuh:\d+", r.stderr), r.stderr[-3000:]


# ---------------------------------------------------------------------------- the OS thread pool
# Each in a subprocess: a regression crashes (SIGSEGV) or hangs a process, and must not take the
# test run down with it.
_POOL_PRELUDE = r"""
import os, sys, threading, time
import torch
import lowbit
torch.manual_seed(0)
w = torch.randn(64, 256)  # 256 blocks of 64: every OS thread of the pool gets blocks
with lowbit.use_backend("reference"):
    want = lowbit.quantize(w, "nf4", 64)
def check(threads):
    with lowbit.use_backend("sim", threads=threads):
        got = lowbit.quantize(w, "nf4", 64)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale), threads
"""

_POOL_RESIZE_SCRIPT = _POOL_PRELUDE + r"""
for rep in range(20):
    for t in (2, 7, 1, 5, 2, 8, 3, 16, 1):
        check(t)
print("RESIZE OK")
"""

# The parent used >= 2 OS threads; a forked child (which has none of them) launches with the same
# and with other counts, then again while a thread of the parent was launching at the fork.
_POOL_FORK_SCRIPT = _POOL_PRELUDE + r"""
def fork_and_wait(counts):
    pid = os.fork()
    if pid == 0:
        try:
            for t in counts:
                check(t)
        except BaseException as e:
            print("CHILD FAILED", repr(e), flush=True)
            os._exit(1)
        os._exit(0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "exit %d" % os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "hang"
check(2)
print("FORK same-count", fork_and_wait([2, 2]), flush=True)
check(7)
print("FORK other-count", fork_and_wait([3, 7, 1]), flush=True)
stop = False
def busy():
    while not stop:
        check(4)
bg = threading.Thread(target=busy)
bg.start()
results = [fork_and_wait([4, 2]) for _ in range(5)]
stop = True
bg.join()
print("FORK during-launch", " ".join(results), flush=True)
check(3)
print("PARENT OK")
"""


def _run_pool_script(script, timeout):
    import os
    import subprocess
    import sys
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(_sim.__file__)))  # this lowbit, not another
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")]))
    try:
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung for {timeout} s: {e.stdout!r} {e.stderr!r}")
    assert r.returncode == 0, f"process died with {r.returncode}: {r.stdout[-2000:]} {r.stderr[-3000:]}"
    return r.stdout


def test_pool_survives_any_sequence_of_thread_counts():
    # A pool restarted with another thread count used to start its new threads with a stale view of
    # the last launch (epoch, helpers wanted, grid): SIGSEGV in nearly every run of this script.
    out = _run_pool_script(_POOL_RESIZE_SCRIPT, timeout=240)
    assert "RESIZE OK" in out, out


def test_pool_works_in_a_forked_child():
    # The child of a fork has none of the parent's pool threads: it used to wait forever for them.
    out = _run_pool_script(_POOL_FORK_SCRIPT, timeout=240)
    assert "FORK same-count exit 0" in out, out
    assert "FORK other-count exit 0" in out, out
    assert "FORK during-launch " + " ".join(["exit 0"] * 5) in out, out
    assert "PARENT OK" in out, out
