"""Drop-in modules: QuantLinear (frozen low-bit weight) and the adapters built on it.

Adding adapters to a model is model surgery: :func:`lowbit.add_lora`, :func:`lowbit.add_qwha`
(:mod:`lowbit.model`)."""

from .lora import LoRALinear, lora_layers
from .quant_linear import QuantLinear
from .qwha import HadamardAdapterLinear, qwha_layers

__all__ = ["QuantLinear", "LoRALinear", "lora_layers", "HadamardAdapterLinear", "qwha_layers"]
