"""Results store: every finished turn is kept across a crash, a re-launch resumes, re-scoring works."""
from __future__ import annotations

import sqlite3

import pytest

from scbench.run import run_spec
from scbench.records import RunSpec
from scbench.store import Store


def spec(**kw):
    base = dict(model={"name": "tiny"}, method={"name": "full"}, task="scbench_kv", mode="multi_turn",
                data={"source": "generated", "n": 2, "length": 400, "turns": 3, "seed": 1}, max_turns=3, max_new_tokens=4)
    base.update(kw)
    return RunSpec(**base)


class Boom(RuntimeError):
    pass


def test_crash_then_resume(tiny_engine, tmp_path, monkeypatch):
    db = tmp_path / "r.sqlite"
    calls = {"n": 0}
    real_put = Store.put

    def flaky_put(self, run_id, result):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Boom("killed mid-run")
        real_put(self, run_id, result)

    monkeypatch.setattr(Store, "put", flaky_put)
    with pytest.raises(Boom):
        run_spec(spec(), str(db), engine=tiny_engine, progress=False)
    store = Store(db)
    (run,) = store.runs()
    assert run["status"] == "failed" and "killed mid-run" in run["error"]
    assert len(store.turns()) == 3  # the three finished turns survived
    store.close()

    monkeypatch.setattr(Store, "put", real_put)
    generated = {"n": 0}
    from scbench.engines import hf

    real_gen = hf.HFSession.generate

    def counting_gen(self, n):
        generated["n"] += 1
        return real_gen(self, n)

    monkeypatch.setattr(hf.HFSession, "generate", counting_gen)
    rid = run_spec(spec(), str(db), engine=tiny_engine, progress=False)
    assert generated["n"] == 3  # only the missing turns were generated
    store = Store(db)
    assert store.run(rid)["status"] == "done"
    resumed = {(t["example_id"], t["turn"]): t["prediction"] for t in store.turns(rid)}
    assert len(resumed) == 6

    # identical to an uninterrupted run
    fresh = tmp_path / "fresh.sqlite"
    rid2 = run_spec(spec(), str(fresh), engine=tiny_engine, progress=False)
    assert rid2 == rid
    assert {(t["example_id"], t["turn"]): t["prediction"] for t in Store(fresh).turns(rid)} == resumed

    # a third launch computes nothing
    generated["n"] = 0
    run_spec(spec(), str(db), engine=tiny_engine, progress=False)
    assert generated["n"] == 0


def test_run_id_changes_with_spec():
    from scbench.provenance import spec_hash
    import dataclasses

    a = spec_hash(dataclasses.asdict(spec()))
    assert a == spec_hash(dataclasses.asdict(spec()))
    assert a != spec_hash(dataclasses.asdict(spec(mode="multi_request")))
    assert a != spec_hash(dataclasses.asdict(spec(method={"name": "streamingllm", "n_init": 4, "n_local": 8})))


def test_store_rows_and_provenance(tiny_engine, tmp_path):
    db = tmp_path / "s.sqlite"
    rid = run_spec(spec(mode="multi_request"), str(db), engine=tiny_engine, progress=False)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store = Store(db)
    run = store.run(rid[:6])
    import json

    prov = json.loads(run["provenance"])
    assert set(prov["git"]) == {"commit", "dirty"}
    assert prov["packages"]["torch"] and prov["engine"]["chat_template_sha256"]
    assert prov["task"] == {"name": "scbench_kv", "version": "1", "category": "string_retrieval", "variant": "faithful"}
    rows = store.turns(rid)
    assert len(rows) == 6
    for r in rows:
        assert r["prompt_tokens"] == r["prefill_computed"] + r["prefill_reused"]
        assert r["kv_bytes"] > 0 and r["ttft_s"] > 0
        assert set(r["scores"]) == {"kv"}


def test_rescore_command(tiny_engine, tmp_path, capsys):
    from scbench.cli import main

    db = tmp_path / "s.sqlite"
    rid = run_spec(spec(), str(db), engine=tiny_engine, progress=False)
    store = Store(db)
    row = store.turns(rid)[0]
    answer = row["reference"]["answer"]
    store.db.execute("UPDATE turns SET prediction=? WHERE run_id=? AND example_id=? AND turn=0",
                     (f"it is {answer}", rid, row["example_id"]))
    main(["score", rid, "--store", str(db)])
    out = capsys.readouterr().out
    assert "1 changed" in out
    assert Store(db).turns(rid)[0]["scores"] == {"kv": 1.0}


