"""``scbench merge``: per-shard (or per-node) results stores merged into one, conflicts reported."""
from __future__ import annotations

import json
from pathlib import Path

from scbench.store import JSON_STAT_COLUMNS, VOLATILE_TURN_COLUMNS, Store

TURN_KEY = ("run_id", "example_id", "turn")


def _stable(column: str, value):
    """A turn column's value as merge compares it: a JSON column without its timings (keys ending in ``_s``)."""
    if column in JSON_STAT_COLUMNS and value:
        return {k: v for k, v in json.loads(value).items() if not k.endswith("_s")}
    return value


def merge_stores(out: str | Path, inputs: list[str | Path]) -> dict:
    """Merge per-shard (or per-node) stores into ``out`` (created or extended).

    Runs: one row per run id; a run is ``done`` in the output when any input has it done or when the output
    holds every turn the run expects (per-shard stores of one run: each shard alone is ``partial``), else the
    most recently updated status wins. Turns: keyed by (run, example, turn); an identical row (up to timings) is
    deduplicated, a row whose prediction, reference, scores or token counts differ is a conflict: the first
    one seen is kept and the conflict is reported. Re-scores (``rescores``) are copied the same way. Inputs are
    opened read-only and never changed (one of an older schema is read through a migrated copy in memory).
    Returns counts and the list of conflicts.
    """
    for path in inputs:  # every input is checked before the output is created or touched
        if Path(path).resolve() == Path(out).resolve():
            raise ValueError(f"merge: input {path} is the output store")
        Store(path, readonly=True).close()
    target = Store(out)
    report = {"runs_added": 0, "turns_added": 0, "duplicates": 0, "conflicts": []}
    try:
        cols = [r[1] for r in target.db.execute("PRAGMA table_info(turns)")]
        run_cols = [r[1] for r in target.db.execute("PRAGMA table_info(runs)")]
        for path in inputs:
            src = Store(path, readonly=True)
            try:
                target.db.execute("BEGIN IMMEDIATE")
                for run in src.runs(state=False):
                    have = target.db.execute("SELECT status, updated FROM runs WHERE run_id=?", (run["run_id"],)).fetchone()
                    if have is None:
                        target.db.execute(f"INSERT INTO runs ({', '.join(run_cols)}) VALUES ({', '.join('?' * len(run_cols))})",
                                          [run.get(c) for c in run_cols])
                        report["runs_added"] += 1
                    elif have[0] != "done" and (run["status"] == "done" or (run["updated"] or 0) > (have[1] or 0)):
                        target.db.execute("UPDATE runs SET status=?, error=?, updated=? WHERE run_id=?",
                                          (run["status"], run["error"], run["updated"], run["run_id"]))
                    if run.get("expected"):
                        target.db.execute("UPDATE runs SET expected=? WHERE run_id=? AND expected IS NULL",
                                          (run["expected"], run["run_id"]))
                have = {r[1] for r in src.db.execute("PRAGMA table_info(turns)")}  # an older input lacks new columns
                src_cols = [c for c in cols if c in have]
                cur = src.db.execute(f"SELECT {', '.join(src_cols)} FROM turns")
                for got in cur:
                    rec = {c: None for c in cols} | dict(zip(src_cols, got))
                    row = [rec[c] for c in cols]
                    key = tuple(rec[k] for k in TURN_KEY)
                    old = target.db.execute(f"SELECT {', '.join(cols)} FROM turns WHERE run_id=? AND example_id=? AND turn=?", key).fetchone()
                    if old is None:
                        target.db.execute(f"INSERT INTO turns ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", row)
                        report["turns_added"] += 1
                        continue
                    old = dict(zip(cols, old))
                    diff = sorted(c for c in cols
                                  if c not in VOLATILE_TURN_COLUMNS and _stable(c, old[c]) != _stable(c, rec[c]))
                    if diff:
                        report["conflicts"].append({"run_id": key[0], "example_id": key[1], "turn": key[2],
                                                    "columns": diff, "source": str(path)})
                    else:
                        report["duplicates"] += 1
                for row in src.db.execute("SELECT run_id, example_id, turn, variant, scores, created FROM rescores"):
                    have = target.db.execute("SELECT scores FROM rescores WHERE run_id=? AND example_id=? AND turn=? "
                                             "AND variant=?", row[:4]).fetchone()
                    if have is None:
                        target.db.execute("INSERT INTO rescores VALUES (?,?,?,?,?,?)", row)
                    elif have[0] != row[4]:
                        report["conflicts"].append({"run_id": row[0], "example_id": row[1], "turn": row[2],
                                                    "columns": [f"rescores[{row[3]}]"], "source": str(path)})
                for (run_id,) in target.db.execute("SELECT run_id FROM runs WHERE status='partial'").fetchall():
                    if target.complete(run_id):  # every shard's rows are in now
                        target.db.execute("UPDATE runs SET status='done', error=NULL WHERE run_id=?", (run_id,))
                        report.setdefault("completed", []).append(run_id)
                target.db.execute("COMMIT")
            except BaseException:
                if target.db.in_transaction:
                    target.db.execute("ROLLBACK")
                raise
            finally:
                src.close()
    finally:
        target.close()
    return report
