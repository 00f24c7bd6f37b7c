"""Independent requests decoded as one batch over the shared context cache (``timing=batched``).

In multi-request mode the requests of an example are independent given the (possibly compressed) context; with
golden history every multi-turn turn's input is known in advance too. ``BatchedReplay`` feeds every turn's prompt
exactly as ``Replay`` does (same forwards, same compression, same logits), keeps each turn's own tokens (its
request, or the forced assistant prefix of a multi-turn turn) aside, and then decodes all turns together: each
decode step forwards one token per turn, the shared context KV is read once for the whole batch (each row up to
its own prefix length), each row's own tokens separately, and the two partial softmaxes are merged exactly with
their log-sum-exp (``shared_prefix_attention``; reference: ``reference_shared_prefix_attention``). Predictions
are those of the sequential path (tests/engines/test_batched_decode.py checks it in float32).

Ragged caches (AdaKV, KVzip pair / layer, DuoAttention: per-KV-head prefix lengths, scbench/kv/ragged.py) batch
too: their prefixes are read in place per head (scbench/kernels/ragged_shared.py, ``batch_step.RaggedShared``).
Methods that change the cache per step or per request fall back to ``Replay`` (sequential): loading methods
(``decode_attention``) unless they bring a batched decode (``batch_decoder()``: Quest, methods/quest_batch.py, whose
rows select their own pages of the shared context; RetrievalAttention's device tier, methods/retrieval_batch.py; a
per-row ``row_memory`` keeps the turn's loaded / KV bytes those of its sequential decode; KIVI, methods/kivi_batch.py,
de-quantises the context once for the batch), caches that are not plain key/value layers (``fast_decode = False``),
compression every turn, naive replay, model-generated history, offloaded checkpoints and recurrent models. Batched
turns record ``decode_path="batched"``, ``decode_batch`` (rows), ``decode_step_s`` (mean step time of the batch, the
CUDA graph capture's one-time work left out: it is the first row's ``warmup_s``) and ``decode_kernel`` (the
shared-prefix attention: ``triton``, scbench/kernels/shared_prefix.py, on CUDA; ``torch`` otherwise;
scbench/batch_step.py);
``decode_s`` is the turn's share of the batch's time (each step's time split between the rows still decoding).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from scbench.batch_step import (BatchStep, MultiKV, SharedPrefixKV, kernel_for,  # noqa: F401
                                 reference_shared_prefix_attention, shared_mask, shared_prefix_attention)
from scbench.engines.base import GenResult
from scbench.kv import cache as kvc
from scbench.runner import Replay

log = logging.getLogger(__name__)

TIMINGS = ("batched", "sequential")


def replay_class(timing: str):
    """``Replay`` for ``timing=sequential`` (one request at a time, today's measurement), else ``BatchedReplay``."""
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}, got {timing!r}")
    return BatchedReplay if timing == "batched" else Replay


def fallback_reason(engine, method, spec, *, check_engine: bool = True) -> str | None:
    """Why this run decodes sequentially (None: its turns can be batched)."""
    from scbench.engines.hf import HFEngine
    from scbench.engines.hf_session import HFSession

    if check_engine and not isinstance(getattr(engine, "_engine", engine), HFEngine):
        return f"engine {getattr(engine, 'name', '?')!r} decodes on its own"
    if not spec.reuse:
        return "naive replay (reuse=false)"
    if (spec.model or {}).get("device_map") not in (None, "", "null", "none"):
        return "the model is split over devices (model.device_map)"
    if spec.mode == "multi_turn" and not spec.golden_context:
        return "multi-turn history is the model's own answers (golden_context=false)"
    if ("decode_attention" in method.hooks() or not getattr(method, "fast_decode", True)) and batch_decoder(method) is None:
        return f"method {method.name!r} changes or owns its cache during decode"
    if spec.compress == "every_turn" and "compress_cache" in method.hooks():
        return "compression rewrites the cache every turn"
    if spec.compress == "decode_every" and "compress_cache" in method.hooks():
        return "compression rewrites the cache during decoding"
    if getattr(engine, "offload", None):
        return "checkpoints are offloaded"
    if check_engine and getattr(engine, "session_class", HFSession) is not HFSession:
        return "the model keeps a recurrent state"
    return None


