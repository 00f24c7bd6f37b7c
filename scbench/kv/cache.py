"""Helpers over a transformers ``Cache``: per-layer lengths, cropping, snapshots and byte accounting.

Bytes are always summed from the tensors the cache really holds, so a method that shrinks or
quantizes its cache shows its saving here and nowhere else. A cache layer that stores something
other than plain ``keys``/``values`` tensors may define ``scbench_nbytes()`` and ``scbench_crop(n)``.
"""
from __future__ import annotations

import torch


def _layers(cache) -> list:
    return [layer for layer in cache.layers if getattr(layer, "is_initialized", False)]


def layer_lengths(cache) -> list[int]:
    """Tokens held per initialised layer."""
    return [layer.get_seq_length() for layer in _layers(cache)]


def kv_nbytes(cache) -> int:
    """Bytes of KV state held by the cache, counted from its real tensors."""
    total = 0
    for layer in _layers(cache):
        if hasattr(layer, "scbench_nbytes"):
            total += int(layer.scbench_nbytes())
        else:
            total += layer.keys.numel() * layer.keys.element_size()
            total += layer.values.numel() * layer.values.element_size()
    return total


def full_nbytes(num_layers: int, kv_heads: int, head_dim: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes a dense cache of ``tokens`` tokens would hold (keys + values, all layers)."""
    return 2 * num_layers * kv_heads * head_dim * tokens * torch.empty((), dtype=dtype).element_size()


def crop_layers(cache, lengths: list[int]) -> None:
    """Keep the first ``lengths[i]`` tokens of layer i (undo appends made after a checkpoint)."""
    for layer, n in zip(_layers(cache), lengths, strict=True):
        if hasattr(layer, "scbench_crop"):
            layer.scbench_crop(n)
        elif layer.keys.shape[-2] != n:
            layer.keys = layer.keys[..., :n, :].contiguous()
            layer.values = layer.values[..., :n, :].contiguous()


def drop_last(cache, n: int) -> None:
    """Remove the last ``n`` tokens of every layer."""
    if n > 0:
        crop_layers(cache, [length - n for length in layer_lengths(cache)])


def replace_layer(cache, idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Put compressed tensors in place of layer ``idx``'s cache (contiguous, so the old storage is freed)."""
    layer = cache.layers[idx]
    layer.keys, layer.values = keys.contiguous(), values.contiguous()


def install_layer(cache, idx: int, layer) -> None:
    """Replace layer ``idx`` by a cache-layer object that stores its own representation (e.g. packed bits)."""
    cache.layers[idx] = layer


def crop_is_exact(cache) -> bool:
    """False when some layer cannot crop back exactly (it declares ``scbench_exact_crop = False``)."""
    return all(getattr(layer, "scbench_exact_crop", True) for layer in _layers(cache))


def snapshot(cache) -> list:
    """A copy of every layer's state (used when a later step may rewrite, not only append).

    A layer defining ``scbench_snapshot()`` / ``scbench_restore(state)`` snapshots itself."""
    return [
        layer.scbench_snapshot() if hasattr(layer, "scbench_snapshot") else (layer.keys.clone(), layer.values.clone())
        for layer in _layers(cache)
    ]


def restore(cache, snap: list) -> None:
    for layer, state in zip(_layers(cache), snap, strict=True):
        if hasattr(layer, "scbench_restore"):
            layer.scbench_restore(state)
        else:
            layer.keys, layer.values = state[0].clone(), state[1].clone()
