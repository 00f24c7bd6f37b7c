"""Device helpers every layer uses."""
from __future__ import annotations

import torch


def sync(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously), so wall-clock timings include it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
