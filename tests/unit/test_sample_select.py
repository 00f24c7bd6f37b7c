"""The two-launch sampled-threshold select (scbench/kernels/sample_select.py) against ``topk`` over the masked
scores: the same selected score multiset (ties may pick other rows), each row once, the static rows first. CUDA,
or Triton's interpreter on CPU (tiny shapes)."""
import os

import pytest
import torch

from scbench.kernels import sample_select
from support import assert_topk_rows

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(sample_select.triton is None or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
                                reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")


@pytest.fixture(autouse=True)
def _interp(request):
    if not CUDA:
        request.getfixturevalue("interpreted")


CASES = [
    (2000, 1900, 40, 4, 16, dict(chunk=512, samples=64, block=4)),   # sampled threshold (m > cap)
    (1500, 1490, 40, 4, 16, dict(chunk=512, samples=64, block=1, margin=-8.0)),  # the sample misses: whole row
    (400, 390, 20, 4, 16, dict(chunk=128, samples=16, block=2, cap=16)),  # cap too small: whole row
    (300, 290, 500, 8, 8, dict(chunk=128, samples=64)),  # fewer rows than k
    (900, 30, 64, 20, 16, dict(chunk=256, samples=64)),  # nothing searchable yet; static rows overlap
    (3000, 2900, 40, 4, 16, dict(chunk=1024)),  # default sample size, cut to the cap (128 for k=40)
]


@pytest.mark.parametrize("fuse,dtype,c,n,k,n_init,n_local,kw",
                         [(False, torch.bfloat16, *case) for case in CASES] + [(False, torch.float32, *case) for case in CASES[:3]]
                         + [(True, torch.bfloat16, *case) for case in CASES] + [(True, torch.float32, *CASES[0])])
def test_sample_select_matches_topk(fuse, dtype, c, n, k, n_init, n_local, kw):
    g = torch.Generator().manual_seed(c + k + n)
    s = torch.randn(2, 3, c, generator=g) * 4
    if dtype == torch.bfloat16:
        s = s.round()  # many exact ties
    s = s.to(dtype).to(DEVICE)
    nn = torch.tensor([n], device=DEVICE)
    got = sample_select.sample_select_triton(s, nn, k, n_init, n_local, num_warps=4, final_warps=4, fuse=fuse, **kw)
    assert_topk_rows(s, got, n, k, n_init, n_local)


def test_sample_select_rejects_bad_sizes():
    s = torch.zeros(1, 1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        sample_select.sample_select_triton(s, torch.tensor([64], device=DEVICE), 8, 0, 0, chunk=100)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (the plugin's select=sample branch)")
@pytest.mark.parametrize("gqa,fuse", [("head", False), ("group", False), ("head", True)])
def test_plugin_sample_rows_match_torch_rows(gqa, fuse):
    from types import SimpleNamespace

    from scbench.methods.retrieval_attention import RetrievalAttention
    from scbench.methods.retrieval_fast import RetrievalDecode

    g = torch.Generator().manual_seed(7)
    layers, c, n = 3, 40000, 39001
    k = [torch.randn(1, 2, c, 64, generator=g).bfloat16().cuda() for _ in range(layers)]
    q = [torch.randn(1, 8, 1, 64, generator=g).bfloat16().cuda() for _ in range(layers)]
    plugin = RetrievalDecode(RetrievalAttention(top_k=512, n_init=16, n_local=64, gqa=gqa, tier="device"))
    plugin.select = "sample"
    plugin.sample = {"fuse": fuse}
    kv = SimpleNamespace(k=k, at=torch.full((layers,), n - 1, device="cuda"))
    nn = torch.tensor([n], device="cuda")
    for _ in range(2):  # two steps: the step's counters zeroed at layer 0 and reused
        plugin.work.zero_() if plugin.work is not None else None
        for l in range(layers):
            got = plugin.rows(kv, l, q[l], step=True)
            s = q[l].reshape(1, 2, 4, 64) @ k[l].transpose(-1, -2)  # the plugin's own scores
            s = s.amax(2) if gqa == "group" else s.flatten(1, 2)
            assert_topk_rows(s, got.reshape(-1, got.shape[-1]), n, 512, 16, 64)
