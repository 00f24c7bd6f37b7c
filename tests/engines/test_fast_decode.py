"""Fast decode (scbench/engines/fastdecode.py) against the plain loop it replaces.

The masked one-query attention is compared with the dense reference on random inputs; greedy decoding through
the static cache must give the plain loop's tokens, token for token, and leave the same cache behind, on the
embedded model (CPU, float32) for full attention and for eviction methods with per-layer lengths, before and
after a later turn is appended on top. The CUDA-graph variant runs only where a GPU is present.
"""
import logging

import pytest
import torch

from scbench.engines import attention, fastdecode
from scbench.registry import METHODS

from support import make_tiny_engine, random_llama

PROMPT = (
    "The committee met on Tuesday. Alice proposed the budget, Bob objected to the travel line, and Carol "
    "moved to postpone the vote until the auditors report. The auditors are expected next month. "
) * 3


@pytest.mark.parametrize("hq,hkv,n,cap,chunk", [(4, 2, 37, 256, 64), (9, 3, 200, 256, 256), (8, 8, 1, 128, 32),
                                                (6, 1, 511, 512, 128)])
def test_masked_attention_matches_reference(hq, hkv, n, cap, chunk):
    torch.manual_seed(n)
    q = torch.randn(2, hq, 1, 32)
    k, v = torch.randn(2, hkv, cap, 32), torch.randn(2, hkv, cap, 32)
    masked = torch.arange(cap) >= n
    k[:, :, n:], v[:, :, n:] = 1e4, -1e4  # what lies beyond the valid keys must not matter
    got = fastdecode.masked_decode_attention(q, k, v, masked, scale=0.17, chunk=chunk)
    want = attention.reference_causal_attention(q, k[:, :, :n], v[:, :, :n], scale=0.17)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    half = fastdecode.masked_decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), masked, scale=0.17, chunk=chunk)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available() or fastdecode.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,n,cap,split", [(32, 8, 1, 256, None), (32, 8, 3000, 4096, None), (9, 3, 700, 768, 256),
                                                (4, 4, 20000, 32768, None)])
def test_split_kv_kernel_matches_reference(dtype, hq, hkv, n, cap, split):
    torch.manual_seed(n)
    q = torch.randn(1, hq, 1, 128, device="cuda", dtype=dtype)
    k, v = (torch.randn(1, hkv, cap, 128, device="cuda", dtype=dtype) for _ in range(2))
    at = torch.tensor([n - 1], device="cuda")
    got = fastdecode.split_kv_decode_attention(q, k, v, at, scale=0.09, split=split)
    want = attention.reference_causal_attention(q, k[:, :, :n], v[:, :, :n], scale=0.09)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def _session(engine, method_cfg, mode, turns, compress=True):
    """Feed a prompt (compressing), decode, append each follow-up, decode again: (the session, per turn its tokens
    and decode path), with the engine's decode mode ``mode`` meanwhile."""
    engine.decode_mode = mode
    try:
        method = METHODS.get(method_cfg["name"])(**{k: v for k, v in method_cfg.items() if k != "name"})
        session = engine.session(method)
        ids = engine.encode(PROMPT, add_special_tokens=False)
        out = []
        for cut, max_new in turns:
            session.feed(ids[:cut] if cut else ids, compress=compress and not out, sparse=False)
            gen = session.generate(max_new)
            out.append((gen.tokens, gen.decode_path))
        return session, out
    finally:
        engine.decode_mode = "auto"


def _run(engine, method_cfg, mode, turns=((None, 16), (40, 8)), compress=True):
    """``_session``'s tokens and paths, the cache's keys and the position."""
    session, out = _session(engine, method_cfg, mode, turns, compress)
    return out, [layer.keys.clone() for layer in session.cache.layers], session.pos


