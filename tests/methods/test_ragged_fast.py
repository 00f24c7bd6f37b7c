"""Ragged per-head caches in the captured decode step (methods/ragged_fast.py, scbench/kernels/ragged_decode.py):
the attention against a float64 per-head reference, the Triton kernel under the interpreter (or CUDA), and greedy
tokens, resident bytes and the cache left behind equal to the plain loop's for AdaKV, KVzip (pair) and DuoAttention
on the tiny random Llama (float32, CPU)."""
import json
import os

import pytest
import torch

from scbench.kernels import ragged_decode as rd
from scbench.methods.adakv import AdaKV
from scbench.methods.duo_attention import DuoAttention
from scbench.methods.kvzip import KVzip

from support import byte_tokenizer, make_tiny_engine


def _case(lengths, g=2, d=16, c=32, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    t, h = sum(lengths), len(lengths)
    pk, pv = (torch.randn(t, d, generator=gen).to(dtype) for _ in range(2))
    sk, sv = (torch.randn(1, h, c, d, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(1, h * g, 1, d, generator=gen).to(dtype)
    return q, pk, pv, sk, sv


CASES = [([5, 40, 17], 6), ([1, 1], -1), ([64, 3], 31), ([9], 0), ([30, 2, 7, 11], 12)]


@pytest.mark.parametrize("lengths,at", CASES)
def test_torch_ragged_decode_matches_reference(lengths, at):
    q, pk, pv, sk, sv = _case(lengths, seed=len(lengths) + at)
    got = rd.ragged_decode_attention(q, pk, pv, rd.head_of_rows(lengths, "cpu"), sk, sv, torch.tensor([at]), 0.3)
    want = rd.reference_ragged_decode(q, pk, pv, lengths, sk, sv, at, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _triton_device():
    if rd.triton is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


@pytest.mark.skipif(_triton_device() is None, reason="needs Triton on CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("lengths,at", CASES)
def test_triton_ragged_decode_matches_reference(lengths, at):
    dev = _triton_device()
    q, pk, pv, sk, sv = _case(lengths, seed=len(lengths) + at)
    offsets = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))])
    split = rd.tiles(16, 4, cpu=dev == "cpu")[0]  # one key block: several items per head, the combine merges them
    work = rd.WorkList(lengths, sk.shape[2], dev, split=split)
    assert work.n == sum(-(-(n + sk.shape[2]) // split) for n in lengths)
    got = rd.ragged_decode_triton(*(x.to(dev) for x in (q, pk, pv, offsets, torch.tensor(lengths))), work,
                                  sk.to(dev), sv.to(dev), torch.tensor([at], device=dev), 0.3)
    want = rd.reference_ragged_decode(q, pk, pv, lengths, sk, sv, at, 0.3)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def engine():
    return make_tiny_engine(byte_tokenizer(), layers=3)


@pytest.fixture(scope="module")
def gates(tmp_path_factory):
    path = tmp_path_factory.mktemp("duo") / "gates.json"
    path.write_text(json.dumps({"gates": [[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], "n_init": 4, "n_local": 28}))
    return str(path)


def _decode(engine, method, mode, prompt, follow, again=False, steps=(24, 17)):
    engine.decode_mode = mode
    try:
        s = engine.session(method)
        s.feed(prompt, compress=True, sparse=False)
        a = s.generate(steps[0])
        s.drop_last(len(a.tokens) - 1)
        s.feed(follow, compress=again, sparse=False)  # again: a second firing (new prefixes: the buffers refit)
        b = s.generate(steps[1])
        return [a.tokens, b.tokens], [a.decode_path, b.decode_path], s
    finally:
        engine.decode_mode = "auto"


@pytest.mark.parametrize("again", [False, True])
@pytest.mark.parametrize("make", [
    lambda g: AdaKV(budget=64, window=16),
    lambda g: KVzip(budget=48, level="pair", chunk=128),
    lambda g: DuoAttention(heads=g, retrieval_ratio=0.5, n_init=4, n_local=28),
], ids=["adakv", "kvzip_pair", "duo_attention"])
def test_fast_ragged_equals_plain(engine, gates, make, again):
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 256, (300,), generator=g).tolist()
    follow = torch.randint(0, 256, (21,), generator=g).tolist()
    plain, ppath, ps = _decode(engine, make(gates), "plain", prompt, follow, again)
    fast, fpath, fs = _decode(engine, make(gates), "fast", prompt, follow, again)
    assert ppath == ["plain"] * 2 and fpath == ["static"] * 2, fpath
    assert any(getattr(layer, "scbench_ragged", False) for layer in fs.cache.layers), "nothing ragged: vacuous"
    assert fast == plain
    assert fs.memory()["kv_bytes"] == ps.memory()["kv_bytes"]
    for a, b in zip(fs.cache.layers, ps.cache.layers):
        assert getattr(a, "lengths", None) == getattr(b, "lengths", None)
        for h in range(a.keys.shape[1]):
            ka, va = a.head(h) if hasattr(a, "head") else (a.keys[0, h], a.values[0, h])
            kb, vb = b.head(h) if hasattr(b, "head") else (b.keys[0, h], b.values[0, h])
            torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-5)


def test_tiles_fit_the_shared_memory_budget():
    """4 key/value tiles x stages must fit (an fp32 D=128 launch with 3 stages asked 307 KB of the H200's 227 KB)."""
    for d in (64, 128, 256):
        for elt in (2, 4):
            bn, stages = rd.tiles(d, elt, cpu=False)
            assert 16 <= bn <= 64 and stages in (1, 2) and 4 * bn * d * elt * stages <= rd.SHARED_BUDGET


@pytest.mark.skipif(not torch.cuda.is_available() or rd.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_ragged_decode_cuda_8b_shape(dtype):
    """Llama-3.1-8B's head shape (8 KV heads x 4, D=128) at uneven per-head lengths, as the bench launches it."""
    lengths = [4096, 100, 2500, 1, 6000, 4096, 333, 2048]
    q, pk, pv, sk, sv = _case(lengths, g=4, d=128, c=512, seed=3)
    offsets = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))])
    want = rd.reference_ragged_decode(*(x.to(dtype) for x in (q, pk, pv)), lengths, sk.to(dtype), sv.to(dtype), 300)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for split in (None, 256, 16384):  # the default (about 4 programs per SM), many small pieces, one per head
        work = rd.WorkList(lengths, sk.shape[2], "cuda", split=split)
        got = rd.ragged_decode_triton(*(x.to("cuda", dtype) if x.is_floating_point() else x.cuda()
                                        for x in (q, pk, pv, offsets, torch.tensor(lengths))), work,
                                      sk.to("cuda", dtype), sv.to("cuda", dtype), torch.tensor([300], device="cuda"))
        torch.testing.assert_close(got.cpu().float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_plugin_falls_back_to_torch_when_the_kernel_cannot_launch(monkeypatch):
    """A launch failure on the first (eager) call: the torch path, the same output, no exception."""
    from types import SimpleNamespace

    from scbench.methods.ragged_fast import RaggedDecode

    lengths = [7, 30]
    q, pk, pv, sk, sv = (x.cuda() for x in _case(lengths))
    plugin = RaggedDecode(None)
    plugin.layers[0] = {"k": pk, "v": pv, "rows": rd.head_of_rows(lengths, "cuda"), "max": 30,
                        "offsets": torch.tensor([0, 7], device="cuda"), "lengths": torch.tensor(lengths, device="cuda")}

    def broken(*a, **k):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(rd, "ragged_decode_triton", broken)
    kv = SimpleNamespace(at=torch.tensor([5], device="cuda"))
    out = plugin.attend(kv, 0, q, sk, sv, None)
    assert plugin.triton_ok is False
    torch.testing.assert_close(out.cpu(), rd.reference_ragged_decode(q.cpu(), pk.cpu(), pv.cpu(), lengths, sk.cpu(),
                                                                     sv.cpu(), 5), atol=1e-5, rtol=1e-5)


def test_work_list_follows_each_heads_own_length():
    """Duo-shaped (4 heads at 131K, 4 at 4K): pieces per head follow the head's length, about the asked number of
    programs in all, a multiple of 64 rows, at most MAX_ITEMS pieces per head."""
    lengths, c = [131072] * 4 + [4096] * 4, 256
    split = rd.pick_split(lengths, c, programs=528)
    assert split % 64 == 0 and split >= 256
    work = rd.WorkList(lengths, c, "cpu", split=split)
    counts = work.count.tolist()
    assert counts[:4] == [-(-(131072 + c) // split)] * 4 and counts[4:] == [-(-(4096 + c) // split)] * 4
    assert 0.8 * 528 <= work.n <= 1.2 * 528 and work.max_count <= rd.MAX_ITEMS
    assert work.base.tolist() == [sum(counts[:h]) for h in range(8)]
    heads, starts = work.items.tolist()
    assert heads == [h for h in range(8) for _ in range(counts[h])]
    assert starts[: counts[0]] == [j * split for j in range(counts[0])]
    assert rd.pick_split([10**6, 5], c, programs=10**4) >= (10**6 + c) / rd.MAX_ITEMS  # one very long head: capped


@pytest.mark.skipif(rd.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs Triton's interpreter (TRITON_INTERPRET=1, as make test sets)")
@pytest.mark.parametrize("name", ["duo_attention", "adakv", "kvzip_pair"])
def test_interpreted_kernel_greedy_tokens_equal_plain(engine, gates, monkeypatch, name):
    """Ragged caches through the work-list kernel itself (interpreted, float32 CPU): the plain loop's tokens."""
    from scbench.methods import ragged_fast

    made = []
    original = ragged_fast.RaggedDecode.__init__

    def interpreted(self, method):
        original(self, method)
        self.interpreted = True
        made.append(self)

    monkeypatch.setattr(ragged_fast.RaggedDecode, "__init__", interpreted)
    monkeypatch.setattr(rd, "pick_split", lambda lengths, c, programs, max_items=rd.MAX_ITEMS: 128)  # 3+ per head
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 256, (120,), generator=g).tolist()
    follow = torch.randint(0, 256, (9,), generator=g).tolist()
    make = {"duo_attention": lambda: DuoAttention(heads=gates, retrieval_ratio=0.5, n_init=4, n_local=28),
            "adakv": lambda: AdaKV(budget=40, window=16),
            "kvzip_pair": lambda: KVzip(budget=40, level="pair", chunk=64)}[name]
    plain, _, _ = _decode(engine, make(), "plain", prompt, follow, steps=(5, 3))
    fast, fpath, _ = _decode(engine, make(), "fast", prompt, follow, steps=(5, 3))
    ran = [p.triton_ok for p in made]
    assert fpath == ["static"] * 2 and True in ran and False not in ran, ran  # the kernel ran, never fell back
    assert fast == plain


@pytest.mark.skipif(rd.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs Triton's interpreter (TRITON_INTERPRET=1, as make test sets)")
@pytest.mark.parametrize("lengths,at", CASES + [([100, 3, 50], 20)])
def test_interpreted_compiled_loops_match_reference(interpreted, lengths, at):
    """The compiled path's loops (to loaded bounds, prefix rows then suffix rows) through the interpreter."""
    q, pk, pv, sk, sv = _case(lengths, seed=len(lengths) + at)
    offsets = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))])
    work = rd.WorkList(lengths, sk.shape[2], "cpu", split=32)
    got = rd.ragged_decode_triton(q, pk, pv, offsets, torch.tensor(lengths), work, sk, sv, torch.tensor([at]), 0.3,
                                  dyn=True)
    torch.testing.assert_close(got, rd.reference_ragged_decode(q, pk, pv, lengths, sk, sv, at, 0.3), atol=1e-5,
                               rtol=1e-5)
