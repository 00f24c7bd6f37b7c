"""The transformers engine's session: one example's ``DynamicCache``, fed and decoded in our own loop.

``HFEngine.session`` hands out an ``HFSession``, or a ``RecurrentSession`` (scbench/engines/recurrent.py) for models
whose cache holds a recurrent state; the engine picks the class once, when it loads the model.
"""
from __future__ import annotations

import logging
import tempfile
import time
import weakref
from pathlib import Path

import torch

from scbench.devices import sync as _sync
from scbench.engines import attention, fastdecode, mlp_rows, sharding
from scbench.engines.base import FeedStats, GenResult, Session, cache_kw
from scbench.kv import cache as kvc
from scbench.kv import offload as kvo

log = logging.getLogger(__name__)


class HFSession(Session):
    """One example's cache. ``pos`` counts positions seen, which can exceed the cache length after eviction."""

    def __init__(self, engine, method):
        self.engine = engine
        self.method = method
        self.cache = kvc.SessionCache(config=engine.model.config)
        self.pos = 0
        self.last_logits: torch.Tensor | None = None
        self.hooks = method.hooks()
        self.tier: kvo.Tier | None = None
        """Where checkpoints wait when the engine offloads them (created at the first checkpoint)."""
        self._parked = 0
        self.decoder: fastdecode.FastDecoder | None = None
        self.score_memo = None
        """A grouped sweep's shared scores (scbench/engines/score_memo.py ``ScoreMemo``) while the compression right after
        a shared first prefill runs; None otherwise."""

    @torch.inference_mode()
    def _forward(self, ids: list[int], ctx: attention.AttnContext | None = None) -> torch.Tensor:
        dev = self.engine.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        position_ids = torch.arange(self.pos, self.pos + len(ids), device=dev).unsqueeze(0)
        ctx = ctx or attention.AttnContext()
        if ctx.method is not None and "decode_attention" in self.hooks:  # loading methods pick their decode keys
            ctx.decode, ctx.cache = True, self.cache
        with attention.active(ctx), mlp_rows.rows(self.engine.model, len(ids)):
            out = self.engine.model(
                input_ids=input_ids, position_ids=position_ids, **{cache_kw(self.engine.model): self.cache},
                use_cache=True, logits_to_keep=1,
            )
        self.pos += len(ids)
        return out.logits[0, -1]

    def feed(self, ids, *, compress, sparse):
        if not ids:
            raise ValueError("feed() needs at least one token")
        if sparse and self.pos == 0 and "blend_prefill" in self.hooks:  # chunk KV reuse (scbench/engines/blend.py)
            return self.method.blend_prefill(self, ids)
        compress = compress and "compress_cache" in self.hooks
        window = self.method.query_window if compress else 0
        ctx = attention.AttnContext(
            method=self.method, sparse=sparse and "prefill_attention" in self.hooks, capture_queries=window,
            score_in_forward=bool(window) and self.method.scores_in_forward(),
        )
        reused = self.pos
        _sync(self.engine.device)
        t0 = time.perf_counter()
        self.last_logits = self._prefill(ids, ctx)
        compress_s = 0.0
        if compress:
            _sync(self.engine.device)
            t1 = time.perf_counter()
            for layer, scores in ctx.scores.items():  # scored in the forward: what the compression reads
                ctx.queries[layer] = attention.scored_queries(scores)
            self._compress(ctx, ids)
            _sync(self.engine.device)
            compress_s = time.perf_counter() - t1 + ctx.score_seconds()
        _sync(self.engine.device)
        return FeedStats(tokens=len(ids), reused=reused, seconds=time.perf_counter() - t0, compress_s=compress_s,
                         attn_cells=ctx.cells_total, attn_computed=ctx.cells_computed)

    def _prefill(self, ids: list[int], ctx: attention.AttnContext) -> torch.Tensor:
        """Forward ``ids`` in chunks of ``engine.prefill_chunk`` tokens (all at once when unset); the last logits.
        Captured queries are gathered across chunks, so compression sees the same last ``capture_queries``."""
        chunk = self.engine.prefill_chunk
        if not chunk or len(ids) <= chunk:
            return self._forward(ids, ctx)
        parts: dict[int, list[torch.Tensor]] = {}
        for start in range(0, len(ids), chunk):
            ctx.queries = {}
            logits = self._forward(ids[start : start + chunk], ctx)
            for layer, q in ctx.queries.items():
                parts.setdefault(layer, []).append(q)
        if ctx.capture_queries:
            ctx.queries = {layer: torch.cat(qs, dim=-2)[..., -ctx.capture_queries :, :] for layer, qs in parts.items()}
        return logits

    @torch.inference_mode()
    def _compress(self, ctx: attention.AttnContext, ids: list[int]) -> None:
        """One compression firing over every layer; ``ids`` are the tokens fed since the previous one."""
        self.method.begin_compression(num_layers=len(self.cache.layers), seen_tokens=self.pos)
        self.method._score_memo = self.score_memo  # Method.shared_scores reads it (None: computes alone)
        try:
            self._compress_layers(ctx, ids)
        finally:
            self.method._score_memo = None
        lengths, e = kvc.layer_lengths(self.cache), self.engine
        full = kvc.full_nbytes(e.num_layers, e.kv_heads, e.head_dim, max(lengths, default=0), e.dtype)
        per_token = kvc.full_nbytes(e.num_layers, e.kv_heads, e.head_dim, 1, e.dtype)  # one token in every layer and head
        resident = kvc.kv_nbytes(self.cache)
        self.last_compression = {"context_tokens": self.pos, "kv_ratio": resident / full if full else None,
                                 # mean kept tokens per layer and KV head (ragged layers keep per-head counts)
                                 "kept_tokens": resident / per_token if per_token else None}
        """What the last compression left (read and cleared by the runner's fired-check, scbench/checks.py)."""

    def _compress_layers(self, ctx: attention.AttnContext, ids: list[int]) -> None:
        self.method.prepare_compression(self, ids)  # e.g. KVzip's context-reconstruction forwards
        for idx, layer in enumerate(self.cache.layers):
            if not layer.is_initialized or kvc.compresses_itself(layer):
                continue
            queries = ctx.queries.get(idx) if ctx.capture_queries else None
            if getattr(layer, "scbench_ragged", False):  # per-head lengths (scbench/kv/ragged.py)
                kvc.install_layer(self.cache, idx, self.method.compress_ragged(idx, layer, queries))
                continue
            out = self.method.compress_cache(idx, layer.keys, layer.values, queries)
            if not isinstance(out, tuple):  # a cache layer with its own representation (e.g. KIVI)
                kvc.install_layer(self.cache, idx, out)
                continue
            k, v = out
            if k.shape[:2] != layer.keys.shape[:2] or k.shape[-1] != layer.keys.shape[-1] or k.shape != v.shape:
                raise ValueError(
                    f"{type(self.method).__name__}.compress_cache returned keys {tuple(k.shape)} / values "
                    f"{tuple(v.shape)} for layer {idx} whose cache is {tuple(layer.keys.shape)}"
                )
            kvc.replace_layer(self.cache, idx, k, v)

    @torch.inference_mode()
    def generate(self, max_new_tokens, *, compress_every: int | None = None, compress_cap: int | None = None):
        """Greedy decode. ``compress_every`` (policy ``decode_every``): every that many decode steps the method's
        compression fires again when the cache holds more than ``compress_cap`` tokens (None: always), on the
        queries of the tokens decoded since the previous firing; decode then takes the plain loop."""
        if self.last_logits is None:
            raise RuntimeError("generate() before any feed()")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stop = self.engine.stop_ids
        dev = self.engine.device
        kvc.freeze(self.cache)  # layers that keep decoded tokens apart (KIVI decode_cache=temp) mark the prompt's end
        t0 = time.perf_counter()
        tok = int(self.last_logits.argmax())
        first_s = time.perf_counter() - t0
        compress_every = compress_every if "compress_cache" in self.hooks else None
        path = "plain" if compress_every else self._decode_path()
        compress_s, since = 0.0, 0
        t1 = time.perf_counter()
        warmup_s = 0.0
        if path == "plain":
            out = [tok]
            window = self.method.query_window if compress_every else 0
            ctx = attention.AttnContext(method=self.method, capture_queries=window, rolling=True)
            while tok not in stop and len(out) < max_new_tokens:
                tok = int(self._forward([tok], ctx).argmax())
                out.append(tok)
                since += 1
                if compress_every and since >= compress_every:
                    if compress_cap is None or max(kvc.layer_lengths(self.cache)) > compress_cap:
                        t2 = time.perf_counter()
                        self._compress(ctx, out[-1 - since : -1])
                        compress_s += time.perf_counter() - t2
                    ctx.queries, since = {}, 0
        else:
            try:
                if self.decoder is None:
                    self.decoder = fastdecode.FastDecoder(self.engine.model, dev, plugin=fastdecode.plugin_for(self.method))
                out = self.decoder.generate(self.cache, self.pos, tok, max_new_tokens, stop)
                warmup_s = self.decoder.capture_s
            except Exception as e:  # noqa: BLE001 - the session's cache keeps its rows (its layers may have moved
                # into the decode buffers, the same rows), so the plain loop goes on from them
                log.warning("fast decode failed (%s: %s); the plain loop for %s on this engine from now on",
                            type(e).__name__, e, self.method.label())
                self.engine.plain_methods.add(self.method.label())
                self.decoder = None
                return self.generate(max_new_tokens)
            self.pos += len(out) - 1
        _sync(dev)
        decode_s = time.perf_counter() - t1 - warmup_s - compress_s  # decode alone (compressions: compress_s)
        self.last_logits = None
        text = self.engine.decode([t for t in out if t not in stop])
        return GenResult(tokens=out, text=text, first_token_s=first_s, decode_s=decode_s, stopped=out[-1] in stop,
                         decode_path=path, compress_s=compress_s, warmup_s=warmup_s)

    def _decode_path(self) -> str:
        """``plain``, or the fast path's name when the engine's decode mode asks for it and the cache allows it."""
        mode = self.engine.decode_mode
        if mode == "plain" or (mode == "auto" and self.engine.device.type != "cuda"):
            return "plain"
        if self.method.label() in self.engine.plain_methods:
            return "plain"  # its fast path failed once on this engine (logged); other methods keep theirs
        reason = fastdecode.unsupported(self.cache, self.method)
        if reason is not None:
            log.debug("plain decode: %s", reason)
            return "plain"
        return "graph" if self.engine.device.type == "cuda" else "static"

    def drop_last(self, n):
        if n > 0:
            kvc.drop_last(self.cache, n)
            self.pos -= n
            self.last_logits = None
        kvc.thaw(self.cache)  # the next turn's prompt is compressed as usual again

    def checkpoint(self, *, rewrites):
        # what follows (each request's prompt and decode) is temporary: layers that can keep it as computed do
        # (KIVI decode_cache=temp), and the snapshot carries their mark
        kvc.freeze(self.cache)
        if self.engine.offload:  # the context KV waits in the slow tier; each rollback loads it back
            if self.tier is None:
                root = None
                if self.engine.offload == "disk":
                    Path(self.engine.offload_dir).mkdir(parents=True, exist_ok=True)
                    root = tempfile.mkdtemp(prefix="session-", dir=self.engine.offload_dir)
                self.tier = kvo.Tier(self.engine.offload, root)
                weakref.finalize(self, self.tier.close)
            self._parked += 1
            return (self.pos, None, kvo.Parked(self.tier, f"checkpoint{self._parked}", kvc.snapshot(self.cache)))
        snap = kvc.snapshot(self.cache) if rewrites or not kvc.crop_is_exact(self.cache) else None
        return (self.pos, kvc.layer_lengths(self.cache), snap)

    def rollback(self, token):
        pos, lengths, snap = token
        if isinstance(snap, kvo.Parked):
            kvc.restore(self.cache, snap.load(self.engine.device))
        elif snap is not None:
            kvc.restore(self.cache, snap)
        else:
            kvc.crop_layers(self.cache, lengths)
        self.pos = pos
        self.last_logits = None

    def memory(self):
        e = self.engine
        lengths = kvc.layer_lengths(self.cache)
        tokens = max(lengths, default=0)
        return {
            "kv_bytes": kvc.kv_nbytes(self.cache),
            "kv_tokens": tokens,
            "kv_full_bytes": kvc.full_nbytes(e.num_layers, e.kv_heads, e.head_dim, self.pos, e.dtype),
            **kvo.take_counters(self.cache, self.tier),  # slow tier, loads since the last call (one call per turn)
            "peak_mem_bytes": e.peak_memory(),
            **({"device_bytes": self._device_bytes()} if len(e.devices) > 1 else {}),
        }

    def _device_bytes(self) -> dict[str, dict[str, int]]:
        """Sharded model: per device, the KV bytes of the layers it holds and its peak allocated bytes."""
        kv = kvc.kv_nbytes_by_device(self.cache)
        peak = sharding.peak_memory_per_device(self.engine.devices)
        return {d: {"kv_bytes": kv.get(d, 0), "peak_mem_bytes": peak.get(d, 0)} for d in sorted(set(kv) | set(peak))}
