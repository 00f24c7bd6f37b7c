"""DuoAttention: retrieval heads keep the full KV cache, streaming heads only attention sinks + recent tokens.

Based on Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads"
(arXiv 2410.10819). Each KV head has a gate value from an offline calibration (``scripts/calibrate_duo.py``, the
paper's optimisation: gates mixing full and streaming attention, trained to keep the last hidden states of a
retrieval answer, with an L1 push towards streaming) stored in a JSON file the config names (``heads``). The
``retrieval_ratio`` share of KV heads with the largest gates, over the whole model, are retrieval heads.
Prefill: retrieval heads attend densely, the query heads of a streaming KV head attend to the first ``n_init``
keys and the ``n_local`` nearest (A-shape). Compression (after the first prefill): streaming heads keep only those
``n_init + n_local`` tokens, stored ragged (``scbench.kv.ragged``): the bytes really shrink per head.
Approximation: tokens appended after a firing join every head (the paper's streaming heads evict as they decode);
``policy.compress=decode_every`` (or every_turn) trims them again. Ragged layers decode through the fast path's
ragged plugin (methods/ragged_fast.py) or the plain loop (the reference).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from scbench.kernels import pattern as pat
from scbench.kv.ragged import RaggedLayer
from scbench.methods.base import positive_int
from scbench.methods.sparse_prefill import SparsePrefill, use_flex


def load_gates(path: str) -> dict:
    """Read a calibration file: {"gates": [[gate per KV head] per layer], "n_init": int, "n_local": int, ...}."""
    f = Path(path)
    if not f.is_file():
        raise ValueError(f"DuoAttention.heads: no file {path!r} (write one with scripts/calibrate_duo.py)")
    raw = f.read_bytes()
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"DuoAttention.heads: {path} is not JSON ({e})") from None
    gates = d.get("gates")
    if not isinstance(gates, list) or not gates or not all(
            isinstance(r, list) and r and all(isinstance(x, (int, float)) for x in r) for r in gates):
        raise ValueError(f"DuoAttention.heads: {path} key 'gates' must be a non-empty list of per-layer gate lists")
    return {**d, "sha256": hashlib.sha256(raw).hexdigest()}


def retrieval_mask(gates: list[list[float]], ratio: float) -> torch.Tensor:
    """bool [L, Hkv]: the round(ratio x L x Hkv) heads with the largest gates (ties: the earlier head)."""
    g = torch.tensor(gates, dtype=torch.float64)
    k = round(ratio * g.numel())
    mask = torch.zeros(g.numel(), dtype=torch.bool)
    order = sorted(range(g.numel()), key=lambda i: (-float(g.view(-1)[i]), i))
    mask[order[:k]] = True
    return mask.view(g.shape)


@functools.lru_cache(maxsize=2)
def _band_lists(tq: int, tk: int, n_init: int, n_local: int, hq: int, device):
    """The A-shape band's block mask ([1, 1, ...], shared by every layer) and its block indices spread over ``hq``
    query heads (one copy per shape: every layer reuses them)."""
    from scbench.methods.ashape import _band_block_mask

    bm = _band_block_mask(tq, tk, n_init, n_local, 0, device)
    spread = [None if t is None else t.expand(-1, hq, *t.shape[2:]).contiguous()
              for t in (bm.kv_indices, bm.full_kv_indices)]
    return bm, spread


def _streaming_block_mask(tq: int, tk: int, n_init: int, n_local: int, streaming: torch.Tensor, device):
    """The band's block mask over every query head, no block listed for a head where ``streaming`` (bool [Hq]) is
    False: FlexAttention skips those heads' rows (they come out 0; the caller overwrites them)."""
    from scbench.kernels import flex

    bm, (ki, fi) = _band_lists(tq, tk, n_init, n_local, streaming.numel(), device)
    on = streaming.to(device=device, dtype=torch.int32)[None, :, None]
    kn = bm.kv_num_blocks * on
    fn = None if bm.full_kv_num_blocks is None else bm.full_kv_num_blocks * on
    return flex._from_kv_blocks(kn, ki, fn, fi, mask_mod=bm.mask_mod, seq_lengths=bm.seq_lengths)


