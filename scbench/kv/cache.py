"""Helpers over a transformers ``Cache``: per-layer lengths, cropping, snapshots and byte accounting.

Bytes are always summed from the tensors the cache really holds, so a method that shrinks or
quantizes its cache shows its saving here and nowhere else. A cache layer that stores something
other than plain ``keys``/``values`` tensors implements ``CacheLayer`` (KIVI's ``KIVILayer``, the loading
methods' ``TieredLayer``); a plain transformers layer is handled through its ``keys`` / ``values``.
"""
from __future__ import annotations

import weakref
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@runtime_checkable
class CacheLayer(Protocol):
    """The contract of a transformers cache layer with its own representation (packed bits, a host tier, ...).

    Implementations subclass both the transformers layer they extend and this protocol, so the type checker
    sees them and ``isinstance(layer, CacheLayer)`` tells them from plain layers. A method installs one from
    its compression hook (``Method.compress_cache`` returning a layer instead of tensors).
    """

    scbench_compresses_itself: bool
    """True: installed once by the method's compression hook; the engine does not call the hook on it again."""
    scbench_exact_crop: bool
    """False when cropping cannot restore the exact earlier state (quantized groups): checkpoints then snapshot."""

    def scbench_nbytes(self) -> int:
        """Bytes resident on the compute device, counted from the real tensors (the layer's ``kv_bytes``)."""
        ...

    def scbench_slow_nbytes(self) -> int:
        """Bytes held in a slower tier (host memory while the model runs on an accelerator); 0 if none."""
        ...

    def scbench_crop(self, n: int) -> None:
        """Keep the first ``n`` tokens."""
        ...

    def scbench_snapshot(self) -> Any:
        """A state ``scbench_restore`` brings back (later steps may rewrite, not only append)."""
        ...

    def scbench_restore(self, state: Any) -> None:
        """Return to a state taken by ``scbench_snapshot``."""
        ...



class SessionOnly:
    """Mixin for cache layers of our own that live for one session and one sequence: ``crop`` goes through the
    layer's ``scbench_crop``; transformers' reset and beam-search hooks refuse with the layer's name instead of
    silently misbehaving."""

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' convention: a negative count of tokens to remove from the end."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        if tokens_to_remove:
            self.scbench_crop(self.get_seq_length() + tokens_to_remove)

    def reset(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be reset; start a new session")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support beam search")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support beam search")


def compresses_itself(layer) -> bool:
    """Whether the engine skips the method's compression hook on ``layer`` (see ``CacheLayer``)."""
    return isinstance(layer, CacheLayer) and layer.scbench_compresses_itself


def _layers(cache) -> list:
    return [layer for layer in cache.layers if getattr(layer, "is_initialized", False)]


def layer_lengths(cache) -> list[int]:
    """Tokens held per initialised layer."""
    return [layer.get_seq_length() for layer in _layers(cache)]


def _layer_nbytes(layer) -> int:
    if isinstance(layer, CacheLayer):
        return int(layer.scbench_nbytes())
    return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()


def kv_nbytes(cache) -> int:
    """Bytes of KV state held by the cache, counted from its real tensors."""
    return sum(_layer_nbytes(layer) for layer in _layers(cache))


def kv_nbytes_by_device(cache) -> dict[str, int]:
    """``kv_nbytes`` split by the device each layer's keys live on (a sharded model spreads its layers)."""
    out: dict[str, int] = {}
    for layer in _layers(cache):
        keys = getattr(layer, "keys", None)
        dev = str(keys.device) if isinstance(keys, torch.Tensor) else "unknown"
        out[dev] = out.get(dev, 0) + _layer_nbytes(layer)
    return out


