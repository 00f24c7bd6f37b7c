"""A-shape sparse prefill: every query sees the first n_init tokens and the n_local most recent ones.

Based on SCBench (Li et al., arXiv 2412.10319), which evaluates the StreamingLLM pattern
(Xiao et al., arXiv 2309.17453) as a prefill-only sparse attention: 128 sink + 3,968 local tokens.
Only the prefill is sparse: decoding stays dense over the full O(n) KV cache (KV memory unchanged).
Which prefills are sparse is the runner's ``policy.sparse_prefill`` (first, as the reference, or every).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

from scbench.kernels import pattern as pat
from scbench.methods.base import positive_int
from scbench.methods.sparse_prefill import SparsePrefill


@functools.lru_cache(maxsize=4)
def _band_block_mask(tq, tk, n_init, n_local, n_last, device):
    from scbench.kernels import flex

    return flex.block_mask(pat.band(tq, tk, n_init, n_local, n_last, device))


@dataclass
class AShape(SparsePrefill):
    """Sink columns + local band; the same pattern for every layer and head."""

    n_init: int = 128
    """Leading tokens every query attends to (attention sinks)."""
    n_local: int = 3968
    """Nearest tokens every query attends to, itself included."""

    name: ClassVar[str] = "ashape"

    @classmethod
    def budget_label(cls, knobs: dict) -> str:
        """``<n_init>+<n_local>``: sink and local tokens."""
        if "n_init" in knobs and "n_local" in knobs:
            return f"{knobs['n_init']}+{knobs['n_local']}"
        return super().budget_label(knobs)

    def __post_init__(self) -> None:
        positive_int(self, "n_init", minimum=0)
        positive_int(self, "n_local", minimum=1)

    def dense_rows(self) -> int:
        """Dense query rows at the end of each chunk (0 here; Tri-shape's n_last)."""
        return 0

    def pattern(self, layer_idx, q, k, scale):
        return pat.band(q.shape[-2], k.shape[-2], self.n_init, self.n_local, self.dense_rows(), q.device)

    def block_mask(self, p):
        """Built once per chunk shape and shared by every layer."""
        return _band_block_mask(p.tq, p.tk, self.n_init, self.n_local, self.dense_rows(), p.cols.device)
