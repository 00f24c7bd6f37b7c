"""Fast greedy decode: pre-allocated per-layer KV buffers and one decode step captured as a CUDA graph.

The plain loop (``HFSession.generate`` with ``decode="plain"``) forwards one token at a time through a
``DynamicCache``: every step concatenates each layer's cache and launches the model op by op from Python, which
leaves a GPU far below its memory-bandwidth bound. Here each layer's keys/values live in a buffer with room for the
turn's tokens (``StaticKV``); a decode step writes its key/value in place at that layer's
own next position and attends to that layer's valid prefix only, so layers may hold different lengths (after
SnapKV/PyramidKV/H2O/StreamingLLM eviction). The attention is a split-KV Triton kernel on CUDA that reads only
the valid keys (``split_kv_decode_attention``), else masked torch products over the buffer
(``masked_decode_attention``). Shapes and addresses never change during a turn, so on CUDA the step (model
forward + greedy pick) is captured once as a CUDA graph and replayed; the host reads the picked tokens back a few
steps behind the GPU to stop at a stop token (``LAG``); tokens computed past the stop are dropped from the cache
again. On CPU the same step runs eagerly (path ``static``).

The buffers are the cache's storage, not a second copy of it: a plain layer moves into its buffer when the buffers
are made (layer by layer, freeing its old tensor), the session's cache keeps views of them after a turn
(``store_back``) and after a crop (``kvc.crop_layers``), and a later prefill appends in place while they have room
(``kvc.SessionCache``), so a conversation's next decode finds its rows already there. Only when the buffers are
outgrown are they made again (with ``HEADROOM`` tokens of room). Methods with a plugin keep their own storage rules.

The plain loop stays the reference: ``tests/engines/test_fast_decode.py`` checks that both produce the same tokens.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

from scbench.devices import sync as _sync
from scbench.engines import attention, fuse
from scbench.engines.base import cache_kw
from scbench.kv import cache as kvc
from scbench.kernels.split_kv import (SPLIT_KV, masked_decode_attention,  # noqa: F401 (API: tests, scripts)
                                      split_kv_decode_attention, triton)

log = logging.getLogger(__name__)

PATHS = ("plain", "static", "graph")
"""What ``GenResult.decode_path`` records: the reference loop, or the static cache stepped eagerly / as a graph."""
BLOCK = 256
"""Buffer capacities are rounded up to this many tokens (also the key chunk of the split value product)."""
LAG = 4
"""CUDA graph path: steps the host lets the GPU run ahead before reading a picked token back."""
ADOPT = os.environ.get("SCBENCH_DECODE_ADOPT", "1") != "0"
"""The buffers are the session cache's storage (see the module docstring); ``SCBENCH_DECODE_ADOPT=0``: a copy beside
it, as before (each turn's cache copied in, a later prefill concatenated: twice the cache at the peak)."""
HEADROOM = int(os.environ.get("SCBENCH_DECODE_HEADROOM", "1024"))
"""Tokens of room the buffers keep past a turn's tokens, so the next turns' prompts and answers fit and reuse the
buffers and graph (H200 131K Quest multi-turn, room on re-allocation only: median turn 150.5 -> 160.3 tok/s,
decode_headroom_131k_h200.md). Since the buffers became the cache's storage a first allocation keeps it too: a later
prefill that fits appends in place instead of copying the cache."""


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
            adopt = ADOPT and plugin is None and type(layer).__name__ == "DynamicLayer"
            # a plugin's tiered layer (Quest, RetrievalAttention on the device tier) takes both buffers as its storage
            tiered = ADOPT and getattr(plugin, "adopt_layers", False) and callable(getattr(layer, "adopt", None))
            # zeros, not garbage, past the cached rows: masked positions get weight 0, and 0 * NaN would still poison
            # the value product; the first n rows are written once (here when the layer moves in, else by ``load``)
            for bufs, name in ((self.k, "keys"), (self.v, "values")):
                x = getattr(layer, name)
                buf = x.new_empty(b, h, cap, d)
                if ADOPT:
                    kvc.with_room(buf)
                buf[:, :, n:].zero_()
                # the layer moves into its buffer now, layer by layer, and its old storage is freed at once (a whole
                # second copy of the cache otherwise); ``load`` then copies nothing
                if adopt or tiered:
                    buf[:, :, :n].copy_(x)
                if adopt:
                    setattr(layer, name, buf[:, :, :n])
                bufs.append(buf)
                del x
            if tiered:  # False (a host tier, a device window): ``load`` copies as before
                layer.adopt(self.k[-1], self.v[-1], n)
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
        """Copy into the buffers every layer of ``cache`` not already in them (a layer that moved in when they were
        made, or views left by ``store_back`` / a crop / an in-place append, is not copied) and restart the step
        counter."""
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
        return masked_decode_attention(q, k, v, self.masked[layer_idx, : k.shape[2]], scale, chunk=BLOCK)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx] if self.lengths else 0


@contextlib.contextmanager
def _logged(device, what):
    """At INFO, the block's seconds (synchronised before and after) logged as ``what()`` + "in N s": the allocation
    and the copy of a turn's cache, which its decode time includes; nothing added when INFO is off."""
    if not log.isEnabledFor(logging.INFO):
        yield
        return
    _sync(device)
    t0 = time.perf_counter()
    yield
    _sync(device)
    log.info("%s in %.4f s", what(), time.perf_counter() - t0)


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
        self.allocations = 0  # how many times _prepare made new buffers
        self.capture_s = 0.0
        """Seconds the last ``generate`` spent on one-time work: the warm-up step (kernel compilation), the graph
        capture and the plugin's own (``take_warmup_s``); 0 when the graph was reused. Not part of the decode time."""

    def _prepare(self, cache, max_new: int) -> None:
        if self.kv is None or not self.kv.fits(cache, max_new) or max_new > self.tokens_cap:
            room = HEADROOM if getattr(self.plugin, "headroom", True) else 0
            self.kv = self.graph = None  # free the old buffers and graph pool before allocating new ones
            with _logged(self.device, lambda: "decode buffers allocated (#%d, %d tokens of room): %.2f GiB of keys "
                         "and values" % (self.allocations, room, sum(x.numel() * x.element_size()
                                                                     for x in (*self.kv.k, *self.kv.v)) / 2**30)):
                self.kv = StaticKV(cache, max_new + room, self.plugin)
                self.allocations += 1
            self.tokens_cap = -(-max_new // BLOCK) * BLOCK
            self.tok = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self.pos = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self.out = torch.zeros(self.tokens_cap, dtype=torch.long, device=self.device)
        if self.fused and self.plan is None:
            self.plan = fuse.prepare(self.model)
        with _logged(self.device, lambda: f"decode buffers loaded ({max(self.kv.lengths, default=0)} tokens in the "
                     "largest layer)"):
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
