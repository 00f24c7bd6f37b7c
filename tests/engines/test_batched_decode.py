"""Batched decode of independent turns (scbench/batch.py): the shared-prefix attention equals plain attention over
each row's keys, and a batched replay stores the same rows as the sequential one (float32, tiny random model)."""
from __future__ import annotations

import json

import pytest
import torch

from scbench.batch import (BatchedReplay, reference_shared_prefix_attention, replay_class, shared_mask,
                           shared_prefix_attention)
from scbench.kernels import shared_prefix
from scbench.registry import TASKS
from scbench.runner import Replay
from support import TIMING, batch_replay as replay, make_replay, same_rows  # noqa: F401

@pytest.mark.parametrize("seed", range(4))
def test_shared_prefix_attention_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    b, hkv, grp, d, s, c = 3, 2, 4 if seed % 2 else 1, 16, 40 + seed * 7, 24
    q = torch.randn(b, hkv * grp, 1, d, generator=g)
    sk, sv = torch.randn(1, hkv, s, d, generator=g), torch.randn(1, hkv, s, d, generator=g)
    ok, ov = torch.randn(b, hkv, c, d, generator=g), torch.randn(b, hkv, c, d, generator=g)
    shared_len = torch.tensor([s, s - 5, 0 if seed == 3 else 1])  # a row may see no shared key at all
    own_at = torch.tensor([0, 7, c - 1])
    got = shared_prefix_attention(q, sk, sv, shared_len, ok, ov, own_at, 0.3)
    want = reference_shared_prefix_attention(q, sk, sv, shared_len, ok, ov, own_at, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    mask = shared_mask(shared_len, s, grp)  # precomputed once per batch: the same result
    torch.testing.assert_close(shared_prefix_attention(q, sk, sv, shared_len, ok, ov, own_at, 0.3, mask), got)
    full = torch.full((b,), s)  # every row sees the whole prefix: no mask at all
    torch.testing.assert_close(shared_prefix_attention(q, sk, sv, full, ok, ov, own_at, 0.3, False),
                               reference_shared_prefix_attention(q, sk, sv, full, ok, ov, own_at, 0.3),
                               atol=1e-5, rtol=1e-5)


BATCHABLE = [{"name": "full"}, {"name": "snapkv", "budget": 96, "window": 8},
             {"name": "pyramidkv", "budget": 96, "window": 8}, {"name": "h2o", "budget": 96},
             {"name": "streamingllm", "n_init": 8, "n_local": 88}, {"name": "ashape", "n_init": 8, "n_local": 56},
             {"name": "trishape", "n_init": 8, "n_local": 56, "n_last": 16},
             {"name": "vertical_slash", "vertical_size": 16, "slash_size": 56, "last_q": 16, "init_cols": 4, "local_diags": 16},
             {"name": "cacheblend", "chunk_size": 64, "recompute_ratio": 0.15, "select_layer": 1},
             {"name": "ppl_compress", "rate": 0.5, "scorer": "engine", "segment": 128, "overlap": 32}]


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
@pytest.mark.parametrize("method", BATCHABLE, ids=lambda m: m["name"])
def test_batched_equals_sequential(tiny_engine, mode, method):
    seq = replay(tiny_engine, Replay, method, mode)
    bat = replay(tiny_engine, BatchedReplay, method, mode)
    same_rows(seq, bat)
    assert {r.stats.decode_path for r in bat} == {"batched"} and {r.stats.decode_batch for r in bat} == {4}
    assert {r.stats.decode_kernel for r in bat} == {"torch"} and {r.stats.decode_kernel for r in seq} == {""}
    assert all(r.stats.decode_step_s > 0 and r.stats.decode_s > 0 for r in bat)


RAGGED = [{"name": "adakv", "budget": 96, "window": 8}, {"name": "kvzip", "budget": 48, "level": "pair"},
          {"name": "kvzip", "budget": 48, "level": "layer", "n_recent": 0},
          {"name": "duo_attention", "n_init": 4, "n_local": 28}]


@pytest.fixture(scope="module")
def duo_gates(tmp_path_factory):
    path = tmp_path_factory.mktemp("duo") / "gates.json"  # the tiny model: 2 layers x 2 KV heads
    path.write_text(json.dumps({"gates": [[0.9, 0.1], [0.2, 0.8]], "n_init": 4, "n_local": 28}))
    return str(path)


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
@pytest.mark.parametrize("method", RAGGED, ids=["adakv", "kvzip_pair", "kvzip_layer", "duo_attention"])
def test_ragged_batched_equals_sequential(tiny_engine, duo_gates, mode, method):
    """Per-head prefix lengths (scbench/kernels/ragged_shared.py's torch path): the sequential path's rows, with the
    resident bytes of the ragged cache (sum of the heads' lengths, not heads x the longest)."""
    method = {**method, "heads": duo_gates} if method["name"] == "duo_attention" else method
    seq = replay(tiny_engine, Replay, method, mode)
    reps = []
    bat = replay(tiny_engine, BatchedReplay, method, mode, keep=reps)
    layers = reps[0].session.cache.layers
    assert any(getattr(layer, "scbench_ragged", False) for layer in layers)  # the case under test: ragged layers
    same_rows(seq, bat)
    assert {r.stats.decode_path for r in bat} == {"batched"} and {r.stats.decode_batch for r in bat} == {4}


@pytest.mark.parametrize("first", [False, True], ids=["later_turns", "every_turn"])
@pytest.mark.parametrize("method", RAGGED[:2], ids=["adakv", "kvzip_pair"])
def test_ragged_batched_forced_answer_prefix(tiny_engine, monkeypatch, method, first):
    """scbench_summary forces "This paper" at the start of later answers (rewound before the next turn's feed): the
    rows' own keys and shared suffix rows around those rewinds, over ragged layers. Forced on the first answer too,
    the first prompt's compression keeps it inside every head's prefix (KVzip): the row's own keys come from there."""
    if first:
        monkeypatch.setattr(type(TASKS.get("scbench_summary")), "assistant_prefix", lambda self, ex, i: "This paper")
    seq = replay(tiny_engine, Replay, method, "multi_turn", task="scbench_summary")
    bat = replay(tiny_engine, BatchedReplay, method, "multi_turn", task="scbench_summary")
    same_rows(seq, bat)
    assert {r.stats.decode_path for r in bat} == {"batched"}


@pytest.mark.skipif(shared_prefix.triton is None or not shared_prefix.INTERPRET,
                    reason="needs Triton's interpreter (TRITON_INTERPRET=1, as make test sets)")
@pytest.mark.cpu_kernels
def test_ragged_batched_kernel_interpreter(tiny_engine, duo_gates, monkeypatch, mode="multi_request"):
    """The Triton kernels themselves in the batched step (interpreted, float32 CPU): the sequential path's rows."""
    import scbench.batch_step

    monkeypatch.setattr(scbench.batch_step, "kernel_for", lambda device: "triton")
    method = {"name": "duo_attention", "n_init": 4, "n_local": 28, "heads": duo_gates}
    bat = replay(tiny_engine, BatchedReplay, method, mode)
    same_rows(replay(tiny_engine, Replay, method, mode), bat)
    assert {r.stats.decode_kernel for r in bat} == {"triton"}


def test_ragged_kernel_launch_failure_records_torch(tiny_engine, duo_gates, monkeypatch, mode="multi_request"):
    """A ragged kernel that fails to launch: the torch path decodes (same rows as sequential) and the turns record
    ``decode_kernel=torch``, not the kernel that was asked for."""
    import scbench.batch_step
    from scbench.kernels import ragged_shared

    def boom(*a, **k):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(scbench.batch_step, "kernel_for", lambda device: "triton")
    monkeypatch.setattr(ragged_shared, "ragged_shared_decode", boom)
    method = {"name": "duo_attention", "n_init": 4, "n_local": 28, "heads": duo_gates}
    bat = replay(tiny_engine, BatchedReplay, method, mode)
    same_rows(replay(tiny_engine, Replay, method, mode), bat)
    assert {r.stats.decode_kernel for r in bat} == {"torch"}


@pytest.mark.parametrize("method,kw", [
    ({"name": "quest", "budget": 64, "page_size": 16, "dense_layers": 1, "recall": True}, {}),  # (batched: test_quest_batch)
    ({"name": "kivi", "bits": 2, "group": 4, "residual": 4}, {}),  # its decodes shape the next turns (test_kivi_batch)
    ({"name": "snapkv", "budget": 96, "window": 8}, {"compress": "every_turn"}),
    ({"name": "full"}, {"golden_context": False}),
    ({"name": "full"}, {"reuse": False}),
], ids=["quest", "kivi", "every_turn", "own_history", "naive"])
def test_fallback_to_sequential(tiny_engine, method, kw):
    seq = replay(tiny_engine, Replay, method, "multi_turn", **kw)
    bat = replay(tiny_engine, BatchedReplay, method, "multi_turn", **kw)
    same_rows(seq, bat)
    assert "batched" not in {r.stats.decode_path for r in bat} and {r.stats.decode_batch for r in bat} == {1}


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_batched_resume_decodes_only_missing_turns(tiny_engine, mode):
    seq = replay(tiny_engine, Replay, {"name": "full"}, mode)
    done = {0: seq[0].prediction, 2: seq[2].prediction}
    reps = []
    bat = replay(tiny_engine, BatchedReplay, {"name": "full"}, mode, done=done, keep=reps)
    same_rows([seq[1], seq[3]], bat)
    assert {r.stats.decode_batch for r in bat} == {3}  # turn 0 is decoded again to check the resume
    assert reps[0].mismatches == []
    done[0] = "not what the model says"
    replay(tiny_engine, BatchedReplay, {"name": "full"}, mode, done=done, keep=reps)
    assert [m["turn"] for m in reps[1].mismatches] == [0]


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
@pytest.mark.parametrize("method", [{"name": "snapkv", "budget": 96, "window": 8},
                                    {"name": "vertical_slash", "vertical_size": 16, "slash_size": 56, "last_q": 16,
                                     "init_cols": 4, "local_diags": 16}], ids=lambda m: m["name"])
def test_batched_resume_rows_equal_uninterrupted(tiny_engine, mode, method):
    """Resume reproduces: the rows a resumed batched replay stores are those of an uninterrupted run, the method's
    promise checks included (the first prompt's compression is checked on turn 0, never on the first missing turn)."""
    seq = replay(tiny_engine, Replay, method, mode)
    assert json.loads(seq[0].stats.checks or "[]") and not seq[1].stats.checks  # promised on turn 0 only
    for done in ({0: seq[0].prediction}, {0: seq[0].prediction, 2: seq[2].prediction}):
        bat = replay(tiny_engine, BatchedReplay, method, mode, done=dict(done))
        same_rows([r for r in seq if r.turn not in done], bat)
        same_rows([r for r in seq if r.turn not in done], replay(tiny_engine, Replay, method, mode, done=dict(done)))


TOGETHER = [({"name": "full"}, "multi_request"), ({"name": "snapkv", "budget": 96, "window": 8}, "multi_turn"),
            (RAGGED[0], "multi_request"), ({"name": "kivi", "bits": 2, "group": 32, "residual": 32, "decode_cache": "temp"}, "multi_turn"),
            ({"name": "quest", "budget": 64, "page_size": 16, "recent_pages": 1, "dense_layers": 1}, "multi_request"),
            ({"name": "retrieval_attention", "tier": "device", "top_k": 24, "n_init": 4, "n_local": 16}, "multi_turn"),
            (RAGGED[1], "multi_turn")]
"""Runs of a grouped sweep whose batches decode as one (``batch.decode_parts``): dense, evicted, ragged, quantised
and loading caches, with their plugins, both modes in one batch."""


def decode_together(engine, cases, **kw):
    """Every case's prepared batch (``BatchedReplay.prepare``) decoded in one batch: the rows of each case."""
    from scbench.batch import decode_parts

    preps = []
    for method, mode in cases:
        rep = make_replay(engine, BatchedReplay, method, mode, **kw)
        preps.append((rep, rep.prepare()))
        assert preps[-1][1] is not None, f"{method['name']} {mode} does not batch"
    results, step_s, kernels = decode_parts(engine, [(p.cache, p.rows, p.plugin) for _, p in preps])
    batch = sum(len(p.rows) for _, p in preps)
    return [list(rep.finish(p, gens, step_s, k, runs=len(preps), batch=batch))
            for (rep, p), gens, k in zip(preps, results, kernels)]


@pytest.mark.cpu_kernels  # the batched step's rotary kernel in the interpreter too
def test_runs_decoded_together_equal_alone(tiny_engine):
    """Several runs' batches forwarded as one (the weights read once per step; each run's rows attend to its own
    cache through its own plugin) give every run the rows it gets alone, in float32 token for token."""
    together = decode_together(tiny_engine, TOGETHER)
    for (method, mode), rows in zip(TOGETHER, together):
        same_rows(replay(tiny_engine, BatchedReplay, method, mode), rows)
    stats = [r.stats for rows in together for r in rows]
    assert {(s.decode_runs, s.decode_batch, s.decode_path) for s in stats} == {(len(TOGETHER), len(stats), "batched")}
    assert len({s.decode_step_s for s in stats}) == 1 and all(s.decode_s > 0 for s in stats)


def test_lagged_token_reads(tiny_engine, monkeypatch):
    """The CUDA graph path reads tokens a few steps behind the device; the extra steps change nothing stored."""
    import scbench.batch

    seq = replay(tiny_engine, Replay, {"name": "full"}, "multi_request")
    monkeypatch.setattr(scbench.batch, "EAGER_LAG", scbench.batch.LAG)
    assert same_rows(seq, replay(tiny_engine, BatchedReplay, {"name": "full"}, "multi_request")) == len(seq) > 1


def test_timing_values():
    assert replay_class("sequential") is Replay and replay_class("batched") is BatchedReplay
    with pytest.raises(ValueError, match="timing must be one of"):
        replay_class("fast")


def byte_engine(device, tmp_path_factory):
    """A tiny random Llama in float32 (3 layers, byte tokenizer) and DuoAttention gates of its shape."""
    from scbench.engines.hf import HFEngine
    from support import byte_tokenizer, random_llama

    tok = byte_tokenizer()
    model = random_llama(len(tok), layers=3, eos_token_id=tok.eos_token_id)
    gates = tmp_path_factory.mktemp("duo_bytes") / "gates.json"  # 3 layers x 2 KV heads
    gates.write_text(json.dumps({"gates": [[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], "n_init": 4, "n_local": 28}))
    return HFEngine("tiny-random-llama", model=model, tokenizer=tok, device=device, dtype="float32"), str(gates)


@pytest.fixture(scope="module")
def cuda_engine(tmp_path_factory):
    return byte_engine("cuda", tmp_path_factory)


CUDA_METHODS = RAGGED + [{"name": "full"}, {"name": "snapkv", "budget": 96, "window": 8}]
BYTES = 1200
"""Prompt length of the byte-tokenizer cases: scbench_kv needs more than 300 bytes for 4 distinct keys."""


@pytest.mark.parametrize("method", [RAGGED[0], RAGGED[3]], ids=["adakv", "duo_attention"])
def test_byte_engine_case_on_cpu(tmp_path_factory, method):
    """The CUDA test's setup (byte tokenizer, BYTES-long example) on the CPU: it generates and batches (the CUDA test
    first ran with 300 bytes, which scbench_kv refuses)."""
    engine, gates = byte_engine("cpu", tmp_path_factory)
    method = {**method, "heads": gates} if method["name"] == "duo_attention" else method
    bat = replay(engine, BatchedReplay, method, "multi_turn", length=BYTES)
    same_rows(replay(engine, Replay, method, "multi_turn", length=BYTES), bat)
    assert {r.stats.decode_path for r in bat} == {"batched"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runs_decoded_together(cuda_engine):
    """On CUDA: several runs' batches (dense, evicted, ragged, both modes) captured as one CUDA graph with each run's
    Triton attention give every run its own batch's tokens (float32)."""
    engine, gates = cuda_engine
    cases = [({"name": "full"}, "multi_request"), (CUDA_METHODS[5], "multi_turn"), (RAGGED[0], "multi_request"),
             ({**RAGGED[3], "heads": gates}, "multi_turn")]
    together = decode_together(engine, cases, length=BYTES)
    for (method, mode), rows in zip(cases, together):
        same_rows(replay(engine, BatchedReplay, method, mode, length=BYTES), rows)
    assert {r.stats.decode_runs for rows in together for r in rows} == {len(cases)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["multi_request", "multi_turn"])
@pytest.mark.parametrize("method", CUDA_METHODS, ids=["adakv", "kvzip_pair", "kvzip_layer", "duo_attention", "full",
                                                      "snapkv"])
def test_cuda_batched_equals_sequential(cuda_engine, method, mode):
    """On CUDA (float32, tiny random Llama, byte tokenizer): the batched step captured as a CUDA graph, with the
    Triton shared-prefix kernels (dense and ragged layers) and the fused forwards, gives the sequential path's tokens."""
    engine, gates = cuda_engine
    method = {**method, "heads": gates} if method["name"] == "duo_attention" else method
    seq = replay(engine, Replay, method, mode, length=BYTES)
    bat = replay(engine, BatchedReplay, method, mode, length=BYTES)
    same_rows(seq, bat)
    assert {r.stats.decode_path for r in bat} == {"batched"}
    assert {r.stats.decode_kernel for r in bat} == {"triton" if shared_prefix.triton is not None else "torch"}
