"""Leaderboard tables from the results store: score per task per turn, category averages, cost columns.

One row per run and metric: runs that collide on (model, method, task, mode) are told apart by their ``setting``
(scbench/report/trust.py), never pooled. Every cost column is a per-turn value aggregated over the run's turns and
examples the way the JSON export aggregates the examples of one turn (``mean``: a per-turn mean; ``max``: the
largest), and its header says which (``cost_header``), the same header in md, csv and html. Scores carry seeded
bootstrap 95 % intervals over examples (``T1 ci95`` ..., ``avg ci95``), the share of turns flagged ``capped`` /
``unfired`` (scbench/checks.py) and n."""
from __future__ import annotations

import json

import pandas as pd

from scbench.registry import TASKS
from scbench.report import costs as method_costs
from scbench.report import payback
from scbench.report import trust

COST_COLUMNS = {  # the universal columns: turn_frame column -> (leaderboard name, aggregation over a run's turns)
    "prefill_computed": ("prefill tok computed", "mean"),
    "prefill_reused": ("prefill tok reused", "mean"),
    "ttft_s": ("TTFT s", "mean"),
    "decode_tok_s": ("decode tok/s", "mean"),
    "kv_mib": ("KV MiB", "mean"),
    "kv_ratio": ("KV vs full", "mean"),
    "state_mib": ("state MiB", "mean"),
    "attn_density": ("prefill density", "mean"),
    "peak_mib": ("peak MiB", "max"),
}


def cost_header(label: str, how: str) -> str:
    """A cost column's header everywhere (md, csv, html): the name and what it aggregates, e.g. ``TTFT s (mean/turn)``."""
    return f"{label} ({how}/turn)"


def method_columns() -> dict[str, tuple[str, str, object]]:
    """The declared method-specific costs that have a leaderboard ``label``: column -> (header, aggregation, default),
    aggregated as the export does (``Cost.agg``). Each is shown only where some row differs from its default."""
    return {col: (c.label, c.agg, c.default)
            for col, c in method_costs.declared_costs().items() if c.label is not None}


def turn_frame(store, variant: str | None = None, include_incomplete: bool = True) -> pd.DataFrame:
    """One row per (run, example, turn, metric) with the run's labels and the cost columns; ``variant``: scores
    re-scored under that task variant where stored (``Store.turns``); without ``include_incomplete`` only the
    turns of complete runs."""
    runs = {r["run_id"]: r for r in store.runs()}
    setting = trust.settings(list(runs.values()))
    extra = method_columns()
    rows = []
    for t in store.turns(variant=variant):
        run = runs[t["run_id"]]
        if not (include_incomplete or run["complete"]):
            continue
        spec = json.loads(run["spec"])
        engine = (spec.get("engine") or {}).get("name")  # only non-hf runs carry it: their rows say so
        model = f"{run['model']} [{engine}]" if engine and engine != "hf" else run["model"]
        mc = method_costs.values(t["method_costs"])
        variant_label = t["scores_variant"] or spec.get("task_variant") or "faithful"
        for metric, value in t["scores"].items():
            rows.append({
                "run_id": t["run_id"], "model": model, "method": run["method_label"], "setting": setting[t["run_id"]],
                "task": run["task"], "variant": variant_label, "flags": t.get("flags") or "", "mode": run["mode"], "metric": metric,
                "example": t["example_id"], "turn": t["turn"] + 1, "score": 100.0 * float(value),
                "status": run["status"], "turns": completeness(run),
                "prefill_computed": t["prefill_computed"], "prefill_reused": t["prefill_reused"],
                "ttft_s": t["ttft_s"], "decode_tok_s": t["decode_tok_s"], "kv_mib": t["kv_bytes"] / 2**20,
                "kv_ratio": t["kv_bytes"] / t["kv_full_bytes"] if t["kv_full_bytes"] else float("nan"),
                "state_mib": (t.get("state_bytes") or 0) / 2**20,
                "attn_density": t["attn_density"], "peak_mib": float("nan") if t["peak_mem_bytes"] is None else t["peak_mem_bytes"] / 2**20,
                **{c: default if mc.get(c) is None else mc[c] for c, (_, _, default) in extra.items()},
            })
    return pd.DataFrame(rows)


def completeness(run: dict) -> str:
    """``turns done/expected`` of a run (``?`` when the run never recorded what it expects)."""
    return f"{run['turns_done']}/{'?' if run['turns_expected'] is None else run['turns_expected']}"


def incomplete_runs(store) -> pd.DataFrame:
    """The runs that are not complete (failed, interrupted, running, partial): status and turns done/expected."""
    rows = [{"run_id": r["run_id"], "model": r["model"], "method": r["method_label"], "task": r["task"],
             "mode": r["mode"], "status": r["status"], "turns": completeness(r)}
            for r in store.runs() if not r["complete"]]
    return pd.DataFrame(rows)


