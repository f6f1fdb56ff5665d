"""quant family: quantize / dequantize / double quant on every backend, bit-exact with the
reference; the reference against bitsandbytes (the independent peer); errors; checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit import _native, reference as ref
from lowbit.formats import FP4, FP4_SORTED_CODES, GEMM_BLOCKS, INT_BLOCKS, NF4, TABLE_BLOCKS, block_sizes_of, dynamic_map

from conftest import require_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = ["nf4", "fp4", "int4", "int2"]
BLOCKS = [32, 64, 128, 256]


def weight(n, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, ::17] *= 8.0  # outliers, so blocks have different scales
    return w.to(dtype)


def ref_quantize(w, fmt, block, dq):
    with lowbit.use_backend("reference"):
        return lowbit.quantize(w, fmt, block, dq)


# ------------------------------------------------------------------------- tables
def test_tables_python_equal_cpp_and_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    require_backend("cpu")
    t = _native.module("cpu").tables()
    assert t["nf4"] == NF4
    assert t["fp4"] == FP4
    assert t["fp4_sorted_codes"] == FP4_SORTED_CODES
    assert torch.equal(torch.tensor(t["dynamic_signed"]), dynamic_map(True))
    assert torch.equal(torch.tensor(t["dynamic_unsigned"]), dynamic_map(False))
    assert t["nested_block"] == 256
    assert torch.equal(torch.tensor(NF4), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(torch.tensor(FP4), bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(True), bnbf.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(False), bnbf.create_dynamic_map(signed=False))
    fp4 = torch.tensor(FP4)
    assert torch.all(fp4[FP4_SORTED_CODES][1:] >= fp4[FP4_SORTED_CODES][:-1])


def test_block_lists_python_equal_cpp():
    """formats.py holds Python's one copy of the block-size rule of include/lowbit/formats.h."""
    require_backend("cpu")
    t = _native.module("cpu").tables()
    assert list(GEMM_BLOCKS) == t["gemm_blocks"]
    assert list(TABLE_BLOCKS) == t["table_blocks"]
    assert list(INT_BLOCKS) == t["int_blocks"]
    assert block_sizes_of("nf4") == block_sizes_of("fp4") == TABLE_BLOCKS
    assert block_sizes_of("int4") == block_sizes_of("int2") == INT_BLOCKS


def test_nf4_is_the_qlora_normal_float():
    """NF4 (QLoRA appendix E): quantiles of N(0,1) at offset 0.9677..., normalised to [-1, 1]."""
    scipy_stats = pytest.importorskip("scipy.stats")
    import numpy as np

    offset = 0.9677083
    pos = scipy_stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -scipy_stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    v = v / np.abs(v).max()
    np.testing.assert_allclose(np.array(NF4), v, atol=2e-7)


