"""CacheBlend's recomputed tokens over the blended cache (``scbench/kernels/dense.py``: ``prefix_rows`` and its
two forms): row i attends to keys 0..last[i]. The way ``SCBENCH_PREFIX_ROWS`` picks; the masked row blocks and the
split against a float64 reference on the CPU, both at Llama-3.1-8B's heads on CUDA. The blend that calls them:
tests/methods/test_cacheblend.py.
"""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("env,keys,way", [("auto", 32768, "masked"), ("auto", 131072, "split"),
                                          ("auto", 80000, "split"), ("split", 1000, "split"),
                                          ("masked", 10**6, "masked")])
def test_prefix_rows_way(monkeypatch, env, keys, way):
    """``SCBENCH_PREFIX_ROWS``: auto (the default) takes the split from ``SPLIT_FROM`` keys (80K: the H100
    figures' interpolated crossover), masked below; split and masked always; anything else is refused by name."""
    from scbench.kernels import dense

    monkeypatch.setattr(dense, "PREFIX_ROWS", env)
    monkeypatch.setattr(dense, "SPLIT_FROM", 80000)
    assert dense.prefix_rows_way(keys) == way
    monkeypatch.setattr(dense, "PREFIX_ROWS", "flash")
    with pytest.raises(ValueError, match="SCBENCH_PREFIX_ROWS='flash'"):
        dense.prefix_rows_way(keys)


def prefix_rows_reference(q, k, v, last, scale):
    """Row i of q over keys 0..last[i]: float64 softmax with the mask (GQA keys repeated), as float32."""
    n = k.shape[-2]
    mask = torch.arange(n)[None, :] <= last[:, None]
    kk, vv = (x.repeat_interleave(q.shape[1] // k.shape[1], 1).double() for x in (k, v))
    s = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ vv).float()


@pytest.mark.parametrize("hq,hk", [(6, 2), (3, 3)])
@pytest.mark.parametrize("cells", [1, 300, None])
def test_prefix_rows_attention_matches_masked_reference(hq, hk, cells):
    """The recomputed tokens' attention over the blended cache (row i sees keys 0..last[i]), in row blocks with GQA
    heads grouped (one row per block with cells=1, a few, or the default), against float64 softmax with the mask."""
    from scbench.kernels.dense import prefix_rows_attention

    g = torch.Generator().manual_seed(hq + (cells or 0))
    n, d = 90, 16
    last = torch.cat([torch.randperm(n - 1, generator=g)[:20].sort().values, torch.tensor([n - 1])])
    last[3] = last[2]  # ties are allowed (ascending, not strictly)
    q = torch.randn(1, hq, len(last), d, generator=g)
    k, v = torch.randn(1, hk, n, d, generator=g), torch.randn(1, hk, n, d, generator=g)
    ref = prefix_rows_reference(q, k, v, last, 0.3)
    torch.testing.assert_close(prefix_rows_attention(q, k, v, last, 0.3, cells=cells), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="ascending"):
        prefix_rows_attention(q, k, v, last.flip(0), 0.3)


@pytest.mark.parametrize("hq,hk", [(6, 2), (3, 3)])
@pytest.mark.parametrize("cells", [1, 400, 1 << 26])
@pytest.mark.parametrize("spread", ["scattered", "consecutive"])
def test_prefix_rows_split_matches_masked_reference(hq, hk, cells, spread):
    """The split form (per row block: the keys every row sees as one unmasked call, the staircase after them in
    float32, merged by log-sum-exp), with the reference part (``attention_lse``) for flash, against float64 softmax
    with the mask: one row per block, a few, all; scattered rows with ties and consecutive rows (ratio 1)."""
    from scbench.kernels.dense import attention_lse, prefix_rows_split

    g = torch.Generator().manual_seed(hq + cells % 1000)
    n, d = 90, 16
    if spread == "scattered":
        last = torch.cat([torch.randperm(n - 1, generator=g)[:20].sort().values, torch.tensor([n - 1])])
        last[3] = last[2]  # ties: a row block whose second row sees nothing past the first's keys
    else:
        last = torch.arange(40, n)
    q = torch.randn(1, hq, len(last), d, generator=g)
    k, v = torch.randn(1, hk, n, d, generator=g), torch.randn(1, hk, n, d, generator=g)
    ref = prefix_rows_reference(q, k, v, last, 0.3)
    got = prefix_rows_split(q, k, v, last, 0.3, part=attention_lse, cells=cells)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert prefix_rows_split(q, k, v, last, 0.3, part=lambda *a: None) is None  # a part that does not take them
    with pytest.raises(ValueError, match="ascending"):
        prefix_rows_split(q, k, v, last.flip(0), 0.3, part=attention_lse)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefix_rows_attention_at_llama_shape():
    """CUDA's row blocks (memory-efficient SDPA with a boolean mask, no cuDNN) and the split form (flash over each
    block's shared keys, the staircase in float32), Llama-3.1-8B heads, bf16, 15% of 12K tokens over the blended
    cache, against float64 per block of rows."""
    from scbench.kernels.dense import prefix_rows_attention, prefix_rows_split

    g = torch.Generator(device="cuda").manual_seed(0)
    n = 12000
    last = torch.cat([torch.randperm(n - 1, generator=g, device="cuda")[:1800].sort().values,
                      torch.tensor([n - 1], device="cuda")])
    q = torch.randn(1, 32, len(last), 128, generator=g, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, n, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = prefix_rows_attention(q, k, v, last, 128 ** -0.5, cells=1 << 22)  # several blocks
    split = prefix_rows_split(q, k, v, last, 128 ** -0.5, cells=1 << 22)  # flash over each block's shared keys
    assert split is not None
    for a in (0, 900, len(last) - 64):
        rows = slice(a, a + 64)
        kk, vv = (x.repeat_interleave(4, 1).double() for x in (k, v))
        s = (q[:, :, rows].double() @ kk.transpose(-1, -2)) * 128 ** -0.5
        s = s.masked_fill(torch.arange(n, device="cuda")[None, :] > last[rows, None], float("-inf"))
        torch.testing.assert_close(out[:, :, rows].double(), s.softmax(-1) @ vv, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(split[:, :, rows].double(), s.softmax(-1) @ vv, atol=2e-2, rtol=2e-2)