def leaderboard(store, variant: str | None = None, include_incomplete: bool = False) -> pd.DataFrame:
    """Rows: model x method x mode x task(/metric); columns: T1..Tn, avg, n, status, turns (done/expected), cost
    columns, and where a compressing run has a full-attention baseline in the store the queries it needs to pay back
    its one-time compression (``extra once s``, ``saving/query s``, ``queries to pay back``: scbench/report/payback.py;
    inf: never) (``variant``: see ``turn_frame``). Runs that are not complete stay out unless ``include_incomplete``."""
    df = turn_frame(store, variant, include_incomplete)
    if df.empty:
        return df
    keys = ["model", "method", "setting", "mode", "task", "variant", "metric"]
    # cost columns are per turn, not per metric: count each turn once
    per_turn = df.drop_duplicates(["run_id", "example", "turn"])
    scores = df.pivot_table(index=keys, columns="turn", values="score", aggfunc="mean")
    turns = list(scores.columns)
    scores.columns = [f"T{c}" for c in turns]
    scores["avg"] = df.groupby(keys)["score"].mean()
    cis = {}
    for key, g in df.groupby(keys):
        row = {f"T{t}": g[g["turn"] == t].groupby("example")["score"].mean() for t in turns}
        row["avg"] = g.groupby("example")["score"].mean()
        cis[key] = {f"{c} ci95": _ci_text(trust.bootstrap_ci(v.tolist())) for c, v in row.items()}
    ci = pd.DataFrame.from_dict(cis, orient="index")
    ci.index = pd.MultiIndex.from_tuples(ci.index, names=keys)
    order = [c for t in turns for c in (f"T{t}", f"T{t} ci95")] + ["avg", "avg ci95"]
    scores = scores.join(ci)[order]
    scores["n"] = df.groupby(keys)["example"].nunique()
    for flag in ("capped", "unfired"):
        scores[f"{flag} %"] = df.groupby(keys)["flags"].apply(lambda f, flag=flag: 100.0 * trust.flag_share(
            [{"flags": x} for x in f], flag))
    runs = df.drop_duplicates("run_id").groupby(keys)
    scores["status"] = runs["status"].agg(lambda v: ",".join(sorted(set(v))))
    scores["turns"] = runs["turns"].agg(lambda v: " ".join(v))
    columns = {**COST_COLUMNS, **{col: (label, how) for col, (label, how, _) in method_columns().items()}}
    costs = per_turn.groupby(keys[:6]).agg(**{cost_header(label, how): (col, how) for col, (label, how) in columns.items()})
    out = scores.reset_index().merge(costs.reset_index(), on=keys[:6], how="left")
    pb = payback.paybacks(store, include_incomplete)
    if pb:  # one-time compression vs full attention (scbench/report/payback.py): per run, so once per row
        per_run = df.drop_duplicates("run_id")[["run_id", *keys[:6]]].copy()
        for f in payback.FIELDS:
            per_run[payback.LABELS[f]] = [float("nan") if pb.get(r, {}).get(f) is None else pb[r][f]
                                          for r in per_run["run_id"]]
        cols = [payback.LABELS[f] for f in payback.FIELDS]
        out = out.merge(per_run.groupby(keys[:6])[cols].mean().reset_index(), on=keys[:6], how="left")
    out.insert(5, "category", out["task"].map(_category))
    if not (per_turn["state_mib"] > 0).any():  # recurrent state column only where a model has one
        out = out.drop(columns=cost_header(*COST_COLUMNS["state_mib"]))
    for col, (label, how, default) in method_columns().items():
        if (per_turn[col].isna() if default is None else per_turn[col] == default).all():
            out = out.drop(columns=cost_header(label, how))
    if not (out["setting"] != "").any():
        out = out.drop(columns="setting")
    return out.sort_values(["model", "mode", "category", "task", "metric", "method"]).reset_index(drop=True)


def _ci_text(ci) -> str:
    lo, hi = ci
    return "" if lo is None else f"[{lo:.1f}, {hi:.1f}]"


def category_averages(board: pd.DataFrame, store=None, variant: str | None = None,
                      include_incomplete: bool = False) -> pd.DataFrame:
    """Mean of the task averages per model x method (x setting) x mode x category, plus an overall mean; with
    ``store``, a seeded bootstrap 95 % interval per category (examples resampled within each task) and n."""
    if board.empty:
        return board
    keys = ["model", "method", *(["setting"] if "setting" in board else []), "mode"]
    cat = board.groupby(keys + ["category"])["avg"].mean().unstack("category")
    categories = list(cat.columns)
    cat["overall"] = board.groupby(keys)["avg"].mean()
    if store is not None:
        df = turn_frame(store, variant, include_incomplete)
        df["category"] = df["task"].map(_category)
        if "setting" not in keys:
            df = df.drop(columns="setting")
        for c in categories:
            col = {}
            for key, g in df[df["category"] == c].groupby(keys):
                groups = [t.groupby("example")["score"].mean().tolist() for _, t in g.groupby(["task", "metric"])]
                col[key] = _ci_text(trust.stratified_ci(groups))
                col[key] += f" n={g['example'].nunique()}"
            cat[f"{c} ci95"] = pd.Series(col)
        cat = cat[[x for c in categories for x in (c, f"{c} ci95")] + ["overall"]]
    return cat.reset_index()


def _category(task: str) -> str:
    try:
        return TASKS.get(task).category
    except KeyError:
        return "unknown"


def to_markdown(df: pd.DataFrame, floatfmt: str = "{:.1f}") -> str:
    if df.empty:
        return "(no results)"
    cols = list(df.columns)

    def fmt(v):
        if isinstance(v, float):
            if v != v:
                return "-"
            return f"{v:.3f}" if abs(v) < 1 and v != 0 else floatfmt.format(v)
        return str(v)

    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
