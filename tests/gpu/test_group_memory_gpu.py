"""Grouped sweeps' memory planning on CUDA: ``devices.peak_window`` measures a block's passing allocations and
leaves the process peak the runs record unchanged; ``group.room_for_run`` sizes by it. Needs CUDA."""
import pytest
import torch

from scbench.devices import peak_allocated, peak_window
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


def test_room_for_run_on_cuda():
    dev = torch.device("cuda", torch.cuda.current_device())

    class Shared:
        fork_bytes = GIB

    free = free_device_bytes(dev)
    assert room_for_run(Shared(), dev, [], 0)
    assert not room_for_run(Shared(), dev, [], free)  # a preparation as large as all free memory: no room
