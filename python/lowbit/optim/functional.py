"""Functional AdamW steps: :func:`adamw_step` (validation, then the kernel of the backend) and the state
layouts. They live in :mod:`lowbit.ops.optim`, the door to native code; the optimizers and users reach
them under these names."""

from __future__ import annotations

from ..ops.optim import (OPTIM_BLOCK, ROUNDINGS, STATE_KEYS_8, STATE_KEYS_32, ZERO_CODE_SIGNED, ZERO_CODE_UNSIGNED,
                         adamw_step, init_state, rounding_id, state_bits, state_shapes)

__all__ = ["adamw_step", "init_state", "ROUNDINGS", "STATE_KEYS_32", "STATE_KEYS_8", "OPTIM_BLOCK", "state_shapes",
           "state_bits", "rounding_id", "ZERO_CODE_SIGNED", "ZERO_CODE_UNSIGNED"]
