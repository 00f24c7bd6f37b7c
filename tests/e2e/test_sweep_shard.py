"""Example-level sharding (shard=i/n), per-shard store merging, failure recording and GPU pinning logic."""
from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from scbench.cli import job_device, main
from scbench.run import parse_shard, run_spec
from scbench.records import RunSpec
from scbench.store import Store
from scbench.store_merge import merge_stores


def spec(**kw):
    base = dict(model={"name": "tiny"}, method={"name": "full"}, task="scbench_kv", mode="multi_request",
                data={"source": "generated", "n": 3, "length": 300, "turns": 2, "seed": 2}, max_turns=2, max_new_tokens=3)
    base.update(kw)
    return RunSpec(**base)


def rows(path, run_id=None):
    store = Store(path)
    out = {(t["run_id"], t["example_id"], t["turn"]): t["prediction"] for t in store.turns(run_id)}
    store.close()
    return out


@pytest.mark.parametrize("value,expected", [(None, None), ("0/1", (0, 1)), ("1/3", (1, 3)), (" 2/4 ", (2, 4))])
def test_parse_shard_ok(value, expected):
    assert parse_shard(value) == expected


@pytest.mark.parametrize("value", ["3/3", "-1/2", "1", "a/b", "0/0", "1/2/3", 5])
def test_parse_shard_refuses(value):
    with pytest.raises(ValueError, match="shard"):
        parse_shard(value)


@pytest.fixture(scope="module")
def unsharded(tiny_engine, tmp_path_factory):
    db = tmp_path_factory.mktemp("full") / "all.sqlite"
    rid = run_spec(spec(), str(db), engine=tiny_engine, progress=False)
    return rid, db


def test_shards_share_run_id_and_store(tiny_engine, tmp_path, unsharded):
    rid_all, db_all = unsharded
    db = tmp_path / "shared.sqlite"
    rid0 = run_spec(spec(), str(db), engine=tiny_engine, progress=False, shard="0/2")
    store = Store(db)
    assert store.run(rid0)["status"] == "partial"
    assert len(store.turns()) == 4 and len({t["example_id"] for t in store.turns()}) == 2  # examples 0 and 2
    store.close()
    rid1 = run_spec(spec(), str(db), engine=tiny_engine, progress=False, shard="1/2")
    assert rid0 == rid1 == rid_all
    assert rows(db) == rows(db_all)  # same rows, same predictions: nothing lost, nothing doubled
    store = Store(db)
    assert store.run(rid0)["status"] == "done" and len(store.turns()) == 6
    store.close()
    with pytest.raises(ValueError, match="shard"):
        run_spec(spec(), str(db), engine=tiny_engine, progress=False, shard="2/2")


def test_merge_per_shard_stores(tiny_engine, tmp_path, unsharded, capsys):
    rid, db_all = unsharded
    parts = [tmp_path / f"s{i}.sqlite" for i in range(3)]
    for i, p in enumerate(parts):
        run_spec(spec(), str(p), engine=tiny_engine, progress=False, shard=f"{i}/3")
    for p in parts:  # each shard alone holds a third of the run
        store = Store(p)
        assert store.run(rid)["status"] == "partial" and store.complete(rid) is False
        store.close()
    out = tmp_path / "merged.sqlite"
    main(["merge", str(out), str(parts[0]), str(parts[1])])
    assert "4 turns added" in capsys.readouterr().out
    store = Store(out)
    assert store.run(rid)["status"] == "partial"  # shard 2 still missing
    store.close()
    main(["merge", str(out), str(parts[2])])
    printed = capsys.readouterr().out
    assert "2 turns added" in printed and "1 run(s) now complete" in printed
    assert rows(out) == rows(db_all)
    con = sqlite3.connect(out)
    assert con.execute("SELECT COUNT(*), MIN(status) FROM runs").fetchone() == (1, "done")  # every shard's rows are in
    con.close()
    # merging again (and the unsharded store) adds nothing: identical rows are deduplicated
    rep = merge_stores(out, [*parts, db_all])
    assert rep["conflicts"] == [] and rep["turns_added"] == 0 and rep["duplicates"] == 12, rep
    assert len(rows(out)) == 6
    # a differing row is a conflict, reported, and the first one is kept
    con = sqlite3.connect(parts[0])
    con.execute("UPDATE turns SET prediction='tampered' WHERE turn=0")
    con.commit()
    con.close()
    with pytest.raises(SystemExit) as e:
        main(["merge", str(out), str(parts[0])])
    assert e.value.code == 1
    assert "conflict" in capsys.readouterr().err
    assert "tampered" not in rows(out).values()


def test_old_store_gains_new_columns(tmp_path):
    """A store written before a cost column existed is migrated in place (nullable columns added), not refused."""
    db = tmp_path / "old.sqlite"
    Store(db).close()
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE turns DROP COLUMN kv_bytes")
    con.execute("ALTER TABLE runs DROP COLUMN expected")
    con.commit()
    con.close()
    store = Store(db)
    cols = {r[1] for r in store.db.execute("PRAGMA table_info(turns)")}
    assert "kv_bytes" in cols and "expected" in {r[1] for r in store.db.execute("PRAGMA table_info(runs)")}
    store.close()


def test_merge_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        merge_stores(tmp_path / "o.sqlite", [tmp_path / "missing.sqlite"])
    with pytest.raises(ValueError, match="output"):
        merge_stores(tmp_path / "o.sqlite", [tmp_path / "o.sqlite"])


def test_failure_before_model_load_is_recorded(tmp_path):
    db = tmp_path / "f.sqlite"
    with pytest.raises(ValueError, match="no knob"):
        run_spec(spec(method={"name": "streamingllm", "n_budget": 3}), str(db), progress=False)
    with pytest.raises(ValueError, match="max_turns"):
        run_spec(spec(max_turns=0), str(db), progress=False)
    store = Store(db)
    runs = store.runs()
    assert [r["status"] for r in runs] == ["failed", "failed"]
    assert "no knob" in runs[0]["error"] and "max_turns" in runs[1]["error"]
    assert runs[0]["method"] == "streamingllm" and runs[0]["task"] == "scbench_kv"
    store.close()


@pytest.mark.parametrize("num,n,enabled,expected", [
    (0, 2, True, "cuda:0"), (1, 2, True, "cuda:1"), (5, 2, True, "cuda:1"), (7, 4, True, "cuda:3"),
    (3, 1, True, None), (3, 0, True, None), (3, 4, False, None), (None, 4, True, None),
])
def test_job_device_mapping(num, n, enabled, expected):
    assert job_device(num, n, enabled) == expected


WRITER = """
import sys, time
from scbench.records import TurnResult, TurnStats
from scbench.store import Store
db, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = Store(db)
s.open_run("run-" + tag, model="m", method="full", method_label="full", task="scbench_kv", mode="multi_turn", spec={}, provenance={})
for i in range(n):
    s.put("run-" + tag, TurnResult(example_id=f"ex{i // 2}", turn=i % 2, prompt_tokens=1, prediction=tag, reference={},
                                   scores={"kv": 1.0}, stats=TurnStats()))
s.finish_run("run-" + tag)
"""


def test_two_processes_write_one_store(tmp_path):
    """Two concurrent writers (as two joblib jobs) on one WAL store: every row lands."""
    db = tmp_path / "c.sqlite"
    Store(db).close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), tag, "150"]) for tag in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    con = sqlite3.connect(db)
    assert con.execute("SELECT run_id, COUNT(*) FROM turns GROUP BY run_id ORDER BY run_id").fetchall() == [("run-a", 150), ("run-b", 150)]
    con.close()