def batch_decoder(method):
    """A loading method's batched decode (``method.batch_decoder()``: each row selects from the shared context by its
    own query, e.g. methods/quest_batch.py), or None (the method decodes sequentially)."""
    make = getattr(method, "batch_decoder", None)
    return make() if callable(make) else None


# --- the batch's cache and decode loop -----------------------------------------------------------------------
@dataclass
class Row:
    """One turn waiting to be decoded."""

    turn: int
    tp: object
    fs: object
    logits: torch.Tensor
    pos: int
    """Position of its first decoded token's successor (the session's ``pos`` after its prompt)."""
    shared_len: list[int]
    """Per layer: tokens of the shared cache it sees."""
    own: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer: keys and values of its own prompt tokens that are not in the shared cache."""
    prompt_tokens: int
    costs: dict | None = None
    """What the method reported right after this turn's prompt was fed (``Method.take_costs``)."""
    compression: dict | None = None
    """What a compression fired by this turn's prompt left (``session.last_compression``), for its fired-check."""


LAG = 4
"""CUDA graph path: steps the host lets the GPU run ahead before reading the picked tokens back."""
EAGER_LAG = 0
"""The same for eager steps (0: read each step's tokens before the next; tests set more to check the lagged reads)."""


@torch.inference_mode()
def decode_rows(engine, cache, rows: list[Row], use_graph: bool | None = None, plugin=None):
    """Greedy-decode every row together. Returns per row its GenResult (a row's ``decode_s`` is its share: each
    step's time split among the rows still decoding; the first row's ``warmup_s`` holds the one-time capture work),
    the batch's mean step time and the attention that ran (``SharedPrefixKV.kernel_used``). ``plugin``:
    a factory of the method's batched decode (``batch_decoder``), one per cache view."""
    results, step_s, kernels = decode_parts(engine, [(cache, rows, plugin)], use_graph)
    return results[0], step_s, kernels[0]


