"""PagePool: where paged optimizer state lives.

One small allocator over fixed-size pages (``page_bytes``), used by both paged optimizers:

* ``kind="file"`` (CPU): pages are memory-mapped files (``MAP_SHARED``) under ``offload_dir``. The
  files are unlinked as soon as they are mapped (nothing leaks if the process dies); the kernel
  writes dirty pages back and drops clean ones under memory pressure, so state larger than RAM
  works. ``resident_bytes`` is measured with ``mincore(2)``.
* ``kind="managed"`` (CUDA): pages are ``cudaMallocManaged`` memory from ``lowbit._cuda``; the
  optimizer prefetches each parameter's state to the GPU before its step and the driver may
  migrate pages back to the host under pressure (QLoRA's paged optimizers). On the ``sim``
  backend the same calls give host memory (for testing the code path; no paging happens).

An allocation never straddles two mappings: a mapping ("chunk") is ``max(page_bytes,
round_up(n, page_bytes))`` bytes and allocations are packed into it at 64-byte alignment.
Memory is released chunk by chunk when the last tensor viewing the chunk dies, never before:
``close()`` (or garbage collection of the pool) only drops the pool's own references, so a tensor
the pool handed out stays valid for as long as it lives. For file chunks the mapping belongs to
the tensor's storage (``torch.from_file``); for managed chunks a :class:`_ManagedChunk` owner is
held by the object the storage was built from (``torch.frombuffer`` and ``torch.as_tensor`` on a
``__cuda_array_interface__`` both keep that object alive until the storage is freed), and its
finaliser frees the allocation.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
from typing import Optional

import torch

from ..ops.optim import ManagedMemory

__all__ = ["PagePool", "PAGE_BYTES"]

PAGE_BYTES = 16 << 20  # 16 MiB: large enough to amortise a mapping, small enough for LoRA-sized state
_ALIGN = 64
_OS_PAGE = mmap.PAGESIZE
_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim now (dirty file pages are written back first)
_MADV_DONTNEED = 4

_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc


class _ManagedChunk:
    """Owns one managed allocation; frees it when garbage collected, i.e. when the last tensor
    built on it (through the buffer object that references this owner) has died."""

    live = 0  # managed chunks not yet freed, over all pools (for tests and leak checks)

    def __init__(self, mem: ManagedMemory, nbytes: int):
        self.mem, self.ptr, self.nbytes = mem, mem.alloc(nbytes), nbytes
        _ManagedChunk.live += 1

    def __del__(self):
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            type(self).live -= 1  # not the global name: it may be gone at interpreter exit
            self.mem.free(ptr)


class _CudaArray:
    """A raw device pointer as a ``__cuda_array_interface__`` object, for ``torch.as_tensor``, which
    keeps this object (and so ``owner``) alive as long as the tensor's storage."""

    def __init__(self, ptr: int, nbytes: int, owner: _ManagedChunk):
        self.owner = owner
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


