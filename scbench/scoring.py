"""Score predictions produced elsewhere with scbench's task scorers (no model, no runner).

    >>> import scbench
    >>> scbench.score_turns("scbench_kv", [{"prediction": "the value is abc", "answer": "abc"}])
    [1.0]
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from scbench.records import Turn
from scbench.registry import TASKS

RESERVED = ("prediction", "answer", "variant")


def score_turns(task: str, turns: Iterable[Mapping[str, Any]], variant: str | None = None) -> list[float]:
    """Per-turn scores in [0, 1] (before the x100 scaling of the leaderboard).

    Each turn is a dict with ``prediction``, ``answer`` (as stored in the official row) and the row or turn
    fields the scorer needs: ``options`` (choice_eng), ``lang``, ``repo``, ``name`` (repoqa), the per-turn
    ``task`` of the mixed tasks, ``task`` of a many_shot row; an optional per-turn ``variant`` overrides the
    call's ``variant``. RepoQA turns are compared against every gold function of their repo among ``turns``,
    as the reference groups them over a run. A mixed task's turn gets the score of its own sub-task.
    """
    turns = [dict(t) for t in turns]
    for i, t in enumerate(turns):
        for key in ("prediction", "answer"):
            if key not in t:
                raise ValueError(f"turn {i}: missing {key!r} (got keys {sorted(t)})")
        if not isinstance(t["prediction"], str):
            raise ValueError(f"turn {i}: 'prediction' must be a string, got {type(t['prediction']).__name__}")
    base = TASKS.get(task)
    needles: dict[Any, list[dict]] = {}
    for t in turns:
        if "repo" in t and t.get("task", "scbench_repoqa") == "scbench_repoqa" and "name" in t:
            needles.setdefault(t["repo"], []).append({"name": t["name"], "needle": t["answer"]})
    out = []
    for t in turns:
        scorer = base.with_variant(t.get("variant", variant))
        fields = {k: v for k, v in t.items() if k not in RESERVED}
        extra = dict(fields)
        if "repo" in t and t["repo"] in needles:
            extra["needles"] = needles[t["repo"]]
        scores = scorer.score(t["prediction"], Turn(input="", answer=t["answer"], extra=fields), extra)
        out.append(float(sum(scores.values()) / len(scores)))
    return out
