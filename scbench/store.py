"""Results store: one SQLite file (WAL), one row per run and one row per (run, example, turn).

Each finished turn is committed at once, so a crash or kill loses nothing finished, and a re-launch
of the same run (same resolved spec, hence the same run id) skips what is stored.
"""
from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from scbench import RESULTS_SCHEMA_VERSION
from scbench.records import TurnResult, TurnStats

STAT_COLUMNS = [f.name for f in dataclasses.fields(TurnStats)]

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created REAL, updated REAL,
    model TEXT, method TEXT, method_label TEXT, task TEXT, mode TEXT,
    status TEXT, error TEXT,
    spec TEXT, provenance TEXT
);
CREATE TABLE IF NOT EXISTS turns (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    example_id TEXT NOT NULL,
    turn INTEGER NOT NULL,
    prediction TEXT,
    reference TEXT,
    scores TEXT,
    {", ".join(f"{c} {'REAL' if c.endswith('_s') or c == 'decode_tok_s' else 'INTEGER'}" for c in STAT_COLUMNS)},
    created REAL,
    PRIMARY KEY (run_id, example_id, turn)
);
"""


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA busy_timeout=60000")
        self.db.executescript(SCHEMA)
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(RESULTS_SCHEMA_VERSION),))
        elif int(row[0]) != RESULTS_SCHEMA_VERSION:
            raise ValueError(f"{self.path}: results schema v{row[0]}, this scbench writes v{RESULTS_SCHEMA_VERSION}")

    def close(self) -> None:
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

    def runs(self) -> list[dict]:
        cur = self.db.execute("SELECT * FROM runs ORDER BY created")
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def run(self, run_id: str) -> dict:
        rows = [r for r in self.runs() if r["run_id"] == run_id or r["run_id"].startswith(run_id)]
        if not rows:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        if len(rows) > 1:
            raise KeyError(f"run id prefix {run_id!r} is ambiguous in {self.path}")
        return rows[0]

    # --- turns ----------------------------------------------------------------------------------
    def put(self, run_id: str, result: TurnResult) -> None:
        stats = dataclasses.asdict(result.stats)
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

    def turns(self, run_id: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT * FROM turns" + (" WHERE run_id=?" if run_id else "") + " ORDER BY run_id, example_id, turn"
        cur = self.db.execute(q, (run_id,) if run_id else ())
        cols = [c[0] for c in cur.description]
        rows = []
        for r in cur.fetchall():
            d = dict(zip(cols, r))
            d["reference"] = json.loads(d["reference"])
            d["scores"] = json.loads(d["scores"])
            rows.append(d)
        return rows

    def update_scores(self, run_id: str, example_id: str, turn: int, scores: dict) -> None:
        self.db.execute("UPDATE turns SET scores=? WHERE run_id=? AND example_id=? AND turn=?",
                        (json.dumps(scores), run_id, example_id, turn))