@torch.inference_mode()
def decode_parts(engine, parts: list, use_graph: bool | None = None):
    """``decode_rows`` for several runs' batches at once (``parts``: (cache, rows, plugin factory or None) per run):
    every row of every part forwards in one step (``batch_step.MultiKV``: the weights read once for all of them),
    each part's rows attend to its own cache. Returns per part its rows' GenResults and the attention that ran, and
    the steps' mean time (a row's ``decode_s`` is its share of each step among all the rows still decoding)."""
    stop, dev = engine.stop_ids, engine.device
    use_graph = dev.type == "cuda" if use_graph is None else use_graph
    rows = [r for _, rs, _ in parts for r in rs]
    firsts, first_s = [], []
    for r in rows:
        t0 = time.perf_counter()
        firsts.append(int(r.logits.argmax()))
        first_s.append(time.perf_counter() - t0)
    outs = [[t] for t in firsts]
    live = [t not in stop and r.tp.max_new_tokens > 1 for t, r in zip(firsts, rows)]
    steps = max([r.tp.max_new_tokens - 1 for r, a in zip(rows, live) if a], default=0)
    ran, wall, done, t_cap = 0, 0.0, 0, 0.0
    kernels = [""] * len(parts)
    after = []  # the plugins' eager work between steps (``after_step(step)``: KIVI's flushes, host-scheduled)

    def build():
        if len(parts) == 1:
            cache, rs, plugin = parts[0]
            kv = SharedPrefixKV(cache, rs, steps, plugin=plugin() if plugin else None)
            hooks = [kv.plugin.after_step] if getattr(kv.plugin, "after_step", None) is not None else []
        else:
            kv = MultiKV([(cache, rs, plugin() if plugin else None) for cache, rs, plugin in parts], steps)
            hooks = kv.after_steps()
        return kv, BatchStep(engine.model, kv, firsts, [r.pos for r in rows], steps), hooks

    if steps:
        kv, step, after = build()
        host = torch.empty(steps, len(rows), dtype=torch.long, pin_memory=dev.type == "cuda")  # rows contiguous
        events = []
        _sync_dev(dev)
        t0 = time.perf_counter()
        if use_graph:
            try:
                step.capture()  # one-time work (kernel compilation, capture) with one real step: out of step_s
                _sync_dev(dev)
                done = 1
            except Exception as e:  # noqa: BLE001 - decode eagerly from fresh buffers instead
                log.warning("batched decode: CUDA graph capture failed (%s: %s); stepping eagerly",
                            type(e).__name__, e)
                use_graph = False
                kv, step, after = build()
            t_cap, t0 = time.perf_counter() - t0, time.perf_counter()
        read = 0
        while read < steps and any(live):
            if ran < steps and (ran < done or ran - read <= (LAG if use_graph else EAGER_LAG)):
                if ran >= done:
                    step()
                for hook in after:  # queued after step ``ran`` (the capture's one too), before the next
                    hook(ran)
                host[ran].copy_(step.out[ran], non_blocking=True)
                if dev.type == "cuda":
                    ev = torch.cuda.Event()
                    ev.record()
                    events.append(ev)
                ran += 1
                continue
            if events:
                events[read].synchronize()
            for b in range(len(rows)):
                if live[b]:
                    outs[b].append(int(host[read, b]))
                    live[b] = outs[b][-1] not in stop and len(outs[b]) < rows[b].tp.max_new_tokens
            read += 1
        _sync_dev(dev)
        wall = time.perf_counter() - t0
        # after the steps: a launch failure's fallback shows
        kernels = [kv.kernel_used()] if len(parts) == 1 else [p.kernel_used() for p in kv.parts]
    # the steps after the capture's one are timed; when none ran, the capture's (an upper bound) is all there is
    step_s = wall / (ran - done) if ran > done else (t_cap / done if done else 0.0)
    warmup_s = max(0.0, t_cap - done * step_s)
    active = [sum(1 for o in outs if len(o) - 1 > s) for s in range(max(len(o) for o in outs) - 1)]
    results, b = [], 0
    for _, rs, _ in parts:
        mine = []
        for _ in rs:
            out = outs[b]
            share = sum(step_s / active[s] for s in range(len(out) - 1))
            mine.append(GenResult(tokens=out, text=engine.decode([t for t in out if t not in stop]),
                                  first_token_s=first_s[b], decode_s=share, stopped=out[-1] in stop,
                                  decode_path="batched", warmup_s=warmup_s if b == 0 else 0.0))
            b += 1
        results.append(mine)
    return results, step_s, kernels


