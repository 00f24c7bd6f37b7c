"""KIVI's batched decode (scbench/batch.py, ``timing=batched``): an example's requests (and golden-history turns)
decoded together, each row attending exactly the values its own sequential decode attends.

The context's packed chunks are the same for every row (quantised before any query): ``prepare`` de-quantises them
ONCE per batch into the shared tensor that ``SharedPrefixKV`` reads once per step for the whole batch. Everything
after them is the row's own: the context's full-precision residual tail, its query tokens (those its feed already
quantised as their de-quantised values), then its generated tokens. When the row's sequential decode would quantise
a group (``KIVILayer.update``: after that step's attention, once the residual holds ``residual + group`` tokens),
``after_step`` replaces the group in the row's own buffer by ``dequantize(quantize(group))``, the values it attends
from then on. The schedule depends only on token counts (``flush_schedule``, host side); the flush runs eagerly
between the batch's steps (between CUDA graph replays), for every layer at once.

Turns record ``decode_kernel`` ``<shared-prefix kernel>+dequant kivi`` (the shared context was de-quantised) and per
row the KV bytes its sequential decode holds (packed sizes, ``row_memory``). ``plan_reason`` keeps a run sequential
where batching could not be exact or does not fit: the de-quantised copy beyond free device memory, or multi-turn
turns whose decode could quantise history that the turn's rewind then cuts (the next turn would depend on the
generated tokens; ``multi_turn_reason``). With ``decode_cache=temp`` decodes never quantise (no flushes, and
multi-turn histories do not depend on the answers: golden-history turns batch whatever their lengths).
tests/engines/test_kivi_batch.py: batched == sequential rows.
"""
from __future__ import annotations

import copy
import weakref
from types import SimpleNamespace

import torch

from scbench.kernels import kivi_dequant
from scbench.kv.quant import analytic_nbytes, dequantize, quantize


