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