def _sync_dev(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the replay -------------------------------------------------------------------------------------------
@dataclass
class Pending:
    """A run's batch ready to decode (``BatchedReplay.prepare``): the cache its rows attend to, the rows, and the
    method's batched decode (a factory; ``plugins`` keeps what it made, for ``row_memory``)."""

    cache: object
    rows: list
    plugin: object = None
    plugins: list = field(default_factory=list)


class BatchedReplay(Replay):
    """``Replay`` that decodes an example's turns as one batch where the method allows it (module docstring)."""

    def __iter__(self):
        pending = self.prepare()
        if pending is None:
            yield from self.sequential()
            return
        gens, step_s, kernel = decode_rows(self.engine, pending.cache, pending.rows, plugin=pending.plugin)
        yield from self.finish(pending, gens, step_s, kernel)

    def sequential(self):
        """The turns one at a time (``Replay``), for a run that cannot batch (``prepare`` returned None)."""
        return super().__iter__()

    def prepare(self) -> Pending | None:
        """Feed every turn's prompt (``Replay``'s forwards and compression) and lay out the batch: None when this run
        decodes sequentially (``fallback_reason``, the method's own plan, or fewer than two turns to compute)."""
        reason = fallback_reason(self.engine, self.method, self.spec)
        plan = getattr(batch_decoder(self.method), "plan_reason", None) if reason is None else None
        if plan is not None:  # the method's own check (KIVI: memory of its shared copy, multi-turn exactness)
            reason = plan(self.engine, self.spec, self.builder, self.turns)
        todo = [i for i in range(self.turns) if i not in self.done or i == self.check_turn]
        if reason is not None or len(todo) < 2:
            if reason is not None:
                log.debug("sequential decode: %s", reason)
            return None
        self.session = self.engine.session(self.method)
        rows = self._prefill_multi_turn() if self.spec.mode == "multi_turn" else self._prefill_multi_request()
        cache = self.session.cache
        batched = batch_decoder(self.method)  # a loading method's own batched decode (its cache layers are its own)
        for i, layer in enumerate(cache.layers):
            if (type(layer).__name__ != "DynamicLayer" and batched is None
                    and not getattr(layer, "scbench_ragged", False)):
                raise RuntimeError(f"method {self.method.name!r} leaves a {type(layer).__name__} in cache layer {i}: "
                                   "it must declare fast_decode = False to be decoded sequentially")
        prepare = getattr(batched, "prepare", None)
        if prepare is not None:  # the method lays out the shared cache and the rows' own tokens (KIVI: de-quantised)
            cache = prepare(cache, rows)
        pending = Pending(cache, rows)
        if batched is not None:
            # no reference back to ``pending`` (nor to this replay): a cycle would keep the decoded run's cache alive
            # until the garbage collector ran, and a grouped sweep's next run would prepare next to it
            method, made = self.method, pending.plugins
            pending.plugin = lambda: made.append(batch_decoder(method)) or made[-1]
        return pending

    def finish(self, pending: Pending, gens: list, step_s: float, kernel: str, runs: int = 1, batch: int = 0):
        """The stored rows of a prepared batch once decoded (``gens``: one GenResult per row); ``runs`` and ``batch``:
        runs and rows decoded in the same batch when several runs' rows were (``decode_runs``, ``decode_batch``)."""
        cache, rows, plugins = pending.cache, pending.rows, pending.plugins
        mem = self.session.memory()
        e = self.engine
        elt = torch.empty((), dtype=e.dtype).element_size()
        per_token = 2 * e.kv_heads * e.head_dim * elt
        # a ragged layer (AdaKV, KVzip, DuoAttention) holds sum(lengths), not kv_heads x max(lengths), prefix tokens
        ragged = sum(sum(layer.lengths) - e.kv_heads * max(layer.lengths) for layer in cache.layers
                     if getattr(layer, "scbench_ragged", False)) * 2 * e.head_dim * elt
        batch = batch or len(rows)
        for row, gen in zip(rows, gens):
            if row.turn in self.done:  # the stored turn recomputed to check the resume (as Replay does)
                self._compare(row.turn, gen.text)
                continue
            n = len(gen.tokens) - 1
            lengths = [s + row.own[0][0].shape[2] + n for s in row.shared_len]
            row_mem = {**mem, "kv_bytes": sum(lengths) * per_token + ragged, "kv_tokens": max(lengths),
                       "kv_full_bytes": kvc.full_nbytes(e.num_layers, e.kv_heads, e.head_dim, row.pos + n, e.dtype)}
            self.session.last_compression = row.compression  # checked on the turn whose prompt fired it
            if plugins:  # what this row's own sequential decode would have loaded and kept (the method counts it);
                # its position after the turn (the loaded-bytes check's dense baseline)
                row_mem.update(plugins[-1].row_memory(rows.index(row), lengths, n))
                self.session.pos = row.pos + n
            yield self._result(row.turn, row.fs, gen, row_mem, row.prompt_tokens, costs=row.costs,
                               decode_batch=batch, decode_step_s=step_s if n else 0.0, decode_kernel=kernel,
                               decode_runs=runs)

    def _take_compression(self) -> dict | None:
        """What the compression fired by the prompt just fed left, cleared: a stored turn's must not reach the first
        missing turn's fired-check (the sequential replay checks it on the stored turn and stores nothing)."""
        comp = getattr(self.session, "last_compression", None)
        self.session.last_compression = None
        return comp

    def _own(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The last ``n`` tokens of every cache layer (copies); a ragged layer's may reach into each head's prefix
        (multi-turn: the compressed first prompt's tail, which the next turn's rewind crops from every head)."""
        own = []
        for layer in self.session.cache.layers:
            if getattr(layer, "scbench_row_state", False):  # KIVI: its state (references); the plugin's prepare
                own.append(layer.scbench_snapshot())        # turns it into the row's own tokens
                continue
            if getattr(layer, "scbench_ragged", False) and layer.keys.shape[2] < n:
                heads = [layer.head(h) for h in range(len(layer.lengths))]
                own.append((torch.stack([k[k.shape[0] - n :] for k, _ in heads])[None],
                            torch.stack([v[v.shape[0] - n :] for _, v in heads])[None]))
                continue
            own.append((layer.keys[:, :, layer.keys.shape[2] - n :].clone(),
                        layer.values[:, :, layer.values.shape[2] - n :].clone()))
        return own

    def _prefill_multi_turn(self) -> list[Row]:
        rows, history = [], 0
        for i in range(self.turns):
            tp = self.builder.first() if i == 0 else self.builder.delta(i, None)
            fs = self._feed(tp.ids, first=i == 0, query_start=tp.query_start)
            history += len(tp.ids)
            costs = self.method.take_costs(self.session)  # this turn's, before the next feed adds its own
            comp = self._take_compression()
            if i not in self.done or i == self.check_turn:
                self._check_window(i, history + tp.max_new_tokens)
                lengths = kvc.layer_lengths(self.session.cache)
                rows.append(Row(i, tp, fs, self.session.last_logits, self.session.pos,
                                [n - tp.rewind for n in lengths], self._own(tp.rewind), history, costs, comp))
            self.session.drop_last(tp.rewind)
            history -= tp.rewind
        return rows

    def _prefill_multi_request(self) -> list[Row]:
        import dataclasses

        ctx_ids = self.builder.context()
        ctx_fs = self._feed(ctx_ids, first=True)
        checkpoint = self.session.checkpoint(rewrites=False)
        base = kvc.layer_lengths(self.session.cache)
        rows = []
        for j in range(self.turns):
            tp = self.builder.request(j)
            if j:
                self.session.rollback(checkpoint)
            fs = self._feed(tp.ids, first=False)
            if j == 0:  # the context prefill is charged to the first request (as in Replay)
                fs = dataclasses.replace(fs, tokens=fs.tokens + ctx_fs.tokens, reused=0,
                                         seconds=fs.seconds + ctx_fs.seconds, compress_s=fs.compress_s + ctx_fs.compress_s,
                                         attn_cells=fs.attn_cells + ctx_fs.attn_cells,
                                         attn_computed=fs.attn_computed + ctx_fs.attn_computed,
                                         prefill_shared=ctx_fs.prefill_shared, scores_shared=ctx_fs.scores_shared)
            costs = self.method.take_costs(self.session)  # this request's, before the next feed adds its own
            comp = self._take_compression()  # the context's compression: request 0's (as its prefill is)
            if j in self.done and j != self.check_turn:
                continue
            prompt = len(ctx_ids) + len(tp.ids)
            self._check_window(j, prompt + tp.max_new_tokens)
            rows.append(Row(j, tp, fs, self.session.last_logits, self.session.pos, list(base),
                            self._own(len(tp.ids)), prompt, costs, comp))
        self.session.rollback(checkpoint)
        return rows
