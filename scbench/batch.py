"""Independent requests decoded as one batch over the shared context cache (``timing=batched``).

In multi-request mode the requests of an example are independent given the (possibly compressed) context; with
golden history every multi-turn turn's input is known in advance too. ``BatchedReplay`` feeds every turn's prompt
exactly as ``Replay`` does (same forwards, same compression, same logits), keeps each turn's own tokens (its
request, or the forced assistant prefix of a multi-turn turn) aside, and then decodes all turns together: each
decode step forwards one token per turn, the shared context KV is read once for the whole batch (each row up to
its own prefix length), each row's own tokens separately, and the two partial softmaxes are merged exactly with
their log-sum-exp (``shared_prefix_attention``; reference: ``reference_shared_prefix_attention``). Predictions
are those of the sequential path (tests/engines/test_batched_decode.py checks it in float32).

Methods that change the cache per step or per request fall back to ``Replay`` (sequential): loading methods
(``decode_attention``), caches that are not plain key/value layers (``fast_decode = False``), compression every
turn, naive replay, model-generated history, offloaded checkpoints and recurrent models. Batched turns record
``decode_path="batched"``, ``decode_batch`` (rows) and ``decode_step_s`` (mean step time of the batch);
``decode_s`` is the turn's share of the batch's time (each step's time split between the rows still decoding).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from scbench.engines import attention
from scbench.engines.base import GenResult, cache_kw
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
    if "decode_attention" in method.hooks() or not getattr(method, "fast_decode", True):
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


# --- attention ------------------------------------------------------------------------------------------------
def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor | None, scale: float):
    """Unnormalised attention of query rows q [N, M, D] over keys k, v [N, C, D] with masked [N or 1, M or 1, C]
    (None: every key counts): (sum_j p_j v_j [N, M, D], sum_j p_j [N, M], max score [N, M]), in float32."""
    acc = {"out_dtype": torch.float32} if q.is_cuda and q.dtype != torch.float32 else {}
    if q.dtype != torch.float32 and not acc:
        q, k, v = q.float(), k.float(), v.float()
    s = torch.bmm(q, k.transpose(1, 2), **acc).mul_(scale)
    if masked is not None:
        s.masked_fill_(masked, float("-inf"))
    m = s.amax(-1).clamp_min(-1e30)  # rows without a key: weight 0 everywhere, no NaN
    p = torch.exp(s - m.unsqueeze(-1))
    total = p.sum(-1)
    o = torch.bmm(p.to(v.dtype), v, **acc)
    return o, total, m


def shared_mask(shared_len: torch.Tensor, s_len: int, g: int) -> torch.Tensor:
    """The shared keys each query row of ``shared_prefix_attention`` must not see: bool [1, B x g, S]."""
    b = shared_len.shape[0]
    pos = torch.arange(s_len, device=shared_len.device)
    return (pos.view(1, 1, s_len) >= shared_len.view(b, 1, 1)).expand(b, g, s_len).reshape(1, b * g, s_len)


def shared_prefix_attention(q, shared_k, shared_v, shared_len, own_k, own_v, own_at, scale: float | None = None,
                            masked: torch.Tensor | bool | None = None):
    """One decode query per row over a shared prefix plus the row's own keys, merged with log-sum-exp.

    q: [B, Hq, 1, D]; shared_k/v: [1, Hkv, S, D] (read once for the whole batch); shared_len: int64 [B], the
    prefix length row b sees; own_k/v: [B, Hkv, C, D], the row's own keys; own_at: int64 [B], its last valid
    own key index -> [B, Hq, 1, D] in q's dtype. ``masked``: ``shared_mask(shared_len, S, Hq // Hkv)`` computed
    once for a batch (None: computed here; False: every row sees all S shared keys, no mask applied).
    """
    b, hq, _, d = q.shape
    hkv, s_len, c = shared_k.shape[1], shared_k.shape[2], own_k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    # shared part: all B x g query rows of a KV head against that head's keys, one product per head
    qs = q.view(b, hkv, g, d).transpose(0, 1).reshape(hkv, b * g, d)
    if masked is None:
        masked = shared_mask(shared_len, s_len, g)
    o1, l1, x1 = _partial(qs, shared_k[0], shared_v[0], None if masked is False else masked, scale)
    o1 = o1.view(hkv, b, g, d).transpose(0, 1).reshape(b * hkv, g, d)
    l1, x1 = (t.view(hkv, b, g).transpose(0, 1).reshape(b * hkv, g) for t in (l1, x1))
    # own part: each row's queries against its own keys
    qo = q.reshape(b * hkv, g, d)
    m_own = (torch.arange(c, device=q.device).view(1, c) > own_at.view(b, 1)).repeat_interleave(hkv, 0).unsqueeze(1)
    o2, l2, x2 = _partial(qo, own_k.reshape(b * hkv, c, d), own_v.reshape(b * hkv, c, d), m_own, scale)
    x = torch.maximum(x1, x2)
    w1, w2 = torch.exp(x1 - x), torch.exp(x2 - x)
    out = (o1 * w1.unsqueeze(-1) + o2 * w2.unsqueeze(-1)) / (l1 * w1 + l2 * w2).unsqueeze(-1)
    return out.to(q.dtype).view(b, hq, 1, d)


def reference_shared_prefix_attention(q, shared_k, shared_v, shared_len, own_k, own_v, own_at, scale=None):
    """Row by row: concatenate the row's prefix and own keys and run the plain float64 attention."""
    outs = []
    for r in range(q.shape[0]):
        n, a = int(shared_len[r]), int(own_at[r]) + 1
        k = torch.cat([shared_k[0, :, :n], own_k[r, :, :a]], dim=1).unsqueeze(0)
        v = torch.cat([shared_v[0, :, :n], own_v[r, :, :a]], dim=1).unsqueeze(0)
        outs.append(attention.reference_causal_attention(q[r : r + 1], k, v, scale))
    return torch.cat(outs)


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


