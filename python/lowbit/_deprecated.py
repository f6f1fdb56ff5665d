"""Deprecation shims for the names and call forms the house issue (12) changed.

Ground floor like :mod:`lowbit.formats`: imports nothing from lowbit, so every layer can mark its
old spellings with the same warning.
"""

from __future__ import annotations

import functools
import warnings

__all__ = ["alias", "warn"]


def warn(old: str, new: str, stacklevel: int = 3) -> None:
    """A DeprecationWarning ``"{old} is deprecated; use {new}"`` at the caller of the deprecated API."""
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=stacklevel)


def alias(fn, old: str, new: str):
    """``fn`` under its old name ``old``: the same call, with a DeprecationWarning naming ``new``."""

    @functools.wraps(fn)
    def shim(*args, **kwargs):
        warn(old, new)
        return fn(*args, **kwargs)

    shim.__doc__ = f"Deprecated: ``{old}`` is :func:`{new}` (same arguments)."
    return shim
