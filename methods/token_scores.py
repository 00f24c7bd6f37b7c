"""Token-scoring eviction: the base class owns budgets, top-k selection and the gather; a method is a score.

A subclass implements ``score`` (one number per cached token and KV head, higher = keep) and may reserve the
most recent tokens (``recent``) and vary the budget per layer (``capacity``). Every KV head keeps the same
number of tokens (its own top-k positions), so the kept keys/values are real, smaller dense tensors
[batch, kv_heads, kept, head_dim]; this is also what SnapKV does. Scores are computed for KV heads: a method
pools its query-head statistics over the query heads of each GQA group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from scbench.methods.base import Method


def check_budget(obj: object, field: str) -> None:
    """A budget is a token count (int >= 1) or a ratio of the context (float in (0, 1])."""
    value = getattr(obj, field)
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
        isinstance(value, float) and 0.0 < value <= 1.0
    )
    if not ok:
        raise ValueError(
            f"{type(obj).__name__}.{field} must be a token count (int >= 1) or a ratio of the context "
            f"(float in (0, 1]), got {value!r}"
        )


def resolve_budget(budget: int | float, context: int) -> int:
    """Tokens a budget allows for a context of ``context`` tokens: the count itself, or floor(ratio * context) >= 1."""
    return budget if isinstance(budget, int) else max(1, int(budget * context))


def select(scores: torch.Tensor, k: int, recent: int) -> torch.Tensor:
    """Positions to keep: the last ``recent`` tokens plus the top ``k - recent`` scores among the others.

    scores: [B, H, n] -> sorted indices [B, H, k] (k <= n, recent <= k).
    """
    n = scores.shape[-1]
    tail = torch.arange(n - recent, n, device=scores.device).expand(*scores.shape[:-1], recent)
    if k == recent:
        return tail.contiguous()
    top = scores[..., : n - recent].topk(k - recent, dim=-1).indices
    return torch.cat([top.sort(dim=-1).values, tail], dim=-1)


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: [B, H, n, D], idx: [B, H, k] -> new contiguous [B, H, k, D]."""
    return x.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def group_queries(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, w, D] -> [B, kv_heads, Hq / kv_heads, w, D]: query head h belongs to KV head h // group (GQA)."""
    b, hq, w, d = queries.shape
    if hq % kv_heads:
        raise ValueError(f"{hq} query heads do not split into {kv_heads} KV groups")
    return queries.view(b, kv_heads, hq // kv_heads, w, d)


@dataclass
class TokenScorer(Method):
    """Keep, per layer and KV head, the ``capacity`` best-scoring tokens (recent ones reserved)."""

    budget: int | float = 4096
    """Tokens kept per layer and head: a count, or a ratio of the tokens seen so far (tau, e.g. 1/32 = 0.03125)."""

    stages: ClassVar[tuple[str, ...]] = ("compression",)

    def __post_init__(self) -> None:
        check_budget(self, "budget")
        self._seen: int | None = None
        self._num_layers: int | None = None

    def begin_compression(self, *, num_layers: int, seen_tokens: int) -> None:
        self._num_layers, self._seen = num_layers, seen_tokens

    # --- what a subclass provides ---------------------------------------------------------------
    def score(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor:
        """keys, values: [B, Hkv, n, D]; queries: [B, Hq, w, D] or None -> scores [B, Hkv, n] (the last
        ``recent`` entries are ignored)."""
        raise NotImplementedError

    def recent(self, capacity: int, queries: torch.Tensor | None) -> int:
        """Most recent tokens always kept (before clamping to the capacity)."""
        return 0

    def capacity(self, layer_idx: int, n: int) -> int:
        """Tokens layer ``layer_idx`` keeps out of its ``n`` cached tokens."""
        return resolve_budget(self.budget, self._seen or n)

    def promises(self, *, context_tokens, **_):
        """Mean kept tokens per layer = the budget (PyramidKV: the same mean); a budget >= the context is flagged."""
        return {"kept_tokens": ("eq", resolve_budget(self.budget, context_tokens))}

    # --- the shared part ------------------------------------------------------------------------
    def keep_indices(self, layer_idx, keys, values, queries) -> torch.Tensor | None:
        """Sorted positions kept per KV head [B, Hkv, k], or None when the layer is within its budget."""
        n = keys.shape[-2]
        k = min(n, self.capacity(layer_idx, n))
        if k >= n:
            return None
        recent = min(k, self.recent(k, queries))
        if recent >= k:
            scores = keys.new_zeros(keys.shape[:-1])
        else:  # a grouped sweep's runs with equal score keys score once (Method.shared_scores)
            scores = self.shared_scores(layer_idx, lambda: self.score(layer_idx, keys, values, queries))[0]
        return select(scores, k, recent)

    def compress_cache(self, layer_idx, keys, values, queries):
        """keys, values: [B, Hkv, n, D] -> [B, Hkv, k, D] with k = min(n, capacity)."""
        idx = self.keep_indices(layer_idx, keys, values, queries)
        if idx is None:
            return keys, values
        return gather(keys, idx), gather(values, idx)


def recency_scores(keys: torch.Tensor) -> torch.Tensor:
    """Fallback when no prompt queries were captured (a one-token feed): prefer the most recent tokens."""
    n = keys.shape[-2]
    return torch.arange(n, dtype=torch.float32, device=keys.device).expand(*keys.shape[:-2], n)
