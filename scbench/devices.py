"""Device helpers every layer uses."""
from __future__ import annotations

import torch


def sync(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously), so wall-clock timings include it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_cached_memory() -> None:
    """After a failed job (OOM above all), collect garbage and give cached accelerator memory back."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_PEAK_FLOOR: dict[str, int] = {}
"""Device -> the process's peak allocated bytes before the last ``peak_window`` reset torch's counter."""


def peak_allocated(device: torch.device | str) -> int:
    """The process's peak allocated bytes on a CUDA device since it started (``torch.cuda.max_memory_allocated``,
    counting the peaks that ``peak_window`` reset)."""
    device = torch.device(device)
    return max(_PEAK_FLOOR.get(str(device), 0), int(torch.cuda.max_memory_allocated(device)))


class peak_window:
    """``with peak_window(device) as w: ...`` then ``w.extra``: the most bytes allocated on a CUDA device inside the
    block beyond what was allocated when it began, and ``w.passing``: the most beyond what is allocated when it ends
    (the block's passing work, without what it keeps); 0 elsewhere. Resets torch's peak counter and keeps the
    process's peak for ``peak_allocated``, so the peak memory the runs record is unchanged."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.extra = self.passing = 0
        self._base = 0

    def __enter__(self):
        if self.device.type == "cuda":
            key = str(self.device)
            _PEAK_FLOOR[key] = peak_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = int(torch.cuda.memory_allocated(self.device))
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device))
            self.extra = max(0, peak - self._base)
            self.passing = max(0, peak - int(torch.cuda.memory_allocated(self.device)))
