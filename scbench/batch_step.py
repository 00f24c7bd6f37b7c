"""The batched decode step of scbench/batch.py: shared-prefix attention and the batch's cache view.

``SharedPrefixKV`` is the cache the model's forward sees during a batched decode: the session's cache layers as
the shared prefix (read once per step for the whole batch) and per-row buffers for each row's own tokens. Its
attention (``SharedPrefixKV.attend``) is, on CUDA with Triton, the shared-prefix kernel of
scbench/kernels/shared_prefix.py (``KERNEL``), else ``shared_prefix_attention`` below: torch products in float32,
the plain path and the reference the kernel is tested against (tests/engines/test_shared_prefix_kernel.py), itself
checked against ``reference_shared_prefix_attention`` (float64, row by row).

``BatchStep`` is one decode step of the batch over static buffers, captured as a CUDA graph on CUDA. It runs with
the fused module forwards of scbench/engines/fuse.py (fused q/k/v and gate/up GEMMs, one-kernel RMSNorm; the rotary
embedding + own-key store as one kernel, ``shared_prefix.rope_store_rows``), as FastDecoder does for one request.
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from scbench.engines import attention, fuse
from scbench.engines.base import cache_kw
from scbench.kernels import ragged_shared, shared_prefix

log = logging.getLogger(__name__)

KERNELS = ("triton", "torch")
KERNEL = os.environ.get("SCBENCH_BATCH_KERNEL") or "triton"
"""Shared-prefix attention on CUDA: ``triton`` (scbench/kernels/shared_prefix.py) or ``torch``
(``shared_prefix_attention``). CPU runs use torch unless the Triton interpreter is on (tests)."""
if KERNEL not in KERNELS:
    raise ValueError(f"SCBENCH_BATCH_KERNEL must be one of {KERNELS}, got {KERNEL!r}")


def kernel_for(device: torch.device) -> str:
    """The shared-prefix attention a batch on ``device`` runs (what batched turns record as ``decode_kernel``):
    the Triton kernel on CUDA (the interpreter tests call it directly), else the torch path."""
    return "triton" if KERNEL == "triton" and device.type == "cuda" and shared_prefix.triton is not None else "torch"


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


class RowBuffers:
    """A batch's own-token buffers as the model's forward writes them: ``k`` / ``v`` per layer [B, Hkv, cap, D], each
    row's write position ``at`` [B] and ``rows`` = arange(B)."""

    fused_step = True
    """fuse.py's attention forward may take this cache: it calls ``rope_store`` (the batch's rows write at their
    own positions) and ``attend``."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.k[layer_idx][self.rows, :, self.at] = key_states[:, :, 0]
        self.v[layer_idx][self.rows, :, self.at] = value_states[:, :, 0]
        return self.k[layer_idx], self.v[layer_idx]

    def rope_store(self, layer_idx, qkv, cos, sin, hq: int, hkv: int) -> torch.Tensor:
        """fuse.py's fused attention: rotary embedding of q and k, every row's key/value written at ``at``."""
        # CPU tensors: the reference even under the Triton interpreter (its tests call the kernel; here it would
        # only slow every batched test down)
        fn = shared_prefix.rope_store_rows if qkv.is_cuda else shared_prefix.rope_store_rows_ref
        return fn(qkv, cos, sin, self.k[layer_idx], self.v[layer_idx], self.at, hq, hkv)


class SharedPrefixKV(RowBuffers):
    """The batch's view of the cache for the model's forward: the session's layers as the shared prefix, plus
    per-row buffers with room for each row's own tokens and everything it generates. ``rows``: batch.Row's."""

    def __init__(self, cache, rows: list, steps: int, kernel: str | None = None, plugin=None, bufs=None):
        self.shared = [(layer.keys, layer.values) for layer in cache.layers]
        dev = self.shared[0][0].device
        self.ragged = {li: RaggedShared(layer, rows, li) for li, layer in enumerate(cache.layers)
                       if getattr(layer, "scbench_ragged", False)}
        """Per ragged layer (AdaKV, KVzip, DuoAttention: per-head prefix lengths) its prefix read in place."""
        own_n = [r.own[0][0].shape[2] for r in rows]
        cap = max(own_n) + steps
        self.k, self.v = [], []
        for li, (sk, _) in enumerate(self.shared):
            _, h, _, d = sk.shape
            if bufs is not None:  # MultiKV: this run's rows of the combined batch's buffers (views, zeroed)
                kb, vb = bufs[0][li], bufs[1][li]
            else:
                kb = sk.new_zeros(len(rows), h, cap, d)
                vb = sk.new_zeros(len(rows), h, cap, d)
            for b, r in enumerate(rows):
                kb[b, :, : own_n[b]] = r.own[li][0][0]
                vb[b, :, : own_n[b]] = r.own[li][1][0]
            self.k.append(kb)
            self.v.append(vb)
        shared_len = [[self.ragged[li].seen[b] if li in self.ragged else n for li, n in enumerate(r.shared_len)]
                      for b, r in enumerate(rows)]
        self.shared_len = torch.tensor(shared_len, dtype=torch.long, device=dev).T.contiguous()
        """[layer, row]: shared tokens the row sees (a ragged layer: suffix rows after the whole per-head prefix)."""
        self.at = torch.tensor(own_n, dtype=torch.long, device=dev) if bufs is None else bufs[2]
        """Per row: where this step's key goes in its own buffer (then the last valid own key)."""
        if bufs is not None:
            self.at.copy_(torch.tensor(own_n, dtype=torch.long))
        self.rows = torch.arange(len(rows), device=dev)
        self.full_prefix = [all(r.shared_len[li] == sk.shape[2] for r in rows) for li, (sk, _) in enumerate(self.shared)]
        """Per layer: every row sees the whole shared cache (multi-request), so no shared mask is needed."""
        self.masks: dict[int, torch.Tensor | bool] = {}
        self.kernel = kernel_for(dev) if kernel is None else kernel
        """The shared-prefix attention this batch runs: ``triton`` or ``torch`` (``KERNEL``)."""
        self.plugin = plugin
        """A loading method's batched decode (``Method.batch_decoder()``, e.g. methods/quest_batch.py): its
        ``attend(kv, layer_idx, q, k, v, scale)`` answers a layer's attention (None: the shared-prefix path)."""
        if plugin is not None:
            plugin.attach(cache, self)

    def attend(self, layer_idx, q, k, v, scale):
        if self.plugin is not None:
            out = self.plugin.attend(self, layer_idx, q, k, v, scale)
            if out is not None:
                return out
        sk, sv = self.shared[layer_idx]
        if layer_idx in self.ragged:
            return self.ragged[layer_idx].attend(self.kernel, q, sk, sv, self.shared_len[layer_idx], k, v, self.at,
                                                 scale)
        if self.kernel == "triton":
            return shared_prefix.shared_prefix_decode(q, sk, sv, self.shared_len[layer_idx], k, v, self.at, scale)
        if layer_idx not in self.masks:  # constant during the decode: built at the first step (before any capture)
            full = self.full_prefix[layer_idx]
            self.masks[layer_idx] = False if full else shared_mask(self.shared_len[layer_idx], sk.shape[2],
                                                                  q.shape[1] // sk.shape[1])
        return shared_prefix_attention(q, sk, sv, self.shared_len[layer_idx], k, v, self.at, scale,
                                       self.masks[layer_idx])

    def kernel_used(self) -> str:
        """What attention the batch actually ran, for the turns' ``decode_kernel`` (after the decode): ``kernel``,
        ``triton+torch`` when some ragged layers fell back to the torch path after a failed launch (``torch``
        when every layer did), and a loading method's own batched attention as ``+<plugin kernel> <name>``
        (e.g. ``triton+triton quest``: the dense layers through the shared-prefix kernel, the rest Quest's)."""
        used = self.kernel
        fell = [r.triton_ok is False for r in self.ragged.values()]
        if used == "triton" and any(fell):
            used = "torch" if all(fell) and len(fell) == len(self.shared) else "triton+torch"
        if self.plugin is not None:
            name = type(self.plugin).__name__.lower().removesuffix("batch") or "plugin"
            used += f"+{getattr(self.plugin, 'kernel', '?')} {name}"
        return used

    def get_seq_length(self, layer_idx: int = 0) -> int:
        extra = max(self.ragged[layer_idx].lengths) if layer_idx in self.ragged else 0
        return extra + int(self.shared[layer_idx][0].shape[2])


class MultiKV(RowBuffers):
    """Several runs' batches decoded as one (a grouped sweep, scbench/group_example.py): every run's rows forward
    together, so the model's weights are read once per step for all of them, while each run's rows attend to that
    run's own cache (its ``SharedPrefixKV``, with its plugin). The rows' own-token buffers and write positions are one
    tensor per layer (``k``, ``v``, ``at``: what the fused step writes in one call); each part's are views of its
    rows.
    ``parts``: (cache, rows, plugin or None) per run."""

    def __init__(self, parts: list, steps: int, kernel: str | None = None):
        rows = [r for _, rs, _ in parts for r in rs]
        shared = parts[0][0].layers
        cap = max(r.own[0][0].shape[2] for r in rows) + steps
        dev = shared[0].keys.device
        self.k = [layer.keys.new_zeros(len(rows), layer.keys.shape[1], cap, layer.keys.shape[3]) for layer in shared]
        self.v = [layer.values.new_zeros(len(rows), layer.values.shape[1], cap, layer.values.shape[3])
                  for layer in shared]
        self.at = torch.zeros(len(rows), dtype=torch.long, device=dev)
        self.rows = torch.arange(len(rows), device=dev)
        self.spans, self.parts, start = [], [], 0
        for cache, rs, plugin in parts:
            s = slice(start, start + len(rs))
            bufs = ([k[s] for k in self.k], [v[s] for v in self.v], self.at[s])
            self.parts.append(SharedPrefixKV(cache, rs, steps, kernel=kernel, plugin=plugin, bufs=bufs))
            self.spans.append(s)
            start += len(rs)
        self.kernel = self.parts[0].kernel
        self.plugin = None

    def attend(self, layer_idx, q, k, v, scale):
        return torch.cat([p.attend(layer_idx, q[s], k[s], v[s], scale) for p, s in zip(self.parts, self.spans)])

    def after_steps(self) -> list:
        """The parts' plugins' eager work between steps (``after_step(step)``)."""
        return [p.plugin.after_step for p in self.parts if getattr(p.plugin, "after_step", None) is not None]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(p.get_seq_length(layer_idx) for p in self.parts)


class RaggedShared:
    """A ragged layer (scbench/kv/ragged.py) as a batch's shared context: its flat per-head prefixes read in place,
    its dense suffix as the shared rows a row may see part of (multi-turn), and the kernel's work list (built once:
    lengths and suffix are fixed during the decode). ``seen[b]``: suffix rows row b sees; a row recorded at
    ``shared_len`` tokens (``get_seq_length``: longest prefix + suffix) sees the whole prefix of every head and
    ``shared_len - max(lengths)`` suffix rows (compression fired once, before any row: batch.fallback_reason)."""

    def __init__(self, layer, rows: list, li: int):
        self.k, self.v, self.lengths = layer.prefix_k, layer.prefix_v, list(layer.lengths)
        t, top = layer.keys.shape[2], max(self.lengths)
        self.seen = [r.shared_len[li] - top for r in rows]
        if any(not 0 <= s <= t for s in self.seen):
            raise RuntimeError(f"batched decode: cache layer {li} (ragged, prefixes up to {top} tokens + {t} appended) "
                               f"does not hold the shared tokens the rows saw ({[r.shared_len[li] for r in rows]})")
        dev = self.k.device
        self.offsets = torch.tensor(ragged_shared.offsets_of(self.lengths), device=dev)
        self.len_t = torch.tensor(self.lengths, device=dev)
        self.work = None
        self.triton_ok: bool | None = None
        """None until the kernel first ran; False after it failed to launch (the torch path from then on)."""

    def attend(self, kernel, q, sk, sv, seen, k, v, at, scale):
        if kernel == "triton" and self.triton_ok is not False:
            first = self.work is None  # the first step: eager, before any CUDA graph capture
            if first:
                rq = ragged_shared.tiling(q.shape[0], q.shape[1] // len(self.lengths))[2]
                split = 64 if q.device.type == "cpu" else None  # the interpreter (tests): short static loops
                self.work = ragged_shared.SharedWork(self.lengths, sk.shape[2], rq, q.device, split=split)
            try:
                out = ragged_shared.ragged_shared_decode(q, self.k, self.v, self.offsets, self.len_t, sk, sv, seen, k,
                                                         v, at, self.work, scale)
            except Exception as e:  # noqa: BLE001 - a launch failure on the first step: the torch path, not a crash
                if not first:
                    raise
                log.warning("ragged shared-prefix kernel failed to launch (%s: %s); torch path instead",
                            type(e).__name__, e)
                self.triton_ok = False
            else:
                self.triton_ok = True
                return out
        return ragged_shared.ragged_shared_attention(q, self.k, self.v, self.lengths, sk, sv, seen, k, v, at, scale)


class BatchStep:
    """One decode step of the whole batch over static buffers: forward the current tokens, write the greedy picks
    to ``out[step]`` and advance. Shapes and addresses never change, so on CUDA the step is captured once as a
    CUDA graph and replayed (as fastdecode.FastDecoder does for one request); on CPU it runs eagerly. ``fused``:
    step with fuse.py's fused module forwards (default ``fuse.ENABLED``, ``SCBENCH_FUSED_DECODE=0`` turns it off)."""

    def __init__(self, model, kv: SharedPrefixKV, firsts: list[int], positions: list[int], steps: int,
                 fused: bool | None = None):
        dev = kv.at.device
        self.model, self.kv = model, kv
        self.plan = fuse.prepare(model) if (fuse.ENABLED if fused is None else fused) else None
        self.tok = torch.tensor([[t] for t in firsts], dtype=torch.long, device=dev)
        self.pos = torch.tensor([[p] for p in positions], dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.out = torch.zeros(steps, len(firsts), dtype=torch.long, device=dev)
        self.graph = None

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        fusing = fuse.active(self.model, self.plan) if self.plan is not None else contextlib.nullcontext()
        with attention.active(attention.AttnContext(static=self.kv)), fusing:
            logits = self.model(input_ids=self.tok, position_ids=self.pos, **{cache_kw(self.model): self.kv},
                                use_cache=True, logits_to_keep=1).logits
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