CASES = [
    {"name": "full"},
    {"name": "pyramidkv", "budget": 48},  # per-layer lengths after eviction
]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CASES, ids=[c["name"] for c in CASES])
def test_static_decode_equals_plain_on_embedded_model(embedded_engine, cfg):
    plain, plain_keys, plain_pos = _run(embedded_engine, cfg, "plain")
    fast, fast_keys, fast_pos = _run(embedded_engine, cfg, "fast")
    assert [p for _, p in plain] == ["plain", "plain"] and [p for _, p in fast] == ["static", "static"]
    assert [t for t, _ in fast] == [t for t, _ in plain]
    assert fast_pos == plain_pos
    assert [k.shape for k in fast_keys] == [k.shape for k in plain_keys]
    if cfg["name"] == "pyramidkv":
        assert len({k.shape[2] for k in fast_keys}) > 1, "the case must exercise per-layer lengths"
    for a, b in zip(fast_keys, plain_keys):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg", [{"name": "full"}, {"name": "streamingllm", "n_init": 4, "n_local": 60},
                                 {"name": "h2o", "budget": 64}], ids=["full", "streamingllm", "h2o"])
def test_static_decode_over_turns_and_buffer_reuse(tiny_engine, cfg):
    """Several turns on one session (buffers reused while they fit, reallocated when not) equal the plain loop."""
    turns = ((None, 30), (20, 8), (300, 40), (5, 3))
    plain, plain_keys, _ = _run(tiny_engine, cfg, "plain", turns=turns)
    fast, fast_keys, _ = _run(tiny_engine, cfg, "fast", turns=turns)
    assert [t for t, _ in fast] == [t for t, _ in plain]
    for a, b in zip(fast_keys, plain_keys):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _conversation(engine, cfg, mode, turns):
    """``_session``'s tokens per turn, and how many times the session's fast decoder made new buffers."""
    session, out = _session(engine, cfg, mode, turns)
    return [tokens for tokens, _ in out], getattr(session.decoder, "allocations", 0)


@pytest.mark.parametrize("cfg", [{"name": "full"}, {"name": "quest", "budget": 64, "page_size": 8, "dense_layers": 0},
                                 {"name": "kivi", "bits": 4, "group": 16, "residual": 16}],
                         ids=["full", "quest", "kivi"])
def test_a_conversation_with_room_keeps_its_first_buffers(tiny_engine, cfg, monkeypatch):
    """Eight turns adding ~90 tokens each: without headroom the buffers (rounded up to 256 tokens) are outgrown every
    two or three turns, each time a new allocation, a copy of the whole cache and a new graph; with ``HEADROOM``
    tokens of room the first buffers serve the whole conversation. Tokens equal the plain loop's."""
    turns = ((None, 30),) + ((60, 30),) * 7
    plain, _ = _conversation(tiny_engine, cfg, "plain", turns)
    monkeypatch.setattr(fastdecode, "HEADROOM", 0)
    tight, tight_allocs = _conversation(tiny_engine, cfg, "fast", turns)
    monkeypatch.setattr(fastdecode, "HEADROOM", 1024)
    roomy, allocs = _conversation(tiny_engine, cfg, "fast", turns)
    assert tight == plain and roomy == plain
    assert tight_allocs >= 3, "the case must outgrow exact buffers more than once"
    if cfg["name"] == "kivi":  # its plugin keeps exact buffers (KIVIDecode.headroom)
        assert allocs == tight_allocs
    else:
        assert allocs == 1


def test_the_info_log_times_the_allocation_and_the_copy_apart_without_changing_tokens(tiny_engine, caplog):
    """At INFO the fast decoder logs each allocation of its buffers (room, GiB) and each turn's copy of the cache into
    them, with their seconds (both inside a turn's decode time); the tokens stay the plain loop's."""
    turns = ((None, 30),) + ((60, 30),) * 3
    plain, _ = _conversation(tiny_engine, {"name": "full"}, "plain", turns)
    with caplog.at_level(logging.INFO, logger=fastdecode.__name__):
        fast, allocs = _conversation(tiny_engine, {"name": "full"}, "fast", turns)
    assert fast == plain
    lines = [r.getMessage() for r in caplog.records if r.name == fastdecode.__name__]
    allocated = [m for m in lines if m.startswith("decode buffers allocated")]
    loaded = [m for m in lines if m.startswith("decode buffers loaded")]
    assert len(allocated) == allocs == 1 and len(loaded) == len(turns)
    assert f"(#1, {fastdecode.HEADROOM} tokens of room)" in allocated[0]
    assert all(m.endswith(" s") and " in " in m for m in allocated + loaded)


