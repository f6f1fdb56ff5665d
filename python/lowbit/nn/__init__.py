"""Drop-in modules: QuantLinear (frozen low-bit weight) and the adapters built on it."""

from .lora import LoRALinear, add_lora, lora_layers
from .quant_linear import QuantLinear

__all__ = ["QuantLinear", "LoRALinear", "add_lora", "lora_layers"]
