"""Fast greedy decode: pre-allocated per-layer KV buffers and one decode step captured as a CUDA graph.

The plain loop (``HFSession.generate`` with ``decode="plain"``) forwards one token at a time through a
``DynamicCache``: every step concatenates each layer's cache and launches the model op by op from Python, which
leaves a GPU far below its memory-bandwidth bound. Here each layer's keys/values are copied once per turn into a
buffer with room for the turn's tokens (``StaticKV``); a decode step writes its key/value in place at that layer's
own next position and attends to that layer's valid prefix only, so layers may hold different lengths (after
SnapKV/PyramidKV/H2O/StreamingLLM eviction). The attention is a split-KV Triton kernel on CUDA that reads only
the valid keys (``split_kv_decode_attention``), else masked torch products over the buffer
(``masked_decode_attention``). Shapes and addresses never change during a turn, so on CUDA the step (model
forward + greedy pick) is captured once as a CUDA graph and replayed; the host reads the picked tokens back a few
steps behind the GPU to stop at a stop token (``LAG``); tokens computed past the stop are dropped from the cache
again. On CPU the same step runs eagerly (path ``static``).

The plain loop stays the reference: ``tests/engines/test_fast_decode.py`` checks that both produce the same tokens.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

import torch

from scbench.engines import attention, fuse
from scbench.engines.base import cache_kw

PATHS = ("plain", "static", "graph")
"""What ``GenResult.decode_path`` records: the reference loop, or the static cache stepped eagerly / as a graph."""
BLOCK = 256
"""Buffer capacities are rounded up to this many tokens (also the key chunk of the split value product)."""
LAG = 4
"""CUDA graph path: steps the host lets the GPU run ahead before reading a picked token back."""
HEADROOM = int(os.environ.get("SCBENCH_DECODE_HEADROOM", "1024"))
"""Tokens of room a re-allocation adds beyond the turn's own: when a session's cache outgrew the buffers (a
multi-turn conversation: each turn adds its prompt and answer), the new buffers keep room for the next turns, so
the following turns reuse them and their captured graph instead of re-allocating, copying the whole cache in and
capturing again every turn or two (H200, 131K, 5 turns of 64 tokens: Quest's median turn 150.5 -> 160.3 tok/s,
results/perf/decode_headroom_131k_h200.md). A first allocation (first turn, every request of multi-request mode)
gets none; a plugin may keep exact buffers (``headroom = False``)."""


def plugin_for(method):
    """The method's decode plugin (``method.static_decoder()``), or None for methods whose cache only appends.

    A plugin lets a method whose decode step does more than attend to every cached key (Quest's page selection,
    KIVI's packed cache) run inside the captured step. Its hooks, all optional except ``attend``:
    ``unsupported(cache)`` (why not, or None), ``allocate(kv, cache)`` (after StaticKV made its buffers),
    ``load(kv, cache)`` (after the copy into them), ``attend(kv, layer, q, k, v, scale)`` (the output, or None
    for the default attention), ``store_back(kv, cache, fed)`` (True when it gave the cache its tokens back) and
    ``state()`` (device tensors a decode step changes beyond StaticKV's own, saved around graph capture); an attribute
    ``headroom = False`` keeps re-allocated buffers exact (``HEADROOM``)."""
    make = getattr(method, "static_decoder", None)
    return make() if callable(make) else None


def unsupported(cache, method) -> str | None:
    """Why the static path cannot take this cache (None: it can). Only plain key/value layers are copied, unless
    the method brings a decode plugin that takes its own layers."""
    plugin = plugin_for(method)
    if plugin is not None:
        check = getattr(plugin, "unsupported", None)
        reason = check(cache) if check is not None else None
        if reason is None and len({getattr(layer, "device", None) for layer in cache.layers}) > 1:
            reason = "cache layers on several devices (a sharded model): the static buffers and graph are per device"
        return reason
    if not getattr(method, "fast_decode", True):
        return f"method {getattr(method, 'name', type(method).__name__)!r} declares fast_decode = False"
    for i, layer in enumerate(getattr(cache, "layers", None) or [None]):
        if not getattr(layer, "is_initialized", False):
            return f"cache layer {i} is empty"
        if type(layer).__name__ != "DynamicLayer":
            return f"cache layer {i} is a {type(layer).__name__}, not a plain DynamicLayer"
    devices = {layer.keys.device for layer in cache.layers}
    if len(devices) > 1:
        return f"cache layers on {len(devices)} devices (a sharded model): the static buffers and graph are per device"
    return None


def masked_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor,
                            scale: float | None = None, chunk: int = BLOCK) -> torch.Tensor:
    """One query per head over a key buffer whose ``masked`` positions do not count (torch ops only).

    q: [B, Hq, 1, D]; k, v: [B, Hkv, C, D] (contiguous, C a multiple of ``chunk``, Hq a multiple of Hkv);
    masked: bool [C] (True: ignore that key) -> [B, Hq, 1, D]. Scores and the softmax are float32 (bf16/fp16
    products accumulate in float32); the value product runs as independent ``chunk``-key products (parallel on
    a GPU) summed afterwards. No host synchronisation: it can be replayed inside a captured decode step.
    Reference: ``attention.causal_attention(q, k[..., :n, :], v[..., :n, :])`` when the first n keys count.
    """
    b, hq, _, d = q.shape
    hkv, c, out_dtype = k.shape[1], k.shape[2], q.dtype
    g, n = hq // hkv, c // chunk
    scale = d**-0.5 if scale is None else scale
    acc = {}
    if q.dtype != torch.float32:
        if q.is_cuda:
            acc = {"out_dtype": torch.float32}
        else:
            q, k, v = q.float(), k.float(), v.float()
    s = torch.bmm(q.reshape(b * hkv, g, d), k.view(b * hkv, c, d).transpose(1, 2), **acc)  # [B*Hkv, g, C]
    s.masked_fill_(masked, float("-inf"))
    p = s.mul_(scale).softmax(-1).to(v.dtype)
    p = p.view(b * hkv, g, n, chunk).transpose(1, 2).reshape(b * hkv * n, g, chunk)
    o = torch.bmm(p, v.view(b * hkv * n, chunk, d), **acc)  # [B*Hkv*n, g, D]
    return o.view(b * hkv, n, g, d).sum(1).to(out_dtype).view(b, hq, 1, d)


try:  # the split-KV decode kernel needs Triton (CUDA); CPU runs use masked_decode_attention
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:
    from scbench.kernels.combine import _combine_kernel

    @triton.jit
    def _split_kv_kernel(Q, K, V, At, Part, Mx, Sm, scale, C, n_splits,
                         G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr,
                         BN: tl.constexpr, PREC: tl.constexpr):
        """One (batch x KV head, split) per program: online softmax over keys [split start, min(end, valid))."""
        bh, sp = tl.program_id(0), tl.program_id(1)
        valid = (tl.load(At) + 1).to(tl.int32)
        rows, cols = tl.arange(0, GP), tl.arange(0, D)
        q = tl.load(Q + bh * G * D + rows[:, None] * D + cols[None, :], mask=rows[:, None] < G, other=0.0)
        m = tl.full([GP], float("-inf"), tl.float32)
        total = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        start = sp * SPLIT
        end = tl.minimum(start + SPLIT, valid)
        base = bh.to(tl.int64) * C * D
        for off in range(start, end, BN):
            keys = off + tl.arange(0, BN)
            inside = keys < end
            kv_off = base + keys[:, None].to(tl.int64) * D + cols[None, :]
            k = tl.load(K + kv_off, mask=inside[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            sc = tl.where(inside[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(V + kv_off, mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m = m_new
        out = (bh * n_splits + sp) * GP + rows
        tl.store(Part + out[:, None] * D + cols[None, :], acc)
        tl.store(Mx + out, m)
        tl.store(Sm + out, total)



SPLIT_KV = {"bn": 64, "max_splits": 64, "launch": {"num_warps": 4, "num_stages": 2}}
"""The split-KV kernel's defaults: keys per block, at most this many splits per head (splits of at least 256
keys), Triton launch options (num_warps, num_stages). ``SCBENCH_SPLIT_KV`` (JSON) overrides keys of it.
Measured on an H200 (scripts/bench_split_kv.py, results/perf/decode_step_fused.md): 2 stages instead of Triton's
default 3 read a 128K-token layer at 4.1 TB/s instead of 3.65."""
if os.environ.get("SCBENCH_SPLIT_KV"):
    SPLIT_KV.update(json.loads(os.environ["SCBENCH_SPLIT_KV"]))


def split_kv_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, at: torch.Tensor,
                              scale: float | None = None, split: int | None = None, bn: int | None = None,
                              launch: dict | None = None) -> torch.Tensor:
    """Flash-decoding style attention of one query per head over the first ``at + 1`` keys (Triton, CUDA).

    q: [B, Hq, 1, D]; k, v: [B, Hkv, C, D] contiguous; at: int64 [1] on the device, the last valid key index
    (read by the kernel, so a captured graph sees its current value) -> [B, Hq, 1, D]. Keys are split into
    ranges processed in parallel (online softmax in float32 in each), then merged; ranges past the valid
    length do no work, so the cost follows the keys in use, not the buffer's capacity.
    ``split``, ``bn`` (keys per inner block) and ``launch`` (Triton's num_warps / num_stages) default to
    ``SPLIT_KV`` (scripts/bench_split_kv.py sweeps them).
    Reference: ``masked_decode_attention`` / ``attention.causal_attention`` on the valid prefix.
    """
    b, hq, _, d = q.shape
    hkv, c = k.shape[1], k.shape[2]
    g = hq // hkv
    bn = SPLIT_KV["bn"] if bn is None else bn
    launch = SPLIT_KV["launch"] if launch is None else launch
    if split is None:  # enough programs to fill the GPU, at most max_splits splits per head
        split = max(256, -(-c // SPLIT_KV["max_splits"] // bn) * bn)
    n_splits = -(-c // split)
    gp = max(16, triton.next_power_of_2(g))
    q3 = q.reshape(b * hkv, g, d).contiguous()
    part = torch.empty(b * hkv * n_splits * gp, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(b * hkv * n_splits * gp, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    out = torch.empty(b * hkv, g, d, dtype=q.dtype, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _split_kv_kernel[(b * hkv, n_splits)](q3, k, v, at, part, mx, sm, d**-0.5 if scale is None else scale, c, n_splits,
                                          G=g, GP=gp, D=d, SPLIT=split, BN=bn, PREC=prec, **(launch or {}))
    _combine_kernel[(b * hkv, g)](part, mx, sm, out, n_splits, G=g, GP=gp, D=d,
                                  NS=max(2, triton.next_power_of_2(n_splits)))
    return out.view(b, hq, 1, d)


KERNEL = os.environ.get("SCBENCH_DECODE_KERNEL") or ("triton" if triton is not None else "torch")
"""Decode attention on CUDA: ``triton`` (split_kv_decode_attention) or ``torch`` (masked_decode_attention)."""


class StaticKV:
    """Per-layer key/value buffers with room for a turn's tokens; duck-types the cache API the model calls.

    Layer ``l`` holds ``base[l]`` tokens copied from the session's cache; decode step ``step`` (a device
    tensor, so a captured graph sees its current value) writes at position ``base[l] + step`` and attends to
    positions ``<= base[l] + step``.
    """

    fused_step = True
    """The fused forwards of scbench/engines/fuse.py attend through this cache (a marker, not an import: fuse.py
    must not import this module, which imports it)."""

    def __init__(self, cache, extra: int, plugin=None):
        self.plugin = plugin
        self.device = cache.layers[0].keys.device
        self.k, self.v = [], []
        for layer in cache.layers:
            b, h, n, d = layer.keys.shape
            cap = -(-(n + extra) // BLOCK) * BLOCK
            # zeros, not garbage: masked positions get weight 0, and 0 * NaN would still poison the value product
            self.k.append(layer.keys.new_zeros(b, h, cap, d))
            self.v.append(layer.values.new_zeros(b, h, cap, d))
        self.positions = torch.arange(max(x.shape[2] for x in self.k), device=self.device)
        self.base = torch.zeros(len(self.k), dtype=torch.long, device=self.device)
        self.step = torch.zeros(1, dtype=torch.long, device=self.device)
        self.at = self.base.clone()
        self.masked = torch.zeros(len(self.k), len(self.positions), dtype=torch.bool, device=self.device)
        self.lengths: list[int] = []
        if plugin is not None and hasattr(plugin, "allocate"):
            plugin.allocate(self, cache)

    def fits(self, cache, extra: int) -> bool:
        """Whether ``cache`` (same layers and shapes) plus ``extra`` tokens per layer fits these buffers."""
        if len(cache.layers) != len(self.k):
            return False
        for layer, kb in zip(cache.layers, self.k):
            keys = layer.keys
            if keys.dtype != kb.dtype or keys.shape[:2] != kb.shape[:2] or keys.shape[3] != kb.shape[3]:
                return False
            if keys.shape[2] + extra > kb.shape[2]:
                return False
        fits = getattr(self.plugin, "fits", None)
        return fits(cache, extra) if fits is not None else True

    def load(self, cache) -> None:
        """Copy every layer of ``cache`` into the buffers and restart the step counter."""
        self.lengths = [layer.keys.shape[2] for layer in cache.layers]
        for layer, kb, vb, n in zip(cache.layers, self.k, self.v, self.lengths):
            if layer.keys.data_ptr() != kb.data_ptr():  # a view left by store_back needs no copy
                kb[:, :, :n].copy_(layer.keys)
                vb[:, :, :n].copy_(layer.values)
        self.base.copy_(torch.tensor(self.lengths, dtype=torch.long))
        self.step.zero_()
        if self.plugin is not None and hasattr(self.plugin, "load"):
            self.plugin.load(self, cache)

    def store_back(self, cache, fed: int) -> None:
        """Give ``cache`` each layer's first ``base + fed`` tokens (views of the buffers, no copy)."""
        if self.plugin is not None and hasattr(self.plugin, "store_back") and self.plugin.store_back(self, cache, fed):
            return
        for layer, kb, vb, n in zip(cache.layers, self.k, self.v, self.lengths):
            layer.keys, layer.values = kb[:, :, : n + fed], vb[:, :, : n + fed]

    def begin_step(self) -> None:
        """Every layer's write position and key mask for this step (two kernels for all layers)."""
        torch.add(self.base, self.step, out=self.at)
        torch.gt(self.positions.unsqueeze(0), self.at.unsqueeze(1), out=self.masked)

    # --- the part of the Cache API that the model's forward calls ---------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """key_states, value_states: [B, Hkv, 1, D] -> the layer's whole buffers [B, Hkv, C, D]."""
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        at = self.at[layer_idx : layer_idx + 1]
        kb.index_copy_(2, at, key_states)
        vb.index_copy_(2, at, value_states)
        return kb, vb

    def attend(self, layer_idx, q, k, v, scale):
        """The attention function's branch for this cache: q [B, Hq, 1, D] -> [B, Hq, 1, D]."""
        if self.plugin is not None:
            out = self.plugin.attend(self, layer_idx, q, k, v, scale)
            if out is not None:
                return out
        if q.is_cuda and KERNEL == "triton":
            return split_kv_decode_attention(q, k, v, self.at[layer_idx : layer_idx + 1], scale)
        return masked_decode_attention(q, k, v, self.masked[layer_idx, : k.shape[2]], scale)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx] if self.lengths else 0


