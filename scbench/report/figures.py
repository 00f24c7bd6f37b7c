"""Figures from export records (matplotlib, headless): per-turn score curves, accuracy vs KV budget,
accuracy vs resident KV bytes with the Pareto front, and accuracy vs each method-specific cost that the records
measure (from the methods' ``Cost`` declarations). Used by ``scbench plot`` and the HTML page."""
from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records, key_fn, x_fn, y_fn=lambda r: r["score"]):
    """key -> sorted [(x, mean y)] over the records."""
    acc = defaultdict(lambda: defaultdict(list))
    for r in records:
        x, y = x_fn(r), y_fn(r)
        if x is None or y is None:
            continue
        acc[key_fn(r)][x].append(y)
    return {k: sorted((x, sum(v) / len(v)) for x, v in pts.items()) for k, pts in sorted(acc.items())}


def turn_curves(records):
    """Grid of panels, rows = SCBench task categories, columns = modes: mean score per turn, one line per
    method x budget (averaged over the tasks of the category)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    modes = sorted({r["mode"] for r in records}) or ["-"]
    cats = sorted({r["category"] for r in records}) or ["-"]
    fig, axes = plt.subplots(len(cats), len(modes), figsize=(4.6 * len(modes), 3.0 * len(cats)), squeeze=False)
    for row, cat in zip(axes, cats):
        for ax, mode in zip(row, modes):
            series = _series([r for r in records if r["mode"] == mode and r["category"] == cat],
                             lambda r: r['method'] if r['budget'] == 'full' else f"{r['method']} {r['budget']}", lambda r: r["turn"])
            for label, pts in series.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_title(f"{cat} / {mode}", fontsize=9)
            ax.set(xlabel="turn", ylabel="score (0-100)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if series:
                ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def _run_points(records, x_field):
    """(method, mode) -> [(x, score, label)] with one point per run config (averaged over turns and tasks)."""
    acc = defaultdict(list)
    for r in records:
        x = r["costs"].get(x_field)
        if x is None or r["score"] is None:
            continue
        acc[(r["method"], r["budget"], r["mode"])].append((x, r["score"]))
    out = defaultdict(list)
    for (method, budget, mode), pts in acc.items():
        out[(method, mode)].append((sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts), budget))
    return {k: sorted(v) for k, v in sorted(out.items())}


def accuracy_vs_budget(records):
    """Score vs measured KV budget (resident KV bytes / full-attention bytes), one panel per task category,
    one line per method x mode."""
    plt = _plt()
    cats = sorted({r["category"] for r in records}) or ["-"]
    fig, axes = plt.subplots(1, len(cats), figsize=(4.6 * len(cats), 3.6), squeeze=False)
    for ax, cat in zip(axes[0], cats):
        for (method, mode), pts in _run_points([r for r in records if r["category"] == cat], "kv_ratio").items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method} ({mode})")
            for x, y, b in pts:
                ax.annotate(b, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_title(f"accuracy vs KV budget: {cat}", fontsize=9)
        ax.set(xlabel="KV budget (resident / full)", ylabel="score (0-100)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def pareto_front(points):
    """Points (x, y, ...) not dominated by one with x <= and y >= (lower cost, higher score), sorted by x."""
    front, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


STAGE_MARKERS = {"": "o", "compression": "s", "generation": "^", "retrieval": "D", "loading": "v"}


def accuracy_vs_bytes(records):
    """Score vs resident KV MiB per run config (marker = the method's lifecycle stage), with the Pareto front."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    stages = {(r["method"], r["mode"]): "+".join(r["stages"]) for r in records}
    allpts = []
    for (method, mode), pts in _run_points(records, "kv_bytes").items():
        stage = stages.get((method, mode), "")
        marker = STAGE_MARKERS.get(stage.split("+")[0], "o")
        xs = [p[0] / 2**20 for p in pts]
        ax.scatter(xs, [p[1] for p in pts], label=f"{method} ({mode}; {stage or 'dense'})", s=26, marker=marker)
        for x, (_, y, b) in zip(xs, pts):
            ax.annotate(b, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        allpts += [(p[0] / 2**20, p[1]) for p in pts]
    front = pareto_front(allpts)
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", lw=1, ls="--", label="Pareto front")
        ax.legend(fontsize=6)
    ax.set(title="accuracy vs resident KV bytes (Pareto front)", xlabel="KV resident (MiB)", ylabel="score (0-100)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


FIGURES = {"turn_curves": turn_curves, "accuracy_vs_budget": accuracy_vs_budget, "accuracy_vs_kv_bytes": accuracy_vs_bytes}


def accuracy_vs_cost(records, column: str):
    """Score vs one declared method-specific cost (axis: its leaderboard label and unit), one point per run config."""
    from scbench.report.costs import declared_costs

    cost = declared_costs()[column]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (method, mode), pts in _run_points(records, column).items():
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=f"{method} ({mode})", s=26)
        for x, y, b in pts:
            ax.annotate(b, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set(title=f"accuracy vs {cost.label or column}", xlabel=f"{column} ({cost.unit})", ylabel="score (0-100)")
    ax.grid(alpha=0.3)
    if ax.collections:
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def figures_for(records) -> dict:
    """FIGURES plus ``accuracy_vs_<column>`` for every declared method cost with a leaderboard label that some
    record measures (a value other than the column's default)."""
    from functools import partial

    from scbench.report.costs import declared_costs

    out = dict(FIGURES)
    for col, cost in declared_costs().items():
        if cost.label and any(r["costs"].get(col) not in (None, cost.default) for r in records):
            out[f"accuracy_vs_{col}"] = partial(accuracy_vs_cost, column=col)
    return out


def render(fig, fmt: str = "svg") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=120)
    _plt().close(fig)
    return buf.getvalue()


def write_figures(records, out_dir, formats=("png", "svg")) -> list[Path]:
    """Write every figure in every format to ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in figures_for(records).items():
        for fmt in formats:
            p = out / f"{name}.{fmt}"
            p.write_bytes(render(make(records), fmt))
            paths.append(p)
    return paths