def test_stop_token_and_single_token_budgets(tiny_engine):
    """A turn that stops at a stop token keeps the plain loop's cache (the stop token is never fed)."""
    stop = set(tiny_engine.stop_ids)
    plain, _, pos_plain = _run(tiny_engine, {"name": "full"}, "plain", turns=((None, 12),), compress=False)
    forced = plain[0][0][5]  # make the 6th greedy token a stop token for both paths
    tiny_engine.stop_ids = stop | {forced}
    try:
        plain, pk, pos_plain = _run(tiny_engine, {"name": "full"}, "plain", turns=((None, 12), (10, 1)), compress=False)
        fast, fk, pos_fast = _run(tiny_engine, {"name": "full"}, "fast", turns=((None, 12), (10, 1)), compress=False)
    finally:
        tiny_engine.stop_ids = stop
    assert plain[0][0][-1] == forced and len(plain[0][0]) <= 6
    assert [t for t, _ in fast] == [t for t, _ in plain] and pos_fast == pos_plain
    assert [k.shape for k in fk] == [k.shape for k in pk]


def test_kivi_takes_the_static_path_through_its_plugin(tiny_engine):
    """KIVI decodes through its plugin (methods/kivi_fast.py; token identity in tests/methods/test_kivi_fast.py)."""
    out, _, _ = _run(tiny_engine, {"name": "kivi", "bits": 4, "group": 16, "residual": 16}, "fast")
    assert [p for _, p in out] == ["static", "static"]
    assert fastdecode.unsupported(tiny_engine.session(METHODS.get("kivi")()).cache, METHODS.get("kivi")())


