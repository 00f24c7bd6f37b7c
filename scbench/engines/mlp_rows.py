"""A long prefill's MLP in row blocks: the same rows, a fraction of the activations.

A decoder layer's MLP works on each token alone, so a prefill of ``T`` tokens can run it ``R`` rows at a time. HF's
``LlamaMLP`` computes ``down(silu(gate(x)) * up(x))`` over all ``T`` rows at once, holding three [T, intermediate]
tensors together: at 131K tokens on Llama-3.1-8B's shape (intermediate 14,336, bf16) that is ~11 GB beside the
16 GB of weights and 17 GB of cache, the largest transient of the whole prefill. In blocks of 16,384 rows it is
~1.4 GB; the GEMMs of 16K rows still fill the GPU.

``rows(model)`` patches the forwards of the MLP modules it recognises (the classes in ``MLP``, with no forward
of their own already set and no hooks) for the length of a ``with`` block, and restores them; a call with at most
``R`` rows, or not on CUDA unless ``R`` is given, goes straight to the module's own forward. The block size is
``SCBENCH_MLP_ROWS`` (default 16384 on CUDA; ``0`` turns it off). CPU runs keep the one call (their results stay
bit for bit) unless ``SCBENCH_MLP_ROWS`` is set or ``block`` is passed. Reference: the module's own forward over
every row (``tests/unit/test_mlp_rows.py``). Measured through ``scbench run`` on the H200 at 131K (full attention):
peak 45.24 -> 37.87 GiB, first prefill 11.59 -> 11.62 s (``results/perf/mlp_rows_h200.md``).
"""
from __future__ import annotations

import contextlib
import os

import torch

from scbench.engines.fuse import _own_forward

MLP = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma2MLP", "Gemma3MLP", "Phi3MLP"}
DEFAULT_ROWS = 16384


def block_rows() -> int:
    """``SCBENCH_MLP_ROWS``: rows per MLP block on CUDA (0: off). A bad value is refused by name."""
    raw = os.environ.get("SCBENCH_MLP_ROWS", str(DEFAULT_ROWS)).strip()
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"SCBENCH_MLP_ROWS must be an integer >= 0 (rows per MLP block; 0 turns it off), got {raw!r}")
    return value


def in_blocks(forward, x: torch.Tensor, block: int) -> torch.Tensor:
    """``forward`` (token-wise, [..., T, H] -> [..., T, H']) over ``x`` ``block`` rows at a time, into one output."""
    t = x.shape[-2]
    first = forward(x[..., :block, :])
    out = first.new_empty(*x.shape[:-2], t, first.shape[-1])
    out[..., :block, :] = first
    del first
    for s in range(block, t, block):
        out[..., s : s + block, :] = forward(x[..., s : s + block, :])
    return out


@contextlib.contextmanager
def rows(model, tokens: int | None = None, block: int | None = None):
    """While inside, the recognised MLPs of ``model`` run calls of more than ``block`` rows in blocks (CUDA with
    ``block`` None: ``SCBENCH_MLP_ROWS``; CPU with ``block`` None: only where that variable is set). ``tokens``: the
    forward's length where known (at most ``block``: nothing is patched). Yields the number of MLPs patched."""
    if tokens is not None and tokens <= 1:  # a decode step: never blocked (no device lookup on the hot path)
        yield 0
        return
    if block is None:
        dev = next(model.parameters()).device
        block = block_rows() if dev.type == "cuda" or "SCBENCH_MLP_ROWS" in os.environ else 0
    wanted = block > 0 and (tokens is None or tokens > block)
    mods = [m for m in model.modules() if type(m).__name__ in MLP and _own_forward(m)] if wanted else []
    for m in mods:
        orig = type(m).forward.__get__(m)

        def fwd(x, *args, _orig=orig, **kw):
            if args or kw or x.dim() < 2 or x.shape[-2] <= block:
                return _orig(x, *args, **kw)
            return in_blocks(_orig, x, block)

        m.forward = fwd
    try:
        yield len(mods)
    finally:
        for m in mods:
            del m.forward
