"""Shared-context KV reuse: same greedy tokens as re-prefilling every turn, and only new tokens computed."""
from __future__ import annotations

import pytest

from scbench.data import load_examples
from scbench.records import RunSpec
from scbench.registry import METHODS, TASKS
from scbench.runner import Replay


def replay(engine, task_name, mode, reuse, method=None, length=300, turns=3, max_new=12, seed=0, **kw):
    task = TASKS.get(task_name)
    count = lambda t: len(engine.encode(t, add_special_tokens=False))  # noqa: E731
    ex = load_examples(task, "generated", n=1, length=length, turns=turns, seed=seed, count=count)[0]
    spec = RunSpec(model={}, method={"name": "full"}, task=task_name, mode=mode, max_turns=turns,
                   max_new_tokens=max_new, reuse=reuse, **kw)
    return list(Replay(engine, method or METHODS.get("full")(), task, ex, spec))


def assert_identity_and_cost(engine, task, mode, **kw):
    reused = replay(engine, task, mode, reuse=True, **kw)
    naive = replay(engine, task, mode, reuse=False, **kw)
    assert [r.prediction for r in reused] == [r.prediction for r in naive]
    assert [r.stats.decode_tokens for r in reused] == [r.stats.decode_tokens for r in naive]
    for i, (a, b) in enumerate(zip(reused, naive)):
        assert a.stats.prompt_tokens == b.stats.prompt_tokens  # the same prompt...
        assert b.stats.prefill_computed == b.stats.prompt_tokens  # ...naive recomputes all of it
        assert a.stats.prefill_computed + a.stats.prefill_reused == a.stats.prompt_tokens
        if i > 0:  # reuse computes only the turn's new tokens
            assert a.stats.prefill_reused > 0
            assert a.stats.prefill_computed < a.stats.prompt_tokens / 2
    return reused, naive


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
@pytest.mark.parametrize("task", ["scbench_kv", "scbench_vt"])
def test_reuse_matches_naive_tiny(tiny_engine, task, mode):
    assert_identity_and_cost(tiny_engine, task, mode)


def test_multi_turn_deltas_are_exact(tiny_engine):
    """Turn i's prompt = turn i-1's prompt + gold answer + follow-up (no generated tokens left behind)."""
    res = replay(tiny_engine, "scbench_kv", "multi_turn", reuse=True, turns=3)
    for prev, cur in zip(res, res[1:]):
        assert cur.stats.prefill_reused == prev.stats.prompt_tokens
        assert cur.stats.prompt_tokens == prev.stats.prompt_tokens + cur.stats.prefill_computed


def test_multi_request_returns_to_context(tiny_engine):
    res = replay(tiny_engine, "scbench_kv", "multi_request", reuse=True, turns=3)
    ctx = res[1].stats.prefill_reused
    assert all(r.stats.prefill_reused == ctx for r in res[1:])
    assert res[0].stats.prefill_reused == 0 and res[0].stats.prefill_computed > ctx


def test_own_answers_history(tiny_engine):
    """golden_context=False feeds the model's own answers: the prompt then differs from the golden one."""
    gold = replay(tiny_engine, "scbench_kv", "multi_turn", reuse=True, turns=2)
    own = replay(tiny_engine, "scbench_kv", "multi_turn", reuse=True, turns=2, golden_context=False)
    assert gold[0].prediction == own[0].prediction
    assert gold[1].stats.prompt_tokens != own[1].stats.prompt_tokens
    assert_identity_and_cost(tiny_engine, "scbench_kv", "multi_turn", turns=2, golden_context=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_reuse_matches_naive_embedded(embedded_engine, mode):
    """The issue's acceptance test on the real embedded model (short prompts, float32, CPU)."""
    reused, naive = assert_identity_and_cost(embedded_engine, "scbench_kv", mode, length=250, turns=3, max_new=24)
    assert any(r.stats.decode_tokens > 1 for r in reused)


def test_streamingllm_keeps_budget_and_bytes(tiny_engine):
    sl = METHODS.get("streamingllm")(n_init=4, n_local=28)
    res = replay(tiny_engine, "scbench_kv", "multi_request", reuse=True, method=sl, turns=2, max_new=5)
    e = tiny_engine
    for r in res:
        per_token = 2 * e.num_layers * e.kv_heads * e.head_dim * 4  # float32 keys + values
        assert r.stats.kv_bytes == r.stats.kv_tokens * per_token
        assert r.stats.kv_bytes < r.stats.kv_full_bytes
    # request 2: cache = 32 kept context tokens + its own request + generated
    r = res[1]
    assert r.stats.kv_tokens == 32 + r.stats.prefill_computed + r.stats.decode_tokens - 1


def test_streamingllm_every_turn_policy(tiny_engine):
    sl = METHODS.get("streamingllm")(n_init=4, n_local=28)
    once = replay(tiny_engine, "scbench_kv", "multi_turn", reuse=True, method=sl, turns=3, max_new=4)
    every = replay(tiny_engine, "scbench_kv", "multi_turn", reuse=True, method=sl, turns=3, max_new=4, compress="every_turn")
    assert every[2].stats.kv_tokens <= 32 + every[2].stats.decode_tokens - 1
    assert once[2].stats.kv_tokens > every[2].stats.kv_tokens


def test_query_blind_compression_keeps_query(tiny_engine):
    """query_visible=False compresses the context alone, then appends the first query uncompressed."""
    sl = METHODS.get("streamingllm")(n_init=4, n_local=12)
    blind = replay(tiny_engine, "scbench_kv", "multi_turn", reuse=True, method=sl, turns=1, max_new=2, query_visible=False)
    seen = replay(tiny_engine, "scbench_kv", "multi_turn", reuse=True, method=sl, turns=1, max_new=2)
    assert seen[0].stats.kv_tokens == 16 + seen[0].stats.decode_tokens - 1
    assert blind[0].stats.kv_tokens > seen[0].stats.kv_tokens
