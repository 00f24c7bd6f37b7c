"""Named sets of tensors kept off the accelerator: host memory (``cpu``) or safetensors files under a folder
(``disk``), loaded back bit-exactly, counting bytes and time (``Tier``); multi-request runs use it to keep the
context KV between requests. ``flatten`` / ``unflatten`` turn a cache snapshot into named tensors and back;
``Parked`` is a snapshot held in a tier.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import torch

from scbench.devices import sync as _sync

TIERS = ("cpu", "disk")
BLOCK_COPY = os.environ.get("SCBENCH_HOST_BLOCK_COPY", "1") != "0"
"""Copies from the accelerator to host memory go into page-locked buffers of the exact size
(``scbench.kv.pinned``), asynchronously (``Tier.put``; a host tier's rows: ``offload.Rows._copy_blocks``, one copy
per contiguous run of rows). 0: the reference: torch's ``.to("cpu")`` into pageable memory (``Tier.put``), and a host
tier's buffers from torch's pinned allocator filled by a copy into their strided view (staged through a pageable
temporary): at 131K 23 s for a Llama-3.1-8B-shaped cache against ~2 s (``scripts/bench_host_tier.py``)."""
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Tier:
    """Named sets of tensors held in host memory (``cpu``) or in ``<root>/<name>.safetensors`` (``disk``).

    ``put`` copies the tensors out (the caller may free its own), ``get`` returns fresh tensors on ``device``
    with the same dtypes, shapes and bits. ``loaded_bytes`` / ``load_s`` count what ``get`` brought back.
    """

    def __init__(self, kind: str, root: str | Path | None = None):
        if kind not in TIERS:
            raise ValueError(f"offload tier must be one of {TIERS}, got {kind!r}")
        if kind == "disk" and root is None:
            raise ValueError("offload tier 'disk' needs a root folder for its safetensors files")
        self.kind = kind
        self.root = Path(root) if root is not None else None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        self._held: dict[str, dict[str, torch.Tensor] | int] = {}
        self.loaded_bytes = 0
        self.load_s = 0.0

    def _path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"

    def put(self, name: str, tensors: dict[str, torch.Tensor]) -> int:
        """Store ``tensors`` (any shapes and dtypes) under ``name``, replacing what was there; returns the bytes."""
        if not _NAME.match(name):
            raise ValueError(f"offload tier: name {name!r} must match {_NAME.pattern}")
        if BLOCK_COPY:  # page-locked, asynchronous (kv/pinned.py); ``get`` then copies back at full bandwidth
            from scbench.kv.pinned import host_copies

            host = dict(zip(tensors, host_copies(tensors.values())))
        else:  # pageable, through the driver's staging buffers both ways
            host = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
        size = sum(nbytes(t) for t in host.values())
        if self.kind == "cpu":
            self._held[name] = host
        else:
            from safetensors.torch import save_file

            save_file(host, str(self._path(name)))
            self._held[name] = size
        return size

    def get(self, name: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The tensors stored under ``name``, on ``device``."""
        if name not in self._held:
            raise KeyError(f"offload tier ({self.kind}): nothing stored under {name!r}; stored: {sorted(self._held)}")
        device = torch.device(device)
        t0 = time.perf_counter()
        if self.kind == "cpu":
            pin = device.type == "cuda"
            out = {k: t.to(device, copy=True, non_blocking=pin and t.is_pinned()) for k, t in self._held[name].items()}
        else:
            from safetensors.torch import load_file

            out = {k: t.to(device) for k, t in load_file(str(self._path(name))).items()}
        _sync(device)
        self.load_s += time.perf_counter() - t0
        self.loaded_bytes += sum(nbytes(t) for t in out.values())
        return out

    def drop(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held is not None and self.kind == "disk":
            self._path(name).unlink(missing_ok=True)

    def held_bytes(self) -> int:
        """Bytes stored in this tier now."""
        return sum(h if isinstance(h, int) else sum(nbytes(t) for t in h.values()) for h in self._held.values())

    def close(self) -> None:
        for name in list(self._held):
            self.drop(name)
        if self.kind == "disk" and self.root.exists() and not any(self.root.iterdir()):
            shutil.rmtree(self.root, ignore_errors=True)


def flatten(obj, path: str = "s") -> tuple[dict[str, torch.Tensor], tuple]:
    """Nested lists/tuples of tensors and plain values -> (named tensors, a tree to rebuild it with ``unflatten``)."""
    if isinstance(obj, torch.Tensor):
        return {path: obj}, ("tensor", path)
    if isinstance(obj, (list, tuple)):
        tensors, items = {}, []
        for i, item in enumerate(obj):
            t, tree = flatten(item, f"{path}.{i}")
            tensors.update(t)
            items.append(tree)
        return tensors, (type(obj).__name__, items)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {}, ("value", obj)
    raise TypeError(f"flatten: cannot store a {type(obj).__name__} at {path} in an offload tier")


def unflatten(tree: tuple, tensors: dict[str, torch.Tensor]):
    kind, payload = tree
    if kind == "tensor":
        return tensors[payload]
    if kind == "value":
        return payload
    items = [unflatten(item, tensors) for item in payload]
    return tuple(items) if kind == "tuple" else items


class Parked:
    """A cache snapshot (``scbench.kv.cache.snapshot``) kept in a Tier: multi-request runs park the context KV
    there after its prefill and load it back before each later request."""

    def __init__(self, tier: Tier, name: str, snap: list):
        tensors, self.tree = flatten(snap)
        self.tier, self.name = tier, name
        self.nbytes = tier.put(name, tensors)

    def load(self, device: torch.device) -> list:
        return unflatten(self.tree, self.tier.get(self.name, device))
