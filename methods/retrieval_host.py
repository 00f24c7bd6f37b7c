"""RetrievalAttention's host tier as the paper splits it (arXiv 2409.10516 §4): per decode step and layer the
accelerator attends over the static pattern it keeps (``scbench.kv.split.DeviceWindow``: the first ``n_init``
and last ``n_local`` rows), while the host searches its stored keys for the ``top_k`` by inner product and
attends over them itself (one C call, scbench/kernels/ra_host.c, on the CPU's threads; torch ops when it cannot
run: float32 products and softmax, the weighted sum of half-precision values with weights rounded to their precision,
as flash attention does); only the query (to the host) and the host's
partial result (output + log-sum-exp per query head, to the accelerator) cross the bus, and the two halves are
merged exactly (``scbench.kv.split.merge``). The device half is launched before the host waits for the query,
so the two overlap. On CUDA with bfloat16 (``stream_path``) nothing waits: the host half is queued as a host function
in the decode stream (``stream_decode``), so the Python thread launches the rest of the step meanwhile (at 131K on
the H200 box 139 vs 198 ms per token, results/perf/ra_host_stream.md); ``SCBENCH_RA_ASYNC=0`` keeps the synchronous
split.

The row set equals ``RetrievalAttention.select``'s (the same inner products and ``topk``), so the plain loading
path (``split=false``: rows gathered on the host and loaded to the accelerator) stays the reference:
tests/methods/test_retrieval_host.py compares greedy tokens. Exact search only; a faiss index or ``recall``
takes the loading path.
"""
from __future__ import annotations

import time

import torch

from scbench.kernels import ra_host
from scbench.kv.offload import TieredLayer, nbytes
from scbench.kv.split import DeviceWindow, merge, partial_attention
from scbench.methods import retrieval_search
from scbench.methods.retrieval_search import Workspace, half_search, scratch, topk_rows


