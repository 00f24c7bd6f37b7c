"""Results store: one SQLite file (WAL), one row per run and one row per (run, example, turn).

Each finished turn is committed at once, so a crash or kill loses nothing finished, and a re-launch
of the same run (same resolved spec, hence the same run id) skips what is stored.

Turn rows hold the universal ``TurnStats`` fields as typed columns and the method's own cost columns as one
JSON object (``method_costs``, declared per method: ``Method.costs``). Schema v1 stores (method costs as flat
columns) are migrated on open (``store_schema.migrate_v1``).

Re-scoring a run with another task variant (``scbench score --variant``) writes ``rescores`` rows beside the
turns; the turns' own scores and the run's spec (whose hash is the run id) stay as the run wrote them.
"""
from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from scbench import RESULTS_SCHEMA_VERSION
from scbench import leases as lease_mod
from scbench import store_schema as schema
from scbench.records import TurnResult
from scbench.store_schema import (JSON_STAT_COLUMNS, LEGACY_METHOD_COLUMNS, READABLE_VERSIONS,  # noqa: F401
                                   RUN_COLUMNS, STAT_COLUMNS, NoStore, StoreError)


class Store:
    """A results store. ``readonly=True`` (commands that only read: ``ls runs``, exports, merge inputs) opens the
    file read-only: it must exist ("no results store at PATH") and nothing in it or next to it is created or
    changed. A writable open checks the schema version before its first write."""

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.heartbeats: dict = {}
        if readonly or self.path.exists():
            if not self.path.is_file():
                raise NoStore(f"no results store at {self.path}")
            try:
                ro = sqlite3.connect(self._read_only_uri(), uri=True, timeout=60, isolation_level=None)
                ro.execute("PRAGMA busy_timeout=60000")
                version = self._check_version(ro)
                if readonly:
                    self.db = ro
                    if version is not None and (version < RESULTS_SCHEMA_VERSION or self._missing(ro)):
                        self._upgrade_in_memory(ro)  # an older store is read through an upgraded copy in memory
                    return
                ro.close()
            except sqlite3.DatabaseError as e:
                raise StoreError(f"{self.path}: not a readable results store ({e})") from None
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(6):
            self.db = None
            try:
                self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
                self.db.execute("PRAGMA busy_timeout=60000")
                self.db.execute("PRAGMA journal_mode=WAL")
                self._create_and_upgrade()
                break
            except sqlite3.OperationalError as e:
                # two jobs opening one new store at once: SQLite answers "database is locked" at once, without
                # waiting, where waiting could deadlock (one switching the file to WAL or upgrading its lock while
                # the other holds a read lock); its remedy is to start again
                if self.db is not None:
                    self.db.close()
                if "locked" not in str(e) or attempt == 5:
                    raise StoreError(f"{self.path}: cannot open the results store for writing ({e})") from None
                time.sleep(0.05 * 2 ** attempt)
            except sqlite3.DatabaseError as e:
                raise StoreError(f"{self.path}: cannot open the results store for writing ({e})") from None

    def _read_only_uri(self) -> str:
        """A read-only URI. With no ``-wal`` file beside it (no writer since the last checkpoint) the file is opened
        immutable: SQLite then creates no ``-wal``/``-shm`` files next to it, which a plain read-only open of a WAL
        store does; with one, a plain read-only open sees what live writers committed."""
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        wal = self.path.with_name(self.path.name + "-wal")
        return uri if wal.exists() else uri + "&immutable=1"

    def _create_and_upgrade(self) -> None:
        schema.create_and_upgrade(self.db)

    def _check_version(self, db) -> int | None:
        return schema.check_version(db, self.path, self.readonly)

    def _missing(self, db) -> bool:
        return schema.missing(db)

    def _upgrade_in_memory(self, ro) -> None:
        """Read-only open of an older store: copy it into memory and upgrade the copy (the file stays as it is)."""
        mem = sqlite3.connect(":memory:", isolation_level=None)
        ro.backup(mem)
        ro.close()
        self.db = mem
        self._create_and_upgrade()

    def close(self) -> None:
        for beat in self.heartbeats.values():
            beat.stop()
        self.heartbeats.clear()
        self.db.close()

    # --- runs -----------------------------------------------------------------------------------
    def open_run(self, run_id: str, *, model: str, method: str, method_label: str, task: str, mode: str,
                 spec: dict, provenance: dict) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO runs (run_id, created, updated, model, method, method_label, task, mode, status, error, spec, provenance) "
            "VALUES (?,?,?,?,?,?,?,?,'running',NULL,?,?) "
            "ON CONFLICT(run_id) DO UPDATE SET updated=excluded.updated, status='running', error=NULL, provenance=excluded.provenance",
            (run_id, now, now, model, method, method_label, task, mode, json.dumps(spec, sort_keys=True), json.dumps(provenance, sort_keys=True)),
        )

    def finish_run(self, run_id: str, status: str = "done", error: str | None = None) -> None:
        self.db.execute("UPDATE runs SET status=?, error=?, updated=? WHERE run_id=?", (status, error, time.time(), run_id))

    def set_expected(self, run_id: str, expected: dict[str, int]) -> None:
        """Record the turns the whole run owes (example id -> turns), so a store holding every shard's rows,
        e.g. after ``merge_stores``, can tell that a ``partial`` run is complete."""
        self.db.execute("UPDATE runs SET expected=? WHERE run_id=?", (json.dumps(expected, sort_keys=True), run_id))

    def complete(self, run_id: str) -> bool | None:
        """True when every expected (example, turn) of the run is stored; None when the run has no expectation."""
        row = self.db.execute("SELECT expected FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        stored = self.done_turns(run_id)
        return all(len(stored.get(ex, {})) >= n for ex, n in json.loads(row[0]).items())

    def note_mismatch(self, run_id: str, mismatches: list[dict]) -> None:
        """Record stored turns that a resume recomputed differently (the run does not reproduce)."""
        row = self.db.execute("SELECT resume_mismatch FROM runs WHERE run_id=?", (run_id,)).fetchone()
        old = json.loads(row[0]) if row and row[0] else []
        self.db.execute("UPDATE runs SET resume_mismatch=? WHERE run_id=?",
                        (json.dumps(old + mismatches, ensure_ascii=False), run_id))

    def runs(self, *, state: bool = True) -> list[dict]:
        """Every run row. With ``state`` (the default) a ``running`` run whose owner is gone reads
        ``interrupted``, and each row gains ``turns_done``, ``turns_expected`` (None when unknown),
        ``complete`` and ``owner`` (the lease: host, pid, started, heartbeat; None when nobody holds it)."""
        cur = self.db.execute("SELECT * FROM runs ORDER BY created")
        cols = [c[0] for c in cur.description]
        rows = [dict(zip(cols, r)) for r in cur.fetchall()]
        if not state:
            return rows
        done = dict(self.db.execute("SELECT run_id, COUNT(*) FROM turns GROUP BY run_id").fetchall())
        leases = self.leases()
        for r in rows:
            r.setdefault("expected", None)
            r.setdefault("resume_mismatch", None)
            expected = json.loads(r["expected"]) if r["expected"] else None
            r["turns_done"] = done.get(r["run_id"], 0)
            r["turns_expected"] = sum(expected.values()) if expected is not None else None
            owners = leases.get(r["run_id"], [])
            live = [o for o in owners if o["alive"]]
            r["owner"] = (live or owners or [None])[0]
            if r["status"] == "running" and not live:
                r["status"] = "interrupted"
            r["complete"] = r["status"] == "done" and (expected is None or r["turns_done"] >= r["turns_expected"])
        return rows

    def run(self, run_id: str) -> dict:
        rows = [r for r in self.runs() if r["run_id"] == run_id or r["run_id"].startswith(run_id)]
        if not rows:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        if len(rows) > 1:
            raise KeyError(f"run id prefix {run_id!r} is ambiguous in {self.path}")
        return rows[0]

    # --- leases (who computes a run; scbench/leases.py) -----------------------------------------
    def leases(self) -> dict[str, list[dict]]:
        """run_id -> its leases (one per shard) with ``alive`` set."""
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='leases'").fetchone():
            return {}  # a store from before leases, opened read-only
        cur = self.db.execute("SELECT * FROM leases")
        cols = [c[0] for c in cur.description]
        out: dict[str, list[dict]] = {}
        now = time.time()
        for r in cur.fetchall():
            lease = dict(zip(cols, r))
            lease["alive"] = lease_mod.alive(lease, now)
            out.setdefault(lease["run_id"], []).append(lease)
        return out

    def claim(self, run_id: str, shard: str = "") -> dict | None:
        """Take the lease of (run, shard) for this process and start its heartbeat; returns None when taken,
        or the live owner's lease when another process holds it (then nothing changes). A lease whose owner
        is gone (killed, or silent past ``leases.stale_after()``) is taken over."""
        mine = lease_mod.me()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            cur = self.db.execute("SELECT * FROM leases WHERE run_id=? AND shard=?", (run_id, shard))
            row = cur.fetchone()
            if row is not None:
                lease = dict(zip([c[0] for c in cur.description], row))
                ours = lease["host"] == mine["host"] and lease["pid"] == mine["pid"]
                if not ours and lease_mod.alive(lease):
                    self.db.execute("ROLLBACK")
                    return lease
            now = time.time()
            self.db.execute("INSERT OR REPLACE INTO leases VALUES (?,?,?,?,?,?,?)",
                            (run_id, shard, mine["host"], mine["pid"], mine["pstart"], now, now))
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.heartbeats[(run_id, shard)] = lease_mod.Heartbeat(self.path, run_id, shard)
        return None

    def release(self, run_id: str, shard: str = "") -> None:
        """Stop the heartbeat and drop this process's lease of (run, shard)."""
        beat = self.heartbeats.pop((run_id, shard), None)
        if beat is not None:
            beat.stop()
        mine = lease_mod.me()
        self.db.execute("DELETE FROM leases WHERE run_id=? AND shard=? AND host=? AND pid=?",
                        (run_id, shard, mine["host"], mine["pid"]))

    # --- turns ----------------------------------------------------------------------------------
    def put(self, run_id: str, result: TurnResult) -> None:
        stats = dataclasses.asdict(result.stats)
        for c in JSON_STAT_COLUMNS:
            stats[c] = json.dumps(stats[c], sort_keys=True)
        cols = ["run_id", "example_id", "turn", "prediction", "reference", "scores", *STAT_COLUMNS, "created"]
        vals = [run_id, result.example_id, result.turn, result.prediction,
                json.dumps(result.reference, ensure_ascii=False), json.dumps(result.scores),
                *(stats[c] for c in STAT_COLUMNS), time.time()]
        self.db.execute(
            f"INSERT OR REPLACE INTO turns ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", vals
        )

    def done_turns(self, run_id: str) -> dict[str, dict[int, str]]:
        """example_id -> {turn: prediction} of what is stored for the run."""
        out: dict[str, dict[int, str]] = {}
        for ex, turn, pred in self.db.execute("SELECT example_id, turn, prediction FROM turns WHERE run_id=?", (run_id,)):
            out.setdefault(ex, {})[turn] = pred
        return out

    def turns(self, run_id: str | None = None, *, variant: str | None = None) -> list[dict[str, Any]]:
        """The turn rows (JSON columns decoded). With ``variant``, a row re-scored under that task variant carries
        those scores instead of its own, and ``scores_variant`` names it (None on rows with their own scores)."""
        q = "SELECT * FROM turns" + (" WHERE run_id=?" if run_id else "") + " ORDER BY run_id, example_id, turn"
        cur = self.db.execute(q, (run_id,) if run_id else ())
        cols = [c[0] for c in cur.description]
        rescored = self.rescores(variant, run_id) if variant is not None else {}
        rows = []
        for r in cur.fetchall():
            d = dict(zip(cols, r))
            d["reference"] = json.loads(d["reference"])
            d["scores"] = json.loads(d["scores"])
            for c in JSON_STAT_COLUMNS:
                d[c] = json.loads(d[c]) if d.get(c) else {}
            key = (d["run_id"], d["example_id"], d["turn"])
            d["scores_variant"] = variant if key in rescored else None
            d["scores"] = rescored.get(key, d["scores"])
            rows.append(d)
        return rows

    def update_scores(self, run_id: str, example_id: str, turn: int, scores: dict) -> None:
        """Replace a turn's own scores (a re-score with the run's own task variant, e.g. after a scorer fix)."""
        self.db.execute("UPDATE turns SET scores=? WHERE run_id=? AND example_id=? AND turn=?",
                        (json.dumps(scores), run_id, example_id, turn))

    def put_rescore(self, run_id: str, example_id: str, turn: int, variant: str, scores: dict) -> None:
        """Store a turn's scores under another task variant, beside its own (replacing an earlier re-score of
        that variant); the turn row and the run's spec are not touched."""
        self.db.execute("INSERT OR REPLACE INTO rescores VALUES (?,?,?,?,?,?)",
                        (run_id, example_id, turn, variant, json.dumps(scores), time.time()))

    def rescores(self, variant: str, run_id: str | None = None) -> dict[tuple[str, str, int], dict]:
        """(run_id, example_id, turn) -> scores of the re-scores under ``variant`` (of one run, or all)."""
        q = "SELECT run_id, example_id, turn, scores FROM rescores WHERE variant=?" + (" AND run_id=?" if run_id else "")
        return {(r, e, t): json.loads(s) for r, e, t, s in self.db.execute(q, (variant, run_id) if run_id else (variant,))}

    # --- failures and merging (sweeps, shards) ---------------------------------------------------
    def record_failure(self, run_id: str, *, spec: dict, error: str) -> None:
        """Mark ``run_id`` failed with ``error``; creates the run row from ``spec`` when the run never opened
        (a bad config, or a crash while the model loaded), keeping its stored turns otherwise."""
        now = time.time()
        method = spec.get("method") if isinstance(spec.get("method"), dict) else {}
        model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
        mode = spec.get("mode")
        self.db.execute(
            "INSERT INTO runs (run_id, created, updated, model, method, method_label, task, mode, status, error, spec, provenance) "
            "VALUES (?,?,?,?,?,?,?,?,'failed',?,?,?) "
            "ON CONFLICT(run_id) DO UPDATE SET updated=excluded.updated, status='failed', error=excluded.error",
            (run_id, now, now, str(model.get("name") or model.get("path") or "?"), str(method.get("name") or "?"),
             str(method.get("name") or "?"), str(spec.get("task") or "?"), str(mode if mode is not None else "?"),
             error, json.dumps(spec, sort_keys=True, default=str), json.dumps({}, sort_keys=True)),
        )


# columns that differ between two honest runs of the same turn (timings, wall clock); not a conflict
VOLATILE_TURN_COLUMNS = {"created", "decode_tok_s", "decode_path", "decode_kernel", "peak_mem_bytes",
                         *(c for c in STAT_COLUMNS if c.endswith("_s"))}