@dataclass
class DuoAttention(SparsePrefill):
    """Full KV for retrieval heads, sink + recent KV (and A-shape prefill) for streaming heads."""

    heads: str = "results/perf/duo_heads_smollm2-135m.json"
    """Calibration file (gates per layer and KV head), from scripts/calibrate_duo.py."""
    retrieval_ratio: float = 0.5
    """Share of KV heads kept full (the paper's 1 - sparsity)."""
    n_init: int = 128
    """Attention-sink tokens a streaming head keeps."""
    n_local: int = 3968
    """Recent tokens a streaming head keeps."""

    name: ClassVar[str] = "duo_attention"
    stages: ClassVar[tuple[str, ...]] = ("generation", "compression")
    fast_decode: ClassVar[bool] = True
    """Batched decoding takes its ragged layers (scbench/kernels/ragged_shared.py); the static / CUDA-graph path takes
    them through ``static_decoder``."""
    decoding: ClassVar[str] = "retrieval heads over their full KV, streaming heads over sink + recent (ragged)"
    approximation: ClassVar[str] = (
        "tokens appended after compression join streaming heads too until the next firing (the paper evicts "
        "them while decoding); gates calibrated briefly on generated retrieval data (scripts/calibrate_duo.py)")

    def __post_init__(self) -> None:
        positive_int(self, "n_init", minimum=0)
        positive_int(self, "n_local", minimum=1)
        r = self.retrieval_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
            raise ValueError(f"DuoAttention.retrieval_ratio must be in [0, 1], got {r!r}")
        self._file = load_gates(self.heads)
        self._retrieval = retrieval_mask(self._file["gates"], float(r))

    @classmethod
    def budget_label(cls, knobs: dict) -> str:
        """``<n_init>+<n_local>``: what a streaming head keeps (retrieval heads keep everything)."""
        if "n_init" in knobs and "n_local" in knobs:
            return f"{knobs['n_init']}+{knobs['n_local']}"
        return super().budget_label(knobs)

    def describe(self) -> dict:
        return {**super().describe(), "heads_sha256": self._file["sha256"],
                "retrieval_heads": int(self._retrieval.sum()), "kv_heads_total": self._retrieval.numel()}

    def retrieval(self, layer_idx: int, kv_heads: int) -> torch.Tensor:
        """bool [kv_heads]: which KV heads of this layer keep their full cache."""
        if layer_idx >= self._retrieval.shape[0] or self._retrieval.shape[1] != kv_heads:
            raise ValueError(f"DuoAttention.heads: {self.heads} has {tuple(self._retrieval.shape)} layers x KV heads; "
                             f"the model has {kv_heads} KV heads at layer {layer_idx} (another model?)")
        return self._retrieval[layer_idx]

    def pattern(self, layer_idx, q, k, scale):
        """Per query head: every column (retrieval) or the A-shape band (streaming)."""
        tq, tk = q.shape[-2], k.shape[-2]
        full = self.retrieval(layer_idx, k.shape[1]).repeat_interleave(q.shape[1] // k.shape[1]).to(q.device)
        cols = torch.zeros(q.shape[1], tk, dtype=torch.bool, device=q.device)
        diags = torch.zeros_like(cols)
        cols[:, : self.n_init], diags[:, : self.n_local] = True, True
        cols[full] = True
        return pat.Pattern(tq, tk, cols, diags)

    def prefill_attention(self, layer_idx, q, k, v, scale):
        """q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] -> [B, Hq, Tq, D]. The heads split by kind: the retrieval heads'
        queries attend densely (``dense.causal_attention``: SDPA's fused kernels), the streaming heads' through the
        A-shape band (``pat.band``). On a GPU the band is one FlexAttention call over every query head whose block
        mask lists no block for the retrieval heads (``_streaming_block_mask``: the band's arithmetic cell test, the
        same shapes in every layer, so no compile per count of streaming heads), then the retrieval heads' rows are
        overwritten; on the CPU the streaming heads' chunked path. The retrieval heads' rows come from one SDPA per
        retrieval KV head (its ``rep`` query heads; views of q, k, v): one shape per length in every layer, where one
        call over each layer's gathered heads had a shape per count of retrieval heads, and cuDNN plans per shape
        (scripts/probe_duo_prefill.py, H200 32K: the first call at a new length 1.40 s over 32 layers vs 0.30 s per
        head, steady 0.24 s + 0.025 s of gathers vs 0.26 s). The same cells as ``pattern``'s per-head table,
        which ``prefill_attention_reference`` (the base class's path) runs whole: at 131K that table sent the dense
        half of the heads through FlexAttention's table-read masks too."""
        from scbench.engines import attention
        from scbench.kernels import dense

        hq, hkv, tq, tk = q.shape[1], k.shape[1], q.shape[-2], k.shape[-2]
        full = self.retrieval(layer_idx, hkv)
        rep = hq // hkv
        kv_r = full.nonzero().flatten().tolist()
        kv_s = (~full).nonzero().flatten().tolist()
        band = pat.band(tq, tk, self.n_init, self.n_local, 0, q.device)
        cells = len(kv_r) * rep * pat.causal_cells(tq, tk) + len(kv_s) * rep * band.computed_cells()
        attention.count_computed(cells * q.shape[0])

        def heads(kvs):
            qi = torch.tensor([h * rep + j for h in kvs for j in range(rep)], device=q.device)
            ki = torch.tensor(kvs, device=q.device)
            return qi, q.index_select(1, qi), k.index_select(1, ki), v.index_select(1, ki)

        if not kv_s:
            return dense.causal_attention(q, k, v, scale)
        if use_flex(q, tq):
            from scbench.kernels import flex

            out = flex.attention(q, k, v, band, scale, _streaming_block_mask(tq, tk, self.n_init, self.n_local,
                                                                             ~full.repeat_interleave(rep), q.device))
        else:  # the streaming heads alone (all heads: no gather) through the chunked path
            qi, qs, ks, vs = heads(kv_s) if kv_r else (None, q, k, v)
            o = torch.cat([pat.chunked_attention(qs[b : b + 1], ks[b : b + 1], vs[b : b + 1], band, scale)
                           for b in range(q.shape[0])])
            out = o if qi is None else torch.empty_like(q).index_copy_(1, qi, o)
        for h in kv_r:  # one SDPA per retrieval KV head: views, no gather, and one shape per length in every layer
            rows = slice(h * rep, (h + 1) * rep)
            out[:, rows] = dense.causal_attention(q[:, rows], k[:, h : h + 1], v[:, h : h + 1], scale)
        return out

    def prefill_attention_reference(self, layer_idx, q, k, v, scale):
        """The per-head pattern table through the sparse-prefill base path (``pattern``): the reference."""
        return super().prefill_attention(layer_idx, q, k, v, scale)

    def _keep(self, head_keys: list[torch.Tensor], layer_idx: int) -> list[torch.Tensor] | None:
        full = self.retrieval(layer_idx, len(head_keys))
        idx, cut = [], False
        for h, k in enumerate(head_keys):
            n = k.shape[0]
            if full[h] or n <= self.n_init + self.n_local:
                idx.append(torch.arange(n, device=k.device))
            else:
                cut = True
                idx.append(torch.cat([torch.arange(self.n_init), torch.arange(n - self.n_local, n)]).to(k.device))
        return idx if cut else None

    def static_decoder(self):
        """The captured-step decode plugin for ragged layers (methods/ragged_fast.py: prefixes read in place)."""
        from scbench.methods.ragged_fast import RaggedDecode

        return RaggedDecode(self)

    def compress_cache(self, layer_idx, keys, values, queries):
        """keys, values: [1, Hkv, n, D] -> a RaggedLayer (streaming heads cut to sink + recent) or the input."""
        idx = self._keep([keys[0, h] for h in range(keys.shape[1])], layer_idx)
        return (keys, values) if idx is None else RaggedLayer.from_indices(keys, values, idx)

    def compress_ragged(self, layer_idx, layer, queries):
        heads = [layer.head(h) for h in range(len(layer.lengths))]
        idx = self._keep([k for k, _ in heads], layer_idx)
        if idx is None:
            return layer
        return RaggedLayer([k[i] for (k, _), i in zip(heads, idx)], [v[i] for (_, v), i in zip(heads, idx)])
