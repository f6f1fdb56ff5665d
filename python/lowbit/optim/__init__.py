"""Optimizers with fused lowbit kernels: ``AdamW``, ``AdamW8bit``, ``PagedAdamW``, ``PagedAdamW8bit``.

Drop-in ``torch.optim.Optimizer`` subclasses (param groups, ``zero_grad``, ``state_dict``)::

    opt = lowbit.optim.AdamW8bit(model.parameters(), lr=1e-4)          # ~2 bytes of state per param
    opt = lowbit.optim.PagedAdamW(model.parameters(), offload_dir="/scratch")  # state in mapped files
"""

from .adamw import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from .functional import adamw_step
from .pages import PagePool

__all__ = ["AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagePool", "adamw_step"]
