"""Grouped sweeps' memory planning on CUDA: ``devices.peak_window`` measures a block's passing allocations and
leaves the process peak the runs record unchanged; ``group.room_for_run`` sizes by it. Needs CUDA."""
import pytest
import torch

from scbench.devices import peak_allocated, peak_window, start_peak
from scbench.engines.fork import GIB, free_device_bytes
from scbench.group_example import room_for_run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
MIB = 1 << 20


def test_peak_window_on_cuda():
    dev = torch.device("cuda", torch.cuda.current_device())
    big = torch.empty(512 * MIB, dtype=torch.uint8, device=dev)
    del big
    before = peak_allocated(dev)
    kept = torch.empty(64 * MIB, dtype=torch.uint8, device=dev)
    with peak_window(dev) as w:
        passing = torch.empty(128 * MIB, dtype=torch.uint8, device=dev)
        kept2 = torch.empty(32 * MIB, dtype=torch.uint8, device=dev)
        del passing
    assert 160 * MIB <= w.extra < 170 * MIB  # the passing 128 MiB and the kept 32 MiB, not the earlier 64
    assert 128 * MIB <= w.passing < 136 * MIB
    assert peak_allocated(dev) >= before  # the 512 MiB peak before the window still counts
    del kept, kept2


def test_start_peak_on_cuda():
    """A run's start (``start_peak``) forgets an earlier run's peak, a peak window's included; later windows keep
    the run's own peak."""
    dev = torch.device("cuda", torch.cuda.current_device())
    base = torch.cuda.memory_allocated(dev)
    big = torch.empty(512 * MIB, dtype=torch.uint8, device=dev)
    with peak_window(dev):
        del big
    assert peak_allocated(dev) >= base + 512 * MIB
    start_peak([dev])
    assert peak_allocated(dev) < base + 8 * MIB
    mid = torch.empty(96 * MIB, dtype=torch.uint8, device=dev)
    del mid
    with peak_window(dev):
        pass
    assert base + 96 * MIB <= peak_allocated(dev) < base + 104 * MIB


def test_room_for_run_on_cuda():
    dev = torch.device("cuda", torch.cuda.current_device())

    class Shared:
        fork_bytes = GIB

    free = free_device_bytes(dev)
    assert room_for_run(Shared(), dev, [], 0)
    assert not room_for_run(Shared(), dev, [], free)  # a preparation as large as all free memory: no room
