"""Compact text tables for the terminal: the end-of-run (and end-of-sweep) table and ``scbench ls runs``.

Plain Python over the store rows (no pandas), so they print in milliseconds after a run.
"""
from __future__ import annotations

import json
import time

from scbench.records import Example, Turn


def turn_budget(task, turn: dict, cap: int | None) -> int | None:
    """The generation budget the turn had: the task's (per sub-task for mixed tasks), capped by ``max_new_tokens``."""
    ref = turn["reference"] if isinstance(turn["reference"], dict) else {}
    index = turn["turn"]
    fake = Turn(input="", answer=ref.get("answer"), extra=ref.get("turn_extra") or {})
    example = Example(id=str(turn["example_id"]), context="", turns=(fake,) * (index + 1),
                      extra=ref.get("example_extra") or {})
    try:
        n = task.turn_max_new_tokens(example, index)
    except (ValueError, KeyError):
        return cap
    return min(n, cap) if cap else n


def run_rows(store, run_ids: list[str]) -> list[dict]:
    """One summary dict per run: labels, score per turn and average, n, capped share and mean costs."""
    from scbench.registry import TASKS
    from scbench.report.export import method_budget

    out = []
    known = {r["run_id"]: r for r in store.runs()}
    for run_id in run_ids:
        run = known.get(run_id)
        if run is None:
            continue
        spec = json.loads(run["spec"] or "{}")
        turns = store.turns(run["run_id"])
        try:
            task = TASKS.get(run["task"])
        except KeyError:
            task = None
        per_turn: dict[int, list[float]] = {}
        capped = 0
        for t in turns:
            vals = [float(v) for v in t["scores"].values()]
            per_turn.setdefault(t["turn"] + 1, []).append(100 * sum(vals) / len(vals) if vals else 0.0)
            budget = turn_budget(task, t, spec.get("max_new_tokens")) if task else None
            capped += bool(budget and (t["decode_tokens"] or 0) >= budget)
        n = len(turns)

        def mean(col):
            vals = [t[col] for t in turns if t[col] is not None]
            return sum(vals) / len(vals) if vals else None

        kv = [t["kv_bytes"] / t["kv_full_bytes"] for t in turns if t["kv_full_bytes"]]
        method = spec.get("method") if isinstance(spec.get("method"), dict) else {"name": run["method"]}
        out.append({
            "run_id": run["run_id"], "model": run["model"] or "?", "task": str(run["task"]).removeprefix("scbench_"),
            "mode": str(run["mode"]), "method": str(method.get("name", run["method"])), "budget": method_budget(method),
            "status": run["status"],
            "turns": {k: sum(v) / len(v) for k, v in sorted(per_turn.items())},
            "avg": sum(sum(v) for v in per_turn.values()) / n if n else None,
            "n": len({t["example_id"] for t in turns}), "n_turns": n, "capped": capped / n if n else None,
            "computed": sum(t["prefill_computed"] or 0 for t in turns),
            "reused": sum(t["prefill_reused"] or 0 for t in turns),
            "ttft": mean("ttft_s"), "tok_s": mean("decode_tok_s"), "kv": sum(kv) / len(kv) if kv else None,
        })
    return out


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    width = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, width)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in width]), *map(line, rows)])