class FastDecoder:
    """Greedy decode over a ``StaticKV``; keeps buffers (and the captured graph) for the next turn when they fit."""

    def __init__(self, model, device: torch.device, use_graph: bool | None = None, plugin=None,
                 fused: bool | None = None):
        self.model = model
        self.fused = fuse.ENABLED if fused is None else fused
        """Step with the fused module forwards (scbench/engines/fuse.py); False: the model's own forwards."""
        self.plan: fuse.Plan | None = None
        self.plugin = plugin
        self.device = device
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.kv: StaticKV | None = None
        self.graph = None
        self.tokens_cap = 0
        self.allocations = 0
        """How many times ``_prepare`` made new buffers (tests: a conversation re-allocates rarely)."""
        self.capture_s = 0.0
        """Seconds the last ``generate`` spent on one-time work: the warm-up step (kernel compilation), the graph
        capture and the plugin's own (``take_warmup_s``); 0 when the graph was reused. Not part of the decode time."""

    def _prepare(self, cache, max_new: int) -> None:
        if self.kv is None or not self.kv.fits(cache, max_new) or max_new > self.tokens_cap:
            # outgrown: keep room for the next turns (HEADROOM), unless the method's plugin keeps exact buffers
            room = HEADROOM if self.kv is not None and getattr(self.plugin, "headroom", True) else 0
            self.kv = self.graph = None  # free the old buffers and graph pool before allocating new ones
            self.kv = StaticKV(cache, max_new + room, self.plugin)
            self.allocations += 1
            self.tokens_cap = -(-max_new // BLOCK) * BLOCK
            self.tok = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self.pos = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self.out = torch.zeros(self.tokens_cap, dtype=torch.long, device=self.device)
        if self.fused and self.plan is None:
            self.plan = fuse.prepare(self.model)
        self.kv.load(cache)

    def _logits(self) -> torch.Tensor:
        """Forward ``tok`` at ``pos`` through the static cache (writing its key/value): the logits [1, 1, V]."""
        self.kv.begin_step()
        fusing = fuse.active(self.model, self.plan) if self.plan is not None else contextlib.nullcontext()
        with attention.active(attention.AttnContext(static=self.kv)), fusing:
            return self.model(input_ids=self.tok, position_ids=self.pos, **{cache_kw(self.model): self.kv},
                              use_cache=True, logits_to_keep=1).logits

    def _step(self) -> None:
        """Forward ``tok`` at ``pos``; write the greedy pick to ``out[step]`` and ``tok``; advance ``pos``, ``step``."""
        nxt = self._logits()[0, -1].argmax().view(1)
        self.out.index_copy_(0, self.kv.step, nxt)
        self.tok.copy_(nxt.view(1, 1))
        self.pos.add_(1)
        self.kv.step.add_(1)

    def _capture(self) -> None:
        """Run one real step on a side stream (warm-up: kernels compile), undo it, then capture the step.

        Returns with no step done: the warm-up step's writes (its key/value row, a page bound) are rewritten
        identically by the first replay, and every other buffer it changed is restored."""
        bufs = [self.tok, self.pos, self.kv.step, *(self.plugin.state() if hasattr(self.plugin, "state") else [])]
        state = [b.clone() for b in bufs]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        for buf, saved in zip(bufs, state):
            buf.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not executed: restore what the recording must not change
            self._step()
        for buf, saved in zip(bufs, state):
            buf.copy_(saved)
        self.graph = graph

    @torch.inference_mode()
    def generate(self, cache, pos: int, first: int, max_new: int, stop: set[int]) -> list[int]:
        """Greedy tokens after ``first`` (already picked), ``len(result) <= max_new``; ``cache`` ends holding
        every token but the last one generated (as the plain loop leaves it)."""
        out = [first]
        if first in stop or max_new <= 1:
            return out
        self._prepare(cache, max_new)
        take = getattr(self.plugin, "take_warmup_s", None)  # a plugin's one-time work in _prepare (kernel compiles)
        warm = take() if take is not None else 0.0
        self.tok.fill_(first)
        self.pos.fill_(pos)
        if not self.use_graph:
            self.capture_s = 0.0
            while out[-1] not in stop and len(out) < max_new:
                self._step()
                out.append(int(self.tok))
        else:
            out += self._replay(max_new - 1, stop)
        self.capture_s += warm
        self.kv.store_back(cache, len(out) - 1)
        return out

    def _replay(self, budget: int, stop: set[int]) -> list[int]:
        """Replay the graph up to ``budget`` times, reading tokens ``LAG`` steps behind; the picked tokens."""
        done, self.capture_s = 0, 0.0
        if self.graph is None:
            t0 = time.perf_counter()
            self._capture()
            torch.cuda.synchronize(self.device)
            self.capture_s = time.perf_counter() - t0
        host = torch.empty(self.tokens_cap, dtype=torch.long, pin_memory=True)
        events, got = [], []
        for i in range(budget):
            if i >= done:
                self.graph.replay()
            host[i : i + 1].copy_(self.out[i : i + 1], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            events.append(ev)
            while len(got) < len(events) and (len(events) - len(got) > LAG or i == budget - 1):
                events[len(got)].synchronize()
                got.append(int(host[len(got)]))
                if got[-1] in stop:
                    return got
        return got
