"""Base of the sparse-prefill methods (A-shape, Tri-shape, vertical-slash): one ``pattern`` hook each.

The base owns the rest of ``prefill_attention``: it runs the pattern through FlexAttention on a GPU
(``scbench.kernels.flex``) or through the chunked reference on the CPU (``scbench.kernels.pattern``), and
reports the cells it computed so the engine can record the turn's attention density. Only the prefill is
sparse: decoding stays dense over the full O(n) KV cache, so KV memory equals full attention's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from scbench.engines import attention
from scbench.kernels import pattern as pat
from scbench.methods.base import Method

MIN_FLEX_QUERIES = 128
"""Shorter chunks (follow-up turns under sparse_prefill=every) take the chunked path, also on a GPU."""


def use_flex(q: torch.Tensor, tq: int) -> bool:
    """Whether a pattern over ``tq`` query rows runs through FlexAttention: on a GPU, for enough rows."""
    return q.is_cuda and tq >= MIN_FLEX_QUERIES


@dataclass
class SparsePrefill(Method):
    """Subclasses implement ``pattern``; the KV cache is never touched."""

    stages: ClassVar[tuple[str, ...]] = ("generation",)
    dense_prefill: ClassVar[bool] = False
    decoding: ClassVar[str] = "dense over the full KV cache (sparse prefill only; KV memory = full attention)"

    def pattern(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> pat.Pattern:
        """The chunk's pattern. q: [1, Hq, Tq, D]; k: [1, Hkv, Tk, D] (one batch row)."""
        raise NotImplementedError

    def block_mask(self, pattern: pat.Pattern):
        """A prebuilt BlockMask for the GPU path, or None to build one per call (override to cache)."""
        return None

    def promises(self, **_):
        return {"attn_density": ("lt", 1.0)}  # a mask that came out dense is flagged

    def prefill_attention(self, layer_idx, q, k, v, scale):
        """q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] -> [B, Hq, Tq, D] (bottom-right causal, GQA)."""
        outs, cells = [], 0
        for b in range(q.shape[0]):
            qb, kb, vb = q[b : b + 1], k[b : b + 1], v[b : b + 1]
            p = self.pattern(layer_idx, qb, kb, scale)
            cells += p.computed_cells() * (q.shape[1] // p.heads)
            if use_flex(q, p.tq):
                from scbench.kernels import flex

                outs.append(flex.attention(qb, kb, vb, p, scale, self.block_mask(p)))
            else:
                outs.append(pat.chunked_attention(qb, kb, vb, p, scale))
        attention.count_computed(cells)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def describe(self) -> dict:
        return {**super().describe(), "decoding": self.decoding}
