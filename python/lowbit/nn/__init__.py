"""Drop-in modules: QuantLinear (frozen low-bit weight) and the adapters built on it."""

from .lora import LoRALinear, add_lora, lora_layers
from .quant_linear import QuantLinear
from .qwha import HadamardAdapterLinear, add_adapters, qwha_layers

__all__ = ["QuantLinear", "LoRALinear", "add_lora", "lora_layers", "HadamardAdapterLinear", "add_adapters", "qwha_layers"]
