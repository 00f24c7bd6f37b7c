"""Quest's batched decode (methods/quest_batch.py) stores the rows of the sequential decode: predictions, loaded
bytes, KV bytes (float32, tiny random model, CPU reference path); its Triton kernels (kernels/quest_batch.py)
against the references on CUDA or in Triton's interpreter."""
from __future__ import annotations

import os

import pytest
import torch

from scbench.batch import BatchedReplay, fallback_reason
from scbench.kernels import quest_batch as qb
from scbench.run import build_method
from scbench.runner import Replay

from support import batch_replay as replay, same_rows

QUEST = [{"name": "quest", "budget": 64, "page_size": 16, "dense_layers": 1},
         {"name": "quest", "budget": 48, "page_size": 8, "dense_layers": 0, "gqa": "group", "recent_pages": 2}]


@pytest.mark.parametrize("mode", ["multi_request", "multi_turn"])
@pytest.mark.parametrize("method", QUEST, ids=["head", "group"])
def test_quest_batched_equals_sequential(tiny_engine, mode, method):
    seq = replay(tiny_engine, Replay, method, mode)
    bat = replay(tiny_engine, BatchedReplay, method, mode)
    same_rows(seq, bat)
    assert {r.stats.decode_path for r in bat} == {"batched"} and {r.stats.decode_batch for r in bat} == {4}
    assert all(r.stats.loaded_bytes > 0 for r in bat)


def test_quest_batch_declines_recall_and_host_tier():
    assert build_method({"name": "quest", "recall": True}).batch_decoder() is None
    assert build_method({"name": "quest", "tier": "cpu"}).batch_decoder() is None
    assert build_method({"name": "quest"}).batch_decoder() is not None


def _batch_case(seed, b=3, hq=4, hkv=2, d=16, page=4, ctx=(45, 45, 45), own=(3, 9, 5), cap=14, dtype=torch.float32,
                device="cpu"):
    from types import SimpleNamespace

    from scbench.kv.offload import TieredLayer

    g = torch.Generator().manual_seed(seed)
    layers, shared, ks, vs = [], [], [], []
    for _ in range(2):  # layer 0 dense, layer 1 selecting
        sk, sv = (torch.randn(1, hkv, max(ctx), d, generator=g).to(device, dtype) for _ in range(2))
        layers.append(TieredLayer(sk, sv, storage="device"))
        shared.append((layers[-1].keys, layers[-1].values))
        ks.append(torch.randn(b, hkv, cap, d, generator=g).to(device, dtype))
        vs.append(torch.randn(b, hkv, cap, d, generator=g).to(device, dtype))
    kv = SimpleNamespace(shared=shared, k=ks, v=vs, at=torch.tensor(own, device=device),
                         shared_len=torch.tensor([list(ctx)] * 2, device=device))
    q = torch.randn(b, hq, 1, d, generator=g).to(device, dtype)
    return SimpleNamespace(layers=layers), kv, q


@pytest.mark.skipif(qb.triton is None or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
                    reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("gqa,ctx,recent", [("head", (45, 45, 45), 1), ("group", (45, 45, 45), 2),
                                            ("head", (45, 30, 40), 1)])
def test_quest_batch_triton_matches_reference(gqa, ctx, recent):
    """The three kernels (scores with the own-bounds update, threshold select with each row's length, the two-source
    paged attention) against the per-row reference; two steps, so the own bounds' in-place update is used."""
    from scbench.methods.quest import Quest
    from scbench.methods.quest_batch import QuestBatch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = Quest(budget=24, page_size=4, dense_layers=1, gqa=gqa, recent_pages=recent)
    cache, kv, q = _batch_case(1, ctx=ctx, device=dev)
    for layer in cache.layers:
        layer.state["quest"] = m.compress_cache(0, layer.keys, layer.values, None).state["quest"]
    fast, ref = QuestBatch(m, triton=True), QuestBatch(m, triton=False)
    fast.attach(cache, kv)
    ref.attach(cache, kv)
    assert fast.triton and not ref.triton
    for step in range(2):
        got = fast.attend(kv, 1, q, kv.k[1], kv.v[1], 0.3)
        want = ref.attend(kv, 1, q, kv.k[1], kv.v[1], 0.3)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        kv.at += 1
        q = q.roll(1, 0)
    assert fast.attend(kv, 0, q, kv.k[0], kv.v[0], 0.3) is None  # the dense layer: the shared-prefix path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["multi_request", "multi_turn"])
def test_cuda_quest_batched_equals_sequential(mode):
    """On CUDA (float32, tiny random Llama): the batched step with Quest's kernels, captured as a CUDA graph, stores
    the rows of the sequential fast path (fastdecode + QuestDecode)."""
    from scbench.engines.hf import HFEngine
    from support import byte_tokenizer, random_llama

    tok = byte_tokenizer()
    model = random_llama(len(tok), layers=3, eos_token_id=tok.eos_token_id)
    engine = HFEngine("tiny-random-llama", model=model, tokenizer=tok, device="cuda", dtype="float32")
    for method in QUEST:  # scbench_kv needs more than 300 bytes for 4 distinct keys
        seq = replay(engine, Replay, method, mode, length=1200)
        bat = replay(engine, BatchedReplay, method, mode, length=1200)
        same_rows(seq, bat)
        assert {r.stats.decode_path for r in bat} == {"batched"}
        assert {r.stats.decode_path for r in seq} <= {"graph", "static"}  # the fast sequential path


@pytest.mark.skipif(qb.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs Triton's interpreter (TRITON_INTERPRET=1, as make test sets)")
def test_triton_batched_replay_interpreter(tiny_engine, monkeypatch, mode="multi_request"):
    """Quest's Triton kernels inside a batched replay (interpreted, float32 CPU): the sequential path's rows. The
    session's layers hold their keys in views of longer reserve buffers (the paged kernel reads their head stride)."""
    from scbench.methods.quest import Quest
    from scbench.methods.quest_batch import QuestBatch

    monkeypatch.setattr(Quest, "batch_decoder", lambda self: QuestBatch(self, triton=True))
    bat = replay(tiny_engine, BatchedReplay, QUEST[0], mode)
    same_rows(replay(tiny_engine, Replay, QUEST[0], mode), bat)
    assert {r.stats.decode_kernel for r in bat} == {"torch+triton quest"}
