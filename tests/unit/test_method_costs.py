"""Method-specific cost columns: declarations (Method.costs), the one JSON store column, the v1 -> v2 store
migration, and the readers (export, leaderboard, figures, schema doc) that take their columns from the declarations."""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import ClassVar

import pytest

from scbench import RESULTS_SCHEMA_VERSION
from scbench.methods.base import Method
from scbench.records import Cost, Example, RunSpec, Turn
from scbench.registry import METHODS, TASKS
from scbench.report import costs as method_costs
from scbench.report.export import records
from scbench.report.figures import figures_for, render
from scbench.report.html import build_html
from scbench.report.table import leaderboard
from scbench.runner import Replay
from scbench.store import Store


def test_schema_doc_is_current():
    """docs/results_schema.md's method-cost table is generated from the declarations: regenerate it with
    ``python -m scbench.report.costs --write`` after adding or changing a cost."""
    text = method_costs.SCHEMA_DOC.read_text()
    assert method_costs.render_doc(text) == text
    for col in method_costs.declared_costs():
        assert f"| `{col}` |" in text


def test_declarations_are_checked():
    with pytest.raises(ValueError, match="agg"):
        Cost("s", "x", agg="median")
    with pytest.raises(ValueError, match="universal TurnStats column"):
        type("Bad", (Method,), {"costs": {"kv_bytes": Cost("bytes", "clash")}})
    with pytest.raises(TypeError, match="scbench.records.Cost"):
        type("Bad", (Method,), {"costs": {"x_s": ("s", "mean")}})
    assert set(METHODS.get("cacheblend").cost_columns()) == {"recompute_frac", "chunk_kv_s", "prefill_saved_s"}
    assert set(METHODS.get("ppl_compress").cost_columns()) == {"context_rate", "context_compress_s"}  # hook costs
    assert METHODS.get("full").cost_columns() == {}


@dataclass
class Counting(Method):
    """Full attention that counts its turns: a method with one cost column of its own, declared in its class."""

    name: ClassVar[str] = "counting"
    costs: ClassVar[dict[str, Cost]] = {
        "turns_counted": Cost("turns", "turns this method saw so far", agg="max", default=0, label="counted"),
    }

    def __post_init__(self) -> None:
        self.seen = 0

    def take_costs(self, session) -> dict:
        self.seen += 1
        return {"turns_counted": self.seen}


@pytest.fixture
def counting(monkeypatch):
    """Register ``Counting`` as a real method would be (scbench/registry.py), for this test only."""
    monkeypatch.setitem(METHODS._entries, "counting", Counting)
    method_costs._declared.cache_clear()
    yield Counting
    method_costs._declared.cache_clear()


def kv_example() -> Example:
    words = " ".join(f"key{i}=val{i * 7 % 97}" for i in range(20))
    return Example(id="e0", context=words, turns=tuple(Turn(input=f"key{i}?", answer=f"val{i}") for i in (3, 5)))


def test_a_method_owns_its_column_end_to_end(tiny_engine, counting, tmp_path):
    spec = RunSpec(model={}, method={"name": "counting"}, task="scbench_kv", max_turns=2, max_new_tokens=3)
    results = list(Replay(tiny_engine, Counting(), TASKS.get("scbench_kv"), kv_example(), spec))
    assert [r.stats.method_costs for r in results] == [{"turns_counted": 1}, {"turns_counted": 2}]
    store = Store(tmp_path / "s.sqlite")
    store.open_run("r1", model="tiny", method="counting", method_label="counting", task="scbench_kv",
                   mode="multi_turn", spec={"method": {"name": "counting"}}, provenance={})
    for r in results:
        store.put("r1", r)
    assert [t["method_costs"] for t in store.turns()] == [{"turns_counted": 1}, {"turns_counted": 2}]
    store.finish_run("r1")  # exports leave unfinished runs out
    recs = records(store)
    assert [r["costs"]["turns_counted"] for r in recs] == [1, 2]
    assert recs[0]["costs"]["recompute_frac"] == 1.0 and recs[0]["costs"]["index_recall"] is None  # others' defaults
    board = leaderboard(store)
    assert board["counted (max/turn)"].tolist() == [2]  # agg max over the run
    assert "recomputed" not in board  # a column at its default everywhere is hidden
    figs = figures_for(recs)
    assert render(figs["accuracy_vs_turns_counted"](recs), "svg").startswith(b"<?xml")
    assert "<th>counted (max/turn)</th>" in build_html(store) and "<th>recomputed (mean/turn)</th>" not in build_html(store)
    assert "| `turns_counted` | turns | turns this method saw so far (**max** over the examples)" in method_costs.schema_rows()
    store.close()


def test_undeclared_cost_is_an_error(tiny_engine):
    class Sloppy(Counting):
        def take_costs(self, session):
            return {"oops": 1}

    spec = RunSpec(model={}, method={"name": "counting"}, task="scbench_kv", max_turns=1, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"Sloppy.take_costs reported \['oops'\], not declared"):
        list(Replay(tiny_engine, Sloppy(), TASKS.get("scbench_kv"), kv_example(), spec))


