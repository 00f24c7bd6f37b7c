"""PyramidKV: SnapKV scoring with per-layer budgets that shrink linearly from the bottom layer to the top.

Based on Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(arXiv 2406.02069), budget rule of the reference code (KVCache-Factory): with a prefix budget
p = capacity - window per layer, the top layer keeps p // beta prefix tokens, the bottom layer
2p - p // beta (clamped to the prefix length, the top then taking the rest), layer l in between on a
straight line; every layer also keeps the window. Prompts shorter than 2p get the same capacity in every
layer (SnapKV), as in the reference. Deliberate change: the step between layers is not floored
(the reference's ``(max - min) // (L - 1)`` overshoots the total by up to ~4% at 30 layers); each layer's
budget is rounded instead, so the total is L * capacity within L / 2 tokens, as in kvpress.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from scbench.methods.base import positive_int
from scbench.methods.token_scores import resolve_budget
from scbench.methods.snapkv import SnapKV


def layer_budgets(capacity: int, n: int, window: int, num_layers: int, beta: int) -> list[int]:
    """Tokens kept per layer (window included) for layers of n tokens and an average ``capacity``."""
    if capacity >= n:
        return [n] * num_layers
    if capacity <= window or num_layers == 1 or n < 2 * (capacity - window):
        return [capacity] * num_layers  # the reference's rule: no pyramid for short prompts
    p = capacity - window
    lo = p // beta
    hi = 2 * p - lo
    if hi >= n - window:
        hi = n - window
        lo = 2 * p - hi
    return [window + round(hi - layer * (hi - lo) / (num_layers - 1)) for layer in range(num_layers)]


@dataclass
class PyramidKV(SnapKV):
    """SnapKV with a pyramid of per-layer budgets (same total)."""

    beta: int = 20
    """Ratio of the bottom-layer prefix budget's excess to the top layer's: larger = steeper pyramid."""

    name: ClassVar[str] = "pyramidkv"
    approximation: ClassVar[str] = "per-layer budgets rounded on the line between bottom and top, not floored steps"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self, "beta")

    def capacity(self, layer_idx, n):
        if self._num_layers is None:
            raise RuntimeError("PyramidKV needs begin_compression(num_layers=...) before compress_cache")
        cap = resolve_budget(self.budget, self._seen or n)
        return layer_budgets(cap, n, self.window, self._num_layers, self.beta)[layer_idx]
