"""KIVI inside the captured decode step (scbench/engines/fastdecode.py plugin): static packed buffers, attention
straight over the packed bits, and the residual quantised in the step when it fills.

Per layer the plugin holds ``scbench.kv.quant``'s formats in buffers sized for the turn: packed keys/values, key
scale/zero per (group, channel) and value scale/zero per (token, channel group); the full-precision tokens (the
residual at load, then every new token) stay in StaticKV's own append-only buffers, of which rows [rs, at] are the
residual. ``nq`` / ``rs`` (device tensors) count the quantized rows in use and where the residual starts. A step
appends the new key/value (StaticKV), attends, then, when the residual holds ``residual + group`` rows, quantises
its oldest group into quantized row ``nq`` and moves ``rs`` past it, each write selected on the device by that
condition (no host sync): ``scbench.kernels.kivi_decode.kivi_decode_step``, on CUDA Triton kernels (one to four
per layer, ``kivi_decode.FUSE_FLUSH``; the packed values held token-major as the kernel reads them,
``values_to_words`` at load, back at ``store_back``), elsewhere de-quantise + masked softmax and ``quantize`` (the
plain path's function) in torch ops. This is what ``KIVILayer.update`` + ``_flush`` do, so the plain
loop stays the reference: tests/methods/test_kivi_fast.py compares greedy tokens. Tokens are never moved, so the
cache handed back after ``fed`` steps is exact even when the graph ran a few steps further. With ``decode_cache=temp``
the step only attends (``residual=None``: no flush), every decoded token stays in StaticKV's full-precision buffer
(sized for the layer's residual plus ``max_new``) and ``store_back`` appends them to the residual.
"""
from __future__ import annotations

import time

import torch

from scbench.kernels import kivi_decode
from scbench.kernels.kivi_decode import kivi_decode_step, values_from_words
from scbench.kernels.kivi_flush import values_to_words_fast
from scbench.kv.quant import KIVILayer


