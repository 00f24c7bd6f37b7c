"""The previous-step-threshold select (scbench/kernels/prev_select.py) against ``topk`` over the masked scores, over
several steps sharing one threshold buffer: the first step (no threshold yet: whole-row path), a good threshold
(candidate list), a stale one below (more candidates) or above the k-th largest (whole-row path), a list past its
capacity (row scan), a threshold far below (the overflow bin: whole-row path), ties, short rows. CUDA, or Triton's
interpreter on CPU (tiny shapes)."""
import os

import pytest
import torch

from scbench.kernels import prev_scores, prev_select
from support import assert_topk_rows


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(prev_select.triton is None or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
                                reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
SMALL = dict(chunk=512, part=64, cap=256, block=512, num_warps=4)


@pytest.fixture(autouse=True)
def _interp(request):
    if not CUDA:
        request.getfixturevalue("interpreted")


def assert_select(s, n, k, n_init, n_local, thr, **kw):
    work = torch.zeros(prev_select.work_size(thr.numel()), dtype=torch.int32, device=DEVICE)
    got = prev_select.prev_select_triton(s, torch.tensor([n], device=DEVICE), k, n_init, n_local, thr, work=work,
                                         **{**SMALL, **kw})
    assert_topk_rows(s, got, n, k, n_init, n_local)
    return int(prev_select.slow_rows(work, thr.numel()).item())


def scores(c, seed, scale=4.0, ties=True):
    s = torch.randn(2, 3, c, generator=torch.Generator().manual_seed(seed)) * scale
    return (s.round() if ties else s).bfloat16().to(DEVICE)


def test_prev_select_steps():
    c, n, k, n_init, n_local = 1500, 1490, 40, 4, 16
    thr = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    s = scores(c, 1, ties=False)
    assert assert_select(s, n, k, n_init, n_local, thr) == 6  # first step: no threshold yet
    assert bool((thr > 0).all())
    assert assert_select(s, n, k, n_init, n_local, thr) == 0  # the same scores: every row from its candidates
    assert assert_select(scores(c, 2, ties=False), n, k, n_init, n_local, thr) == 0  # new scores, same spread
    s = scores(c, 3, ties=False) * 0.25
    assert assert_select(s, n, k, n_init, n_local, thr) == 6  # threshold above: whole row
    assert assert_select(s, n, k, n_init, n_local, thr, cap=32, part=16) == 0  # more candidates than the list holds: scan
    assert assert_select(scores(c, 5, scale=2.0), n, k, n_init, n_local, thr, margin=0) == 0  # ties at the threshold
    assert assert_select(scores(c, 5, scale=2.0), n, k, n_init, n_local, thr, margin=0) == 0


@pytest.mark.parametrize("group", [False, True])
def test_prev_select_scales_by_query_norm(group):
    """The threshold follows |q|: queries scaled 3x (or 1/3) keep every row on its candidate list, where a
    threshold without q falls back to the whole row (threshold above) or at least stays exact."""
    g = torch.Generator().manual_seed(5)
    c, n, k, n_init, n_local = 1200, 1190, 30, 4, 16
    keys = torch.randn(1, 2, c, 16, generator=g)
    q = torch.randn(1, 4, 1, 16, generator=g)
    hs = 2 if group else 4

    def sc(qq):
        s = qq.reshape(1, 2, 2, 16) @ keys.transpose(-1, -2)
        return (s.amax(2) if group else s.flatten(1, 2)).bfloat16().to(DEVICE)

    thr = torch.zeros(hs, dtype=torch.int32, device=DEVICE)
    plain = torch.zeros(hs, dtype=torch.int32, device=DEVICE)
    qd = lambda x: x.bfloat16().to(DEVICE)  # noqa: E731
    assert assert_select(sc(q), n, k, n_init, n_local, thr, q=qd(q), group=group) == hs  # first step
    assert assert_select(sc(q), n, k, n_init, n_local, plain) == hs
    assert assert_select(sc(q * 3), n, k, n_init, n_local, thr, q=qd(q * 3), group=group) == 0
    assert assert_select(sc(q / 3), n, k, n_init, n_local, thr, q=qd(q / 3), group=group) == 0
    assert assert_select(sc(q / 3), n, k, n_init, n_local, plain) == hs  # the unscaled threshold is above every k-th


@pytest.mark.parametrize("c,n,k,n_init,n_local,kw", [
    (2000, 1900, 40, 4, 16, {}),
    (2000, 1900, 40, 4, 16, dict(atomic=False)),  # tl.histogram instead of an atomic per candidate
    (2000, 1900, 40, 4, 16, dict(loop=2, chunk=256)),  # filter programs looping over chunks
    (2000, 1900, 40, 4, 16, dict(one=True)),  # one launch: the row's last filter program picks
    (400, 390, 20, 4, 16, dict(cap=32, part=16, one=True)),  # ... from the whole row (list overflows)
    (2000, 1900, 40, 4, 16, dict(margin=400)),  # the next threshold far below: its k-th in the overflow bin
    (2000, 1900, 40, 4, 16, dict(margin=400, split=4)),  # ... the whole row in a third launch
    (400, 390, 20, 4, 16, dict(cap=128)),  # small capacity
    (300, 290, 500, 8, 8, {}),  # fewer rows than k
    (900, 30, 64, 20, 16, {}),  # nothing searchable yet; static rows overlap
])
def test_prev_select_matches_topk(c, n, k, n_init, n_local, kw):
    thr = torch.zeros(6, dtype=torch.int32, device=DEVICE)
    for step in range(2):  # the second step's threshold from the first
        assert_select(scores(c, c + step), n, k, n_init, n_local, thr, **kw)


def test_prev_select_rejects_bad_input():
    thr = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    nn = torch.tensor([64], device=DEVICE)
    with pytest.raises(ValueError, match="bfloat16"):
        prev_select.prev_select_triton(torch.zeros(1, 1, 64, device=DEVICE), nn, 8, 0, 0, thr)
    with pytest.raises(ValueError, match="power of two"):
        prev_select.prev_select_triton(torch.zeros(1, 1, 64, device=DEVICE).bfloat16(), nn, 8, 0, 0, thr, chunk=100)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (the plugin's select=prev branch)")
@pytest.mark.parametrize("gqa", ["head", "group"])
def test_plugin_prev_rows_match_torch_rows(gqa):
    from types import SimpleNamespace

    from scbench.methods.retrieval_attention import RetrievalAttention
    from scbench.methods.retrieval_fast import RetrievalDecode

    g = torch.Generator().manual_seed(7)
    layers, c, n = 3, 40000, 39001
    k = [torch.randn(1, 2, c, 64, generator=g).bfloat16().cuda() for _ in range(layers)]
    plugin = RetrievalDecode(RetrievalAttention(top_k=512, n_init=16, n_local=64, gqa=gqa, tier="device"))
    plugin.select = "prev"
    kv = SimpleNamespace(k=k, at=torch.full((layers,), n - 1, device="cuda"))
    for step in range(3):  # the first step without thresholds, then each from the one before (new queries)
        q = [torch.randn(1, 8, 1, 64, generator=g).bfloat16().cuda() for _ in range(layers)]
        plugin.work.zero_() if plugin.work is not None else None
        for l in range(layers):
            got = plugin.rows(kv, l, q[l], step=True)
            s = q[l].reshape(1, 2, 4, 64) @ k[l].transpose(-1, -2)  # the plugin's own scores
            s = s.amax(2) if gqa == "group" else s.flatten(1, 2)
            assert_topk_rows(s, got.reshape(-1, got.shape[-1]), n, 512, 16, 64)
    assert plugin.thr is not None and bool((plugin.thr > 0).all())


@pytest.mark.parametrize("group", [False, True])
def test_prev_scores_select_matches_topk(group):
    """The filter that computes the scores itself: its row list against topk over the scores it returned, and
    those scores against q @ k^T rounded to bfloat16 (up to the summation order)."""
    g = torch.Generator().manual_seed(11)
    c, n, kk, n_init, n_local = 700, 690, 24, 4, 16
    keys = torch.randn(1, 2, c, 16, generator=g).bfloat16().to(DEVICE)
    hs = 2 if group else 4
    thr = torch.zeros(hs, dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, 4, 1, 16, generator=g).bfloat16().to(DEVICE)
    for step in range(2):  # the same query twice: the second step's threshold fits
        work = torch.zeros(prev_select.work_size(hs), dtype=torch.int32, device=DEVICE)
        got, s = prev_scores.prev_scores_select_triton(q, keys, torch.tensor([n], device=DEVICE), kk, n_init, n_local,
                                                       group, thr, work=work, cap=256, bn=32, part=64, block=256,
                                                       atomic=step == 0, tiles=1 + step)
        assert_topk_rows(s, got, n, kk, n_init, n_local)
        ref = q.reshape(1, 2, 2, 16).float() @ keys.float().transpose(-1, -2)
        ref = ref.amax(2) if group else ref.flatten(1, 2)
        assert torch.allclose(s.float(), ref.bfloat16().float(), rtol=1e-2, atol=1e-2)
        assert int(prev_select.slow_rows(work, hs).item()) == (hs if step == 0 else 0)
