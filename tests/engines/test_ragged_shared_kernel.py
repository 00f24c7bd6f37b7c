"""Batched decode over a ragged context layer (scbench/kernels/ragged_shared.py): the torch path against the float64
reference; the Triton kernel against both through the interpreter (tiny shapes, both loop forms) and on CUDA at
bf16 / fp32 (scripts/gpu_tests.sh). Skips the kernel cases without Triton."""
from __future__ import annotations

import pytest
import torch

from scbench.kernels import ragged_shared as rs

CUDA = torch.cuda.is_available()
KERNEL = rs.triton is not None and (CUDA or rs.INTERPRET)


def case(lengths, b, g=2, d=16, t=0, c=12, seed=0, dtype=torch.float32, device="cpu", suf_len=None, strided=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    h = len(lengths)
    q = r(b, h * g, 1, d)
    pk, pv = r(sum(lengths), d), r(sum(lengths), d)
    if strided:  # the suffix viewed out of a larger buffer (as after a crop)
        sk, sv = r(1, h, t + 5, d)[:, :, :t], r(1, h, t + 5, d)[:, :, :t]
    else:
        sk, sv = r(1, h, t, d), r(1, h, t, d)
    ok, ov = r(b, h, c, d), r(b, h, c, d)
    sl = torch.tensor(suf_len if suf_len is not None else [t] * b, device=device)
    at = torch.tensor([(5 * i + 2) % c for i in range(b)], device=device)
    return q, pk, pv, lengths, sk, sv, sl, ok, ov, at


CASES = [
    dict(lengths=[5, 40, 17], b=3),  # multi-request: no suffix, every row sees the whole prefix
    dict(lengths=[1, 1], b=2, g=1, t=9, suf_len=[0, 9]),  # multi-turn: rows see different suffix rows
    dict(lengths=[64, 3, 20, 8], b=4, g=4, t=30, suf_len=[30, 17, 2, 0], strided=True),  # 16 rows, strided suffix
    dict(lengths=[33, 70], b=5, g=7, t=6, suf_len=[6, 6, 3, 1, 0]),  # 35 rows: two tiles, requests straddle them
]


@pytest.mark.parametrize("kw", CASES)
def test_torch_path_matches_reference(kw):
    x = case(**kw)
    torch.testing.assert_close(rs.ragged_shared_attention(*x, 0.3), rs.reference_ragged_shared(*x, 0.3), atol=1e-5,
                               rtol=1e-5)


def test_work_list_follows_each_heads_length():
    w = rs.SharedWork([100, 3, 300], 20, 2, "cpu", split=64)
    # per head: ceil((n + t) / split) context pieces, then 2 own pieces; heads contiguous
    assert w.count.tolist() == [2 + 2, 1 + 2, 5 + 2] and w.base.tolist() == [0, 4, 7] and w.n == 14
    assert w.items[1].tolist()[:4] == [0, 64, -1, -2] and w.items[0].tolist()[4:7] == [1, 1, 1]
    assert rs.tiling(5, 7) == (32, 2, 5) and rs.tiling(2, 4) == (16, 1, 2) and rs.tiling(12, 4) == (32, 2, 9)


def _kernel(x, rows=None, split=32, dyn=None):
    q, pk, pv, lengths, sk, sv, sl, ok, ov, at = x
    dev = q.device
    rt, nt, rq = rs.tiling(q.shape[0], q.shape[1] // len(lengths), rows)
    work = rs.SharedWork(lengths, sk.shape[2], rq, dev, split=split)
    off = torch.tensor(rs.offsets_of(lengths), device=dev)
    return rs.ragged_shared_decode(q, pk, pv, off, torch.tensor(lengths, device=dev), sk, sv, sl, ok, ov, at, work,
                                   0.3, rows=rows, dyn=dyn)


@pytest.mark.skipif(not KERNEL or (CUDA and not rs.INTERPRET), reason="the interpreter cases (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("kw", CASES)
def test_kernel_matches_reference_interpreter(kw):
    x = case(**kw)
    got = _kernel(x, rows=16)
    torch.testing.assert_close(got, rs.ragged_shared_attention(*x, 0.3), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got, rs.reference_ragged_shared(*x, 0.3), atol=2e-6, rtol=1e-5)


@pytest.mark.skipif(not KERNEL or (CUDA and not rs.INTERPRET), reason="the interpreter cases (TRITON_INTERPRET=1)")
def test_compiled_loops_interpreter(interpreted):
    """The compiled path's loops (to loaded bounds: prefix rows, then suffix rows, then own keys)."""
    x = case(**CASES[2])
    torch.testing.assert_close(_kernel(x, dyn=True), rs.reference_ragged_shared(*x, 0.3), atol=2e-6, rtol=1e-5)


@pytest.mark.skipif(not CUDA or rs.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype,b,lengths,t", [
    (torch.bfloat16, 2, [131072, 4096, 131072, 4096, 131072, 4096, 131072, 4096], 0),  # DuoAttention 131K
    (torch.bfloat16, 5, [9000, 300, 20000, 1, 4000, 777, 12000, 64], 700),  # AdaKV-like, multi-turn suffix
    (torch.float32, 12, [3000, 5000, 100, 2000, 64, 999, 4000, 1], 40),  # 48 rows: two tiles
])
def test_kernel_matches_reference_cuda(dtype, b, lengths, t):
    sl = [max(0, t - 97 * i) for i in range(b)]
    x = case(lengths, b, g=4, d=128, t=t, c=300, seed=3, dtype=dtype, device="cuda", suf_len=sl, strided=t > 0)
    rt, nt, rq = rs.tiling(b, 4)
    work = rs.SharedWork(lengths, t, rq, "cuda")
    q, pk, pv, _, sk, sv, sl, ok, ov, at = x
    off = torch.tensor(rs.offsets_of(lengths), device="cuda")
    got = rs.ragged_shared_decode(q, pk, pv, off, torch.tensor(lengths, device="cuda"), sk, sv, sl, ok, ov, at, work)
    want = rs.ragged_shared_attention(*x)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    if dtype == torch.float32 and max(lengths) < 10000:
        torch.testing.assert_close(got.cpu().double(), rs.reference_ragged_shared(*(y.cpu() if torch.is_tensor(y) else y
                                   for y in x)).double(), atol=2e-5, rtol=1e-4)
