"""StreamingLLM: keep the attention sinks and a recent window, evict the middle.

Based on Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (arXiv 2309.17453),
with SCBench's settings (128 sink tokens + 3,968 local tokens). Eviction runs when the runner's
compression policy fires (once after the first prefill by default, as the SCBench reference does);
tokens appended later are kept uncompressed until the next firing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from scbench.methods.base import Method, positive_int


@dataclass
class StreamingLLM(Method):
    """Sink + recent-window eviction of the KV cache."""

    n_init: int = 128
    """Tokens kept at the start of the cache (attention sinks)."""
    n_local: int = 3968
    """Most recent tokens kept."""

    name: ClassVar[str] = "streamingllm"
    stages: ClassVar[tuple[str, ...]] = ("compression",)

    @classmethod
    def budget_label(cls, knobs: dict) -> str:
        """``<n_init>+<n_local>``: sink and local tokens."""
        if "n_init" in knobs and "n_local" in knobs:
            return f"{knobs['n_init']}+{knobs['n_local']}"
        return super().budget_label(knobs)

    def __post_init__(self) -> None:
        positive_int(self, "n_init", minimum=0)
        positive_int(self, "n_local", minimum=1)

    @property
    def budget(self) -> int:
        return self.n_init + self.n_local

    def compress_cache(self, layer_idx, keys, values, queries):
        """keys, values: [batch, kv_heads, tokens, head_dim] -> at most n_init + n_local tokens."""
        n = keys.shape[-2]
        if n <= self.budget:
            return keys, values
        keep = torch.cat([torch.arange(self.n_init), torch.arange(n - self.n_local, n)]).to(keys.device)
        return keys.index_select(-2, keep), values.index_select(-2, keep)
