"""Vertical-slash sparse prefill (MInference-style): per head, the key columns and diagonals that carry
the attention mass of the last queries.

Based on MInference 1.0 (Jiang et al., arXiv 2407.02490), as evaluated in SCBench (arXiv 2412.10319).
For each layer and query head: score the last ``last_q`` queries against every key (causal softmax),
sum the probabilities per key column (vertical lines) and per diagonal (slash lines), keep the top
``vertical_size`` columns and ``slash_size`` diagonals (the first ``init_cols`` columns and the nearest
``local_diags`` diagonals always kept, inside the budgets), then compute attention on those lines only.
Only the prefill is sparse: decoding stays dense over the full O(n) KV cache (KV memory unchanged).
With ``head_patterns`` (a file written by scripts/search_sparse_patterns.py), each head runs the kind an offline
search chose for it, A-shape or vertical-slash, as MInference's offline per-head pattern search does.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from scbench.kernels import pattern as pat
from scbench.methods.base import positive_int
from scbench.records import Cost
from scbench.methods.sparse_prefill import MIN_FLEX_QUERIES, SparsePrefill

DENSE_ABOVE = float(os.environ.get("SCBENCH_VS_DENSE_ABOVE", "0.3"))
"""GPU: a layer whose estimated pattern touches more than this share of the causal key blocks runs dense SDPA
instead (FlexAttention's masked blocks cost several dense blocks each: on an H200 at 128K a block density of 1.0
took 5.3x dense SDPA, the structured pattern 0.25x). ``SCBENCH_VS_DENSE_ABOVE=2`` never falls back."""


def line_scores(q: torch.Tensor, k: torch.Tensor, scale: float, last_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mass of the last queries per key column and per diagonal.

    q: [Hq, Tq, D]; k: [Hkv, Tk, D] -> (vertical [Hq, Tk], slash [Hq, Tk]) in float32, where slash[:, d]
    sums the probabilities of cells with position(query) - key = d. Scores are taken against the keys in
    reverse order, padded with n masked keys, so that every diagonal is a column of one strided view.
    """
    hq, tq = q.shape[0], q.shape[1]
    hkv, tk = k.shape[0], k.shape[1]
    n = min(last_q, tq)
    qs = q[:, tq - n :].reshape(hkv, hq // hkv * n, -1)  # query heads of one KV head side by side
    kf = F.pad(k.flip(-2), (0, 0, 0, n))  # [Hkv, Tk + n, D]: key Tk-1-m at m, then n padding keys
    s = (qs @ kf.transpose(-1, -2)).view(hq, n, tk + n)
    s[:, :, tk:] = float("-inf")
    m = torch.arange(n, device=q.device)
    s[:, :, :n].masked_fill_(m[None, :] < (n - 1 - m)[:, None], float("-inf"))  # row r sees m >= n-1-r
    a = torch.softmax(s.float().mul_(scale), -1)
    vertical = a[:, :, :tk].sum(1).flip(-1)
    # row r (position tk-n+r) holds diagonal d at m = d + n-1-r: flat index r*(tk+n-1) + d + n-1
    slash = a.as_strided((hq, n, tk), (n * (tk + n), tk + n - 1, 1), a.storage_offset() + n - 1).sum(1)
    return vertical, slash


SPARSE_LENGTHS: set[int] = set()
"""Query lengths this process ran vertical-slash's FlexAttention calls at. FlexAttention compiles at a first length and
once more, with dynamic shapes, at a second; the engine's warm-up feeds two dummy prompts, but on them every layer may
fall back to dense (random tokens: no structure), which would leave both compiles to the first structured layer of a
timed prefill. So until two lengths are in, a fallback layer also runs the sparse calls (result discarded)."""


HEAD_KINDS = ("ashape", "vertical_slash")
"""Kinds a head can run (the search also measures MInference's block-sparse kind, which this method cannot run)."""


def load_head_patterns(path: str) -> dict:
    """Read and check a per-head pattern file: {"layers": [[kind per query head] per layer],
    "ashape": {"n_init": int, "n_local": int}, ...}; adds "sha256" of the file."""
    f = Path(path)
    if not f.is_file():
        raise ValueError(f"VerticalSlash.head_patterns: no file {path!r} "
                         "(write one with scripts/search_sparse_patterns.py)")
    raw = f.read_bytes()
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"VerticalSlash.head_patterns: {path} is not JSON ({e})") from None
    layers, band = d.get("layers"), d.get("ashape")
    if not isinstance(layers, list) or not layers or not all(isinstance(r, list) and r for r in layers):
        raise ValueError(f"VerticalSlash.head_patterns: {path} key 'layers' must be a non-empty list of head lists")
    bad = sorted({k for r in layers for k in r if k not in HEAD_KINDS}, key=str)
    if bad:
        raise ValueError(f"VerticalSlash.head_patterns: {path} has kinds {bad}; expected one of {list(HEAD_KINDS)}")
    if not isinstance(band, dict) or not all(isinstance(band.get(k), int) and band[k] >= m
                                              for k, m in (("n_init", 0), ("n_local", 1))):
        raise ValueError(f"VerticalSlash.head_patterns: {path} key 'ashape' must be {{'n_init': int >= 0, "
                         f"'n_local': int >= 1}}, got {band!r}")
    return {**d, "sha256": hashlib.sha256(raw).hexdigest()}


