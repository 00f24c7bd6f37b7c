"""Per-head budget allocation (AdaKV, KVzip's pair-level selection): one pool of kept tokens shared by many heads.

Heads are given as a list of score vectors of possibly different lengths (a ragged layer, or several layers for
KVzip's model-wide selection). ``allocate`` keeps the ``total`` best-scoring entries over all of them together,
after guaranteeing each head its own ``floor`` best ones (AdaKV's safeguard); ``reference_allocate`` is the plain
sort-and-walk version the tests compare it with.
"""
from __future__ import annotations

import torch


def allocate(scores: list[torch.Tensor], total: int, floor: int = 0) -> list[torch.Tensor]:
    """Positions kept per head (sorted, int64): each head's top ``min(floor, n_h)`` plus the best of the rest so
    that ``min(total, sum n_h)`` are kept in all. scores: one float [n_h] per head (n_h may be 0)."""
    sizes = [int(s.shape[0]) for s in scores]
    flat = torch.cat([s.float() for s in scores]) if scores else torch.zeros(0)
    total = min(int(total), flat.shape[0])
    if floor > 0:  # the safeguard: each head's own top entries go first
        flat = flat.clone()
        start = 0
        for s, n in zip(scores, sizes):
            k = min(floor, n)
            if k:
                flat[start + s.float().topk(k).indices] = float("inf")
            start += n
    keep = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
    keep[flat.topk(total).indices] = True
    return [part.nonzero().flatten() for part in keep.split(sizes)]


def reference_allocate(scores: list[torch.Tensor], total: int, floor: int = 0) -> list[torch.Tensor]:
    """Plain version: walk the (head, position) entries from the best score down (safeguarded ones first)."""
    entries = []
    for h, s in enumerate(scores):
        order = sorted(range(len(s)), key=lambda i: -float(s[i]))
        guarded = set(order[:floor])
        entries += [(i not in guarded, -float(s[i]), h, i) for i in range(len(s))]
    entries.sort()
    kept: list[list[int]] = [[] for _ in scores]
    for _, _, h, i in entries[: min(total, len(entries))]:
        kept[h].append(i)
    return [torch.tensor(sorted(k), dtype=torch.long) for k in kept]
