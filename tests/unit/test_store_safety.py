"""Stores that read-only commands never touch, schema checks before writes, one-line errors for missing or
corrupt stores, leases (interrupted runs, claimed runs skipped, stale ones taken over), completeness in exports."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from scbench.cli import main
from scbench.store import Store, StoreError
from scbench.store_merge import merge_stores
from support import make_store


def digest(folder) -> dict:
    """Every file in ``folder`` (names and bytes): a read-only command must leave it identical."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def cli_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def test_ls_runs_on_a_missing_store_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "typo" / "x.sqlite"
    err = cli_error(["ls", "runs", "--store", str(missing)], capsys)
    assert f"no results store at {missing}" in err
    assert not (tmp_path / "typo").exists()
    for cmd in (["export", "--store", str(missing)], ["plot", "--store", str(missing), "--out", str(tmp_path / "f")]):
        assert f"no results store at {missing}" in cli_error(cmd, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_read_only_commands_leave_the_store_untouched(tmp_path, capsys):
    db = make_store(tmp_path / "s.sqlite")
    # an older store of the same schema: no lease table, no resume_mismatch column (read-only opens must cope)
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("DROP TABLE leases")
    con.execute("ALTER TABLE runs DROP COLUMN resume_mismatch")
    con.close()
    before = digest(tmp_path)
    assert sorted(before) == ["s.sqlite"]
    main(["ls", "runs", "--store", str(db)])
    for fmt in ("md", "csv", "json", "html"):
        main(["export", "--store", str(db), "--format", fmt])
    out = capsys.readouterr().out
    assert " 6/" in out  # ls runs: turns stored / expected
    assert digest(tmp_path) == before  # no -wal / -shm files next to it either


def test_merge_never_alters_its_inputs(tmp_path):
    src = make_store(tmp_path / "in" / "a.sqlite")
    con = sqlite3.connect(src, isolation_level=None)
    con.execute("ALTER TABLE runs DROP COLUMN resume_mismatch")
    con.execute("ALTER TABLE turns DROP COLUMN state_bytes")  # an input from before a cost column existed
    con.execute("PRAGMA journal_mode=DELETE")
    con.close()
    before = digest(tmp_path / "in")
    rep = merge_stores(tmp_path / "out.sqlite", [src])
    assert rep["turns_added"] == 16 * 6 and not rep["conflicts"]
    assert digest(tmp_path / "in") == before


def test_newer_schema_is_refused_before_any_write(tmp_path, capsys):
    db = make_store(tmp_path / "s.sqlite")
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    con.execute("ALTER TABLE runs DROP COLUMN expected")
    con.execute("PRAGMA journal_mode=DELETE")
    con.close()
    before = digest(tmp_path)
    assert "results schema v99" in cli_error(["ls", "runs", "--store", str(db)], capsys)
    with pytest.raises(StoreError, match="schema v99"):
        Store(db)  # a writable open refuses too, before switching to WAL or adding columns
    assert digest(tmp_path) == before


@pytest.mark.parametrize("content", [b"this is not a database at all" * 100, b"SQLite format 3\x00" + b"\x07" * 2000])
def test_corrupt_store_is_one_line(tmp_path, capsys, content):
    db = tmp_path / "bad.sqlite"
    db.write_bytes(content)
    for cmd in (["ls", "runs", "--store", str(db)], ["export", "--store", str(db)]):
        assert str(db) in cli_error(cmd, capsys)
    with pytest.raises(StoreError, match="bad.sqlite"):
        Store(db)


HOLD = """
import sys, time
from scbench.store import Store
s = Store(sys.argv[1])
s.open_run("r1", model="m", method="full", method_label="full", task="scbench_kv", mode="multi_turn", spec={}, provenance={})
assert s.claim("r1") is None
print("claimed", flush=True)
time.sleep(float(sys.argv[2]))
"""


def holder(db, seconds):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "claimed"
    return p


def test_killed_owner_reads_interrupted_and_is_taken_over(tmp_path, capsys):
    db = tmp_path / "s.sqlite"
    p = holder(db, 60)
    store = Store(db, readonly=True)
    (run,) = store.runs()
    assert run["status"] == "running" and run["owner"]["pid"] == p.pid and run["owner"]["alive"]
    store.close()
    store = Store(db)
    owner = store.claim("r1")  # a second process skips a run whose owner lives
    assert owner is not None and owner["pid"] == p.pid
    p.kill()
    p.wait()
    (run,) = store.runs()
    assert run["status"] == "interrupted" and run["owner"]["pid"] == p.pid and not run["owner"]["alive"]
    main(["ls", "runs", "--store", str(db)])
    line = capsys.readouterr().out
    assert "interrupted" in line and f":{p.pid} heartbeat" in line
    assert store.claim("r1") is None  # the dead owner's lease is taken over
    (run,) = store.runs()
    assert run["owner"]["pid"] == os.getpid()
    store.release("r1")
    store.close()


def test_stale_heartbeat_of_another_host_is_taken_over(tmp_path, monkeypatch):
    db = tmp_path / "s.sqlite"
    store = Store(db)
    now = time.time()
    store.db.execute("INSERT INTO leases VALUES ('r1', '', 'other-host', 1, NULL, ?, ?)", (now - 1000, now - 10))
    assert store.claim("r1")["host"] == "other-host"  # fresh heartbeat: alive
    store.db.execute("UPDATE leases SET heartbeat=?", (now - 1000,))
    monkeypatch.setenv("SCBENCH_LEASE_STALE_S", "300")
    assert store.claim("r1") is None  # silent for 1000 s: taken over
    store.release("r1")
    store.close()


def test_second_launch_skips_a_claimed_run(tiny_engine, tmp_path):
    from scbench.records import RunSpec
    from scbench.run import run_id_of, run_spec

    s = RunSpec(model={"name": "tiny"}, method={"name": "full"}, task="scbench_kv", mode="multi_request",
                data={"source": "generated", "n": 1, "length": 300, "turns": 2, "seed": 1}, max_turns=2, max_new_tokens=2)
    db = tmp_path / "s.sqlite"
    rid = run_id_of(s)
    script = HOLD.replace('"r1"', repr(rid))
    p = subprocess.Popen([sys.executable, "-c", script, str(db), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "claimed"
        run_spec(s, str(db), engine=tiny_engine, progress=False)
        store = Store(db, readonly=True)
        assert store.turns() == [] and store.runs()[0]["status"] == "running"  # skipped: nothing computed
        store.close()
    finally:
        p.kill()
        p.wait()
    run_spec(s, str(db), engine=tiny_engine, progress=False)  # the owner is gone: this launch takes over
    store = Store(db, readonly=True)
    (run,) = store.runs()
    assert run["status"] == "done" and run["complete"] and run["owner"] is None and len(store.turns()) == 2
    store.close()


def test_exports_show_completeness_and_leave_unfinished_runs_out(tmp_path, capsys):
    db = make_store(tmp_path / "s.sqlite")
    store = Store(db)
    store.set_expected("r0t0", {"0": 3, "1": 3, "2": 3})  # a run owing 9 turns with 6 stored, left running
    store.db.execute("UPDATE runs SET status='running' WHERE run_id='r0t0'")
    store.close()
    main(["export", "--store", str(db), "--format", "md"])
    md = capsys.readouterr().out
    board, _, unfinished = md.partition("Unfinished runs")
    assert "| r0t0 |" in unfinished and "interrupted" in unfinished and "6/9" in unfinished
    assert "status" in board and "turns" in board and "6/9" not in board
    main(["export", "--store", str(db), "--format", "json"])
    recs = json.loads(capsys.readouterr().out)
    assert recs and all(r["complete"] and r["status"] == "done" for r in recs)
    assert "r0t0" not in {r["run_id"] for r in recs}
    main(["export", "--store", str(db), "--format", "json", "--include-incomplete"])
    recs = json.loads(capsys.readouterr().out)
    (part,) = {(r["status"], r["turns_done"], r["turns_expected"]) for r in recs if r["run_id"] == "r0t0"}
    assert part == ("interrupted", 6, 9)
    main(["export", "--store", str(db), "--format", "html"])
    page = capsys.readouterr().out
    assert "Unfinished runs" in page and "6/9" in page


@pytest.mark.parametrize("where", ["dir", "under_file", "full_disk"])
def test_export_write_errors_are_one_line(tmp_path, capsys, monkeypatch, where):
    db = make_store(tmp_path / "s.sqlite")
    if where == "dir":
        out = tmp_path
    elif where == "under_file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "board.md"
    else:  # a full disk: the write fails with ENOSPC
        import errno
        from pathlib import Path

        def full(self, *a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

        monkeypatch.setattr(Path, "write_text", full)
        out = tmp_path / "board.md"
    err = cli_error(["export", "--store", str(db), "--out", str(out)], capsys)
    assert err.startswith("scbench export: error: ") and str(out) in err


def test_score_on_a_missing_store_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "typo" / "x.sqlite"
    assert f"no results store at {missing}" in cli_error(["score", "abc", "--store", str(missing)], capsys)
    assert not (tmp_path / "typo").exists()


def test_heartbeat_refreshes_the_lease(tmp_path):
    from scbench import leases

    store = Store(tmp_path / "s.sqlite")
    assert store.claim("r1") is None
    store.heartbeats.pop(("r1", "")).stop()  # replace the 30 s beat by a fast one
    first = store.db.execute("SELECT heartbeat FROM leases").fetchone()[0]
    beat = leases.Heartbeat(store.path, "r1", "", every=0.05)
    time.sleep(0.5)
    beat.stop()
    assert store.db.execute("SELECT heartbeat FROM leases").fetchone()[0] > first
    store.release("r1")
    assert store.db.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0
    store.close()
