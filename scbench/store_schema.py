"""The results store's schema: tables, versions, and the upgrades a writable open applies (``scbench.store.Store``).

Schema v1 stores (method costs as flat columns) are migrated on open (``migrate_v1``); stores written by an older
scbench of the current version get the nullable columns added since (``add_missing_columns``).
"""
from __future__ import annotations

import dataclasses
import json

from scbench import RESULTS_SCHEMA_VERSION
from scbench.records import TurnStats

STAT_COLUMNS = [f.name for f in dataclasses.fields(TurnStats)]


JSON_STAT_COLUMNS = {"method_costs", "device_bytes"}
"""TurnStats fields stored as JSON text (dicts)."""


def _stat_type(column: str) -> str:
    """SQLite type of a TurnStats column: times and rates REAL, labels and JSON TEXT, counts INTEGER."""
    kind = {f.name: f.type for f in dataclasses.fields(TurnStats)}[column].removesuffix(" | None")
    return "REAL" if kind == "float" else "TEXT" if kind == "str" or column in JSON_STAT_COLUMNS else "INTEGER"


LEGACY_METHOD_COLUMNS = {
    "index_recall": ("retrieval_attention",), "index_build_s": ("retrieval_attention",),
    "index_bytes": ("retrieval_attention",),
    "context_rate": ("ppl_compress", "llmlingua2"), "context_compress_s": ("ppl_compress", "llmlingua2"),
    "recompute_frac": ("cacheblend",), "chunk_kv_s": ("cacheblend",), "prefill_saved_s": ("cacheblend",),
}
"""Schema v1's flat method-cost columns of the turns table -> the methods that measured them (the rest of the
rows hold the column's default). The v1 -> v2 migration moves a row's values into its ``method_costs``."""


SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    created REAL, updated REAL,
    model TEXT, method TEXT, method_label TEXT, task TEXT, mode TEXT,
    status TEXT, error TEXT,
    spec TEXT, provenance TEXT,
    expected TEXT
);
CREATE TABLE IF NOT EXISTS turns (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    example_id TEXT NOT NULL,
    turn INTEGER NOT NULL,
    prediction TEXT,
    reference TEXT,
    scores TEXT,
    {", ".join(f"{c} {_stat_type(c)}" for c in STAT_COLUMNS)},
    created REAL,
    PRIMARY KEY (run_id, example_id, turn)
);
CREATE TABLE IF NOT EXISTS rescores (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    example_id TEXT NOT NULL,
    turn INTEGER NOT NULL,
    variant TEXT NOT NULL,
    scores TEXT,
    created REAL,
    PRIMARY KEY (run_id, example_id, turn, variant)
);
"""


class StoreError(ValueError):
    """A results store that is corrupt or of another schema version (one line, naming the file)."""


class NoStore(FileNotFoundError):
    """No results store at the path a command only reads."""


LEASES = """
CREATE TABLE IF NOT EXISTS leases (
    run_id TEXT NOT NULL, shard TEXT NOT NULL,
    host TEXT, pid INTEGER, pstart REAL, started REAL, heartbeat REAL,
    PRIMARY KEY (run_id, shard)
);
"""
RUN_COLUMNS = {"expected": "TEXT", "resume_mismatch": "TEXT"}
"""Columns added to ``runs`` after schema v1 first shipped (nullable; added to older stores on a write open)."""
READABLE_VERSIONS = {1, RESULTS_SCHEMA_VERSION}
"""Schema versions this scbench opens (v1 is migrated on a writable open, read through a migrated copy otherwise)."""


def create_and_upgrade(db) -> None:
    # tables and version row in one transaction: a second job opening the new store never sees a meta table
    # without its schema_version (it read "results schema v?" and failed)
    db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}{LEASES}\nINSERT OR IGNORE INTO meta VALUES "
                          f"('schema_version', '{RESULTS_SCHEMA_VERSION}');\nCOMMIT;")
    row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if int(row[0]) == 1:
        migrate_v1(db)
    add_missing_columns(db)


def check_version(db, path, readonly: bool) -> int | None:
    """The store's schema version (None: an empty new file); refuses, before anything is written, a file that
    is not a results store or a store of a schema this scbench cannot read or migrate."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "meta" not in tables:
        if tables:
            raise StoreError(f"{path}: not a results store (tables: {', '.join(sorted(tables))})")
        if readonly:
            raise StoreError(f"{path}: an empty file, not a results store")
        return None
    row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    version = int(row[0]) if row is not None and str(row[0]).isdigit() else None
    if version not in READABLE_VERSIONS:
        raise StoreError(f"{path}: results schema v{row[0] if row else '?'}, this scbench reads "
                         f"v{'/v'.join(map(str, sorted(READABLE_VERSIONS)))} and writes v{RESULTS_SCHEMA_VERSION}; "
                         "use the scbench that wrote it")
    return version


def missing(db) -> bool:
    """Whether a store lacks tables or columns this scbench adds on a writable open."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"runs", "turns", "rescores", "leases"} <= tables:
        return True
    have = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
    have_turns = {r[1] for r in db.execute("PRAGMA table_info(turns)")}
    return not (set(RUN_COLUMNS) <= have and set(STAT_COLUMNS) <= have_turns)


def migrate_v1(db) -> None:
    """Schema v1 -> v2, in one transaction: each turn's flat method-cost columns (LEGACY_METHOD_COLUMNS) become
    its ``method_costs`` JSON (the columns its run's method measured; a NULL, written before the column
    existed, is left out and reads as the default), then the flat columns are dropped."""
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if int(row[0]) == 1:  # not migrated meanwhile by another process
            have = {r[1] for r in db.execute("PRAGMA table_info(turns)")}
            if "method_costs" not in have:
                db.execute("ALTER TABLE turns ADD COLUMN method_costs TEXT")
            legacy = [c for c in LEGACY_METHOD_COLUMNS if c in have]
            if legacy:
                cur = db.execute(
                    f"SELECT t.rowid, r.method, {', '.join('t.' + c for c in legacy)} "
                    "FROM turns t LEFT JOIN runs r ON r.run_id = t.run_id")
                for rowid, method, *values in cur.fetchall():
                    costs = {c: v for c, v in zip(legacy, values)
                             if method in LEGACY_METHOD_COLUMNS[c] and v is not None}
                    db.execute("UPDATE turns SET method_costs=? WHERE rowid=?",
                               (json.dumps(costs, sort_keys=True), rowid))
                for c in legacy:
                    db.execute(f"ALTER TABLE turns DROP COLUMN {c}")
            db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(RESULTS_SCHEMA_VERSION),))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def add_missing_columns(db) -> None:
    """Stores written by an older scbench of the same schema version lack columns added since (new cost
    columns are nullable additions): add them, so old stores stay readable and resumable."""
    want = {"runs": RUN_COLUMNS,
            "turns": {c: _stat_type(c) for c in STAT_COLUMNS}}
    absent = lambda table: {c: k for c, k in want[table].items()  # noqa: E731
                            if c not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}}
    if not any(absent(t) for t in want):
        return
    db.execute("BEGIN IMMEDIATE")  # two jobs opening one new store at once: the second sees the first's columns
    try:
        for table in want:
            for col, kind in absent(table).items():
                db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {kind}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