@dataclass
class VerticalSlash(SparsePrefill):
    """Per-head vertical (key column) + slash (diagonal) pattern estimated from the last queries."""

    vertical_size: int = 1000
    """Key columns kept per head (MInference's Llama-3 setting)."""
    slash_size: int = 6096
    """Diagonals kept per head (MInference's Llama-3 setting)."""
    last_q: int = 64
    """Last queries whose attention estimates the pattern."""
    init_cols: int = 30
    """Leading columns always kept (counted in vertical_size)."""
    local_diags: int = 100
    """Nearest diagonals always kept, the main one included (counted in slash_size)."""
    head_patterns: str | None = None
    """Per-head kinds from an offline search (a JSON file, see ``load_head_patterns``); None: every head
    vertical-slash."""

    name: ClassVar[str] = "vertical_slash"
    costs: ClassVar[dict[str, Cost]] = {
        "prefill_fallbacks": Cost("layers", "vertical-slash on a GPU: layers whose estimated pattern was too dense for "
                                  "the sparse kernel to win and ran dense SDPA (their cells count in `attn_density`)",
                                  default=0, label="dense fallbacks", agg="sum"),
    }
    approximation: ClassVar[str | None] = (
        "MInference-style: one vertical-and-slash budget for every head, or with head_patterns a per-head choice "
        "of A-shape / vertical-slash searched offline (MInference's block-sparse kind is not run); exact line masks "
        "(MInference's kernel computes 64-wide slash blocks)"
    )

    @classmethod
    def budget_label(cls, knobs: dict) -> str:
        """``<vertical_size>v+<slash_size>s``."""
        if "vertical_size" in knobs:
            return f"{knobs['vertical_size']}v+{knobs.get('slash_size')}s"
        return super().budget_label(knobs)

    def __post_init__(self) -> None:
        for f in ("vertical_size", "slash_size", "last_q", "local_diags"):
            positive_int(self, f, minimum=1)
        positive_int(self, "init_cols", minimum=0)
        if self.init_cols > self.vertical_size or self.local_diags > self.slash_size:
            raise ValueError("VerticalSlash: init_cols must be <= vertical_size and local_diags <= slash_size")
        self._heads = load_head_patterns(self.head_patterns) if self.head_patterns is not None else None

    def describe(self) -> dict:
        d = super().describe()
        if self._heads is not None:
            d["head_patterns_sha256"] = self._heads["sha256"]
        return d

    def band_heads(self, layer_idx: int, heads: int) -> list[int]:
        """Query heads of this layer that run A-shape (from ``head_patterns``; none without it)."""
        if self._heads is None:
            return []
        layers = self._heads["layers"]
        if layer_idx >= len(layers) or len(layers[layer_idx]) != heads:
            got = len(layers[layer_idx]) if layer_idx < len(layers) else "no"
            raise ValueError(f"VerticalSlash.head_patterns: {self.head_patterns} has {len(layers)} layers and {got} "
                             f"heads for layer {layer_idx}; the model has {heads} query heads there (another model?)")
        return [h for h, kind in enumerate(layers[layer_idx]) if kind == "ashape"]

    def prefill_attention(self, layer_idx, q, k, v, scale):
        """GPU: estimate the pattern, then run it through FlexAttention, or dense SDPA for the layer when its
        block density is above ``DENSE_ABOVE`` (counted: ``fallbacks`` / ``density_sum`` / ``layers_seen``)."""
        if not (q.is_cuda and q.shape[0] == 1 and q.shape[-2] >= MIN_FLEX_QUERIES):
            return super().prefill_attention(layer_idx, q, k, v, scale)
        from scbench.engines import attention
        from scbench.kernels import flex

        p = self.pattern(layer_idx, q, k, scale)
        bm = flex.block_mask(p.diagonals_only())
        density = flex.block_density(bm, p.tq, p.tk)
        st = self.__dict__.setdefault("gpu_stats", {"layers_seen": 0, "fallbacks": 0, "density_sum": 0.0})
        st["layers_seen"] += 1
        st["density_sum"] += density
        if density > DENSE_ABOVE:
            st["fallbacks"] += 1
            if len(SPARSE_LENGTHS) < 2 and p.tq not in SPARSE_LENGTHS:  # compile now, not in a later timed prefill
                SPARSE_LENGTHS.add(p.tq)
                flex.attention(q, k, v, p, scale, bm)
            return attention.causal_attention(q, k, v, scale)  # dense: counted as every cell
        SPARSE_LENGTHS.add(p.tq)
        attention.count_computed(p.computed_cells() * (q.shape[1] // p.heads))
        return flex.attention(q, k, v, p, scale, bm)

    def take_costs(self, session) -> dict:
        """Layers that fell back to dense SDPA since the last call (the runner calls it once per turn)."""
        st = self.__dict__.pop("gpu_stats", None)
        return {"prefill_fallbacks": st["fallbacks"]} if st else {}

    def pattern(self, layer_idx, q, k, scale):
        """q: [1, Hq, Tq, D]; k: [1, Hkv, Tk, D] -> per-head Pattern (P = Hq)."""
        from scbench.kernels import vs_lines
        from scbench.kernels.paged_decode import triton_on

        tq, tk = q.shape[-2], k.shape[-2]
        lines = vs_lines.line_scores_triton if triton_on(q) else line_scores
        vertical, slash = lines(q[0], k[0], scale if scale is not None else q.shape[-1] ** -0.5, self.last_q)
        vertical[:, : self.init_cols] = float("inf")
        slash[:, : self.local_diags] = float("inf")
        cols = torch.zeros_like(vertical, dtype=torch.bool)
        diags = torch.zeros_like(slash, dtype=torch.bool)
        cols.scatter_(-1, vertical.topk(min(self.vertical_size, tk), -1).indices, True)
        diags.scatter_(-1, slash.topk(min(self.slash_size, tk), -1).indices, True)
        band = self.band_heads(layer_idx, q.shape[1])
        if band:
            b = self._heads["ashape"]
            cols[band], diags[band] = False, False
            cols[band, : b["n_init"]], diags[band, : b["n_local"]] = True, True
        return pat.Pattern(tq, tk, cols, diags, scattered_cols=True)
