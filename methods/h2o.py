"""H2O: keep the heavy hitters (largest accumulated attention over the prompt) plus a recent window.

Based on Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
(arXiv 2306.14048). A token's score is the attention it received from every prompt query (causal, softmax in
float32, scale head_dim ** -0.5), summed over the queries and over the query heads of its KV group (GQA).
The score is computed from the post-RoPE prompt queries, in chunks of queries so no n x n matrix is ever held:
with every prompt query voting, during the prefill forward layer by layer (``scores_in_forward``: a layer's queries
are dropped once scored, instead of holding every layer's until the compression, 32 GiB at 131K on the 8B shape);
with ``obs_window``, at compression time from the captured queries. Approximations, recorded with each run:
eviction happens when the runner's compression policy fires (once after the prefill by default), not at every
decoding step as in the paper; with ``obs_window`` set, only the last ``obs_window`` prompt queries vote (None: all
of them, exact H2O prefill scores).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from scbench.methods.base import positive_int
from scbench.methods.token_scores import TokenScorer, group_queries, recency_scores

ALL_QUERIES = 1 << 62
"""``query_window`` asking the engine for every prompt query."""


def accumulated_attention(keys: torch.Tensor, queries: torch.Tensor, chunk_elems: int = 1 << 26) -> torch.Tensor:
    """Column sums of causal softmax attention for the last w positions, summed over each GQA group.

    keys: [B, Hkv, n, D]; queries: [B, Hq, w, D] (positions n - w ... n - 1) -> [B, Hkv, n] float32.
    Works on query chunks of at most ``chunk_elems`` attention weights.
    """
    b, h, n, d = keys.shape
    w = queries.shape[-2]
    q = group_queries(queries, h)
    g = q.shape[2]
    rows = max(1, chunk_elems // max(1, b * h * g * n))
    kf = keys.float()
    total = torch.zeros(b, h, n, dtype=torch.float32, device=keys.device)
    cols = torch.arange(n, device=keys.device)
    for s in range(0, w, rows):
        qc = q[:, :, :, s : s + rows].float()
        pos = torch.arange(n - w + s, n - w + s + qc.shape[-2], device=keys.device)
        logits = torch.einsum("bhgwd,bhnd->bhgwn", qc, kf) * d**-0.5
        logits.masked_fill_(cols > pos[:, None], float("-inf"))
        total += logits.softmax(-1).sum((2, 3))
    return total


@dataclass
class H2O(TokenScorer):
    """Heavy hitters by accumulated prompt attention + the most recent tokens."""

    budget: int | float = 4096
    """Tokens kept per layer and head (heavy + recent), or a ratio of the context."""
    recent_ratio: float = 0.5
    """Share of the budget given to the most recent tokens (the paper splits it evenly)."""
    obs_window: int | None = None
    """Prompt queries whose attention accumulates (the last ones); None: every prompt query."""

    name: ClassVar[str] = "h2o"
    query_lse: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.recent_ratio, (int, float)) or not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"H2O.recent_ratio must be in [0, 1], got {self.recent_ratio!r}")
        if self.obs_window is not None:
            positive_int(self, "obs_window")

    @property
    def approximation(self) -> str:  # recorded next to every score
        votes = "all prompt queries" if self.obs_window is None else f"the last {self.obs_window} prompt queries"
        return f"evicts when compression fires (not every decode step); scores from {votes}"

    @property
    def query_window(self) -> int:
        return self.obs_window or ALL_QUERIES

    def recent(self, capacity, queries):
        return int(capacity * self.recent_ratio)

    def score_key(self):
        """The prompt queries' accumulated attention: the same at every budget and recent ratio."""
        return ("H2O.score", self.obs_window) if type(self).score is H2O.score else None

    def scores_in_forward(self) -> bool:
        """Every prompt query votes (``obs_window`` None) and ``score`` is H2O's: the scores are summed in the
        forward (``SCBENCH_SCORE_IN_FORWARD=0``: the queries are kept until the compression, as before)."""
        return (self.obs_window is None and type(self).score is H2O.score
                and os.environ.get("SCBENCH_SCORE_IN_FORWARD", "1") != "0")

    def forward_scores(self, layer_idx, keys, queries):
        """One forward's queries' share of the scores: ``score`` over the layer's keys as they stand."""
        return self.score(layer_idx, keys, None, queries)

    def score(self, layer_idx, keys, values, queries):
        """keys: [B, Hkv, n, D]; queries: [B, Hq, w, D] -> [B, Hkv, n]. On CUDA: the blockwise Triton kernels
        (scbench/kernels/h2o_scores.py, never the attention matrix; the first prefill's log-sum-exps come from its
        dense forward); elsewhere the chunked torch reference."""
        if queries is None:
            return recency_scores(keys)
        pre = getattr(queries, "scbench_scores", None)  # summed in the forward (scores_in_forward)
        if pre is not None:
            if pre.shape != keys.shape[:-1]:
                raise RuntimeError(f"H2O layer {layer_idx}: scores from the forward {tuple(pre.shape)} do not fit "
                                   f"its keys {tuple(keys.shape)}")
            return pre
        from scbench.kernels import h2o_scores

        if keys.is_cuda and h2o_scores.triton is not None and h2o_scores.ENABLED:
            lse, n = getattr(queries, "scbench_lse", (None, None))  # the dense forward's (one pass fewer)
            ok = lse is not None and n == keys.shape[-2] and lse.shape == queries.shape[:3]
            return h2o_scores.accumulated_attention_triton(keys, queries, lse=lse if ok else None)
        return accumulated_attention(keys, queries)
