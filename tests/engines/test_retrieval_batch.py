"""RetrievalAttention's batched decode (methods/retrieval_batch.py) stores the rows of the sequential decode:
predictions, loaded bytes, KV bytes (float32, tiny random model, CPU reference path); its Triton path against the
reference (CUDA, or Triton's interpreter on CPU)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from scbench.batch import BatchedReplay
from scbench.kernels import quest_batch as qb
from scbench.kernels import topk_select
from scbench.run import build_method
from scbench.runner import Replay

from support import batch_replay as replay, same_rows

RA = [{"name": "retrieval_attention", "tier": "device", "top_k": 24, "n_init": 4, "n_local": 16},
      {"name": "retrieval_attention", "tier": "device", "top_k": 16, "n_init": 2, "n_local": 8, "gqa": "group"}]


@pytest.mark.parametrize("mode", ["multi_request", "multi_turn"])
@pytest.mark.parametrize("method", RA, ids=["head", "group"])
def test_retrieval_batched_equals_sequential(tiny_engine, mode, method):
    seq = replay(tiny_engine, Replay, method, mode)
    bat = replay(tiny_engine, BatchedReplay, method, mode)
    same_rows(seq, bat)
    assert {r.stats.decode_path for r in bat} == {"batched"} and {r.stats.decode_batch for r in bat} == {4}
    assert all(r.stats.loaded_bytes > 0 for r in bat)
    assert {r.stats.decode_kernel for r in bat} == {"torch+torch retrieval"}


def test_retrieval_batch_declines_host_tier_index_and_recall():
    assert build_method({"name": "retrieval_attention"}).batch_decoder() is None  # the host tier (default)
    assert build_method({"name": "retrieval_attention", "tier": "device", "recall": True}).batch_decoder() is None
    assert build_method({"name": "retrieval_attention", "tier": "device"}).batch_decoder() is not None


@pytest.mark.skipif(qb.triton is None or topk_select.triton is None
                    or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
                    reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("gqa,ctx,own", [("head", (300, 300, 300), (3, 9, 5)), ("group", (300, 300, 300), (4, 4, 4)),
                                         ("head", (260, 300, 285), (6, 2, 9))])
def test_triton_path_equals_reference(gqa, ctx, own):
    """The Triton path (one score product, window mask, radix select, paged kernel) == the per-row reference, with
    equal and (multi-turn-like) differing shared lengths."""
    from scbench.methods.retrieval_batch import RetrievalBatch, retrieval_rows_torch
    from scbench.kv.offload import TieredLayer
    from scbench.methods.quest_batch import batch_attention_torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(len(gqa) + sum(own))
    b, hq, hkv, d, cap = 3, 4, 2, 16, 14
    method = build_method({"name": "retrieval_attention", "tier": "device", "top_k": 32, "n_init": 4, "n_local": 24,
                           "gqa": gqa})
    sk, sv = (torch.randn(1, hkv, max(ctx), d, generator=g).to(dev) for _ in range(2))
    layer = TieredLayer(sk, sv, storage="device")
    ks, vs = (torch.randn(b, hkv, cap, d, generator=g).to(dev) for _ in range(2))
    kv = SimpleNamespace(shared=[(layer.keys, layer.values)], k=[ks], v=[vs], at=torch.tensor(own, device=dev),
                         shared_len=torch.tensor([list(ctx)], device=dev))
    q = torch.randn(b, hq, 1, d, generator=g).to(dev)
    fast = RetrievalBatch(method, triton=True)
    fast.attach(SimpleNamespace(layers=[layer]), kv)
    assert fast.triton
    got = fast.attend(kv, 0, q, ks, vs, 0.25)
    n = [c + a + 1 for c, a in zip(ctx, own)]
    want = batch_attention_torch(q, sk, sv, ks, vs, retrieval_rows_torch(method, q, sk, ks, list(ctx), n),
                                 list(ctx), n, 0.25)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    slow = RetrievalBatch(method, triton=False)
    slow.attach(SimpleNamespace(layers=[layer]), kv)
    torch.testing.assert_close(slow.attend(kv, 0, q, ks, vs, 0.25), want)


@pytest.mark.skipif(qb.triton is None or topk_select.triton is None
                    or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
                    reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("gqa", ["head", "group"])
def test_triton_prev_select_equals_radix(gqa, request):
    """bfloat16: the previous-step-threshold select (select=prev) attends the rows the radix select attends, over
    two steps (the first without thresholds)."""
    if not torch.cuda.is_available():
        request.getfixturevalue("interpreted")  # triton 3.6's interpreter index patch
    from scbench.methods.retrieval_batch import RetrievalBatch  # noqa: F401
    from scbench.kv.offload import TieredLayer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, d, cap, ctx = 2, 4, 2, 16, 8, 400
    method = build_method({"name": "retrieval_attention", "tier": "device", "top_k": 32, "n_init": 4, "n_local": 24,
                           "gqa": gqa})
    sk, sv = (torch.randn(1, hkv, ctx, d, generator=g).bfloat16().to(dev) for _ in range(2))
    layer = TieredLayer(sk, sv, storage="device")
    ks, vs = (torch.randn(b, hkv, cap, d, generator=g).bfloat16().to(dev) for _ in range(2))
    kv = SimpleNamespace(shared=[(layer.keys, layer.values)], k=[ks], v=[vs], at=torch.tensor([2, 3], device=dev),
                         shared_len=torch.tensor([[ctx, ctx - 20]], device=dev))
    fast, ref = RetrievalBatch(method, triton=True), RetrievalBatch(method, triton=True)
    fast.select, ref.select = "prev", "radix"
    for x in (fast, ref):
        x.attach(SimpleNamespace(layers=[layer]), kv)
    for _ in range(2):
        q = torch.randn(b, hq, 1, d, generator=g).bfloat16().to(dev)
        torch.testing.assert_close(fast.attend(kv, 0, q, ks, vs, 0.25).float(), ref.attend(kv, 0, q, ks, vs, 0.25).float(),
                                   atol=1e-2, rtol=1e-2)
    assert 0 in fast.thr


@pytest.mark.skipif(qb.triton is None or topk_select.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs Triton's interpreter (TRITON_INTERPRET=1, as make test sets)")
def test_triton_batched_replay_interpreter(tiny_engine, monkeypatch, mode="multi_request"):
    """The Triton path inside a batched replay (interpreted, float32 CPU): the sequential path's rows (multi-request
    only: ~20 s interpreted; differing shared lengths, as multi-turn rows have, are in test_triton_path_equals_reference)."""
    from scbench.methods.retrieval_attention import RetrievalAttention
    from scbench.methods.retrieval_batch import RetrievalBatch

    monkeypatch.setattr(RetrievalAttention, "batch_decoder", lambda self: RetrievalBatch(self, triton=True))
    method = {"name": "retrieval_attention", "tier": "device", "top_k": 16, "n_init": 4, "n_local": 96}
    bat = replay(tiny_engine, BatchedReplay, method, mode)
    same_rows(replay(tiny_engine, Replay, method, mode), bat)
    assert {r.stats.decode_kernel for r in bat} == {"torch+triton retrieval"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["multi_request", "multi_turn"])
def test_cuda_retrieval_batched_equals_sequential(mode):
    """On CUDA (float32, tiny random Llama): the batched step with the Triton path, captured as a CUDA graph, stores
    the rows of the sequential fast path (fastdecode + RetrievalDecode)."""
    from scbench.engines.hf import HFEngine
    from support import byte_tokenizer, random_llama

    tok = byte_tokenizer()
    model = random_llama(len(tok), layers=3, eos_token_id=tok.eos_token_id)
    engine = HFEngine("tiny-random-llama", model=model, tokenizer=tok, device="cuda", dtype="float32")
    method = {"name": "retrieval_attention", "tier": "device", "top_k": 16, "n_init": 4, "n_local": 256}
    seq = replay(engine, Replay, method, mode, length=1200)  # scbench_kv needs > 300 bytes for 4 distinct keys
    bat = replay(engine, BatchedReplay, method, mode, length=1200)
    same_rows(seq, bat)
    assert {r.stats.decode_kernel for r in bat} == {"triton+triton retrieval"}
    assert {r.stats.decode_path for r in seq} <= {"graph", "static"}  # the fast sequential path