def host_partial(q: torch.Tensor, keys: torch.Tensor, vbuf: torch.Tensor, lo: int, hi: int, top_k: int,
                 group: bool, scale: float, ws: Workspace | None = None,
                 native: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, Hq, D] (float32, host) over the top ``top_k`` rows of [lo, hi) by inner product (all of
    them when there are no more): keys [B, Hkv, n, D] the searched keys (float32), vbuf [B, Hkv, cap, D] the
    values' contiguous buffer -> (out [B, Hq, D], lse [B, Hq]) float32; lse -inf where no row is searchable.
    Half-precision ``keys`` must be the keys' contiguous buffer [B, Hkv, cap, D] (``half_search``).

    The search's inner products are the attention logits (divided by the scale): with float32 keys the retrieved
    keys are never gathered, only their values (``index_select`` of whole rows).

    ``native`` (None: when it can run): the C kernel (scbench/kernels/ra_host.py), which reads float32 or bfloat16
    keys in place; False: the torch ops below, its reference."""
    b, hq, d = q.shape
    hkv, cap = vbuf.shape[1], vbuf.shape[2]
    rep = hq // hkv
    if hi <= lo:
        return q.new_zeros(b, hq, d), q.new_full((b, hq), float("-inf"))
    if native is not False and ra_host.supports(keys, vbuf) and (native or ra_host.available()):
        return ra_host.host_partial(q, keys, vbuf, lo, hi, top_k, group, scale,
                                    scratch(ws, "scores", (b * hq * (hi - lo),), torch.float32))
    m = hi - lo
    base = (torch.arange(b * hkv).view(b, hkv, 1) * cap + lo)
    if keys.dtype != torch.float32:  # half-precision keys searched in place, candidates rescored in float32
        idx, sel = half_search(q, keys, lo, hi, top_k, group, ws)
    else:  # [B, Hkv, rep, m]: top_keys' products (the same expression: the same top-k)
        s = scratch(ws, "s", (b, hkv, rep, m), torch.float32)
        torch.matmul(q.reshape(b, hkv, rep, d), keys[..., lo:hi, :].transpose(-1, -2), out=s)
        if m <= top_k:  # every searchable row
            idx = torch.arange(m).expand(b, hkv, m)
            sel = s
        elif group:
            idx = topk_rows(s.amax(2), top_k)  # [B, Hkv, k]
            sel = s.gather(-1, idx.unsqueeze(2).expand(b, hkv, rep, top_k))
        elif retrieval_search.BOUND:
            idx = topk_rows(s, top_k)  # [B, Hkv, rep, k]
            sel = s.gather(-1, idx)
        else:  # topk's own values: no gather
            sel, idx = s.topk(top_k, dim=-1, sorted=False)
    logits = sel * scale
    lse = logits.logsumexp(-1, keepdim=True)
    p = (logits - lse).exp()
    flat = vbuf.view(-1, d)
    p = p.to(vbuf.dtype)  # half-precision values: weights rounded as flash attention's P @ V (float32 sums)
    rows = (idx + (base if idx.dim() == 3 else base.unsqueeze(-1))).reshape(-1)
    vals = scratch(ws, "vals", (rows.numel(), d), vbuf.dtype)
    torch.index_select(flat, 0, rows, out=vals)
    if idx.dim() == 3:  # one row set per KV head
        out = p @ vals.view(b, hkv, -1, d)  # [B, Hkv, rep, D]
    else:
        out = (p.unsqueeze(-2) @ vals.view(b, hkv, rep, -1, d)).squeeze(-2)
    return out.reshape(b, hq, d).float(), lse.reshape(b, hq)


class Staging:
    """Per-layer pinned host buffers for the query and the host's partial result (reused every step: the copy
    out of a buffer completes before the same layer's next step, which follows several synchronisations), and
    for the stream path its job (``ra_host.HostJob``) and float32 scratch."""

    def __init__(self, q: torch.Tensor, pin: bool):
        b, hq, _, d = q.shape
        self.q = torch.empty((b, hq, d), dtype=q.dtype, pin_memory=pin)
        self.part = torch.empty((b, hq, d + 1), dtype=torch.float32, pin_memory=pin)
        self.job = None
        self.launched = False

    def take_seconds(self) -> float:
        """Host seconds the stream jobs of this layer ran since the last call (waits for a job still queued)."""
        if self.job is None:
            return 0.0
        if self.launched and not self.job.done:
            torch.cuda.current_stream().synchronize()
        self.check()
        s, self.job.seconds = self.job.seconds, 0.0
        return s

    def check(self) -> None:
        """Raise if the last job that ran failed (``ra_host_partial``'s return code: unsupported sizes)."""
        if self.job is not None and self.job.done and self.job.rc:
            raise RuntimeError(f"RetrievalAttention host job: ra_host_partial returned {self.job.rc} (B={self.job.B}, "
                               f"Hq={self.job.Hq}, Hkv={self.job.Hkv}, D={self.job.D}, rows [{self.job.lo}, "
                               f"{self.job.hi}))")


def stream_path(method, layer: TieredLayer, q: torch.Tensor) -> bool:
    """Whether this step's host half runs as a CUDA host function in the decode stream (``stream_decode``): a
    host tier on CUDA, bfloat16 queries and stored keys/values, the C kernel and ``cuLaunchHostFunc`` available
    (``SCBENCH_RA_ASYNC=0`` turns it off), and something to search."""
    return (layer.compute.type == "cuda" and layer.storage.type == "cpu" and q.dtype == torch.bfloat16
            and layer.dtype == torch.bfloat16 and q.shape[-1] <= 512 and method.reads_stored_keys(layer)
            and layer.n - method.n_local > method.n_init and ra_host.stream_jobs()
            and ra_host.supports(layer._k.buf, layer._v.buf))


def stream_decode(method, layer: TieredLayer, q: torch.Tensor, scale: float) -> torch.Tensor:
    """``split_decode`` without a host synchronisation: the device half, the query's copy to the host, the host
    half as a host function in the stream's order (``ra_host.HostJob``: the same C call as ``host_partial``, its
    bfloat16 query converted there), the partial result's copy back and the merge are all queued, so the Python
    thread goes on launching the rest of the step (and the next layers) while the host searches; the new token's
    rows reach the host tier the same way (``Rows.append`` with ``async_rows``). Same numbers as ``split_decode``:
    the same kernel on the same inputs. ``load_s`` counts the host jobs' own seconds (``take_seconds``)."""
    b, hq, _, d = q.shape
    st = layer.staging
    stream = torch.cuda.current_stream()
    if st.launched and not st.job.done:
        stream.synchronize()  # not passed yet (a second call in one step): its buffers are about to be reused
    st.check()
    if not layer.window.valid:  # rebuilt from the host rows: they must hold every appended row
        stream.synchronize()
    ks, vs = layer.window.rows(layer)
    st.rows_attended = ks.shape[-2]
    out_d, lse_d = partial_attention(q[:, :, 0], ks, vs, scale)
    st.q.copy_(q[:, :, 0], non_blocking=True)
    lo, hi = method.n_init, layer.n - method.n_local
    if method.workspace is None:
        method.workspace = Workspace()
    ws = method.workspace
    need = b * hq * (hi - lo)
    sc = ws.bufs.get("stream_scores")
    if sc is None or sc.numel() < need:
        stream.synchronize()  # a queued job may still write the old buffer
        sc = ws.bufs["stream_scores"] = torch.empty(need + b * hq * 4096, dtype=torch.float32)
    if st.job is None:
        st.qf = torch.empty((b, hq, d), dtype=torch.float32)
        st.out = torch.empty((b, hq, d), dtype=torch.float32)
        st.lse = torch.empty((b, hq), dtype=torch.float32)
        st.job = ra_host.HostJob(q=st.q.data_ptr(), qf=st.qf.data_ptr(), out=st.out.data_ptr(), lse=st.lse.data_ptr(),
                                 part=st.part.data_ptr(), B=b, Hq=hq, D=d)
    kb, vb = layer._k.buf, layer._v.buf
    j = st.job
    j.keys, j.kcap, j.vals, j.vcap = kb.data_ptr(), kb.shape[2], vb.data_ptr(), vb.shape[2]
    j.kbf16, j.vbf16, j.Hkv, j.lo, j.hi = 1, 1, kb.shape[1], lo, hi
    j.top_k, j.group, j.scale, j.scores = method.top_k, int(method.gqa == "group"), float(scale), sc.data_ptr()
    j.nthreads = max(1, torch.get_num_threads() - 1)  # one core for the Python thread launching meanwhile
    ra_host.launch_job(j, stream)
    st.launched = True
    part = st.part.to(layer.compute, non_blocking=True)
    out = merge(out_d, lse_d, part[..., :d], part[..., d])
    layer._k.async_rows = layer._v.async_rows = True  # from the next token on, appends are queued too
    return out


def split_decode(method, layer: TieredLayer, q: torch.Tensor, scale: float | None) -> torch.Tensor:
    """One decode step's attention of q [B, Hq, 1, D] (compute device) over ``layer`` -> [B, Hq, 1, D]."""
    b, hq, _, d = q.shape
    scale = d**-0.5 if scale is None else scale
    if layer.window is None:
        layer.window = DeviceWindow(method.n_init, method.n_local)
    cuda = layer.compute.type == "cuda" and layer.storage.type == "cpu"
    st = getattr(layer, "staging", None)
    if st is None or st.q.shape != q[:, :, 0].shape or st.q.dtype != q.dtype:
        if st is not None and st.launched:
            torch.cuda.current_stream().synchronize()  # its buffers may still be in a queued job
        st = layer.staging = Staging(q, cuda)
    if cuda and stream_path(method, layer, q):
        out = stream_decode(method, layer, q, scale)
        _count_step(method, layer, st.rows_attended)
        return out.to(q.dtype).unsqueeze(2)
    layer.settle()  # the host half below reads every stored row
    t0 = time.perf_counter()
    st.q.copy_(q[:, :, 0], non_blocking=cuda)  # to the host, then the device half is queued behind it
    if cuda:
        ready = torch.cuda.Event()
        ready.record()
    ks, vs = layer.window.rows(layer)
    out_d, lse_d = partial_attention(q[:, :, 0], ks, vs, scale)
    if cuda:
        ready.synchronize()
    n = layer.n
    keys = layer._k.buf if method.reads_stored_keys(layer) else method.search_keys(layer)
    if method.workspace is None:  # one for all layers (they run in turn)
        method.workspace = Workspace()
    ws = method.workspace
    out_h, lse_h = host_partial(st.q.float(), keys, layer._v.buf, method.n_init, n - method.n_local,
                                method.top_k, method.gqa == "group", scale, ws)
    st.part[..., :d] = out_h
    st.part[..., d] = lse_h
    part = st.part.to(layer.compute, non_blocking=cuda) if cuda else st.part
    out = merge(out_d, lse_d, part[..., :d], part[..., d])
    layer.load_s += time.perf_counter() - t0
    _count_step(method, layer, ks.shape[-2])
    return out.to(q.dtype).unsqueeze(2)


def _count_step(method, layer: TieredLayer, window_rows: int) -> None:
    """A split step's counters: the share of rows attended (the device window's and the host's top-k) and the bus
    traffic of this step and layer: the query out, the partial result back, the new token's key and value out."""
    st, n = layer.staging, layer.n
    searchable = max(0, n - method.n_local - method.n_init)
    layer.attended_sum = getattr(layer, "attended_sum", 0.0) + (window_rows + min(method.top_k, searchable)) / n
    layer.attended_n = getattr(layer, "attended_n", 0) + 1
    b, hkv, _, d = layer.keys.shape
    layer.loaded_bytes += nbytes(st.q) + nbytes(st.part) + 2 * b * hkv * d * layer.keys.element_size()
