"""Chunk-over-cache attention on CUDA (KVzip's reconstruction forwards, later turns, ragged heads). Needs CUDA.

SDPA with a boolean mask and GQA falls to the math kernel (float32 [Hq, Tq, Tk] scores: 32 GiB for a 2,061-token
KVzip chunk over 131K keys, 32 heads) or to cuDNN (a new plan per (Tq, Tk): every head of a ragged cache);
``causal_attention`` takes flash through a lower-right CausalBias instead."""
import time

import pytest
import torch

from scbench.kernels import dense
from scbench.kv.ragged import RaggedLayer, ragged_attention, reference_ragged_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = "cuda"


@pytest.mark.parametrize("tq,tk", [(37, 500), (300, 1000), (2061, 4109)])
def test_lower_right_matches_reference(tq, tk):
    g = torch.Generator(device=DEV).manual_seed(tq)
    q = torch.randn(1, 32, tq, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 8, tk, 128, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(2))
    ref = dense.reference_causal_attention(q, k, v).float()
    assert (dense.causal_attention(q, k, v).float() - ref).abs().max() < 2e-2
    assert (dense.masked_blocks(q, k, v, None, True, 1 << 20).float() - ref).abs().max() < 2e-2


def test_bf16_takes_flash_not_the_masked_fallback(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("masked fallback taken: no flash kernel for a lower-right GQA chunk on this build")

    monkeypatch.setattr(dense, "masked_blocks", fail)
    q = torch.randn(1, 32, 300, 128, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 1000, 128, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    out = dense.causal_attention(q, k, v)
    assert out.shape == q.shape and bool(torch.isfinite(out).all())


def test_chunk_over_long_cache_memory_is_bounded():
    q = torch.randn(1, 32, 2061, 128, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 40_000, 128, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dense.causal_attention(q, k, v)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 4 * 2**30, f"{extra / 2**30:.1f} GiB extra (the math kernel's float32 scores would be 10 GiB)"


def test_ragged_later_prefill_is_fast():
    """32 layers x 8 heads of distinct lengths, a 64-token later prompt: no per-shape planning (seconds before)."""
    g = torch.Generator(device=DEV).manual_seed(0)
    layers = []
    for i in range(32):
        lengths = [2000 + 97 * h + 13 * i for h in range(8)]
        layer = RaggedLayer([torch.randn(n, 128, device=DEV, dtype=torch.bfloat16, generator=g) for n in lengths],
                            [torch.randn(n, 128, device=DEV, dtype=torch.bfloat16, generator=g) for n in lengths])
        layer.update(*(torch.randn(1, 8, 64, 128, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(2)))
        layers.append(layer)
    q = torch.randn(1, 32, 64, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    ragged_attention(q, layers[0])  # kernel load
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for layer in layers:
        out = ragged_attention(q, layer)
    torch.cuda.synchronize()
    assert time.perf_counter() - t0 < 1.0
    last = layers[-1]
    cpu = RaggedLayer([last.head(h)[0][: last.lengths[h]].cpu() for h in range(8)],
                      [last.head(h)[1][: last.lengths[h]].cpu() for h in range(8)])
    cpu.update(last.keys.cpu(), last.values.cpu())
    ref = reference_ragged_attention(q.cpu(), cpu).float()
    assert (out.float().cpu() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("tq,tk", [(300, 1000), (2061, 4109)])
def test_prefix_split_cudnn_matches_reference(tq, tk):
    """KVzip's repeat forwards: cuDNN over the context + cuDNN causal over the chunk, merged by log-sum-exp."""
    g = torch.Generator(device=DEV).manual_seed(tk)
    q = torch.randn(1, 32, tq, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 8, tk, 128, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(2))
    ref = dense.reference_causal_attention(q, k, v).float()
    out = dense.prefix_split_cudnn(q, k, v, None)
    if out is None:
        pytest.skip("cuDNN does not take these shapes on this build (the flash path stays)")
    assert (out.float() - ref).abs().max() < 2e-2
    with dense.split_prefix():
        assert (dense.causal_attention(q, k, v).float() - ref).abs().max() < 2e-2
