"""Page-locked host buffers of exactly the requested size, made fast.

torch's pinned allocator (``torch.empty(..., pin_memory=True)``) rounds every block up to a power of two and gets it
from ``cudaHostAlloc``, which faults and locks the pages on one thread: on an H200 box ~1.5 GB/s, 0.34-0.38 s for
one 131K-token Llama-3.1-8B layer's K and V (two 270 MB tensors, 512 MB each after the rounding), 11-12 s for the 32
layers a host tier takes after its first prefill, and 32 GB pinned for 17 GB of rows
(``scripts/bench_host_tier.py``, ``results/perf/host_tier_h200.json``). ``pinned_empty`` maps private anonymous
memory of the exact size (transparent huge pages advised), faults its pages in on torch's CPU threads (a fill) and
locks them with ``cudaHostRegister``: 0.024 s for the same layer (0.039 s with 4 KiB pages). The returned tensor
owns the mapping through a buffer object: when the last tensor viewing it is gone, the pages are unregistered, then
unmapped. Small buffers, hosts without CUDA and failed registrations take torch's allocator.
"""
from __future__ import annotations

import ctypes
import logging
import math
import mmap
import weakref

import torch

log = logging.getLogger(__name__)
_WARNED = False
MIN_BYTES = 16 << 20
"""Below this, torch's caching pinned allocator (its blocks are reused; rounding wastes little)."""
HUGE_PAGES = True
"""Advise transparent huge pages for the mapping where the kernel allows them (fewer faults and pages to lock: 24 vs
39 ms per 131K layer on the H200, scripts/bench_host_tier.py); False: 4 KiB pages."""


def _release(mm: mmap.mmap, addr: int) -> None:
    """Unregister, then unmap, once no tensor views the pages. Every device is synchronised first: a copy queued
    from or into the pages (``non_blocking``) may still be running when its last host view is dropped, which torch's
    own pinned blocks survive by recorded events and these would not."""
    try:
        if torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):
                torch.cuda.synchronize(i)
        torch.cuda.cudart().cudaHostUnregister(addr)
    except Exception:  # noqa: BLE001 - interpreter shutdown: the driver may be gone; the pages go with the process
        pass
    try:
        mm.close()
    except BufferError:  # pragma: no cover - an export outlived the owner: leave the mapping to the process
        pass


def _clear_error() -> None:
    """Reset the runtime's last error after a failed registration: torch reads it after its next kernel launch and
    would report it there."""
    get = getattr(torch.cuda.cudart(), "cudaGetLastError", None)
    if get is not None:
        get()
        return
    try:  # the launch check reads (and clears) the pending error
        torch.zeros(1, device="cuda").add_(1)
    except RuntimeError:
        pass


def _registered(nbytes: int) -> torch.Tensor | None:
    """uint8 [nbytes] over a fresh anonymous mapping whose pages are faulted in and registered; None if
    registration fails."""
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # not MAP_SHARED: shmem pages fault slower
    if HUGE_PAGES and hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)
    owner_t = type("_PinnedPages", (ctypes.c_uint8 * nbytes,), {})
    owner = owner_t.from_buffer(mm)
    addr = ctypes.addressof(owner)
    flat = torch.frombuffer(owner, dtype=torch.uint8)
    flat.fill_(0)  # fault the pages in on torch's threads: cudaHostRegister would fault them on one
    err = torch.cuda.cudart().cudaHostRegister(addr, nbytes, 1)  # cudaHostRegisterPortable: every device
    err = int(getattr(err, "value", err))
    if err != 0:
        _clear_error()
        global _WARNED
        if not _WARNED:
            _WARNED = True
            log.warning("cudaHostRegister of %d bytes failed (error %s): host buffers come from torch's pinned "
                        "allocator", nbytes, err)
        del flat, owner
        mm.close()
        return None
    weakref.finalize(owner, _release, mm, addr)
    return flat


def pinned_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (zero-filled when registered) contiguous host tensor in page-locked memory."""
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= MIN_BYTES and torch.cuda.is_available():
        flat = _registered(nbytes)
        if flat is not None:
            return flat.view(dtype).view(shape)
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def host_copies(tensors) -> list[torch.Tensor]:
    """Contiguous host copies of ``tensors``: from an accelerator into page-locked buffers (``pinned_empty``), all
    queued asynchronously, then each device's current stream synchronised once; host tensors are cloned."""
    out, devices = [], set()
    for t in tensors:
        if t.is_cuda:
            h = pinned_empty(t.shape, t.dtype)
            h.copy_(t.detach(), non_blocking=True)
            devices.add(t.device)
        else:
            h = t.detach().clone(memory_format=torch.contiguous_format)
        out.append(h)
    for device in devices:
        torch.cuda.current_stream(device).synchronize()
    return out
