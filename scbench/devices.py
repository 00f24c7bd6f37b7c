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
"""Device -> the peak allocated bytes since ``start_peak`` (or the process start) before the last ``peak_window``
reset torch's counter."""


def peak_allocated(device: torch.device | str) -> int:
    """Peak allocated bytes on a CUDA device since the last ``start_peak`` for it, else since the process started
    (``torch.cuda.max_memory_allocated``, counting the peaks that ``peak_window`` reset)."""
    device = torch.device(device)
    return max(_PEAK_FLOOR.get(str(device), 0), int(torch.cuda.max_memory_allocated(device)))


def peak_rss(pid: int | None = None) -> int | None:
    """Peak resident set size (``VmHWM``) of a process (this one by default) in bytes: since it started or since the
    last ``reset_peak_rss``. None when ``/proc`` cannot be read (not Linux)."""
    try:
        for line in open(f"/proc/{pid or 'self'}/status").read().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def reset_peak_rss(pid: int | None = None) -> bool:
    """Restart a process's ``VmHWM`` at its current resident size (Linux: "5" written to ``/proc/<pid>/clear_refs``);
    False where that is refused or missing (the peak then stays the process's lifetime peak)."""
    try:
        with open(f"/proc/{pid or 'self'}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def start_peak(devices=(), pids=(None,)) -> None:
    """Start a new peak-memory epoch: from here ``peak_allocated`` on each CUDA device of ``devices`` and
    ``peak_rss`` of each process in ``pids`` (None: this one) count only what is allocated or resident from now on.
    A run calls it before its first turn, so the peak it records is its own, not an earlier run's in the same
    process (a sweep's runs share one process and its model)."""
    for device in devices:
        device = torch.device(device)
        if device.type == "cuda":
            _PEAK_FLOOR[str(device)] = 0
            torch.cuda.reset_peak_memory_stats(device)
    for pid in pids:
        reset_peak_rss(pid)


class peak_window:
    """``with peak_window(device) as w: ...`` then ``w.extra``: the most bytes allocated on a CUDA device inside the
    block beyond what was allocated when it began, and ``w.passing``: the most beyond what is allocated when it ends
    (the block's passing work, without what it keeps); 0 elsewhere. Resets torch's peak counter and keeps the
    peak so far for ``peak_allocated``, so the peak memory the runs record is unchanged."""

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
