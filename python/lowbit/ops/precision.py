"""The precision policy of the packed products (gemm, gemm_t, lowrank) on the CPU, named like
``torch.set_float32_matmul_precision``. It governs fp32 activations:

* ``"highest"``: fp32 accumulation error only (the exact fp32 tile kernels; ≤ 1e-6 relative at K = 4096);
* ``"high"`` (default): ≤ 2e-4 relative (int16 images of x and W on ``vpdpwssd`` / ``vpmaddwd``);
* ``"medium"``: bf16-rounding level (≤ 1e-2 relative): x may be rounded to bf16 and run on the bf16
  matrix engine (AMX or AVX512-BF16), and the small-M GEMV may use int8 activations.

bf16 activations always compute as ``F.linear(x, qt.dequantize(torch.bfloat16))`` does (bf16
products, fp32 accumulation), fp16 activations as fp32 under ``high`` (fp16-level error at worst),
whatever the policy. The setting is process-wide, like torch's. Which engine each M range runs is in
``lowbit.info()["engines"]``; the error of each path is in docs/kernels.md.
"""

from __future__ import annotations

import contextlib
import threading

from .._native import module

__all__ = ["PRECISIONS", "set_matmul_precision", "get_matmul_precision", "matmul_precision"]

PRECISIONS = ("highest", "high", "medium")
_lock = threading.Lock()
_current = ["high"]  # the Python-side copy (the value when _C is not built)


def set_matmul_precision(precision: str) -> None:
    """Set the policy for every later product in this process: ``"highest"``, ``"high"`` or ``"medium"``."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    with _lock:
        try:
            module("cpu").set_matmul_precision(PRECISIONS.index(precision))
        except RuntimeError:  # _C not built: the reference backend has one precision anyway
            pass
        _current[0] = precision


def get_matmul_precision() -> str:
    """The policy in force: ``"highest"``, ``"high"`` (the default) or ``"medium"``."""
    return _current[0]


@contextlib.contextmanager
def matmul_precision(precision: str):
    """``with lowbit.matmul_precision("medium"): ...`` — set the policy, restore the previous one on exit
    (also on an exception). Process-wide while inside, like :func:`set_matmul_precision`."""
    old = get_matmul_precision()
    set_matmul_precision(precision)
    try:
        yield
    finally:
        set_matmul_precision(old)