class SharedPrefixKV:
    """The batch's view of the cache for the model's forward: the session's layers as the shared prefix, plus
    per-row buffers with room for each row's own tokens and everything it generates."""

    def __init__(self, cache, rows: list[Row], steps: int):
        self.shared = [(layer.keys, layer.values) for layer in cache.layers]
        dev = self.shared[0][0].device
        own_n = [r.own[0][0].shape[2] for r in rows]
        cap = max(own_n) + steps
        self.k, self.v = [], []
        for li, (sk, _) in enumerate(self.shared):
            _, h, _, d = sk.shape
            kb = sk.new_zeros(len(rows), h, cap, d)
            vb = sk.new_zeros(len(rows), h, cap, d)
            for b, r in enumerate(rows):
                kb[b, :, : own_n[b]] = r.own[li][0][0]
                vb[b, :, : own_n[b]] = r.own[li][1][0]
            self.k.append(kb)
            self.v.append(vb)
        self.shared_len = torch.tensor([r.shared_len for r in rows], dtype=torch.long, device=dev).T.contiguous()
        self.at = torch.tensor(own_n, dtype=torch.long, device=dev)
        """Per row: where this step's key goes in its own buffer (then the last valid own key)."""
        self.rows = torch.arange(len(rows), device=dev)
        self.full_prefix = [all(r.shared_len[li] == sk.shape[2] for r in rows) for li, (sk, _) in enumerate(self.shared)]
        """Per layer: every row sees the whole shared cache (multi-request), so no shared mask is needed."""
        self.masks: dict[int, torch.Tensor | bool] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.k[layer_idx][self.rows, :, self.at] = key_states[:, :, 0]
        self.v[layer_idx][self.rows, :, self.at] = value_states[:, :, 0]
        return self.k[layer_idx], self.v[layer_idx]

    def attend(self, layer_idx, q, k, v, scale):
        sk, sv = self.shared[layer_idx]
        if layer_idx not in self.masks:  # constant during the decode: built at the first step (before any capture)
            full = self.full_prefix[layer_idx]
            self.masks[layer_idx] = False if full else shared_mask(self.shared_len[layer_idx], sk.shape[2],
                                                                  q.shape[1] // sk.shape[1])
        return shared_prefix_attention(q, sk, sv, self.shared_len[layer_idx], k, v, self.at, scale,
                                       self.masks[layer_idx])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.shared[layer_idx][0].shape[2])


