"""Loading of the compiled modules and the backend switch.

Backends: ``"reference"`` (pure torch, :mod:`lowbit.reference`), ``"cpu"`` (``lowbit._C``),
``"sim"`` (``lowbit._sim``: the CUDA kernels run on the CPU by the simt simulator, over CPU
tensors) and ``"cuda"`` (``lowbit._cuda``). By default a CPU tensor goes to ``cpu`` and a CUDA
tensor to ``cuda``; :func:`use_backend` overrides that inside a ``with`` block.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from typing import Optional

import torch

BACKENDS = ("reference", "cpu", "sim", "cuda")

_modules: dict[str, object] = {}
_import_errors: dict[str, str] = {}
for _name, _mod in (("cpu", "_C"), ("sim", "_sim"), ("cuda", "_cuda")):
    try:
        _modules[_name] = importlib.import_module(f"lowbit.{_mod}")
    except ImportError as e:  # not built, or built for another Python
        _import_errors[_name] = f"{type(e).__name__}: {e}"

_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lowbit_backend", default=None)


def module(backend: str):
    """The compiled module of a backend, or a RuntimeError that says why it is not there."""
    if backend not in _modules:
        why = _import_errors.get(backend, "not built")
        raise RuntimeError(f"lowbit backend {backend!r} is unavailable ({why}); see lowbit.info()")
    return _modules[backend]


def has(backend: str) -> bool:
    return backend == "reference" or backend in _modules


def cuda_status() -> tuple[bool, str]:
    """(usable, message): whether CUDA kernels can run here, and why not."""
    if "cuda" not in _modules:
        return False, f"lowbit._cuda not built ({_import_errors.get('cuda', 'nvcc not found at build time')})"
    count, message = _modules["cuda"].device_status()
    if count == 0:
        return False, message
    if not torch.cuda.is_available():
        return False, "lowbit._cuda sees a device but this torch build has no CUDA"
    return True, message


@contextlib.contextmanager
def use_backend(name: str, schedule: Optional[str] = None, threads: Optional[int] = None):
    """Run lowbit's public API on one implementation inside the block.

    ``name``: ``"reference" | "cpu" | "sim" | "cuda"``. For ``"sim"``, ``schedule`` is
    ``"forward"``, ``"reverse"`` or ``"random:<seed>"`` (order in which simulated threads start and
    leave barriers) and ``threads`` the number of OS threads that run simulated blocks.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {BACKENDS}")
    if name != "sim" and (schedule is not None or threads is not None):
        raise ValueError(f"schedule/threads apply to the 'sim' backend only, not backend={name!r}")
    if name != "reference":
        module(name)  # raise now if unavailable
    restore = None
    if name == "sim" and (schedule is not None or threads is not None):
        sim = module("sim")
        restore = sim.get_config()
        sim.configure(schedule if schedule is not None else restore[0],
                      int(threads) if threads is not None else restore[1])
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)
        if restore is not None:
            module("sim").configure(*restore)


def backend_for(t: torch.Tensor) -> str:
    """Which implementation runs for an input tensor (validated against its device)."""
    forced = _backend.get()
    if forced is None:
        if t.device.type == "cuda":
            return "cuda"
        if t.device.type != "cpu":
            raise ValueError(f"tensors on device {t.device} are not supported (cpu or cuda)")
        return "cpu" if "cpu" in _modules else "reference"
    if forced in ("cpu", "sim") and t.device.type != "cpu":
        raise ValueError(f"backend {forced!r} needs CPU tensors, got a tensor on {t.device}")
    if forced == "cuda" and t.device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got a tensor on {t.device}")
    return forced


def call(backend: str, fn: str, *args):
    """Call a kernel of a compiled backend; CUDA-style backends get the current stream last."""
    mod = module(backend)
    if backend == "cpu":
        return getattr(mod, fn)(*args)
    stream = torch.cuda.current_stream().cuda_stream if backend == "cuda" else 0
    return getattr(mod, fn)(*args, stream)