def test_prefill_chunk_matches_one_forward(smol_tokenizer):
    """Chunked prefill: same logits, same cache, same captured query window as one forward."""
    ids = torch.randint(0, 1000, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    results = []
    for chunk in (None, 64, 7):
        engine = make_tiny_engine(smol_tokenizer)
        engine.prefill_chunk = chunk
        session = engine.session(METHODS.get("full")())
        ctx = attention.AttnContext(capture_queries=90)
        logits = session._prefill(ids, ctx)
        results.append((logits, [layer.keys for layer in session.cache.layers], ctx.queries))
    for logits, keys, queries in results[1:]:
        torch.testing.assert_close(logits, results[0][0], atol=1e-5, rtol=1e-5)
        for a, b in zip(keys, results[0][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert queries.keys() == results[0][2].keys()
        for layer in queries:
            assert queries[layer].shape[-2] == 90
            torch.testing.assert_close(queries[layer], results[0][2][layer], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [({"prefill_chunk": 0}, "prefill_chunk"),
                                          ({"prefill_chunk": "8"}, "prefill_chunk"),
                                          ({"decode": "fastest"}, "decode")])
def test_bad_engine_knobs(smol_tokenizer, kwargs, match):
    from scbench.engines.hf import HFEngine

    model = random_llama(len(smol_tokenizer), layers=1, hidden=32, intermediate=64, heads=2, kv_heads=1)
    with pytest.raises(ValueError, match=match):
        HFEngine("tiny", model=model, tokenizer=smol_tokenizer, device="cpu", **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_equals_plain():
    """Graph capture + replay (float32, a tiny random Llama with a byte tokenizer: no download)."""
    from scbench.engines.hf import HFEngine
    from support import byte_tokenizer

    tok = byte_tokenizer()
    model = random_llama(len(tok), layers=3, eos_token_id=tok.eos_token_id)
    engine = HFEngine("tiny-random-llama", model=model, tokenizer=tok, device="cuda", dtype="float32")
    turns = ((None, 40), (25, 20), (7, 33))
    for cfg in ({"name": "full"}, {"name": "pyramidkv", "budget": 96}):
        plain, pk, _ = _run(engine, cfg, "plain", turns=turns)
        fast, fk, _ = _run(engine, cfg, "fast", turns=turns)
        assert {p for _, p in fast} == {"graph"}
        assert [t for t, _ in fast] == [t for t, _ in plain]
        for a, b in zip(fk, pk):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_the_decode_buffers_are_the_caches_storage_across_turns(tiny_engine, monkeypatch, mode):
    """Through the runner (multi-turn drops each answer before the next turn, multi-request rolls back to the context):
    after the first decode the session's cache is views of the decoder's buffers, cropped as views, every later
    prompt is appended in place (no concatenated copy of the cache) and the next decode loads nothing. The rows equal
    the plain loop's."""
    from scbench.kv import cache as kvc
    from scbench.runner import Replay
    from support import make_replay, same_rows, spy_returns

    tiny_engine.decode_mode = "plain"
    try:
        plain = list(make_replay(tiny_engine, Replay, {"name": "full"}, mode))
        appended = spy_returns(monkeypatch, kvc, "append_in_place")
        copies = []
        real_load = fastdecode.StaticKV.load
        monkeypatch.setattr(fastdecode.StaticKV, "load", lambda kv, cache: copies.append(sum(
            layer.keys.data_ptr() != kb.data_ptr() for layer, kb in zip(cache.layers, kv.k))) or real_load(kv, cache))
        tiny_engine.decode_mode = "fast"
        rep = make_replay(tiny_engine, Replay, {"name": "full"}, mode)
        fast = list(rep)
    finally:
        tiny_engine.decode_mode = "auto"
    assert same_rows(fast, plain) == 4 and {r.stats.decode_path for r in fast} == {"static"}
    layers, dec = len(rep.session.cache.layers), rep.session.decoder
    assert dec.allocations == 1
    assert copies == [0, 0, 0, 0]  # the first buffers adopt the layers as they are made; later turns are there already
    assert appended.count(True) == 3 * layers  # each later prompt, one chunk per layer
    for layer, kb, vb in zip(rep.session.cache.layers, dec.kv.k, dec.kv.v):
        assert layer.keys.data_ptr() == kb.data_ptr() and layer.values.data_ptr() == vb.data_ptr()


TIERED = [{"name": "quest", "budget": 64, "page_size": 8, "dense_layers": 0},
          {"name": "retrieval_attention", "top_k": 48, "n_init": 4, "n_local": 16, "tier": "device"}]


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
@pytest.mark.parametrize("cfg", TIERED, ids=["quest", "retrieval"])
def test_tiered_layers_take_the_decode_buffers_as_their_storage(tiny_engine, monkeypatch, mode, cfg):
    """Quest and RetrievalAttention (device tier) decode through a plugin over TieredLayers: the buffers become the
    layers' storage when they are made (the first decode held the cache twice: 51.3 / 49.5 GiB against full
    attention's 37.8 at 131K on an H100), so no decode loads a copy, and after every turn the layers are views of
    the buffers. The rows equal those of the layers keeping their own storage (``SCBENCH_*_ADOPT=0``)."""
    from scbench.runner import Replay
    from support import make_replay, same_rows
    import scbench.methods.quest_fast as qf
    import scbench.methods.retrieval_fast as rf

    def run(adopt: bool):
        for mod in (qf, rf):
            monkeypatch.setattr(mod, "ADOPT", adopt)
        monkeypatch.setattr(qf.QuestDecode, "adopt_layers", adopt)
        monkeypatch.setattr(rf.RetrievalDecode, "adopt_layers", adopt)
        copies = []
        real_load = fastdecode.StaticKV.load
        monkeypatch.setattr(fastdecode.StaticKV, "load", lambda kv, cache: copies.append(sum(
            layer.keys.data_ptr() != kb.data_ptr() for layer, kb in zip(cache.layers, kv.k))) or real_load(kv, cache))
        rep = make_replay(tiny_engine, Replay, cfg, mode)
        rows = list(rep)
        monkeypatch.setattr(fastdecode.StaticKV, "load", real_load)
        return rep, rows, copies

    tiny_engine.decode_mode = "fast"
    try:
        _, own, own_copies = run(False)
        rep, rows, copies = run(True)
    finally:
        tiny_engine.decode_mode = "auto"
    assert same_rows(rows, own) == 4 and {r.stats.decode_path for r in rows} == {"static"}
    layers, dec = len(rep.session.cache.layers), rep.session.decoder
    assert dec.allocations == 1 and copies == [0, 0, 0, 0] and own_copies[0] == layers
    for layer, kb, vb in zip(rep.session.cache.layers, dec.kv.k, dec.kv.v):
        assert layer.keys.data_ptr() == kb.data_ptr() and layer.values.data_ptr() == vb.data_ptr()
