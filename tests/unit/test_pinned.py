"""scbench.kv.pinned: exact-size page-locked buffers; their registration lifecycle is checked on CPU with a
recording stand-in for the CUDA runtime (tests/gpu/test_retrieval_host_gpu.py runs the real one)."""
from __future__ import annotations

import gc

import pytest
import torch

from scbench.kv import pinned


class FakeCudart:
    def __init__(self, fail: bool = False):
        self.fail = fail
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []
        self.cleared = 0
        self.synced: list[int] = []

    def cudaHostRegister(self, addr, nbytes, flags):  # noqa: N802 - the runtime's name
        if self.fail:
            return 2
        self.registered[addr] = nbytes
        return 0

    def cudaHostUnregister(self, addr):  # noqa: N802
        assert self.synced, "pages unregistered before the devices were synchronised"
        self.unregistered.append(addr)
        return 0

    def cudaGetLastError(self):  # noqa: N802
        self.cleared += 1
        return 0


@pytest.fixture
def fake(monkeypatch):
    rt = FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: rt)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda i=None: rt.synced.append(i))
    return rt


def test_exact_size_registered_then_released_after_the_last_view(fake):
    shape = (1, 3, 5000, 640)  # 19.2 MB of bfloat16: above MIN_BYTES
    t = pinned.pinned_empty(shape, torch.bfloat16)
    assert t.shape == shape and t.dtype == torch.bfloat16 and t.is_contiguous()
    (addr, nbytes), = fake.registered.items()
    assert addr == t.data_ptr() and nbytes == t.numel() * 2  # the exact size, no power-of-two rounding
    assert torch.count_nonzero(t.view(torch.uint8)) == 0  # pages faulted in (filled) before registering
    t[0, 1, 7] = 3.5
    view = t[..., 5:10, :]
    del t
    gc.collect()
    assert fake.unregistered == []  # a view still holds the pages
    assert view[0, 1, 2, 0].item() == 3.5
    del view
    gc.collect()
    assert fake.unregistered == [addr] and fake.synced == [0, 1]  # every device synchronised, then unregistered


def test_small_buffers_and_failed_registration_take_torchs_allocator(monkeypatch, fake):
    calls = []
    real_empty = torch.empty

    def fake_empty(*a, **kw):
        calls.append(kw.get("pin_memory", False))
        kw.pop("pin_memory", None)
        return real_empty(*a, **kw)

    monkeypatch.setattr(torch, "empty", fake_empty)
    small = pinned.pinned_empty((4, 1024), torch.float32)
    assert small.shape == (4, 1024) and calls[-1] is True and fake.registered == {}
    fake.fail = True
    big = pinned.pinned_empty((5 << 20,), torch.float32)
    assert big.numel() == 5 << 20 and calls[-1] is True and fake.registered == {}
    assert fake.cleared == 1  # the failed call's error does not surface at torch's next kernel launch
