"""Queries to pay back a one-time compression (scbench/report/payback.py) on a store built here: a KVzip-like run
that pays 3 s once and saves 0.9 s per later query, one that never pays back, one without compression."""
from __future__ import annotations

import json
import math

import pytest

from scbench.records import TurnResult, TurnStats
from scbench.report import export, payback
from scbench.report.html import build_html
from scbench.report.table import leaderboard
from scbench.store import Store

TURNS, EXAMPLES = 3, ("0", "1")


def add_run(store, run_id, method, turn_stats, examples=EXAMPLES, mode="multi_turn"):
    spec = {"model": {"name": "tiny"}, "method": {"name": method}, "task": "scbench_kv", "task_variant": None,
            "mode": mode}
    prov = {"method": {"name": method, "params": {}, "stages": []},
            "task": {"name": "scbench_kv", "version": "1", "category": "string_retrieval", "variant": "faithful"}}
    store.open_run(run_id, model="tiny", method=method, method_label=method, task="scbench_kv", mode=mode,
                   spec=spec, provenance=prov)
    for ex in examples:
        for t in range(TURNS):
            store.put(run_id, TurnResult(ex, t, 100, "p", {"answer": "a"}, {"kv": 0.5}, turn_stats(t, ex)))
    store.finish_run(run_id)


def stats(prefill_s, decode_tokens, decode_s, compress_s=0.0):
    return TurnStats(prompt_tokens=100, prefill_s=prefill_s, ttft_s=prefill_s, decode_tokens=decode_tokens,
                     decode_s=decode_s, compress_s=compress_s, kv_bytes=10, kv_full_bytes=20)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    # full: 10 s first prefill; later turns 1 s prefill + 10 decode steps of 0.1 s
    add_run(s, "full", "full", lambda t, ex: stats(10.0 if t == 0 else 1.0, 11, 1.0))
    # kvzip: 13 s first prefill (3.5 s compression inside); later 0.6 s prefill, 0.05 s/step but shorter answers
    # (5 steps): at full's 10 steps a later query costs 0.6 + 0.5 = 1.1 s vs 2.0 s -> saves 0.9 s; 3 / 0.9 -> 4
    add_run(s, "kvzip", "kvzip", lambda t, ex: stats(13.0 if t == 0 else 0.6, 6, 0.25, 3.5 if t == 0 else 0.0))
    # slower every query: never pays back
    add_run(s, "slow", "snapkv", lambda t, ex: stats(11.0 if t == 0 else 1.2, 11, 1.5, 0.5 if t == 0 else 0.0))
    # no compression recorded: no payback numbers
    add_run(s, "ashape", "ashape", lambda t, ex: stats(9.0, 11, 1.0))
    # cheaper first prefill (e.g. sparse prefill + compression): pays back at once; one example only
    add_run(s, "cheap", "quest", lambda t, ex: stats(8.0 if t == 0 else 1.0, 11, 1.0, 0.1), examples=("1",))
    # another mode has no full baseline
    add_run(s, "req", "kvzip", lambda t, ex: stats(13.0, 6, 0.25, 3.5), mode="multi_request")
    yield s
    s.close()


def test_payback_numbers(store):
    pb = payback.paybacks(store)
    assert set(pb) == {"kvzip", "slow", "cheap"}
    k = pb["kvzip"]
    assert k["extra_once_s"] == pytest.approx(3.0)
    assert k["saving_per_query_s"] == pytest.approx(0.9)
    assert k["queries_to_pay_back"] == 4 and k["n_examples"] == 2 and k["baseline_run_id"] == "full"
    assert math.isinf(pb["slow"]["queries_to_pay_back"]) and pb["slow"]["saving_per_query_s"] < 0
    assert pb["cheap"]["queries_to_pay_back"] == 0 and pb["cheap"]["n_examples"] == 1


def test_payback_in_leaderboard_and_export(store):
    board = leaderboard(store)
    board = board[board["mode"] == "multi_turn"].set_index("method")
    col = payback.LABELS["queries_to_pay_back"]
    assert board.loc["kvzip", col] == 4 and math.isinf(board.loc["snapkv", col])
    assert math.isnan(board.loc["ashape", col]) and math.isnan(board.loc["full", col])
    recs = json.loads(export.to_json(store))
    by_run = {r["run_id"]: r["payback"] for r in recs}
    assert by_run["kvzip"]["queries_to_pay_back"] == 4 and by_run["kvzip"]["pays_back"] is True
    assert by_run["slow"]["queries_to_pay_back"] is None and by_run["slow"]["pays_back"] is False
    assert by_run["ashape"] is None and by_run["full"] is None and by_run["req"] is None


def test_single_turn_never_pays_back():
    first = {"example_id": "0", "turn": 0, "decode_tokens": 3, "decode_s": 0.2}
    res = payback.payback([{**first, "prefill_s": 2.0}], [{**first, "prefill_s": 1.0}])
    assert res["saving_per_query_s"] is None and math.isinf(res["queries_to_pay_back"])
    assert payback.payback([{**first, "prefill_s": 2.0}], [{**first, "example_id": "9", "prefill_s": 1.0}]) is None


def test_payback_in_html(store):
    page = build_html(store)
    assert "queries to pay back" in page and ">never<" in page and 'data-v="4"' in page
