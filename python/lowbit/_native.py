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
# use_backend("sim", schedule=, threads=): (schedule or "", threads or -1) for the calls made in this
# context; call() hands it to the simulator for the calling thread around each kernel.
_sim_config: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar("lowbit_sim_config", default=None)


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
    leave barriers; seed in [0, 2**64)) and ``threads`` the number of OS threads that run simulated
    blocks (0: ``SIMT_THREADS`` or the core count; at most 256).

    Scope: everything — the backend, ``schedule`` and ``threads`` — holds for the code inside the
    block in this thread (and this asyncio task: a ``contextvars`` context), and ends with the block
    however it is left (return, exception, a generator closed early). Nothing process-wide changes:
    other threads keep their own backend and the simulator's process-wide configuration
    (``lowbit._sim.configure``); a nested block inherits the ``schedule``/``threads`` it does not set.
    """
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {BACKENDS}")
    if name != "sim" and (schedule is not None or threads is not None):
        raise ValueError(f"schedule/threads apply to the 'sim' backend only, not backend={name!r}")
    if name != "reference":
        module(name)  # raise now if unavailable
    sim_config = None
    if name == "sim":
        outer = _sim_config.get() or ("", -1)
        if schedule is not None and not isinstance(schedule, str):
            raise TypeError(f"schedule={schedule!r} must be a str ('forward', 'reverse' or 'random:<seed>')")
        if schedule == "":  # configure_thread's "keep the process-wide one", not a schedule
            raise ValueError("schedule='' is not 'forward', 'reverse' or 'random:<seed>'")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int):
                raise TypeError(f"threads={threads!r} must be an int")
            if not 0 <= threads <= 256:
                raise ValueError(f"threads={threads} must be in [0, 256] (0: SIMT_THREADS or the core count)")
        sim_config = (outer[0] if schedule is None else schedule, outer[1] if threads is None else threads)
        sim = module("sim")
        try:  # the simulator's own parser checks the schedule (one rule); nothing stays set
            sim.configure_thread(*sim_config)
        finally:
            sim.configure_thread("", -1)
        if sim_config == ("", -1):
            sim_config = None
    token = _backend.set(name)
    try:
        sim_token = _sim_config.set(sim_config)
        try:
            yield
        finally:
            _sim_config.reset(sim_token)
    finally:
        _backend.reset(token)


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
    f = getattr(mod, fn)
    if backend == "cpu":
        return _checked_call(backend, fn, f, args)
    if backend == "cuda":
        return _checked_call(backend, fn, f, args + (torch.cuda.current_stream().cuda_stream,))
    config = _sim_config.get()
    if config is None:
        return _checked_call(backend, fn, f, args + (0,))
    mod.configure_thread(*config)  # this thread's launches only, for this call
    try:
        return _checked_call(backend, fn, f, args + (0,))
    finally:
        mod.configure_thread("", -1)


# pybind11's "incompatible function arguments" message prints every argument's value: for the
# kernels most are raw addresses (tensor.data_ptr()), which an error message must not show (issue 14,
# finding 9). The ops validate first, so this is a second line: it names the entry and the arguments
# that do not convert, by their names and types, and never prints an int argument's value unless it
# is out of range (an address never is).
_INT64 = (-2 ** 63, 2 ** 63 - 1)


def _checked_call(backend: str, fn: str, f, args: tuple):
    try:
        return f(*args)
    except TypeError as e:
        if "incompatible function arguments" not in str(e):
            raise
    raise TypeError(f"lowbit.{_MODULE_NAME[backend]}.{fn}: {_unconvertible(f, args)}") from None


_MODULE_NAME = {"cpu": "_C", "sim": "_sim", "cuda": "_cuda"}


def _unconvertible(f, args: tuple) -> str:
    import re

    sig = (f.__doc__ or "").split("\n", 1)[0]
    params = re.findall(r"(\w+): ([\w.\[\]| ]+?)(?: = [^,)]*)?(?:, |\))", sig[sig.find("(") + 1:] + ")")
    if len(params) != len(args):
        return f"{len(args)} arguments given, its signature takes {len(params)} ({', '.join(n for n, _ in params)})"
    bad, wide = [], []
    for (name, ann), v in zip(params, args):
        is_int = isinstance(v, int) and not isinstance(v, bool)
        if ann == "Address":  # a tensor's address: named, its value never shown
            if not is_int:
                bad.append(f"{name} (an address) is a {type(v).__name__}, not an int")
            elif not _INT64[0] <= v <= _INT64[1]:
                bad.append(f"{name} (an address) is out of the int64 range")
        elif "SupportsInt" in ann:
            if not is_int:
                bad.append(f"{name} is a {type(v).__name__}, not an int")
            elif not _INT64[0] <= v <= _INT64[1]:
                bad.append(f"{name}={v} is out of the int64 range")
            elif not -2 ** 31 <= v < 2 ** 31:
                wide.append(f"{name}={v}")
        elif "SupportsFloat" in ann:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                bad.append(f"{name} is a {type(v).__name__}, not a float")
        elif ann == "bool" and not isinstance(v, bool):
            bad.append(f"{name} is a {type(v).__name__}, not a bool")
        elif ann == "str" and not isinstance(v, str):
            bad.append(f"{name} is a {type(v).__name__}, not a str")
    if not bad:  # within int64 but out of an int32 parameter (block, fmt, dtype, r, n...)
        bad.append(f"out of the range of its C++ integer type: {', '.join(wide)}" if wide
                   else "an argument does not convert to its C++ type")
    return "; ".join(bad)
