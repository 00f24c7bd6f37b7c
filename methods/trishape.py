"""Tri-shape sparse prefill: A-shape plus the last n_last query rows attending densely.

Based on SCBench (Li et al., arXiv 2412.10319, "Tri-shape"): the dense last rows let the query at the
end of the prompt read the whole context. The paper uses 64-128 rows, its reference code 100; the
default here is 64. Only the prefill is sparse: decoding stays dense over the full O(n) KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from scbench.methods.ashape import AShape
from scbench.methods.base import positive_int


@dataclass
class TriShape(AShape):
    """A-shape with the last ``n_last`` query rows of each prefill chunk dense."""

    n_last: int = 64
    """Dense query rows at the end of the chunk (reference code: 100)."""

    name: ClassVar[str] = "trishape"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self, "n_last", minimum=0)

    def dense_rows(self) -> int:
        return self.n_last

    @property
    def warmup_lengths(self) -> tuple[int, ...]:
        """From 2 x ``flex.SPLIT_SEGMENT`` keys the dense rows run as split-key FlexAttention calls (whole segments
        batched, then the causal tail), compiled for a first shape and again with dynamic shapes for a second: two
        warm-up prompts with 2 and 3 whole segments (never 1: a size-1 batch is specialised) and tails of
        different lengths, so no prompt length compiles inside a timed prefill."""
        from scbench.kernels.flex import SPLIT_SEGMENT

        return 2 * SPLIT_SEGMENT + self.n_last + 600, 3 * SPLIT_SEGMENT + self.n_last + 1100