class KIVIDecode:
    """fastdecode plugin for a ``KIVI`` method instance."""

    headroom = False
    """Re-allocated buffers stay exact (``fastdecode.HEADROOM`` not added): with room, KIVI's multi-turn turns on the
    H200 at 131K were no faster (its rounding to 8 key groups already spares a re-allocation) and its re-allocating
    turn and later prefills slower (results/perf/decode_headroom_131k_h200.md; not profiled: the attention kernel
    sizes its residual splits by the residual buffer's rows, ``kivi_decode.res_splits``, so room adds idle programs)."""

    def __init__(self, method):
        self.m = method
        self.bufs: dict[int, list[torch.Tensor]] = {}
        self.held: dict[int, list] = {}
        """Per layer, the (key chunk, value chunk) pairs whose rows the buffers hold, in row order."""
        self.copies = 0
        self.vgroup = 0
        self.warmup_s = 0.0

    def take_warmup_s(self) -> float:
        """Seconds of one-time work (kernel compiles) since the last call: FastDecoder books them as warm-up."""
        w, self.warmup_s = self.warmup_s, 0.0
        return w

    def unsupported(self, cache) -> str | None:
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, KIVILayer):
                return f"kivi fast decode: cache layer {i} is a {type(layer).__name__}, not a KIVILayer"
            if (layer.bits, layer.group, layer.residual, layer.decode_cache) != (
                    self.m.bits, self.m.group, self.m.residual, self.m.decode_cache):
                return f"kivi fast decode: layer {i} was packed with other settings than the method's"
            if layer.decode_cache == "temp" and layer.frozen is None:
                return f"kivi fast decode: layer {i} (decode_cache=temp) has no freeze mark (the session sets it)"
        return None

    def _cap(self, layer, extra: int) -> int:
        g = self.m.group
        need = layer.n_quant + layer.keys.shape[-2] + extra + g
        return -(-need // (8 * g)) * 8 * g

    def allocate(self, kv, cache) -> None:
        m = self.m
        for l, layer in enumerate(cache.layers):
            b, h, _, d = layer.keys.shape
            self.vgroup = layer.value_group
            cap = self._cap(layer, kv.k[l].shape[2] - layer.keys.shape[-2])
            dev, dt = layer.keys.device, layer.keys.dtype
            db = d * m.bits // 8
            self.bufs[l] = [
                torch.zeros(b, h, cap, db, dtype=torch.uint8, device=dev),  # packed keys
                torch.zeros(b, h, cap // m.group, d, dtype=dt, device=dev),  # key scale
                torch.zeros(b, h, cap // m.group, d, dtype=dt, device=dev),  # key zero
                torch.zeros(b, h, cap, db, dtype=torch.uint8, device=dev),  # packed values
                torch.zeros(b, h, cap, d // self.vgroup, dtype=dt, device=dev),  # value scale
                torch.zeros(b, h, cap, d // self.vgroup, dtype=dt, device=dev),  # value zero
            ]
            self.held[l] = []
        n = len(cache.layers)
        layer = cache.layers[0]
        self.use_triton = self.triton_ok(layer.keys)  # decides the packed values' layout too
        if self.use_triton:  # compile the value-layout kernel now, as one-time work (take_warmup_s), not in a turn
            t0 = time.perf_counter()
            d = layer.keys.shape[-1]
            values_to_words_fast(torch.zeros(1, 1, 32 // m.bits, d * m.bits // 8, dtype=torch.uint8,
                                             device=layer.keys.device), m.bits)
            if layer.keys.is_cuda:
                torch.cuda.synchronize(layer.keys.device)
            self.warmup_s += time.perf_counter() - t0
        if self.use_triton:  # the single-kernel step's arrival counters, made outside any graph capture
            kivi_decode.counters(layer.keys.device, layer.keys.shape[0] * layer.keys.shape[1] + 1)
        self.nq = torch.zeros(n, dtype=torch.long, device=kv.device)
        self.rs = torch.zeros(n, dtype=torch.long, device=kv.device)

    def fits(self, cache, extra: int) -> bool:
        return all(self._cap(layer, extra) <= self.bufs[l][0].shape[2] for l, layer in enumerate(cache.layers))

    def load(self, kv, cache) -> None:
        """Copy each KIVILayer's chunks into the buffers (each chunk straight into its rows: no concatenation).

        Chunks are never written in place (``KIVILayer``), so a chunk that is the same object at the same rows as
        one the buffers already hold (loaded, or handed back by ``store_back``, in a previous turn) is not copied
        again: a turn after a rollback or a short follow-up feed copies only the chunks that are new since (the
        rows of held chunks are never rewritten: the step's flush writes rows >= ``n_quant`` only). The copies of
        all layers go as one ``_foreach_copy_`` (a turn's few new chunks: no Python loop of small copies).
        ``copies`` counts the chunks actually copied (tests)."""
        self.n0 = []
        g = self.m.group
        dsts, srcs, vdst, vsrc = [], [], [], []
        for l, layer in enumerate(cache.layers):
            kp, ks, kz, vp, vs, vz = self.bufs[l]
            held, same, row = self.held[l], True, 0
            for j, (kc, vc) in enumerate(zip(layer.kchunks, layer.vchunks)):
                (ckp, cks, ckz), (cvp, cvs, cvz) = kc, vc
                n = ckp.shape[2]
                same = same and j < len(held) and held[j][0] is kc and held[j][1] is vc
                if not same:
                    for dst, src, a, b in ((kp, ckp, row, row + n), (ks, cks, row // g, (row + n) // g),
                                           (kz, ckz, row // g, (row + n) // g), (vs, cvs, row, row + n),
                                           (vz, cvz, row, row + n)):
                        dsts.append(dst[:, :, a:b])
                        srcs.append(src)
                    vdst.append(vp[:, :, row : row + n])
                    vsrc.append(cvp)
                    self.copies += 1
                row += n
            self.held[l] = list(zip(layer.kchunks, layer.vchunks))
            self.n0.append((layer.n_quant, layer.keys.shape[-2]))
        if self.use_triton:  # the kernels read the packed values token-major
            vsrc = _batched(vsrc, lambda x: values_to_words_fast(x, self.m.bits))
        if dsts:
            torch._foreach_copy_(dsts + vdst, srcs + vsrc)
        self.nq.copy_(torch.tensor([n for n, _ in self.n0]))
        self.rs.zero_()

    def state(self) -> list[torch.Tensor]:
        """What a step changes besides rows it rewrites identically: the counters."""
        return [self.nq, self.rs]

    def attend(self, kv, l, q, k, v, scale):
        """Attention over the packed rows and the residual [rs, at], then the residual's oldest group quantized
        when full (``kivi_decode_step``: on CUDA Triton kernels, the counters moved on the device)."""
        m = self.m
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return kivi_decode_step(q, *self.bufs[l], k, v, self.nq[l : l + 1], self.rs[l : l + 1], kv.at[l : l + 1],
                                bits=m.bits, group=m.group, vgroup=self.vgroup, scale=scale,
                                residual=None if self.temp else m.residual, triton_ok=self.use_triton)

    @property
    def temp(self) -> bool:
        """``decode_cache=temp``: decoded tokens are never quantized (the step only attends; no flush)."""
        return self.m.decode_cache == "temp"

    def triton_ok(self, q) -> bool:
        """Whether the Triton kernels take q (or a tensor on q's device of its head_dim)."""
        m = self.m
        return (q.is_cuda and kivi_decode.triton is not None
                and kivi_decode.attention_kernel_ok(m.bits, m.group, self.vgroup, q.shape[-1])
                and kivi_decode.flush_kernel_ok(m.group, self.vgroup, q.shape[-1]))

    def store_back(self, kv, cache, fed: int) -> bool:
        """Rebuild each KIVILayer from the buffers after ``fed`` tokens (what the plain steps would have left).

        Layers that flushed alike (all of them, in practice) are copied out together: per kind one ``stack`` of
        their rows, each layer's chunk / residual a view of it (never written in place; ``KIVILayer`` only
        replaces its tensors), instead of ~15 small copies per layer."""
        g = self.m.group
        alike: dict[tuple[int, int, int], list[int]] = {}
        for l in range(len(cache.layers)):
            nq0, r = self.n0[l]
            nq = nq0
            for _ in range(fed):  # the plain steps: append, then flush a group when the residual is full
                r += 1
                if not self.temp and r - self.m.residual >= g:
                    r, nq = r - g, nq + g
            alike.setdefault((nq0, nq, r), []).append(l)
        for (nq0, nq, r), ls in alike.items():
            start = nq - nq0

            def take(pick):
                return torch.stack([pick(l) for l in ls]).unbind(0)

            keys = take(lambda l: kv.k[l][:, :, start : start + r])
            values = take(lambda l: kv.v[l][:, :, start : start + r])
            if nq > nq0:
                kp, ks, kz, vs, vz = (take(lambda l, i=i, a=a, b=b: self.bufs[l][i][:, :, a:b])
                                      for i, a, b in ((0, nq0, nq), (1, nq0 // g, nq // g), (2, nq0 // g, nq // g),
                                                      (4, nq0, nq), (5, nq0, nq)))
                vp = torch.stack([self.bufs[l][3][:, :, nq0:nq] for l in ls])
                vp = (values_from_words(vp, self.m.bits) if self.use_triton else vp).unbind(0)
            for i, l in enumerate(ls):
                layer = cache.layers[l]
                if nq > nq0:
                    layer.kchunks.append((kp[i], ks[i], kz[i]))
                    layer.vchunks.append((vp[i], vs[i], vz[i]))
                self.held[l] = list(zip(layer.kchunks, layer.vchunks))  # the new chunk's rows are in the buffers
                layer.n_quant = nq
                layer.keys, layer.values = keys[i], values[i]
        return True


def _batched(xs: list[torch.Tensor], fn) -> list[torch.Tensor]:
    """``[fn(x) for x in xs]``, as one call on their stack when they are small and alike (a turn's new chunks)."""
    if len(xs) > 1 and len({x.shape for x in xs}) == 1 and sum(x.numel() for x in xs) <= 1 << 26:
        return list(fn(torch.stack(xs)).unbind(0))
    return [fn(x) for x in xs]