def test_export_formats(tiny_engine, tmp_path, capsys):
    from scbench.cli import main

    db = tmp_path / "s.sqlite"
    run_spec(spec(), str(db), engine=tiny_engine, progress=False)
    run_spec(spec(method={"name": "streamingllm", "n_init": 4, "n_local": 16}), str(db), engine=tiny_engine, progress=False)
    main(["export", "--store", str(db), "--format", "md"])
    md = capsys.readouterr().out
    assert "| T1 | T1 ci95 | T2 | T2 ci95 | T3 | T3 ci95 | avg | avg ci95 | n | capped % |" in md and "streamingllm(n_init=4,n_local=16)" in md and "string_retrieval" in md
    out = tmp_path / "board.csv"
    main(["export", "--store", str(db), "--format", "csv", "--out", str(out)])
    import pandas as pd

    board = pd.read_csv(out)
    assert len(board) == 2 and set(board["method"]) == {"full", "streamingllm(n_init=4,n_local=16)"}
    sl = board[board["method"].str.startswith("streaming")].iloc[0]
    assert sl["KV vs full (mean/turn)"] < 1.0


def assert_specs_hash_to_run_ids(store):
    """Every stored spec is the one its run id was hashed from (provenance.spec_hash, run.run_id_of)."""
    import json

    from scbench.provenance import spec_hash
    from scbench.run import run_id_of

    for run in store.runs():
        stored = json.loads(run["spec"])
        assert spec_hash(stored) == run["run_id"]
        assert run_id_of(RunSpec(**stored)) == run["run_id"]


def test_rescore_variant_keeps_history(tiny_engine, tmp_path, capsys):
    """`scbench score --variant` stores the variant's scores beside the run's own: the turns' scores and the
    spec stay as the run wrote them (so the spec still hashes to the run id); export shows the variant on request."""
    import json

    from scbench.cli import main

    db = tmp_path / "s.sqlite"
    rid = run_spec(spec(task="scbench_qa_eng", max_turns=2), str(db), engine=tiny_engine, progress=False)
    store = Store(db)
    row = store.turns(rid)[0]
    gold = row["reference"]["answer"]
    gold = gold[0] if isinstance(gold, list) else gold
    store.db.execute("UPDATE turns SET prediction=? WHERE run_id=? AND example_id=? AND turn=0",
                     (f"{gold} and more words", rid, row["example_id"]))
    main(["score", rid, "--store", str(db)])  # the run's own variant: its scores follow the scorer
    before = {(t["example_id"], t["turn"]): t["scores"] for t in store.turns(rid)}
    spec_before = store.run(rid)["spec"]
    capsys.readouterr()
    main(["score", rid, "--store", str(db), "--variant", "token_f1"])
    assert "stored beside the run's own scores" in capsys.readouterr().out
    assert {(t["example_id"], t["turn"]): t["scores"] for t in store.turns(rid)} == before
    assert store.run(rid)["spec"] == spec_before
    assert_specs_hash_to_run_ids(store)
    rescored = store.rescores("token_f1", rid)
    assert set(rescored) == {(rid, ex, turn) for ex, turn in before}
    key = (row["example_id"], 0)
    assert 0 < rescored[(rid, *key)]["qa_eng"] < before[key]["qa_eng"] == 1.0  # F1 < substring hit

    main(["export", "--store", str(db), "--format", "json", "--out", str(tmp_path / "own.json")])
    main(["export", "--store", str(db), "--format", "json", "--variant", "token_f1", "--out", str(tmp_path / "f1.json")])
    own, f1 = (json.loads((tmp_path / f).read_text()) for f in ("own.json", "f1.json"))
    assert {r["task_variant"] for r in own} == {"faithful"} and {r["task_variant"] for r in f1} == {"token_f1"}
    assert own[0]["score"] > f1[0]["score"]
    main(["export", "--store", str(db), "--format", "md", "--variant", "token_f1"])
    assert "token_f1" in capsys.readouterr().out

    merged = tmp_path / "merged.sqlite"  # re-scores travel with a merge
    from scbench.store_merge import merge_stores

    assert merge_stores(merged, [db])["conflicts"] == []
    assert Store(merged).rescores("token_f1") == store.rescores("token_f1")
