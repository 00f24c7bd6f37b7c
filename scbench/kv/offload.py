"""The slow tier: KV kept off the accelerator and loaded back on demand (``Tier``, named tensor sets in host
memory or files, is in ``scbench.kv.tier``).

``TieredLayer`` is a transformers cache layer for the loading methods (Quest,
RetrievalAttention): its keys and values live in a storage tier (``device``: the accelerator, as Quest keeps
them in HBM; ``cpu``: host memory) and a decode step loads only the rows the method picks (``load``), counting
the bytes and, for host storage, the transfer time.
"""
from __future__ import annotations

import time

import torch
from transformers.cache_utils import DynamicLayer

from scbench.devices import sync as _sync
from scbench.kernels.dense import causal_attention
from scbench.kv import tier as _tier
from scbench.kv.cache import CacheLayer
from scbench.kv.pinned import pinned_empty
from scbench.kv.tier import TIERS, Parked, Tier, flatten, nbytes, unflatten  # noqa: F401 (``Tier`` & co. lived here)

STORAGES = ("device", "cpu")
HOST_RESERVE = 1024
"""Spare rows of a host tier's first buffers: regrowing copies the whole layer (and pins new host memory)."""


class Rows:
    """A growing [..., n, D] tensor: rows live in a capacity buffer on ``device`` (pinned host memory when the
    model runs on CUDA), so appending copies the new rows only. ``view`` is the first ``n`` rows."""

    def __init__(self, device: torch.device, compute: torch.device, dtype: torch.dtype | None = None, *,
                 pin: bool = True, reserve: int = 0):
        self.device, self.dtype = device, dtype
        self.pin = pin and device.type == "cpu" and compute.type == "cuda"
        self.reserve = reserve
        """Spare rows of the first buffer (host tiers: the first decode steps do not regrow it)."""
        self.buf: torch.Tensor | None = None
        self.n = 0
        self.async_rows = False
        """Queue a decode token's rows from the device (pinned staging copy, then ``ra_host.CopyJob`` as a CUDA host
        function) instead of copying them synchronously: set by RetrievalAttention's stream path
        (methods/retrieval_host.stream_decode), whose host jobs read the buffer in the same stream's order; every
        other reader runs after a synchronisation (the decode loop's per-token sync, or ``settle``)."""
        self._stage = self._job = None

    @property
    def view(self) -> torch.Tensor:
        return self.buf[..., : self.n, :]

    @torch.inference_mode()  # the buffers are made under inference mode; a rollback writes them outside it
    def append(self, x: torch.Tensor) -> None:
        t = x.shape[-2]
        cap = 0 if self.buf is None else self.buf.shape[-2]
        if self.async_rows and self._queue(x, t, cap):
            return
        self.settle()
        if self.n + t > cap:  # grow by 1/8 (at least 64 rows): little slack, amortised O(1) appends
            rows = max(self.n + t, cap + max(64, cap // 8)) if cap else self.n + t + self.reserve
            shape = (*x.shape[:-2], rows, x.shape[-1])
            dtype = self.dtype or x.dtype
            if self.pin and _tier.BLOCK_COPY:  # exact size, pages locked on several threads (kv/pinned.py)
                buf = pinned_empty(shape, dtype)
            else:
                buf = torch.empty(shape, dtype=dtype, device=self.device, pin_memory=self.pin)
            if self.n:
                buf[..., : self.n, :] = self.view
            self.buf = buf
        if not self._copy_blocks(x, self.n):
            self.buf[..., self.n : self.n + t, :] = x
        self.n += t

    def _copy_blocks(self, x: torch.Tensor, start: int) -> bool:
        """Rows ``x`` [..., t, D] from an accelerator into rows [start, start + t) of the pinned buffer: one
        asynchronous copy per leading block (B x Hkv runs of contiguous rows, straight into the pinned pages), then
        one synchronisation. torch's copy into the strided view of the buffer first lands in a pageable host
        temporary (a synchronous, staged transfer) and then copies that into place: ~0.3 s per 270 MB layer tensor,
        ~20 s for a Llama-3.1-8B-shaped cache at 131K. False (the caller copies): not pinned, not from an
        accelerator, a few rows (a decode token) or another dtype."""
        t = x.shape[-2]
        if (not _tier.BLOCK_COPY or not self.pin or not x.is_cuda or t < 64 or x.dtype != self.buf.dtype
                or not self.buf.is_contiguous()):
            return False
        src = x.reshape(-1, t, x.shape[-1])
        dst = self._runs(start, start + t)
        for i in range(src.shape[0]):
            dst[i].copy_(src[i], non_blocking=True)
        torch.cuda.current_stream(x.device).synchronize()  # readers on the host may follow at once
        return True

    def _queue(self, x: torch.Tensor, t: int, cap: int) -> bool:
        """``append`` through the stream (``async_rows``): False when it cannot (no room, not CUDA rows, another
        shape), and ``append`` copies synchronously."""
        from scbench.kernels import ra_host

        if (not x.is_cuda or not self.pin or self.n + t > cap or t > 16 or x.dtype != self.buf.dtype
                or x.shape[:-2] != self.buf.shape[:-2] or x.shape[-1] != self.buf.shape[-1]
                or not self.buf.is_contiguous() or not ra_host.stream_jobs()):
            return False
        if self._job is not None and not self._job.done:
            torch.cuda.current_stream().synchronize()  # the last queued copy has not run: its staging is reused
        if self._stage is None or self._stage.shape != x.shape:
            self._stage = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self._stage.copy_(x, non_blocking=True)
        es, d = self.buf.element_size(), x.shape[-1]
        self._job = self._job or ra_host.CopyJob()
        j = self._job
        j.src, j.dst = self._stage.data_ptr(), self.buf.data_ptr() + self.n * d * es
        j.heads, j.rows, j.rowbytes, j.dst_stride = x[..., 0, 0].numel(), t, d * es, cap * d * es
        ra_host.launch_job(j)
        self.n += t
        return True

    def settle(self) -> None:
        """Wait until queued appends reached the buffer (a no-op when none is pending)."""
        if self._job is not None and not self._job.done:
            torch.cuda.current_stream().synchronize()

    def to_device(self, device: torch.device, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows [start, end) (default: all ``n``) as a new tensor on ``device``. From a pinned capacity buffer to an
        accelerator: one asynchronous copy per leading block (B x Hkv runs of contiguous rows, straight from the
        pinned pages), where ``view.to(device)`` of the strided view first gathers the rows into a pageable host
        temporary and then copies that (at 131K: ~17 GB through host memory twice for every later prefill). The
        caller synchronises before the buffer changes. Waits for queued appends first (``settle``)."""
        self.settle()
        end = self.n if end is None else end
        view = self.buf[..., start:end, :]
        if not (self.pin and device.type == "cuda" and self.buf.is_contiguous()) or view.is_contiguous():
            return view.to(device)
        d = self.buf.shape[-1]
        out = torch.empty((*self.buf.shape[:-2], end - start, d), dtype=self.buf.dtype, device=device)
        src = self._runs(start, end)
        dst = out.view(-1, end - start, d)
        for i in range(src.shape[0]):
            dst[i].copy_(src[i], non_blocking=True)
        return out

    def _runs(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of the contiguous capacity buffer as [B x Hkv, end - start, D]: each leading block's
        rows are one contiguous run of memory (``to_device`` and ``_copy_blocks`` copy run by run)."""
        return self.buf.view(-1, self.buf.shape[-2], self.buf.shape[-1])[:, start:end]

    def crop(self, n: int) -> None:
        self.n = min(self.n, n)

    def adopt(self, buf: torch.Tensor, n: int) -> None:
        """Make ``buf`` [..., C, D] (its first ``n`` rows already holding these rows and the new ones) the
        capacity buffer: no copy (a decode loop's static buffer becomes the storage)."""
        if buf.device != self.device or (self.dtype is not None and buf.dtype != self.dtype) or n > buf.shape[-2]:
            raise ValueError(f"Rows.adopt: buffer {tuple(buf.shape)} {buf.dtype} on {buf.device} cannot hold {n} "
                             f"rows of this {self.device} store")
        self.buf, self.n = buf, n


class TieredLayer(DynamicLayer, CacheLayer):
    """A cache layer whose keys/values [B, Hkv, n, D] live in a storage tier; decode loads a subset of rows.

    ``keys`` / ``values`` are views of ``Rows`` buffers on the storage device, so appending a decode token
    copies one row, not the layer. ``update`` with one token appends it and returns the storage views (the
    loading method's ``decode_attention`` picks and ``load``s rows); with several tokens (a later prefill)
    it appends them and returns the whole layer on the compute device (dense prefill over everything; the
    transfer from a host tier counts as loaded).
    ``state`` holds what a method keeps next to the KV (Quest's page bounds, a search index); its tensors count
    as resident or slow-tier bytes by where they live. ``crop_floor`` is the lowest length the layer was
    cropped to since the method last refreshed that state (rows beyond it changed).
    """

    scbench_compresses_itself = True
    """Installed once by the method's compression hook; the engine does not call it again on this layer."""
    scbench_exact_crop = True
    """Cropping only lowers the row count: the earlier rows are untouched."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, *, storage: str):
        super().__init__()
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.compute = keys.device
        self.storage = torch.device("cpu") if storage == "cpu" else keys.device
        self.dtype, self.device = keys.dtype, self.storage
        self.is_initialized = True
        reserve = HOST_RESERVE if self.storage != self.compute else 0
        self._k = Rows(self.storage, self.compute, reserve=reserve)
        self._v = Rows(self.storage, self.compute, reserve=reserve)
        self.state: dict = {}
        self.loaded_bytes = 0
        self.load_s = 0.0
        self.recall_sum = 0.0
        self.recall_n = 0
        self.window = None
        """A ``scbench.kv.split.DeviceWindow``: static rows kept on the compute device (host-split decode)."""
        self._append(keys, values)
        self.crop_floor = self.n

    # --- storage ------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self._k.n

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self._k.append(k)
        self._v.append(v)
        self.keys, self.values = self._k.view, self._v.view

    def adopt(self, k: torch.Tensor, v: torch.Tensor, n: int) -> bool:
        """Take buffers k, v [B, Hkv, C, D] whose first ``n`` rows are this layer's rows (its own first, then
        new ones) as the storage, without a copy; False (nothing changed) when the layer cannot: a host tier, a
        device window, or other shapes."""
        if (self.storage != self.compute or self.window is not None or k.device != self.storage
                or k.shape[:2] != self.keys.shape[:2] or k.shape[3] != self.keys.shape[3] or k.dtype != self.dtype
                or n < self.n or n > k.shape[2]):
            return False
        self._k.adopt(k, n)
        self._v.adopt(v, n)
        self.keys, self.values = self._k.view, self._v.view
        return True

    def settle(self) -> None:
        """Wait for appends still queued in the stream (``Rows.async_rows``): the host rows are then complete."""
        self._k.settle()
        self._v.settle()

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states, value_states: [B, Hkv, t, D] on the compute device."""
        self._append(key_states, value_states)
        if self.window is not None:
            self.window.append(key_states, value_states, self.n)
        if key_states.shape[-2] == 1 or self.storage == self.compute:
            return self.keys, self.values
        return self.load_all()  # a later prefill attends densely over everything, brought from the host tier

    # --- loading --------------------------------------------------------------------------------------
    def load(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` [B, Hs, m] (Hs a multiple of Hkv: head h reads KV head h // (Hs // Hkv)) ->
        keys, values [B, Hs, m, D] on the compute device. Counts the bytes moved and, from host storage, the time.

        One ``gather`` per tensor into a staging buffer (pinned host memory for a host tier, so the copy to the
        accelerator runs at full bandwidth)."""
        b, hkv, n, d = self.keys.shape
        hs, m = idx.shape[1], idx.shape[2]
        if hs % hkv:
            raise ValueError(f"TieredLayer.load: {hs} index heads is not a multiple of {hkv} KV heads")
        rep = hs // hkv
        host = self.storage != self.compute
        self.settle()
        t0 = time.perf_counter()
        idx5 = idx.to(self.storage).view(b, hkv, rep, m, 1).expand(b, hkv, rep, m, d)
        out = []
        for rows in (self.keys, self.values):
            dst = torch.empty((b, hkv, rep, m, d), dtype=rows.dtype, device=self.storage, pin_memory=self._k.pin)
            torch.gather(rows.unsqueeze(2).expand(b, hkv, rep, n, d), 3, idx5, out=dst)
            dst = dst.view(b, hs, m, d)
            out.append(dst.to(self.compute, non_blocking=True) if host else dst)
        if host:
            _sync(self.compute)
            self.load_s += time.perf_counter() - t0
        self.loaded_bytes += nbytes(out[0]) + nbytes(out[1])
        return out[0], out[1]

    def load_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row [B, Hkv, n, D] on the compute device (dense attention), counted like ``load``."""
        t0 = time.perf_counter()
        k, v = self._k.to_device(self.compute), self._v.to_device(self.compute)
        if self.storage != self.compute:
            _sync(self.compute)
            self.load_s += time.perf_counter() - t0
        self.loaded_bytes += nbytes(k) + nbytes(v)
        return k, v

    def load_range(self, start: int, end: int) -> torch.Tensor:
        """Keys of rows [start, end) on the compute device (index maintenance), counted as loaded."""
        k = self._k.to_device(self.compute, start, end)
        if self.storage != self.compute:
            _sync(self.compute)  # the pinned rows may change once this returns
            self.loaded_bytes += nbytes(k)
        return k

    def record_recall(self, q: torch.Tensor, idx: torch.Tensor, scale: float) -> float:
        """Diagnostic: the share of exact attention mass (over all rows) that the rows ``idx`` [B, Hs, m] hold.

        q: [B, Hq, 1, D]. Computed in float32 on the storage device, averaged over batch and query heads."""
        self.settle()
        b, hkv, n, d = self.keys.shape
        hq, hs = q.shape[1], idx.shape[1]
        qs = q.to(self.storage, torch.float32).reshape(b, hkv, hq // hkv, d)
        probs = (qs @ self.keys.float().transpose(-1, -2) * scale).softmax(-1)  # [B, Hkv, rep, n]
        probs = probs.reshape(b, hq, n)
        sel = idx.to(self.storage).repeat_interleave(hq // hs, dim=1) if hs != hq else idx.to(self.storage)
        mass = probs.gather(-1, sel).sum(-1).mean().item()
        self.recall_sum += mass
        self.recall_n += 1
        return mass

    # --- cache-layer protocol ---------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.n

    def _nbytes_on(self, device: torch.device) -> int:
        """Bytes of the stored rows and of the method state's tensors that live on ``device``."""
        tensors = [self.keys, self.values]
        for value in self.state.values():
            tensors += [value.view] if isinstance(value, Rows) else list(flatten(value)[0].values())
        return sum(nbytes(t) for t in tensors if t.device == device)

    def scbench_nbytes(self) -> int:
        """Bytes on the accelerator: stored rows kept there and the method's state there (e.g. Quest's page
        bounds). The buffers' spare rows (up to 1/8, as an allocator's slack) are not counted."""
        return self._nbytes_on(self.compute) + (self.window.nbytes() if self.window is not None else 0)

    def scbench_slow_nbytes(self) -> int:
        """Bytes held in the slow tier (host memory while the model runs on an accelerator): rows and state."""
        return self._nbytes_on(self.storage) if self.storage != self.compute else 0

    def scbench_crop(self, n: int) -> None:
        self._k.crop(n)
        self._v.crop(n)
        self.crop_floor = min(self.crop_floor, self.n)
        self.keys, self.values = self._k.view, self._v.view
        if self.window is not None:
            self.window.crop(n)

    def scbench_snapshot(self):
        self.settle()
        return (self.keys.clone(), self.values.clone())

    def scbench_restore(self, state) -> None:
        self.scbench_crop(0)
        self._append(*state)
        if self.window is not None:
            self.window.valid = False  # rebuilt from the restored host rows when next needed


def require_tiered(method, layer_idx: int, layer) -> TieredLayer:
    """The layer a loading method's ``decode_attention`` works on; a clear error when its hook never installed it."""
    if not isinstance(layer, TieredLayer):
        raise RuntimeError(
            f"{type(method).__name__}.decode_attention: layer {layer_idx} is a {type(layer).__name__}, "
            "not a TieredLayer: its compression hook (which moves the KV into the tier after the prefill) did not "
            "run on this cache"
        )
    return layer


def attend_loaded(layer: TieredLayer, q: torch.Tensor, idx: torch.Tensor | None, scale: float | None,
                  *, recall: bool = False) -> torch.Tensor:
    """Decode attention over the rows ``idx`` [B, Hs, m] of ``layer`` only (None: every row), loaded from its
    tier: q [B, Hq, 1, D] -> [B, Hq, 1, D]. ``recall`` records the attention mass those rows hold."""
    if idx is None:
        k, v = layer.load_all()
        if recall:
            layer.recall_sum, layer.recall_n = layer.recall_sum + 1.0, layer.recall_n + 1
    else:
        k, v = layer.load(idx)
        if recall:
            layer.record_recall(q, idx, scale if scale is not None else q.shape[-1] ** -0.5)
    return causal_attention(q, k, v, scale)


def tiered_layers(cache) -> list[TieredLayer]:
    """The cache's ``TieredLayer``s (a loading method reads the state it keeps on them from here)."""
    return [layer for layer in cache.layers if isinstance(layer, TieredLayer)]


def take_counters(cache, tier: Tier | None = None) -> dict:
    """Sum the counters of the tiered layers (and of ``tier``, a session's checkpoint tier) since the last call
    and reset them: slow-tier bytes held now, bytes loaded, load seconds and the mean recall of attention mass
    (None when not measured). A method's own counters (e.g. a search index's) are its business: it reports them
    through ``Method.take_costs``."""
    layers = tiered_layers(cache)
    for layer in layers:  # host seconds of stream jobs (methods/retrieval_host.stream_decode), once they ran
        st = getattr(layer, "staging", None)
        if st is not None and hasattr(st, "take_seconds"):
            layer.load_s += st.take_seconds()
    recall_n = sum(layer.recall_n for layer in layers)
    out = {
        "slow_tier_bytes": sum(layer.scbench_slow_nbytes() for layer in layers),
        "loaded_bytes": sum(layer.loaded_bytes for layer in layers),
        "load_s": sum(layer.load_s for layer in layers),
        "attn_recall": sum(layer.recall_sum for layer in layers) / recall_n if recall_n else None,
    }
    for layer in layers:
        layer.loaded_bytes, layer.load_s, layer.recall_sum, layer.recall_n = 0, 0.0, 0.0, 0
    if tier is not None:
        out["slow_tier_bytes"] += tier.held_bytes()
        out["loaded_bytes"] += tier.loaded_bytes
        out["load_s"] += tier.load_s
        tier.loaded_bytes, tier.load_s = 0, 0.0
    return out


def device_tier_unsupported(cache, who: str, host_note: str) -> str | None:
    """Why a device-side decode plugin (Quest, RetrievalAttention) cannot take ``cache`` (None: it can): every layer
    must be a ``TieredLayer`` whose keys and values live on the compute device; ``host_note`` says what the plain
    loop does instead for a host tier."""
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, TieredLayer):
            return f"{who} fast decode: cache layer {i} is a {type(layer).__name__}, not a TieredLayer"
        if layer.storage != layer.compute:
            return f"{who} fast decode: the KV lives in host memory (tier=cpu): {host_note}"
    return None