class PagePool:
    def __init__(self, kind: str = "file", *, offload_dir: Optional[str] = None, page_bytes: int = PAGE_BYTES,
                 backend: str = "cuda"):
        if kind not in ("file", "managed"):
            raise ValueError(f"kind={kind!r} must be 'file' or 'managed'")
        if not isinstance(page_bytes, int) or page_bytes <= 0 or page_bytes % _OS_PAGE:
            raise ValueError(f"page_bytes={page_bytes!r} must be a positive multiple of the OS page size {_OS_PAGE}")
        self.kind, self.page_bytes = kind, page_bytes
        self._chunks: list[tuple[torch.Tensor, int, int]] = []  # (uint8 tensor, base address, bytes)
        self._top = 0  # bytes used in the last chunk
        self._used = 0
        self._closed = False
        if kind == "file":
            self._tmp = None
            if offload_dir is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="lowbit-pages-")
                offload_dir = self._tmp.name
            if not os.path.isdir(offload_dir):
                raise ValueError(f"offload_dir={offload_dir!r} is not a directory")
            self.offload_dir = offload_dir
        else:
            self._mem = ManagedMemory(backend)  # ValueError / RuntimeError naming the backend
            self.backend = backend

    # ------------------------------------------------------------------ allocation
    def _new_chunk(self, nbytes: int) -> None:
        size = max(self.page_bytes, -(-nbytes // self.page_bytes) * self.page_bytes)
        if self.kind == "file":
            fd, path = tempfile.mkstemp(prefix="state-", suffix=".pages", dir=self.offload_dir)
            try:
                os.ftruncate(fd, size)  # sparse: pages read as zeros until written
                t = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
            finally:
                os.close(fd)
                os.unlink(path)  # the mapping keeps the inode alive
        else:
            owner = _ManagedChunk(self._mem, size)
            if self.backend == "cuda":
                t = torch.as_tensor(_CudaArray(owner.ptr, size, owner), device="cuda")
            else:  # simulator: host memory; frombuffer holds the ctypes array, which holds the owner
                buf = (ctypes.c_uint8 * size).from_address(owner.ptr)
                buf.owner = owner
                t = torch.frombuffer(buf, dtype=torch.uint8)
            del owner  # from here on the tensor's storage is the only way to the owner
            t.zero_()
        self._chunks.append((t, t.data_ptr(), size))
        self._top = 0

    def alloc(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled tensor of ``shape`` / ``dtype`` in the pool's pages."""
        if self._closed:
            raise RuntimeError("PagePool is closed")
        shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (int(shape),)
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:  # nothing to place: a plain empty tensor on the pool's device (no chunk needed)
            device = "cpu" if self.kind == "file" or self.backend != "cuda" else torch.cuda.current_device()
            return torch.empty(shape, dtype=dtype, device=device)
        if not self._chunks or self._top + nbytes > self._chunks[-1][2]:
            self._new_chunk(nbytes)
        t, _, _ = self._chunks[-1]
        view = t[self._top:self._top + nbytes]
        self._top = -(-(self._top + nbytes) // _ALIGN) * _ALIGN
        self._used += nbytes
        # Fresh file chunks are sparse (read as zeros) and managed chunks were zeroed: no write here,
        # which would make every page resident and dirty before the optimizer touches it.
        return view.view(dtype).view(shape)

    def owns(self, t: torch.Tensor) -> bool:
        a = t.data_ptr()
        return any(base <= a < base + size for _, base, size in self._chunks)

    # ------------------------------------------------------------------ paging
    def prefetch(self, tensors, device: Optional[int] = None, stream: int = 0) -> None:
        """Managed pages: migrate ``tensors`` to ``device`` (None: the current CUDA device) before
        a kernel uses them. File pages: nothing (the kernel faults pages in on first touch)."""
        if self.kind != "managed":
            return
        if device is None:
            device = torch.cuda.current_device() if self.backend == "cuda" else 0
        for t in tensors:
            if t.numel() == 0:  # 0-element state is a plain tensor outside the pool
                continue
            self._mem.prefetch(t.data_ptr(), t.numel() * t.element_size(), int(device), int(stream))

    def evict(self) -> None:
        """Ask the OS to write back and drop the pool's resident pages now (file pages; a hint)."""
        if self.kind != "file":
            return
        for _, base, size in self._chunks:
            if _c().madvise(base, size, _MADV_PAGEOUT) != 0:
                _c().madvise(base, size, _MADV_DONTNEED)  # older kernels: drop the mapping's pages

    def memory_stats(self) -> dict:
        """``total_bytes`` (mapped), ``used_bytes`` (allocated), ``resident_bytes`` (in RAM now, by
        mincore; None for managed memory, whose residency the driver does not report cheaply),
        ``pages`` (of ``page_bytes``), ``chunks``."""
        total = sum(size for _, _, size in self._chunks)
        resident = None
        if self.kind == "file":
            resident = 0
            for _, base, size in self._chunks:
                n = -(-size // _OS_PAGE)
                vec = (ctypes.c_ubyte * n)()
                if _c().mincore(base, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), "mincore failed")
                resident += int((torch.frombuffer(vec, dtype=torch.uint8) & 1).sum()) * _OS_PAGE
            resident = min(resident, total)
        return {"kind": self.kind, "total_bytes": total, "used_bytes": self._used, "resident_bytes": resident,
                "page_bytes": self.page_bytes, "pages": total // self.page_bytes, "chunks": len(self._chunks)}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Drop the pool's references only: each chunk is freed (managed) or unmapped (file) when its
        # last tensor dies; the page files were unlinked when mapped, so removing the directory is safe.
        self._chunks.clear()
        if self.kind == "file" and self._tmp is not None:
            self._tmp.cleanup()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