@pytest.mark.parametrize("backend", ["cpu", "sim"])
def test_native_entry_points_apply_the_one_block_rule(backend):
    """The native quantize and gemm refuse exactly the blocks formats.h refuses (before, the CUDA
    launchers took any multiple of 8 / 32 that Python refused): ValueError from _C, RuntimeError
    from a launcher's error code."""
    require_backend(backend)
    mod = _native.module(backend)
    numel = 8192
    w = torch.randn(numel)
    codes = torch.empty(numel, dtype=torch.uint8)
    scale, zero = torch.empty(numel // 32), torch.empty(numel // 32)
    fmt_id = {"nf4": 0, "int4": 2}
    for fmt, block in (("nf4", 48), ("nf4", 16), ("nf4", 8192), ("int4", 512), ("nf4", 64), ("nf4", 4096), ("int4", 256)):
        args = (w.data_ptr(), 0, numel, block, fmt_id[fmt], codes.data_ptr(), scale.data_ptr(), zero.data_ptr())
        if block in block_sizes_of(fmt):
            mod.quantize(*args)
        else:
            with pytest.raises((ValueError, RuntimeError)):
                mod.quantize(*args)
    x, y = torch.randn(2, 512), torch.empty(2, 16)
    for block in (64, 256, 512, 96):
        args = (x.data_ptr(), y.data_ptr(), 0, 0, 2, 16, 512, codes.data_ptr(), scale.data_ptr(), 0, 0, 0, 0.0,
                block, 0)
        if block in GEMM_BLOCKS:
            mod.gemm(*args)
        else:
            with pytest.raises((ValueError, RuntimeError)):
                mod.gemm(*args)


# ------------------------------------------------------------------------- bit-exact on every backend
SHAPES = [(1, None), (3, None), (5, 4096 * 3), (2, 4096)]  # None: K = block


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
def test_bitexact_with_reference(kernel_backend, fmt, block, dtype, dq):
    for n, k in SHAPES:
        w = weight(n, k or block, dtype, seed=n)
        expected = ref_quantize(w, fmt, block, dq)
        got = lowbit.quantize(w, fmt, block, dq)
        assert got.equal(expected), f"{fmt} block={block} {dtype} dq={dq} shape={tuple(w.shape)}: packed bytes or scales differ"
        for out_dtype in DTYPES:
            with lowbit.use_backend("reference"):
                exp = expected.dequantize(out_dtype)
            assert torch.equal(got.dequantize(out_dtype), exp), f"dequantize to {out_dtype} differs"


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int2"])
def test_bitexact_large_blocks_and_edge_values(kernel_backend, fmt):
    """Constant blocks, zero blocks, exact midpoint ties, huge/tiny magnitudes, 4096-blocks (nf4)."""
    block = 64
    w = weight(8, 4 * block)
    w[0] = 0.0                                    # all-zero rows
    w[1, :block] = 3.25                           # constant block
    w[2, :16] = torch.tensor(NF4[:16]) * 2.0      # codes exactly
    mids = (torch.tensor(NF4[:-1]) + torch.tensor(NF4[1:])) / 2
    w[3, :15] = mids                              # exact ties (absmax 1 set below)
    w[3, 15] = 1.0
    w[4] *= 1e30
    w[5] *= 1e-30
    w[6] = w[6].abs()
    w[6, 5] = -0.0                                # a block whose minimum is a negative zero
    w[6, 9] = 0.0
    expected = ref_quantize(w, fmt, block, True)
    assert lowbit.quantize(w, fmt, block, True).equal(expected)
    if fmt == "nf4":
        wl = weight(4, 8192)
        assert lowbit.quantize(wl, "nf4", 4096).equal(ref_quantize(wl, "nf4", 4096, False))


def test_quantize8_matches_reference(kernel_backend):
    x = torch.randn(1000) * torch.logspace(-3, 2, 1000)
    for signed, offset in ((True, 0.0), (True, 0.37), (False, 0.0)):
        xs = x if signed else x.abs()
        q, a = lowbit.ops.quantize8(xs, 256, signed, offset)
        rq, ra = ref.quantize8_ref(xs, 256, signed, offset)
        assert torch.equal(q, rq) and torch.equal(a, ra)
        assert torch.equal(lowbit.ops.dequantize8(q, a, 256, signed, offset), ref.dequantize8_ref(rq, ra, 256, signed, offset))


# ------------------------------------------------------------------------- quantization quality (reference)
@pytest.mark.parametrize("fmt", FORMATS)
def test_error_bounded_by_half_step(fmt):
    """Every dequantized value is within half a code gap of the input (the nearest-code rule)."""
    w = weight(16, 256)
    qt = ref_quantize(w, fmt, 64, False)
    err = (qt.dequantize(torch.float32) - w).abs().reshape(-1, 64)
    s = qt.scale[:, None]
    if fmt in ("int4", "int2"):
        bound = s / 2 * (1 + 1e-5)
    else:
        table = torch.tensor(NF4 if fmt == "nf4" else sorted(FP4))
        bound = s * (table[1:] - table[:-1]).max() / 2 * (1 + 1e-5)
    assert torch.all(err <= bound)


# ------------------------------------------------------------------------- bitsandbytes interop


def _bnb():
    return pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("block", [64, 256, 1024])
def test_quantize_equals_bitsandbytes(fmt, dtype, block):
    F = _bnb().functional
    w = weight(32, 1024, dtype)
    packed, state = F.quantize_4bit(w, blocksize=block, quant_type=fmt, compress_statistics=False)
    qt = lowbit.quantize(w, fmt, block, False)
    assert torch.equal(qt.codes.reshape(-1), packed.reshape(-1))
    assert torch.equal(qt.scale, state.absmax)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32], ids=lambda d: str(d)[6:])
def test_from_bnb_dequantizes_bit_exactly(fmt, nested, dtype, storage):
    bnb = _bnb()
    w = weight(48, 512, dtype, seed=3)
    layer = bnb.nn.Linear4bit(512, 48, bias=False, compute_dtype=dtype, quant_type=fmt,
                              compress_statistics=nested, quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=fmt, compress_statistics=nested,
                                     quant_storage=storage, blocksize=64)
    layer.weight._quantize("cpu") if hasattr(layer.weight, "_quantize") else None
    sd = layer.state_dict(prefix="layer.")
    qt = lowbit.from_bnb(sd, prefix="layer.")
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert qt.fmt == fmt and qt.double_quant == nested and qt.dtype == dtype
    assert torch.equal(qt.dequantize(), expected)
    # and back: our entries load into a fresh bitsandbytes layer giving the same weights
    sd2 = qt.to_bnb(prefix="")
    p = bnb.nn.Params4bit.from_prequantized(data=sd2["weight"], quantized_stats={k[len("weight."):]: v for k, v in sd2.items() if k != "weight"},
                                            requires_grad=False, device="cpu")
    assert torch.equal(bnb.functional.dequantize_4bit(p.data, p.quant_state), expected)
    assert lowbit.from_bnb(sd2).equal(qt)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_to_bnb_loads_in_bitsandbytes(fmt, dq):
    bnb = _bnb()
    w = weight(64, 256)
    qt = lowbit.quantize(w, fmt, 64, dq)
    sd = qt.to_bnb(prefix="")
    p = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats={k[7:]: v for k, v in sd.items() if k != "weight"},
                                            requires_grad=False, device="cpu")
    assert torch.equal(bnb.functional.dequantize_4bit(p.data, p.quant_state), qt.dequantize())
    state = json.loads(bytes(sd[f"weight.quant_state.bitsandbytes__{fmt}"].tolist()))
    assert state["blocksize"] == 64 and state["shape"] == [64, 256]


