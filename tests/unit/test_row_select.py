"""The one-launch radix select (scbench/kernels/row_select.py) against ``radix_select_triton`` and the plugin's torch
rows. CUDA, or Triton's interpreter with one program per row (its per-row barriers would wait forever there on a
program that has not started: the interpreter runs programs one after another)."""
import os
from types import SimpleNamespace

import pytest
import torch

from scbench.kernels import row_select, topk_select

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(topk_select.triton is None or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
                                reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")


@pytest.mark.parametrize("c,n,k,n_init,n_local,nprog", [(700, 650, 40, 4, 16, None), (300, 290, 500, 8, 8, None),
                                                        (2200, 2100, 300, 0, 32, 3), (900, 30, 64, 20, 16, None)])
def test_one_launch_equals_radix_select(c, n, k, n_init, n_local, nprog):
    g = torch.Generator().manual_seed(c + k)
    s = (torch.randn(2, 3, c, generator=g) * 4).round().bfloat16().to(DEVICE)  # many exact ties
    nn = torch.tensor([n], device=DEVICE)
    want = topk_select.radix_select_triton(s, nn, k, n_init, n_local, chunk=256, static=True).cpu()
    work = torch.zeros(row_select.work_size(6), dtype=torch.int32, device=DEVICE)
    got = row_select.radix_select_one(s, nn, k, n_init, n_local, work, chunk=256,
                                      nprog=(nprog if CUDA else 1)).cpu()
    ns = n_init + n_local
    assert torch.equal(got[:, :ns], want[:, :ns])  # the static rows
    kk = min(k, max(0, n - n_local - n_init))
    assert torch.equal((got[:, ns:] >= 0).sum(-1), torch.full((6,), kk))
    sc = s.float().cpu().view(6, c)
    for r in range(6):  # the same selected score multiset (ties may pick other rows), each row once
        a, b = got[r, ns:][got[r, ns:] >= 0].long(), want[r, ns:][want[r, ns:] >= 0].long()
        assert a.unique().numel() == a.numel() and bool(((a >= n_init) & (a < n - n_local)).all())
        assert torch.equal(sc[r, a].sort().values, sc[r, b].sort().values)
        top = sc[r, n_init : max(n_init, n - n_local)].topk(kk).values  # and the torch top-k's
        assert torch.equal(sc[r, a].sort().values, top.sort().values)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (the plugin's one-launch branch, bfloat16 scores)")
@pytest.mark.parametrize("gqa", ["head", "group"])
def test_plugin_one_launch_rows_match_torch_rows(gqa):
    from scbench.methods.retrieval_attention import RetrievalAttention
    from scbench.methods.retrieval_fast import RetrievalDecode

    g = torch.Generator().manual_seed(5)
    layers = 3
    k = [torch.randn(1, 2, 3000, 64, generator=g).bfloat16() for _ in range(layers)]
    q = [torch.randn(1, 8, 1, 64, generator=g).bfloat16() for _ in range(layers)]
    plugin = RetrievalDecode(RetrievalAttention(top_k=256, n_init=16, n_local=64, gqa=gqa, tier="device"))
    plugin.one_launch = True
    kv = SimpleNamespace(k=[x.cuda() for x in k], at=torch.full((layers,), 2900, device="cuda"))
    n, lo, hi = 2901, 16, 2901 - 64
    for _ in range(2):  # two steps over the layers: the step's work buffer zeroed at layer 0 and reused
        plugin.work.zero_() if plugin.work is not None else None
        for l in range(layers):
            got = plugin.rows(kv, l, q[l].cuda(), step=True).long().cpu()
            s = q[l].cuda().reshape(1, 2, 4, 64) @ kv.k[l].transpose(-1, -2)  # the plugin's own scores
            s = (s.amax(2) if gqa == "group" else s.flatten(1, 2)).float().cpu()[0]
            static = list(range(lo)) + list(range(hi, n))
            assert torch.equal(got[0, :, :80], torch.tensor(static).expand(got.shape[1], -1))
            for h in range(got.shape[1]):
                a = got[0, h, 80:]
                assert a.unique().numel() == 256 and bool(((a >= lo) & (a < hi)).all())
                want = s[h, lo:hi].topk(256).values
                assert torch.equal(s[h, a].sort().values, want.sort().values)
