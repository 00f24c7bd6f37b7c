"""Ragged KV cache layers: every KV head holds its own number of tokens, stored without padding.

Per-head budgets (AdaKV, KVzip's pair-level selection) and head-level hybrids (DuoAttention: full retrieval heads,
sink + recent streaming heads) keep different token counts per KV head. A ``RaggedLayer`` stores the compressed
part flat (``prefix_k`` [T, D] with T = sum of the per-head counts, head after head, batch 1) and the tokens
appended after the compression densely (``keys`` [1, H, t, D], every head gets them), so the bytes it holds are
exactly the kept tokens: nothing is padded or masked. Attention over it (``ragged_attention``) runs head by head
on the plain path (the fast static-cache decode does not take ragged layers: ``fastdecode.unsupported`` sends them
to the plain loop). ``reference_ragged_attention`` is the float64 yardstick (padded + masked, test-only).

A compression that fires again on a ragged layer goes head by head (``compress_heads``): the method's
``compress_cache`` sees one KV head at a time, with the query heads of its group.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from scbench.kernels.dense import causal_attention
from scbench.kv.cache import CacheLayer, SessionOnly


class RaggedLayer(SessionOnly, DynamicLayer, CacheLayer):
    """KV heads of different lengths: a flat compressed prefix per head + a dense appended suffix (batch 1)."""

    scbench_ragged = True
    """The engine's compression pass calls ``method.compress_ragged`` on it (a later firing)."""
    scbench_compresses_itself = False
    scbench_exact_crop = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        """keys, values: one [n_h, D] tensor per KV head (n_h may differ, n_h >= 1)."""
        super().__init__()
        if not keys or len(keys) != len(values):
            raise ValueError(f"RaggedLayer needs one key and one value tensor per head, got {len(keys)} / {len(values)}")
        for h, (k, v) in enumerate(zip(keys, values)):
            if k.dim() != 2 or k.shape != v.shape or k.shape[0] < 1:
                raise ValueError(f"RaggedLayer head {h}: keys {tuple(k.shape)} / values {tuple(v.shape)}, expected "
                                 "equal [n_h >= 1, head_dim]")
        self.lengths = [int(k.shape[0]) for k in keys]
        self.prefix_k = torch.cat(keys).contiguous()
        self.prefix_v = torch.cat(values).contiguous()
        d = self.prefix_k.shape[-1]
        self.dtype, self.device = self.prefix_k.dtype, self.prefix_k.device
        self.keys = self.prefix_k.new_empty(1, len(keys), 0, d)
        self.values = self.prefix_v.new_empty(1, len(keys), 0, d)
        self.is_initialized = True

    @classmethod
    def from_indices(cls, keys: torch.Tensor, values: torch.Tensor, idx: list[torch.Tensor]) -> "RaggedLayer":
        """keys, values: [1, H, n, D]; idx: per head the kept positions (sorted) -> the ragged layer."""
        if keys.shape[0] != 1:
            raise ValueError(f"RaggedLayer supports batch 1, got batch {keys.shape[0]}")
        return cls([keys[0, h, i] for h, i in enumerate(idx)], [values[0, h, i] for h, i in enumerate(idx)])

    # --- per-head views -------------------------------------------------------------------------
    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head h's whole keys and values [n_h + t, D] (compressed prefix, then the appended tokens)."""
        start = sum(self.lengths[:h])
        sl = slice(start, start + self.lengths[h])
        if self.keys.shape[-2] == 0:
            return self.prefix_k[sl], self.prefix_v[sl]
        return torch.cat([self.prefix_k[sl], self.keys[0, h]]), torch.cat([self.prefix_v[sl], self.values[0, h]])

    def head_lengths(self) -> list[int]:
        return [n + self.keys.shape[-2] for n in self.lengths]

    # --- cache-layer protocol -------------------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        """key_states, value_states: [1, H, t, D] -> the suffix, marked so ``scbench_attention`` attends per head."""
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.keys.scbench_ragged = self  # read by scbench.engines.attention.scbench_attention
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return max(self.lengths) + self.keys.shape[-2]

    def scbench_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.prefix_k, self.prefix_v, self.keys, self.values))

    def scbench_slow_nbytes(self) -> int:
        return 0

    def scbench_crop(self, n: int) -> None:
        """Drop the last ``get_seq_length() - n`` tokens of every head (suffix first, then each prefix's tail)."""
        drop = self.get_seq_length() - n
        t = self.keys.shape[-2]
        if drop <= t:
            self.keys, self.values = self.keys[..., : t - drop, :], self.values[..., : t - drop, :]
            return
        rest = drop - t
        if rest >= min(self.lengths):
            raise ValueError(f"RaggedLayer: cannot crop to {n} tokens, a head holds only {min(self.lengths)} + {t}")
        heads = [self.head(h) for h in range(len(self.lengths))]
        self.__init__([k[: k.shape[0] - t - rest] for k, _ in heads], [v[: v.shape[0] - t - rest] for _, v in heads])

    def scbench_snapshot(self) -> tuple:
        """References: nothing here is written in place (appends and crops make new tensors)."""
        return list(self.lengths), self.prefix_k, self.prefix_v, self.keys, self.values

    def scbench_restore(self, snap: tuple) -> None:
        lengths, self.prefix_k, self.prefix_v, self.keys, self.values = snap
        self.lengths = list(lengths)


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Queries aligned to the end of the keys. q: [1, g, Tq, D]; k, v: [1, 1, Tk, D]. The dense path's
    ``causal_attention``: on CUDA it keeps SDPA off cuDNN, which re-plans for every new (Tq, Tk) -- and every head
    of a ragged cache has its own Tk (a later turn's prefill took 8-11 s at 32K on an H200 with plain SDPA)."""
    return causal_attention(q, k, v, scale)


FEED_ROWS = 512
"""Query feeds of at most this many tokens over a ragged layer take the batched kernel on CUDA (``ragged_feed``)."""


def ragged_attention(q: torch.Tensor, layer: RaggedLayer, scale: float | None = None) -> torch.Tensor:
    """Causal attention of q over a ragged layer: on CUDA with Triton (a feed of at most ``FEED_ROWS`` tokens)
    ``ragged_feed``, else one KV head (and its query group) at a time.

    q: [1, Hq, Tq, D], the queries of the last Tq positions of every head -> [1, Hq, Tq, D].
    """
    if q.is_cuda and q.shape[-2] <= FEED_ROWS and layer.keys.shape[-2] >= q.shape[-2]:
        from scbench.kernels import ragged_shared

        if ragged_shared.triton is not None:
            return ragged_feed(q, layer, scale)
    hkv = len(layer.lengths)
    g = q.shape[1] // hkv
    outs = []
    for h in range(hkv):
        k, v = layer.head(h)
        outs.append(_causal(q[:, h * g : (h + 1) * g], k[None, None], v[None, None], scale))
    return torch.cat(outs, dim=1)


def ragged_feed(q: torch.Tensor, layer: RaggedLayer, scale: float | None = None) -> torch.Tensor:
    """``ragged_attention`` as one batched decode (scbench/kernels/ragged_shared.py): each of the Tq query tokens is a
    row that sees every head's whole prefix and the suffix up to itself (the feed's tokens are the suffix's last Tq
    rows), no own keys; each head's keys are read once per tile of query rows, two launches per layer instead of a
    concatenation and an attention call per head. Needs the queries in the suffix (``layer.update`` ran)."""
    from scbench.kernels import ragged_shared

    _, hq, tq, d = q.shape
    t = layer.keys.shape[-2]
    rq = ragged_shared.tiling(tq, hq // len(layer.lengths))[2]
    key = (tuple(layer.lengths), t, tq, q.device, q.dtype)
    cached = getattr(layer, "_feed_work", None)
    if cached is None or cached[0] != key:  # per feed shape (a later feed of the same length reuses it)
        dev = q.device
        work = ragged_shared.SharedWork(layer.lengths, t, rq, dev, split=64 if dev.type == "cpu" else None)
        tensors = (torch.tensor(ragged_shared.offsets_of(layer.lengths), device=dev),
                   torch.tensor(layer.lengths, device=dev), t - tq + 1 + torch.arange(tq, device=dev),
                   q.new_zeros(tq, len(layer.lengths), 1, d), torch.full((tq,), -1, dtype=torch.long, device=dev))
        cached = layer._feed_work = (key, work, tensors)
    _, work, (offsets, lengths, suf_len, own, own_at) = cached
    rows = q[0].transpose(0, 1).unsqueeze(2)  # [Tq, Hq, 1, D]: one row per query token
    out = ragged_shared.ragged_shared_decode(rows, layer.prefix_k, layer.prefix_v, offsets, lengths, layer.keys,
                                             layer.values, suf_len, own, own, own_at, work, scale)
    return out.squeeze(2).transpose(0, 1).unsqueeze(0)


def reference_ragged_attention(q: torch.Tensor, layer: RaggedLayer, scale: float | None = None) -> torch.Tensor:
    """float64 yardstick: heads left-padded to one length, padding masked out, explicit causal mask."""
    hkv, tq, d = len(layer.lengths), q.shape[-2], q.shape[-1]
    heads = [layer.head(h) for h in range(hkv)]
    n = max(k.shape[0] for k, _ in heads)
    k = torch.zeros(hkv, n, d, dtype=torch.float64)
    v = torch.zeros(hkv, n, d, dtype=torch.float64)
    valid = torch.zeros(hkv, n, dtype=torch.bool)
    for h, (kh, vh) in enumerate(heads):
        k[h, n - kh.shape[0] :], v[h, n - kh.shape[0] :], valid[h, n - kh.shape[0] :] = kh.double(), vh.double(), True
    g = q.shape[1] // hkv
    k, v, valid = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0), valid.repeat_interleave(g, 0)
    s = (q[0].double() @ k.transpose(-1, -2)) * (scale if scale is not None else d**-0.5)
    causal = torch.ones(tq, n, dtype=torch.bool).tril(n - tq)
    s = s.masked_fill(~(causal[None] & valid[:, None, :]), float("-inf"))
    return (s.softmax(-1) @ v).to(q.dtype)[None]


def compress_heads(method, layer_idx: int, layer: RaggedLayer, queries: torch.Tensor | None) -> RaggedLayer:
    """A compression firing on a ragged layer: ``method.compress_cache`` on each KV head alone (its query group)."""
    hkv = len(layer.lengths)
    g = queries.shape[1] // hkv if queries is not None else 0
    keys, values = [], []
    for h in range(hkv):
        k, v = layer.head(h)
        qh = queries[:, h * g : (h + 1) * g] if queries is not None else None
        out = method.compress_cache(layer_idx, k[None, None], v[None, None], qh)
        if not isinstance(out, tuple):
            raise ValueError(f"{type(method).__name__}.compress_cache returned a cache layer for one head of a ragged "
                             f"layer ({layer_idx}); it cannot compress per-head (ragged) caches")
        keys.append(out[0][0, 0])
        values.append(out[1][0, 0])
    return RaggedLayer(keys, values)
