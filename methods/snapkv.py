"""SnapKV: keep the prefix tokens the last prompt queries attend to most, plus the observation window.

Based on Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (arXiv 2404.14469), with
SCBench's settings (capacity 4,096 tokens including a 32-token observation window, average pooling with
kernel 5). The window's post-RoPE queries attend (causally, softmax in float32) over the whole layer; the
weights on the prefix are averaged over the window (same ranking as the paper's sum), smoothed with a
1-D average pool (zero padding counted, as in the reference), and averaged over the query heads of each
KV group (GQA). Each KV head keeps its own top positions, all heads the same count. The softmax scale is
head_dim ** -0.5 (Llama-family attention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from scbench.methods.base import positive_int
from scbench.methods.token_scores import TokenScorer, group_queries, recency_scores


def window_attention(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of the last w positions over all n keys.

    keys: [B, Hkv, n, D]; queries: [B, Hq, w, D], the queries of positions n - w ... n - 1
    -> weights [B, Hkv, Hq / Hkv, w, n] in float32.
    """
    n, d = keys.shape[-2], keys.shape[-1]
    w = queries.shape[-2]
    q = group_queries(queries, keys.shape[1]).float()
    logits = torch.einsum("bhgwd,bhnd->bhgwn", q, keys.float()) * d**-0.5
    future = torch.ones(w, n, dtype=torch.bool, device=keys.device).triu(n - w + 1)
    return logits.masked_fill_(future, float("-inf")).softmax(-1)


@dataclass
class SnapKV(TokenScorer):
    """Observation-window attention scores, pooled, top-k per KV head."""

    budget: int | float = 4096
    """Tokens kept per layer and head including the window, or a ratio of the context (e.g. 0.03125)."""
    window: int = 32
    """Observation window: the last prompt tokens whose queries vote; always kept."""
    kernel: int = 5
    """Average-pool kernel over token positions (odd)."""

    name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self, "window")
        positive_int(self, "kernel")
        if self.kernel % 2 == 0:
            raise ValueError(f"{type(self).__name__}.kernel must be odd, got {self.kernel}")

    @property
    def query_window(self) -> int:  # the engine captures this many prompt queries per layer
        return self.window

    def recent(self, capacity, queries):
        return queries.shape[-2] if queries is not None else 0

    def score_key(self):
        """The window's votes pooled by ``kernel``: the same for SnapKV, PyramidKV and AdaKV at one window and kernel
        (their budgets differ only in what they keep); a subclass with its own ``score`` shares nothing."""
        return ("SnapKV.score", self.window, self.kernel) if type(self).score is SnapKV.score else None

    def score(self, layer_idx, keys, values, queries):
        """keys: [B, Hkv, n, D]; queries: [B, Hq, w, D] -> [B, Hkv, n] (window entries are 0, unused)."""
        if queries is None:
            return recency_scores(keys)
        b, h, n, _ = keys.shape
        w = queries.shape[-2]
        votes = window_attention(keys, queries)[..., : n - w].mean(-2)  # [B, Hkv, g, n - w]
        pooled = F.avg_pool1d(votes.flatten(0, 2).unsqueeze(1), self.kernel, stride=1, padding=self.kernel // 2)
        scores = pooled.view(b, h, -1, n - w).mean(2)
        return F.pad(scores, (0, w))