def flush_schedule(own: int, start: int, steps: int, residual: int, group: int) -> list[tuple[int, int, int]]:
    """The groups a row's decode quantises: ``(step, first own index, tokens)`` after each of ``steps`` steps, for a
    row holding ``own`` own tokens whose residual starts at own index ``start`` (``KIVILayer._flush``'s rule)."""
    out, r = [], own - start
    for t in range(steps):
        r += 1
        m = max(0, (r - residual) // group) * group
        if m:
            out.append((t, start, m))
            start, r = start + m, r - m
    return out


def counts_after(nq: int, n: int, *, append: int = 0, crop: int | None = None, residual: int, group: int):
    """A KIVILayer's (quantised tokens, all tokens) after appending ``append`` tokens or cropping to ``crop``."""
    if crop is not None:
        return (nq, crop) if crop >= nq else (crop // group * group, crop)
    n += append
    return nq + max(0, (n - nq - residual) // group) * group, n


def multi_turn_reason(lengths: list[int], rewinds: list[int], max_new: list[int], residual: int, group: int):
    """Why golden-history turns cannot be batched exactly (None: they can). The sequential run decodes turn i (up to
    ``max_new - 1`` tokens fed), then crops them and the rewind; the batched prefill crops the rewind only. A group
    quantised during turn i's decode changes what the next turns attend (de-quantised where the batch has it exact,
    or cut back into the residual with the generated tokens' scales), depending on the answer's length: only a run
    whose earlier turns never quantise during their decode is the same batched."""
    nq, n = counts_after(0, 0, append=lengths[0], residual=residual, group=group)
    for i in range(len(lengths) - 1):
        if counts_after(nq, n, append=max_new[i] - 1, residual=residual, group=group)[0] != nq:
            return (f"turn {i}'s decode may quantise its history (what turn {i + 1} attends would depend on the "
                    "length of the answer)")
        nq, n = counts_after(*counts_after(nq, n, crop=n - rewinds[i], residual=residual, group=group),
                             append=lengths[i + 1], residual=residual, group=group)
    return None


def _span(chunks, a: int, b: int, group: int, axis: int):
    """The (packed, scale, zero) slices of ``chunks`` (consecutive, from token 0) covering tokens [a, b)."""
    at = 0
    for packed, scale, zero in chunks:
        t = packed.shape[2]
        lo, hi = max(a, at), min(b, at + t)
        if lo < hi:
            s = slice((lo - at) // group, (hi - at) // group) if axis == -2 else slice(lo - at, hi - at)
            yield lo, packed[:, :, lo - at : hi - at], scale[:, :, s], zero[:, :, s]
        at += t


def dequant_tokens(chunks, a: int, b: int, bits: int, group: int, axis: int, out: torch.Tensor, at: int = 0):
    """De-quantise tokens [a, b) of ``chunks`` into ``out[:, :, at:]`` (on CUDA the kernel of kivi_dequant.py,
    bit-identical to ``dequantize``, as ``KIVILayer.dequantized`` picks it; else ``dequantize``)."""
    kernel = out.is_cuda and kivi_dequant.usable(out)
    for lo, packed, scale, zero in _span(chunks, a, b, group, axis):
        if kernel:
            kivi_dequant.dequantize_into(out, at + lo - a, packed, scale, zero, bits=bits, group=group, axis=axis)
        else:
            t = packed.shape[2]
            out[:, :, at + lo - a : at + lo - a + t] = dequantize(packed, scale, zero, bits, group, axis, out.dtype)


def _common(states) -> int:
    """Tokens of the leading chunks every state shares (the same chunk objects: quantised once, before any row)."""
    ref, n = states[0][0], 0
    for i, chunk in enumerate(ref):
        if any(len(s[0]) <= i or s[0][i] is not chunk for s in states[1:]):
            break
        n += chunk[0].shape[2]
    return n


class KIVIBatch:
    """The batched decode of one ``KIVI`` instance (module docstring)."""

    kernel = "dequant"
    """What ``SharedPrefixKV.kernel_used`` appends: the shared context was de-quantised once for the batch."""

    def __init__(self, method):
        self.m = method
        self.plan = None

    # --- before the prefill: can this run be batched exactly, within memory? ------------------------------------
    def plan_reason(self, engine, spec, builder, turns: int) -> str | None:
        m, b = self.m, copy.copy(builder)  # the replay's builder keeps its history: tokenize on a copy
        tokens = None
        if spec.mode == "multi_turn":
            max_new = [builder.max_new(i) for i in range(turns)]
            temp = m.decode_cache == "temp"  # decodes never quantise: histories do not depend on the answers
            # (conservative: no need to tokenize the prompts)
            if not temp and any(n - 1 >= m.group for n in max_new[:-1]):
                return (f"kivi: an earlier turn's decode ({max(max_new[:-1])} tokens) may quantise a group of "
                        "history that later turns attend (they would depend on the length of its answer)")
            tps = [b.first()] + [b.delta(i, None) for i in range(1, turns)]
            why = None if temp else multi_turn_reason([len(t.ids) for t in tps], [t.rewind for t in tps], max_new,
                                                      m.residual, m.group)
            if why is not None:
                return f"kivi: {why}"
            tokens = sum(len(t.ids) for t in tps)
        dev = torch.device(engine.device)
        if dev.type != "cuda":
            return None
        elt = torch.empty((), dtype=engine.dtype).element_size()
        per_token = 2 * engine.num_layers * engine.kv_heads * engine.head_dim * elt
        # free: the driver's, plus what torch's allocator holds unused
        free = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        if tokens is None:  # multi-request: the prompt budget bounds the context; tokenize only when that is too much
            tokens = builder.budget if per_token * builder.budget <= free else len(b.context())
        if per_token * tokens > free:
            return (f"kivi: the de-quantised shared context ({per_token * tokens / 2**30:.2f} GiB) does not fit free "
                    f"device memory ({free / 2**30:.2f} GiB)")
        return None

    # --- after the prefill: the shared tensor and the rows' own tokens -------------------------------------------
    def prepare(self, cache, rows):
        """Rows hold their KIVILayer states (batch.BatchedReplay._own); lay out the shared context and each row's
        own tokens -> the cache ``SharedPrefixKV`` reads (its layers: the de-quantised shared chunks)."""
        m = self.m
        states = [[r.own[li] for r in rows] for li in range(len(cache.layers))]
        if not any(isinstance(s, tuple) and len(s) == 6 for s in states[0]):
            return cache  # no layer was quantised (nothing to lay out): the plain shared-prefix batch
        shared_n = min(_common(s) for s in states)
        layers, own = [], [[] for _ in rows]
        starts = None
        for li, layer_states in enumerate(states):
            kc, vc, _, k0, _, _ = layer_states[0]
            _, h, _, d = k0.shape
            vg = cache.layers[li].value_group
            # no chunk in common (a context shorter than residual + group): one zero token no row sees
            sk, sv = (k0.new_zeros(1, h, max(shared_n, 1), d) for _ in range(2))
            dequant_tokens(kc, 0, shared_n, m.bits, m.group, -2, sk)
            dequant_tokens(vc, 0, shared_n, m.bits, vg, -1, sv)
            layers.append(SimpleNamespace(keys=sk, values=sv))  # a layer as SharedPrefixKV reads it
            row_starts = []
            for b, (kc, vc, nq, keys, values, _) in enumerate(layer_states):
                parts = []
                for chunks, resid, grp, axis in ((kc, keys, m.group, -2), (vc, values, vg, -1)):
                    out = resid.new_empty(1, h, nq - shared_n + resid.shape[2], d)
                    dequant_tokens(chunks, shared_n, nq, m.bits, grp, axis, out)
                    out[:, :, nq - shared_n :] = resid
                    parts.append(out)
                own[b].append(tuple(parts))
                row_starts.append(nq - shared_n)
            if starts is not None and row_starts != starts:
                raise RuntimeError(f"kivi batched decode: cache layer {li} quantised other tokens than layer 0")
            starts = row_starts
        for b, r in enumerate(rows):
            r.own, r.shared_len = own[b], [shared_n] * len(layers)
        plan = {"starts": starts, "own": [o[0][0].shape[2] for o in own], "shared": shared_n,
                "vgroup": cache.layers[0].value_group}
        return SimpleNamespace(layers=layers, kivi_plan=plan)

    # --- during the decode -----------------------------------------------------------------------------------
    def attach(self, cache, kv) -> None:
        m = self.m
        self.kv, self.plan = weakref.proxy(kv), getattr(cache, "kivi_plan", None)  # kept no longer than the decode
        self.shapes = [(layer.keys.shape[1], layer.keys.shape[3], layer.keys.element_size()) for layer in cache.layers]
        self.due: dict[int, list[tuple[int, int, int]]] = {}
        self.sched = []
        if self.plan is None:
            return
        steps = kv.k[0].shape[2] - max(self.plan["own"])
        for b, (own, start) in enumerate(zip(self.plan["own"], self.plan["starts"])):
            # decode_cache=temp: the sequential decode never quantises (KIVILayer's freeze mark)
            self.sched.append([] if m.decode_cache == "temp"
                              else flush_schedule(own, start, steps, m.residual, m.group))
            for t, a, n in self.sched[-1]:
                self.due.setdefault(t, []).append((b, a, n))

    def attend(self, kv, layer_idx, q, k, v, scale):
        return None  # the shared-prefix path: shared de-quantised chunks + the row's own (exact-as-attended) tokens

    def after_step(self, step: int) -> None:
        """Quantise and de-quantise in place the groups due after ``step`` (every layer at once, eager)."""
        m, kv = self.m, self.kv
        for b, a, n in self.due.get(step, ()):
            for bufs, grp, axis in ((kv.k, m.group, -2), (kv.v, self.plan["vgroup"], -1)):
                x = torch.stack([buf[b, :, a : a + n] for buf in bufs])  # [L, H, n, D]
                y = dequantize(*quantize(x, m.bits, grp, axis), m.bits, grp, axis, x.dtype)
                for li, buf in enumerate(bufs):
                    buf[b, :, a : a + n] = y[li]

    def row_memory(self, b: int, lengths: list[int], fed: int) -> dict:
        """The KV bytes row b's sequential decode holds after ``fed`` steps (packed chunks + residual)."""
        if self.plan is None:
            return {}
        m, p = self.m, self.plan
        nq = p["shared"] + p["starts"][b] + sum(n for t, _, n in self.sched[b] if t < fed)
        held = 0
        for li, (h, d, elt) in enumerate(self.shapes):
            held += analytic_nbytes(lengths[li], batch=1, heads=h, head_dim=d, bits=m.bits, group=m.group,
                                    residual=m.residual, elt=elt, quant=nq)
        return {"kv_bytes": held}