def full_nbytes(num_layers: int, kv_heads: int, head_dim: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes a dense cache of ``tokens`` tokens would hold (keys + values, all layers)."""
    return 2 * num_layers * kv_heads * head_dim * tokens * torch.empty((), dtype=dtype).element_size()


def crop_layers(cache, lengths: list[int]) -> None:
    """Keep the first ``lengths[i]`` tokens of layer i (undo appends made after a checkpoint). A layer whose keys and
    values are the first rows of capacity buffers (``with_room``) keeps views of them, as a ``SessionCache`` then
    appends there; any other is copied out, so the rows cut off are freed."""
    for layer, n in zip(_layers(cache), lengths, strict=True):
        if isinstance(layer, CacheLayer):
            layer.scbench_crop(n)
        elif layer.keys.shape[-2] != n:
            roomy = room_of(layer.keys) is not None and room_of(layer.values) is not None
            layer.keys = layer.keys[..., :n, :] if roomy else layer.keys[..., :n, :].contiguous()
            layer.values = layer.values[..., :n, :] if roomy else layer.values[..., :n, :].contiguous()


_ROOMY: dict[tuple[str, int], weakref.ref] = {}
"""(device, address) -> a capacity buffer marked by ``with_room`` (alive while its owner keeps it)."""


def with_room(buf: torch.Tensor) -> torch.Tensor:
    """Mark ``buf`` [B, Hkv, C, D] (contiguous) as a capacity buffer whose rows past a view of its first rows belong
    to that view's holder: a ``SessionCache`` layer holding its first n rows appends a later prefill's rows in place
    (no copy of the whole layer), and ``crop_layers`` keeps a view. Who marks a buffer hands views of it to one cache
    alone (the fast decoder, scbench/engines/fastdecode.py, to its session's cache). The mark ends with ``buf``."""
    key = (str(buf.device), buf.data_ptr())
    _ROOMY[key] = weakref.ref(buf, lambda ref, key=key: _ROOMY.pop(key, None) if _ROOMY.get(key) is ref else None)
    return buf


def room_of(t: torch.Tensor, more: int = 0) -> torch.Tensor | None:
    """The marked capacity buffer whose first rows ``t`` [B, Hkv, n, D] is, when it holds ``more`` rows past them;
    else None."""
    ref = _ROOMY.get((str(t.device), t.data_ptr()))
    buf = ref() if ref is not None else None
    if (buf is None or t.dim() != 4 or t.dtype != buf.dtype or t.stride() != buf.stride()
            or t.shape[:2] != buf.shape[:2] or t.shape[3] != buf.shape[3] or t.shape[2] + more > buf.shape[2]):
        return None
    return buf


def append_in_place(layer, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Write ``keys`` / ``values`` [B, Hkv, t, D] past a plain layer's rows inside their capacity buffers
    (``with_room``) and make the layer views of the longer prefix; False (nothing done) when they have no room."""
    t = keys.shape[-2]
    kb, vb = room_of(layer.keys, t), room_of(layer.values, t)
    if (kb is None or vb is None or keys.dtype != kb.dtype or values.dtype != vb.dtype
            or keys.shape[:2] != kb.shape[:2] or values.shape[:2] != vb.shape[:2]
            or layer.values.shape[-2] != layer.keys.shape[-2]):
        return False
    n = layer.keys.shape[-2]
    with torch.inference_mode():  # the buffers are inference tensors (made in the decode's inference mode)
        kb[:, :, n : n + t].copy_(keys)
        vb[:, :, n : n + t].copy_(values)
        layer.keys, layer.values = kb[:, :, : n + t], vb[:, :, : n + t]
    return True


class SessionCache(DynamicCache):
    """A session's cache (scbench/engines/hf_session.py): transformers' ``DynamicCache``, except that a plain layer
    holding the first rows of capacity buffers (the fast decoder's, after a decode turn) takes a later prefill's rows
    in place: transformers' layer would concatenate, a new copy of the whole layer beside the decoder's buffers
    (twice the cache at the end of the prefill, and a third copy when the decode loads it back). Attention then reads
    the layer as views of the buffers, as it reads a loading method's ``TieredLayer``."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx < len(self.layers):
            layer = self.layers[layer_idx]
            if (type(layer) is DynamicLayer and getattr(layer, "keys", None) is not None
                    and append_in_place(layer, key_states, value_states)):
                return layer.keys, layer.values
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def drop_last(cache, n: int) -> None:
    """Remove the last ``n`` tokens of every layer."""
    if n > 0:
        crop_layers(cache, [length - n for length in layer_lengths(cache)])


def freeze(cache) -> None:
    """Mark every layer's current length: a layer that can keeps what is appended from now on as computed (KIVI's
    ``decode_cache="temp"``, ``scbench_freeze``), so a crop back to the mark is exact. Other layers: nothing."""
    for layer in _layers(cache):
        if hasattr(layer, "scbench_freeze"):
            layer.scbench_freeze()


def thaw(cache) -> None:
    """Clear the marks ``freeze`` set (appends are compressed as usual again)."""
    for layer in _layers(cache):
        if hasattr(layer, "scbench_thaw"):
            layer.scbench_thaw()


def replace_layer(cache, idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Put compressed tensors in place of layer ``idx``'s cache (contiguous, so the old storage is freed)."""
    layer = cache.layers[idx]
    layer.keys, layer.values = keys.contiguous(), values.contiguous()


def install_layer(cache, idx: int, layer) -> None:
    """Replace layer ``idx`` by a cache-layer object that stores its own representation (e.g. packed bits)."""
    cache.layers[idx] = layer


def crop_is_exact(cache) -> bool:
    """False when some layer cannot crop back exactly (it declares ``scbench_exact_crop = False``)."""
    return all(layer.scbench_exact_crop for layer in _layers(cache) if isinstance(layer, CacheLayer))


def snapshot(cache) -> list:
    """A copy of every layer's state (used when a later step may rewrite, not only append).

    A ``CacheLayer`` snapshots itself."""
    return [
        layer.scbench_snapshot() if isinstance(layer, CacheLayer) else (layer.keys.clone(), layer.values.clone())
        for layer in _layers(cache)
    ]


def restore(cache, snap: list) -> None:
    for layer, state in zip(_layers(cache), snap, strict=True):
        if isinstance(layer, CacheLayer):
            layer.scbench_restore(state)
        else:
            layer.keys, layer.values = state[0].clone(), state[1].clone()