def test_from_bnb_errors():
    qt = lowbit.quantize(weight(8, 64), "nf4", 64, True)
    sd = qt.to_bnb("m.")
    for missing in ("m.weight", "m.weight.absmax", "m.weight.quant_map", "m.weight.nested_absmax"):
        bad = {k: v for k, v in sd.items() if k != missing}
        with pytest.raises(ValueError, match="lacks|nested"):
            lowbit.from_bnb(bad, prefix="m.")
    bad = dict(sd)
    bad["m.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="not a valid bitsandbytes quant state"):
        lowbit.from_bnb(bad, prefix="m.")
    with pytest.raises(ValueError, match="only nf4/fp4"):
        lowbit.quantize(weight(8, 64), "int4", 64).to_bnb()
    with pytest.raises(TypeError):
        lowbit.from_bnb([1, 2], prefix="m.")


# ------------------------------------------------------------------------- input validation
@pytest.mark.parametrize("bad, exc, match", [
    (lambda: lowbit.quantize(torch.randn(4, 64).to(torch.float64), "nf4", 64), TypeError, "w.dtype=torch.float64"),
    (lambda: lowbit.quantize(torch.randint(0, 3, (4, 64)), "nf4", 64), TypeError, "w.dtype"),
    (lambda: lowbit.quantize(torch.randn(2, 4, 64), "nf4", 64), ValueError, "2 dimensions"),
    (lambda: lowbit.quantize(torch.randn(4, 100), "nf4", 64), ValueError, "K=100 is not a multiple of block_size=64"),
    (lambda: lowbit.quantize(torch.randn(4, 64), "nf5", 64), ValueError, "fmt='nf5'"),
    (lambda: lowbit.quantize(torch.randn(4, 96), "nf4", 48), ValueError, "block_size=48"),
    (lambda: lowbit.quantize(torch.randn(4, 1024), "int4", 1024), ValueError, "block_size=1024"),
    (lambda: lowbit.quantize(torch.randn(4, 64), "nf4", 64.0), TypeError, "block_size"),
    (lambda: lowbit.quantize(torch.randn(0, 64), "nf4", 64), ValueError, "empty"),
    (lambda: lowbit.quantize([[1.0] * 64], "nf4", 64), TypeError, "torch.Tensor"),
    (lambda: lowbit.quantize(torch.full((4, 64), float("nan")), "nf4", 64), ValueError, "NaN/Inf"),
    (lambda: lowbit.quantize(torch.tensor([[float("inf")] + [0.0] * 63]), "int4", 64), ValueError, "NaN/Inf"),
    (lambda: lowbit.quantize(torch.randn(4, 64), "nf4", 64).dequantize(torch.int8), TypeError, "dtype=torch.int8"),
])
def test_bad_input_raises_clear_errors(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


def test_dequantize_into_out(backend):
    qt = ref_quantize(weight(16, 128), "nf4", 64, True)
    with lowbit.use_backend("reference"):
        expected = qt.dequantize(torch.bfloat16)
    buf = torch.full((16, 128), float("nan"), dtype=torch.bfloat16)
    assert qt.dequantize(out=buf) is buf and torch.equal(buf, expected)
    with pytest.raises(ValueError, match="out must be a contiguous .16, 128."):
        qt.dequantize(out=torch.empty(16, 64, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="out.dtype"):
        qt.dequantize(torch.float32, out=torch.empty(16, 128, dtype=torch.bfloat16))


def test_dequantize_default_dtype_is_the_original_for_both_spellings(backend):
    """lowbit.dequantize(qt) and qt.dequantize() follow one rule: out's dtype, else the weight's."""
    qt = lowbit.quantize(weight(16, 128, torch.bfloat16), "nf4", 64, True)
    assert lowbit.dequantize(qt).dtype == qt.dequantize().dtype == torch.bfloat16
    assert torch.equal(lowbit.dequantize(qt), qt.dequantize())
    assert lowbit.dequantize(qt, torch.float32).dtype == torch.float32
    buf = torch.empty(16, 128, dtype=torch.float16)
    assert lowbit.dequantize(qt, out=buf) is buf and torch.equal(buf, qt.dequantize(torch.float16))
    with pytest.raises(TypeError, match="qt must be a QuantizedTensor"):
        lowbit.dequantize(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="dtype='float32'"):
        qt.dequantize("float32")


def test_dequantize_is_a_custom_op():
    qt = lowbit.quantize(weight(16, 128), "int4", 64, True)
    w = lowbit.ops.weight_args(qt)
    torch.library.opcheck(torch.ops.lowbit.dequantize.default, (*w, 16, 128, 64, "int4", torch.bfloat16))
    torch.library.opcheck(torch.ops.lowbit.dequantize_into.default,
                          (torch.empty(16, 128), *w, 16, 128, 64, "int4", torch.float32))


def test_use_backend_errors():
    with pytest.raises(ValueError, match="backend='tpu'"):
        with lowbit.use_backend("tpu"):
            pass
    with pytest.raises(ValueError, match="sim"):
        with lowbit.use_backend("cpu", schedule="forward"):
            pass


def test_non_contiguous_input_is_accepted():
    w = weight(64, 128).T  # (128, 64) non-contiguous
    assert lowbit.quantize(w, "nf4", 64).equal(ref_quantize(w.contiguous(), "nf4", 64, False))


# ------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dq", [False, True])
def test_save_load_round_trip(tmp_path, fmt, dq):
    qt = lowbit.quantize(weight(24, 128, torch.bfloat16), fmt, 32, dq)
    bias = torch.randn(24, dtype=torch.bfloat16)
    path = tmp_path / "x.safetensors"
    lowbit.save_tensors({"w": qt, "b": bias}, path)
    d = lowbit.load_tensors(path)
    assert set(d) == {"w", "b"}
    assert d["w"].equal(qt) and d["w"].dtype == torch.bfloat16
    assert torch.equal(d["b"], bias)
    assert torch.equal(d["w"].dequantize(), qt.dequantize())


def test_load_rejects_truncated_and_foreign_files(tmp_path):
    qt = lowbit.quantize(weight(8, 64), "nf4", 64, True)
    path = tmp_path / "x.safetensors"
    lowbit.save_tensors({"w": qt}, path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        lowbit.load_tensors(tmp_path / "trunc.safetensors")
    (tmp_path / "foreign.bin").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        lowbit.load_tensors(tmp_path / "foreign.bin")
    with pytest.raises(ValueError, match="is not a file"):
        lowbit.load_tensors(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file as st_save

    comps = {f"w.{k}": v for k, v in qt.components().items() if k != "scale_q"}
    st_save(comps, str(tmp_path / "broken.safetensors"), metadata={"lowbit": json.dumps({"version": 1, "quantized": {"w": qt.metadata()}})})
    with pytest.raises(ValueError, match="inconsistent"):
        lowbit.load_tensors(tmp_path / "broken.safetensors")
    with pytest.raises(TypeError):
        lowbit.save_tensors({"w": "not a tensor"}, tmp_path / "y.safetensors")


def test_save_file_load_file_are_deprecated_aliases(tmp_path):
    qt = lowbit.quantize(weight(8, 64), "nf4", 64, True)
    with pytest.warns(DeprecationWarning, match="lowbit.save_file is deprecated; use lowbit.save_tensors"):
        lowbit.save_file({"w": qt}, tmp_path / "x.safetensors")
    with pytest.warns(DeprecationWarning, match="lowbit.load_file is deprecated; use lowbit.load_tensors"):
        assert lowbit.load_file(tmp_path / "x.safetensors")["w"].equal(qt)
    assert lowbit.convert.load_file is lowbit.load_file


# ------------------------------------------------------------------------- properties (hypothesis)
hyp = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(FORMATS), block=st.sampled_from(BLOCKS), n=st.integers(1, 9),
       kb=st.integers(1, 5), dtype=st.sampled_from(DTYPES), dq=st.booleans(), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]))
def test_property_cpu_equals_reference(fmt, block, n, kb, dtype, dq, seed, scale):
    require_backend("cpu")
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, kb * block, generator=g) * scale).to(dtype)
    with lowbit.use_backend("cpu"):
        got = lowbit.quantize(w, fmt, block, dq)
        deq = got.dequantize()
    expected = ref_quantize(w, fmt, block, dq)
    assert got.equal(expected)
    with lowbit.use_backend("reference"):
        assert torch.equal(deq, expected.dequantize())
    assert deq.shape == w.shape and deq.dtype == dtype
