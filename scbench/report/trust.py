"""Trust helpers shared by every export: what tells colliding runs apart, bootstrap intervals, trust-flag shares.

- ``settings(runs)``: runs that collide on (model, method label, task, mode) differ in some other spec key
  (``max_new_tokens``, ``data.n``, a policy...); each gets a ``setting`` label naming those keys and its values, e.g.
  ``max_new_tokens=24``; a run with no collision gets ``""``. Exports group by run, never pool such runs.
- ``bootstrap_ci(values)``: seeded percentile bootstrap over examples of the mean (95 % by default).
- ``stratified_ci(groups)``: the same for a mean of group means (a category = the mean of its tasks' scores):
  examples are resampled within each group.
- ``flag_share(turns, flag)``: share of turns carrying a trust flag (scbench/checks.py).
"""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np

BOOTSTRAP_SAMPLES = 2000
SEED = 0


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, tuple)) else v
    return out


def settings(runs: list[dict]) -> dict[str, str]:
    """run_id -> setting label (spec keys that differ from the runs it collides with; ``""`` when it collides with
    none). ``runs``: store rows with run_id, model, method_label, task, mode, spec (JSON)."""
    groups = defaultdict(list)
    for r in runs:
        groups[(r["model"], r["method_label"], r["task"], r["mode"])].append(r)
    out = {}
    for members in groups.values():
        if len(members) == 1:
            out[members[0]["run_id"]] = ""
            continue
        flat = {r["run_id"]: _flat(json.loads(r["spec"] or "{}")) for r in members}
        keys = sorted({k for f in flat.values() for k in f})
        differing = [k for k in keys if len({repr(f.get(k)) for f in flat.values()}) > 1]
        for rid, f in flat.items():
            label = ",".join(f"{k}={f.get(k)}" for k in differing)
            out[rid] = label or f"run={rid[:8]}"  # identical specs (another engine option): the id tells them apart
    return out


def bootstrap_ci(values, *, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = SEED):
    """(low, high) percentile interval of the mean of ``values`` (one per example); (v, v) for one value."""
    x = np.asarray([v for v in values if v is not None and v == v], dtype=float)
    if len(x) == 0:
        return None, None
    if len(x) == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(samples, len(x)))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a, method="inverted_cdf")), float(np.quantile(means, 1 - a, method="inverted_cdf"))


def stratified_ci(groups: list[list[float]], *, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES,
                  seed: int = SEED):
    """(low, high) interval of the mean over groups of each group's mean, resampling examples within groups."""
    gs = [np.asarray([v for v in g if v is not None and v == v], dtype=float) for g in groups]
    gs = [g for g in gs if len(g)]
    if not gs:
        return None, None
    rng = np.random.default_rng(seed)
    means = np.mean([g[rng.integers(0, len(g), size=(samples, len(g)))].mean(1) for g in gs], axis=0)
    a = (1 - level) / 2
    return float(np.quantile(means, a, method="inverted_cdf")), float(np.quantile(means, 1 - a, method="inverted_cdf"))


def flag_share(turns: list[dict], flag: str) -> float:
    """Share of ``turns`` (store rows) flagged ``flag``; 0.0 for none."""
    if not turns:
        return 0.0
    return sum(flag in (t.get("flags") or "").split(",") for t in turns) / len(turns)