V1_TURNS = """CREATE TABLE turns (
    run_id TEXT NOT NULL REFERENCES runs(run_id), example_id TEXT NOT NULL, turn INTEGER NOT NULL,
    prediction TEXT, reference TEXT, scores TEXT,
    prompt_tokens INTEGER, prefill_computed INTEGER, prefill_reused INTEGER, prefill_s REAL, ttft_s REAL,
    decode_tokens INTEGER, decode_s REAL, decode_tok_s REAL, decode_path TEXT, compress_s REAL, kv_bytes INTEGER,
    kv_tokens INTEGER, kv_full_bytes INTEGER, state_bytes INTEGER, slow_tier_bytes INTEGER, loaded_bytes INTEGER,
    load_s REAL, attn_recall REAL, index_recall REAL, index_build_s REAL, index_bytes INTEGER,
    peak_mem_bytes INTEGER, truncated_tokens INTEGER, attn_density REAL, context_rate REAL,
    context_compress_s REAL, recompute_frac REAL, chunk_kv_s REAL, prefill_saved_s REAL, created REAL,
    PRIMARY KEY (run_id, example_id, turn));"""
V1_RUNS = """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE runs (run_id TEXT PRIMARY KEY, created REAL, updated REAL, model TEXT, method TEXT, method_label TEXT,
    task TEXT, mode TEXT, status TEXT, error TEXT, spec TEXT, provenance TEXT, expected TEXT);
INSERT INTO meta VALUES ('schema_version', '1');"""
LEGACY = ("index_recall", "index_build_s", "index_bytes", "context_rate", "context_compress_s", "recompute_frac",
          "chunk_kv_s", "prefill_saved_s")
# per method: its two turns' legacy values (what a v1 scbench wrote: defaults for the columns it did not measure)
V1_ROWS = {
    "full": [(None, 0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0)] * 2,
    "cacheblend": [(None, 0.0, 0, 1.0, 0.0, 0.2, 0.5, 0.25), (None, 0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0)],
    "ppl_compress": [(None, 0.0, 0, 0.4, 1.5, 1.0, 0.0, 0.0), (None, 0.0, 0, 0.4, 0.0, 1.0, 0.0, 0.0)],
    "retrieval_attention": [(0.9, 0.3, 4096, 1.0, 0.0, 1.0, 0.0, 0.0), (None, 0.0, 4096, 1.0, 0.0, 1.0, 0.0, 0.0)],
}


def old_store(path) -> None:
    """A results store as scbench wrote it before method costs moved into one JSON column (schema v1)."""
    db = sqlite3.connect(path)
    db.executescript(V1_RUNS + V1_TURNS)
    for method, rows in V1_ROWS.items():
        spec = {"model": {"name": "tiny"}, "method": {"name": method}, "task": "scbench_kv", "mode": "multi_turn"}
        db.execute("INSERT INTO runs VALUES (?,1,1,'tiny',?,?,'scbench_kv','multi_turn','done',NULL,?,'{}',NULL)",
                   (f"run-{method}", method, method, json.dumps(spec)))
        for turn, legacy in enumerate(rows):
            db.execute(f"INSERT INTO turns (run_id, example_id, turn, prediction, reference, scores, prompt_tokens, "
                       f"kv_bytes, kv_full_bytes, attn_density, peak_mem_bytes, {', '.join(LEGACY)}) "
                       f"VALUES (?, 'e0', ?, 'p', '{{\"answer\": \"a\"}}', '{{\"kv\": 1.0}}', 100, 10, 20, 1.0, 5, "
                       f"{', '.join('?' * len(LEGACY))})", (f"run-{method}", turn, *legacy))
    db.commit()
    db.close()


def test_v1_store_migrates(tmp_path):
    path = tmp_path / "old.sqlite"
    old_store(path)
    store = Store(path)
    have = {r[1] for r in store.db.execute("PRAGMA table_info(turns)")}
    assert not have & set(LEGACY) and "method_costs" in have
    assert store.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(RESULTS_SCHEMA_VERSION)
    got = {(t["run_id"], t["turn"]): t["method_costs"] for t in store.turns()}
    assert got[("run-full", 0)] == {}
    assert got[("run-cacheblend", 0)] == {"recompute_frac": 0.2, "chunk_kv_s": 0.5, "prefill_saved_s": 0.25}
    assert got[("run-ppl_compress", 1)] == {"context_rate": 0.4, "context_compress_s": 0.0}
    assert got[("run-retrieval_attention", 0)] == {"index_recall": 0.9, "index_build_s": 0.3, "index_bytes": 4096}
    assert got[("run-retrieval_attention", 1)] == {"index_build_s": 0.0, "index_bytes": 4096}  # NULL: default
    # every export record reads as the v1 record did: each legacy column with the value the v1 row held
    for r in records(store):
        want = V1_ROWS[r["method"]][r["turn"] - 1]
        assert [r["costs"][c] for c in LEGACY] == list(want), r["method"]
    board = leaderboard(store)
    assert {"context kept (mean/turn)", "recomputed (mean/turn)", "prefill saved s (mean/turn)"} <= set(board.columns)
    store.close()
    again = Store(path)  # migrated once; reopening changes nothing
    assert {(t["run_id"], t["turn"]): t["method_costs"] for t in again.turns()} == got
    again.close()


def test_merge_ignores_method_cost_timings(tmp_path):
    """Two honest runs of one turn differ in their timings, also inside method_costs: not a conflict."""
    from scbench.records import TurnResult, TurnStats
    from scbench.store_merge import merge_stores

    for name, secs in (("a", 0.5), ("b", 0.7)):
        s = Store(tmp_path / f"{name}.sqlite")
        s.open_run("r", model="m", method="cacheblend", method_label="cb", task="t", mode="multi_turn", spec={},
                   provenance={})
        stats = TurnStats(method_costs={"recompute_frac": 0.2, "chunk_kv_s": secs})
        s.put("r", TurnResult("e", 0, 1, "p", {}, {"kv": 1.0}, stats))
        s.close()
    report = merge_stores(tmp_path / "out.sqlite", [tmp_path / "a.sqlite", tmp_path / "b.sqlite"])
    assert report["conflicts"] == [] and report["duplicates"] == 1