class BatchStep:
    """One decode step of the whole batch over static buffers: forward the current tokens, write the greedy picks
    to ``out[step]`` and advance. Shapes and addresses never change, so on CUDA the step is captured once as a
    CUDA graph and replayed (as fastdecode.FastDecoder does for one request); on CPU it runs eagerly."""

    def __init__(self, model, kv: SharedPrefixKV, firsts: list[int], positions: list[int], steps: int):
        dev = kv.at.device
        self.model, self.kv = model, kv
        self.tok = torch.tensor([[t] for t in firsts], dtype=torch.long, device=dev)
        self.pos = torch.tensor([[p] for p in positions], dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.out = torch.zeros(steps, len(firsts), dtype=torch.long, device=dev)
        self.graph = None

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        with attention.active(attention.AttnContext(static=self.kv)):
            logits = self.model(input_ids=self.tok, position_ids=self.pos, **{cache_kw(self.model): self.kv}, use_cache=True,
                                logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1).view(-1, 1)
        self.out.index_copy_(0, self.step, nxt.view(1, -1))
        self.tok.copy_(nxt)
        self.pos.add_(1)
        self.kv.at.add_(1)
        self.step.add_(1)

    def capture(self) -> None:
        """Run the first step for real on a side stream (warm-up), then record the step; returns with one step done."""
        dev = self.tok.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self()
        torch.cuda.current_stream(dev).wait_stream(side)
        state = [t.clone() for t in (self.tok, self.pos, self.kv.at, self.step)]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not executed: restore what the recording advanced
            self()
        for buf, saved in zip((self.tok, self.pos, self.kv.at, self.step), state):
            buf.copy_(saved)
        self.graph = graph


LAG = 4
"""CUDA graph path: steps the host lets the GPU run ahead before reading the picked tokens back."""
EAGER_LAG = 0
"""The same for eager steps (0: read each step's tokens before the next; tests set more to check the lagged reads)."""


@torch.inference_mode()
def decode_rows(engine, cache, rows: list[Row], use_graph: bool | None = None):
    """Greedy-decode every row together. Returns per row its GenResult, the batch's mean step time and, per step,
    how many rows were still decoding (a row's ``decode_s`` is its share: each step's time split among them)."""
    stop, dev = engine.stop_ids, engine.device
    use_graph = dev.type == "cuda" if use_graph is None else use_graph
    firsts, first_s = [], []
    for r in rows:
        t0 = time.perf_counter()
        firsts.append(int(r.logits.argmax()))
        first_s.append(time.perf_counter() - t0)
    outs = [[t] for t in firsts]
    live = [t not in stop and r.tp.max_new_tokens > 1 for t, r in zip(firsts, rows)]
    steps = max([r.tp.max_new_tokens - 1 for r, a in zip(rows, live) if a], default=0)
    ran, wall = 0, 0.0
    if steps:
        kv = SharedPrefixKV(cache, rows, steps)
        step = BatchStep(engine.model, kv, firsts, [r.pos for r in rows], steps)
        host = torch.empty(steps, len(rows), dtype=torch.long, pin_memory=dev.type == "cuda")  # rows contiguous
        events = []
        _sync_dev(dev)
        t0 = time.perf_counter()
        done = 0
        if use_graph:
            try:
                step.capture()
                done = 1
            except Exception as e:  # noqa: BLE001 - decode eagerly from fresh buffers instead
                log.warning("batched decode: CUDA graph capture failed (%s: %s); stepping eagerly",
                            type(e).__name__, e)
                use_graph = False
                kv = SharedPrefixKV(cache, rows, steps)
                step = BatchStep(engine.model, kv, firsts, [r.pos for r in rows], steps)
        read = 0
        while read < steps and any(live):
            if ran < steps and (ran < done or ran - read <= (LAG if use_graph else EAGER_LAG)):
                if ran >= done:
                    step()
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
    step_s = wall / ran if ran else 0.0
    active = [sum(1 for o in outs if len(o) - 1 > s) for s in range(max(len(o) for o in outs) - 1)]
    results = []
    for b, out in enumerate(outs):
        share = sum(step_s / active[s] for s in range(len(out) - 1))
        results.append(GenResult(tokens=out, text=engine.decode([t for t in out if t not in stop]),
                                 first_token_s=first_s[b], decode_s=share, stopped=out[-1] in stop,
                                 decode_path="batched"))
    return results, step_s


def _sync_dev(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the replay -------------------------------------------------------------------------------------------
class BatchedReplay(Replay):
    """``Replay`` that decodes an example's turns as one batch where the method allows it (module docstring)."""

    def __iter__(self):
        reason = fallback_reason(self.engine, self.method, self.spec)
        todo = [i for i in range(self.turns) if i not in self.done or i == self.check_turn]
        if reason is not None or len(todo) < 2:
            if reason is not None:
                log.debug("sequential decode: %s", reason)
            yield from super().__iter__()
            return
        self.session = self.engine.session(self.method)
        rows = self._prefill_multi_turn() if self.spec.mode == "multi_turn" else self._prefill_multi_request()
        cache = self.session.cache
        for i, layer in enumerate(cache.layers):
            if type(layer).__name__ != "DynamicLayer":
                raise RuntimeError(f"method {self.method.name!r} leaves a {type(layer).__name__} in cache layer {i}: "
                                   "it must declare fast_decode = False to be decoded sequentially")
        gens, step_s = decode_rows(self.engine, cache, rows)
        mem = self.session.memory()
        e = self.engine
        per_token = 2 * e.kv_heads * e.head_dim * torch.empty((), dtype=e.dtype).element_size()
        for row, gen in zip(rows, gens):
            if row.turn in self.done:  # the stored turn recomputed to check the resume (as Replay does)
                self._compare(row.turn, gen.text)
                continue
            n = len(gen.tokens) - 1
            lengths = [s + row.own[0][0].shape[2] + n for s in row.shared_len]
            row_mem = {**mem, "kv_bytes": sum(lengths) * per_token, "kv_tokens": max(lengths),
                       "kv_full_bytes": kvc.full_nbytes(e.num_layers, e.kv_heads, e.head_dim, row.pos + n, e.dtype)}
            yield self._result(row.turn, row.fs, gen, row_mem, row.prompt_tokens, costs=row.costs,
                               decode_batch=len(rows), decode_step_s=step_s if n else 0.0)

    def _own(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The last ``n`` tokens of every cache layer (copies)."""
        return [(layer.keys[:, :, layer.keys.shape[2] - n :].clone(), layer.values[:, :, layer.values.shape[2] - n :].clone())
                for layer in self.session.cache.layers]

    def _prefill_multi_turn(self) -> list[Row]:
        rows, history = [], 0
        for i in range(self.turns):
            tp = self.builder.first() if i == 0 else self.builder.delta(i, None)
            fs = self._feed(tp.ids, first=i == 0, query_start=tp.query_start)
            history += len(tp.ids)
            costs = self.method.take_costs(self.session)  # this turn's, before the next feed adds its own
            if i not in self.done or i == self.check_turn:
                self._check_window(i, history + tp.max_new_tokens)
                lengths = kvc.layer_lengths(self.session.cache)
                rows.append(Row(i, tp, fs, self.session.last_logits, self.session.pos,
                                [n - tp.rewind for n in lengths], self._own(tp.rewind), history, costs))
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
                                         prefill_shared=ctx_fs.prefill_shared)
            costs = self.method.take_costs(self.session)  # this request's, before the next feed adds its own
            if j in self.done and j != self.check_turn:
                continue
            prompt = len(ctx_ids) + len(tp.ids)
            self._check_window(j, prompt + tp.max_new_tokens)
            rows.append(Row(j, tp, fs, self.session.last_logits, self.session.pos, list(base),
                            self._own(len(tp.ids)), prompt, costs))
        self.session.rollback(checkpoint)
        return rows
