"""Drop-in modules: QuantLinear (frozen low-bit weight), SVDQuantLinear (W4A4 + low-rank branch) and the
adapters built on them.

Adding adapters to a model is model surgery: :func:`lowbit.add_lora`, :func:`lowbit.add_qwha`
(:mod:`lowbit.model`)."""

from .lora import LoRALinear, lora_layers
from .quant_linear import QuantLinear
from .qwha import HadamardAdapterLinear, qwha_layers
from .svdquant import SVDQuantLinear, svdquant_layers

__all__ = ["QuantLinear", "LoRALinear", "lora_layers", "HadamardAdapterLinear", "qwha_layers", "SVDQuantLinear",
           "svdquant_layers"]