def summary_table(store, run_ids: list[str]) -> str:
    """The end-of-run table: one line per run (task, mode, method), score per turn, average, n, capped share,
    prefill tokens computed / reused, mean TTFT, decode tok/s and KV bytes vs full; the model(s) on top."""
    rows = run_rows(store, run_ids)
    if not rows:
        return "(no runs)"
    n_turns = max((max(r["turns"], default=0) for r in rows), default=0)
    header = ["task", "mode", "method", "budget", *(f"T{i}" for i in range(1, n_turns + 1)), "avg", "n", "capped",
              "computed", "reused", "TTFT s", "tok/s", "KV/full"]
    body = [[r["task"], r["mode"], r["method"], r["budget"], *(_fmt(r["turns"].get(i)) for i in range(1, n_turns + 1)),
             _fmt(r["avg"]), str(r["n"]), "-" if r["capped"] is None else f"{100 * r['capped']:.0f}%",
             str(r["computed"]), str(r["reused"]), _fmt(r["ttft"], ".2f"), _fmt(r["tok_s"]), _fmt(r["kv"], ".2f")]
            for r in rows]
    if any(r["status"] != "done" for r in rows):  # a sweep's failed (or partial) jobs say so
        header.append("status")
        for line, r in zip(body, rows):
            line.append(r["status"] or "?")
    models = sorted({r["model"] for r in rows})
    head = f"model: {', '.join(models)}   store: {store.path}   scores 0-100, capped: turns that hit the token budget"
    return head + "\n" + _table(header, body)


def spec_changes(spec: dict, defaults: dict) -> str:
    """The spec's settings that differ from ``defaults`` (the root config), as ``key=value`` pairs
    (model, method and task are shown in their own columns)."""
    out = []

    def walk(prefix, value, default):
        if isinstance(value, dict) and isinstance(default, dict):
            for k in sorted(value):
                walk(f"{prefix}{k}.", value[k], default.get(k, object()))
        elif value != default:
            out.append(f"{prefix.rstrip('.')}={value}")

    flat = {k: v for k, v in spec.items() if k not in ("model", "method", "task", "mode", "engine")}
    for key in ("compress", "query_visible", "sparse_prefill", "truncation"):  # the root config nests these under policy
        defaults = {**defaults, key: (defaults.get("policy") or {}).get(key)}
    defaults = {**defaults, "task_variant": None}
    walk("", flat, defaults)
    if spec.get("engine"):
        out.append(f"engine={spec['engine'].get('name')}")
    return " ".join(out)


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def runs_listing(store, defaults: dict, now: float | None = None, note=None) -> str:
    """``scbench ls runs``: id, status, task, mode, score, n (examples), turns (stored / expected), model, method,
    age, settings that differ from ``defaults``, and ``note(run)`` (who holds a running run) plus RESUME MISMATCH
    where a resumed run's replay differed from its stored turns, the count of turns flagged unfired / capped
    (scbench/checks.py) and, for runs that collide on model, method, task and mode, ``setting:`` what differs."""
    now = time.time() if now is None else now
    runs = store.runs()
    if not runs:
        return f"no runs in {store.path}"
    rows = {r["run_id"]: r for r in run_rows(store, [r["run_id"] for r in runs])}
    from scbench.report.trust import settings

    collide = settings(runs)  # what tells runs of the same model, method, task and mode apart
    body = []
    for run in runs:
        r = rows[run["run_id"]]
        spec = json.loads(run["spec"] or "{}")
        done_turns = run.get("turns_done", r["n_turns"])
        turns = f"{done_turns}/{'?' if run.get('turns_expected') is None else run['turns_expected']}"
        flags = [f for t in store.turns(run["run_id"]) for f in (t.get("flags") or "").split(",") if f]
        extra = [note(run) if note else "", "RESUME MISMATCH" if run.get("resume_mismatch") else "",
                 *(f"{f}={flags.count(f)}" for f in ("unfired", "capped") if f in flags),
                 f"setting: {collide[run['run_id']]}" if collide.get(run["run_id"]) else ""]
        body.append([run["run_id"][:12], run["status"] or "?", r["task"], r["mode"], _fmt(r["avg"]), str(r["n"]), turns,
                     run["model"], f"{r['method']}({r['budget']})" if r["budget"] != "full" else r["method"],
                     age(now - (run["updated"] or run["created"] or now)),
                     " ".join(filter(None, [spec_changes(spec, defaults) or "-", *extra]))])
    header = ["run", "status", "task", "mode", "score", "n", "turns", "model", "method", "age", "settings (vs default)"]
    width = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, width)).rstrip()
                     for cells in [header, ["-" * w for w in width], *body])
