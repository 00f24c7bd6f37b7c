"""Ragged per-head caches (AdaKV, KVzip pair/layer, DuoAttention) inside the captured decode step
(scbench/engines/fastdecode.py plugin).

A ``RaggedLayer`` (scbench/kv/ragged.py) holds a flat compressed prefix per KV head (own length, no padding) and a
dense suffix of the tokens appended since the compression. The static path's buffer for such a layer is that
suffix plus the turn's decode room, ``[1, Hkv, cap, D]`` with cap = suffix + max_new rounded up to 256 tokens, the
same decode room every dense layer gets (StaticKV copies ``layer.keys``, which is the suffix); the prefix is NOT
copied, padded or gathered: the step reads it in place (``scbench.kernels.ragged_decode``: Triton split-K on CUDA,
torch segment ops elsewhere) through per-head offsets and lengths fixed for the turn, and a work list built on the
turn's first step (each head cut into pieces by its own length, so that the step time follows the bytes). So the resident KV
(``kv_bytes``) stays the ragged count, and the only extra memory during decode is that suffix buffer (plus the
kernel's split partials). After the turn the layer gets its suffix back as a view of the buffer.

Dense layers of the same cache (a layer within budget, KVzip level uniform) take the default attention. The plain
loop (``ragged_attention``, per head) stays the reference: tests/methods/test_ragged_fast.py compares greedy
tokens. Not covered: compression during decoding (``decode_every`` takes the plain loop). Batched decoding (several
requests over one ragged cache) is scbench/batch_step.py's ``RaggedShared`` with scbench/kernels/ragged_shared.py.
"""
from __future__ import annotations

import logging

import torch

from scbench.kernels import ragged_decode as rd

log = logging.getLogger(__name__)


class RaggedDecode:
    """fastdecode plugin for methods whose caches hold ``RaggedLayer``s."""

    def __init__(self, method):
        self.m = method
        self.layers: dict[int, dict] = {}
        """layer -> the prefix tensors read in place and their per-head offsets / lengths (set by ``load``)."""
        self.triton_ok: bool | None = None
        """None until the Triton kernel first ran (the eager warm-up step, before any graph capture); False after a
        launch failure: the torch path from then on (still in the captured step), never a crashed run."""
        self.interpreted = False
        """CPU tensors through the Triton kernel too (tests under ``TRITON_INTERPRET=1``: the kernel's greedy
        tokens against the plain loop)."""

    @staticmethod
    def _ragged(layer) -> bool:
        return bool(getattr(layer, "scbench_ragged", False))

    def unsupported(self, cache) -> str | None:
        for i, layer in enumerate(cache.layers):
            if not getattr(layer, "is_initialized", False):
                return f"cache layer {i} is empty"
            if not self._ragged(layer) and type(layer).__name__ != "DynamicLayer":
                return f"ragged fast decode: cache layer {i} is a {type(layer).__name__}"
            if layer.keys.shape[0] != 1:
                return "ragged fast decode: batch 1 only"
        return None

    def _key(self, cache) -> dict:
        return {i: (layer.prefix_k.data_ptr(), tuple(layer.lengths)) for i, layer in enumerate(cache.layers)
                if self._ragged(layer)}

    def fits(self, cache, extra: int) -> bool:
        """The buffers (and a captured graph) hold the prefixes' addresses and lengths: a new compression refits."""
        return self._key(cache) == {i: s["key"] for i, s in self.layers.items()}

    def load(self, kv, cache) -> None:
        """Per ragged layer the prefix tensors and their offsets / lengths. An entry whose prefix is unchanged is
        kept as it is: a CUDA graph captured on it reads these very tensors (by address)."""
        old, self.layers = self.layers, {}
        for i, layer in enumerate(cache.layers):
            if not self._ragged(layer):
                continue
            if i in old and old[i]["key"] == (layer.prefix_k.data_ptr(), tuple(layer.lengths)):
                self.layers[i] = old[i]
                continue
            dev = layer.prefix_k.device
            lengths = list(layer.lengths)
            offsets = [0]
            for n in lengths[:-1]:
                offsets.append(offsets[-1] + n)
            self.layers[i] = {"key": (layer.prefix_k.data_ptr(), tuple(lengths)), "k": layer.prefix_k,
                              "v": layer.prefix_v, "rows": rd.head_of_rows(lengths, dev),
                              "offsets": torch.tensor(offsets, device=dev),
                              "lengths": torch.tensor(lengths, device=dev), "host": lengths}

    @staticmethod
    def _work(s: dict, k) -> "rd.WorkList":
        """The layer's work list for this suffix buffer (C rows): built on the turn's eager warm-up step, reused by
        the captured graph (same buffer, same lengths)."""
        c = k.shape[2]
        if s.get("work_c") != c:
            host = s["host"] if "host" in s else s["lengths"].tolist()
            s["work"], s["work_c"] = rd.WorkList(host, c, k.device), c
        return s["work"]

    def attend(self, kv, l, q, k, v, scale):
        """Layer l's attention (None for a dense layer: the default). k, v: the suffix buffer [1, Hkv, cap, D]."""
        s = self.layers.get(l)
        if s is None:
            return None
        at = kv.at[l : l + 1]
        from scbench.engines import fastdecode

        if (q.is_cuda or self.interpreted) and rd.triton is not None and fastdecode.KERNEL == "triton" \
                and self.triton_ok is not False:
            try:
                out = rd.ragged_decode_triton(q, s["k"], s["v"], s["offsets"], s["lengths"], self._work(s, k), k,
                                              v, at, scale)
            except Exception as e:  # noqa: BLE001 - a launch failure (e.g. out of shared memory) on the eager warm-up
                if self.triton_ok:  # it launched before: a real error
                    raise
                log.warning("ragged decode kernel failed to launch (%s: %s); torch segment ops instead",
                            type(e).__name__, e)
                self.triton_ok = False
            else:
                self.triton_ok = True
                return out
        return rd.ragged_decode_attention(q, s["k"], s["v"], s["rows"], k, v, at, scale)
