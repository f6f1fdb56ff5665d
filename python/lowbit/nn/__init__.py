"""Drop-in modules: QuantLinear (frozen low-bit weight) and the adapters built on it."""

from .quant_linear import QuantLinear

__all__ = ["QuantLinear"]
