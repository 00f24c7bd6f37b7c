"""Per-turn samples: ``scbench show RUN`` (readable, long texts elided) and ``scbench export --samples --format
jsonl`` (one JSON line per stored turn with every field)."""
from __future__ import annotations

import json
from typing import Iterator

from scbench.store import STAT_COLUMNS

COSTS_SHOWN = ("prompt_tokens", "prefill_computed", "prefill_reused", "ttft_s", "decode_tokens", "decode_tok_s",
               "kv_bytes", "kv_full_bytes")


def elide(text, limit: int = 400) -> str:
    """``text`` as a string, its middle replaced by ``[... N chars ...]`` when longer than ``limit``."""
    text = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]} [... {len(text) - 2 * keep} chars ...] {text[-keep:]}"


def sample_records(store, run_ids: list[str] | None = None) -> Iterator[dict]:
    """Every stored turn (of ``run_ids``, or of every run) as one flat dict: run labels, example, turn (1-based),
    question, prediction, answer, scores and every cost column."""
    runs = {r["run_id"]: r for r in store.runs()}
    for run_id in run_ids or list(runs):
        run = runs[run_id]
        spec = json.loads(run["spec"] or "{}")
        for t in store.turns(run_id):
            ref = t["reference"] if isinstance(t["reference"], dict) else {"answer": t["reference"]}
            yield {
                "run_id": run_id, "model": run["model"], "method": run["method"], "method_label": run["method_label"],
                "task": run["task"], "task_variant": spec.get("task_variant"), "mode": run["mode"],
                "status": run["status"], "example": t["example_id"], "turn": t["turn"] + 1,
                "question": ref.get("question"), "prediction": t["prediction"], "answer": ref.get("answer"),
                "scores": t["scores"], "turn_extra": ref.get("turn_extra"), "example_extra": ref.get("example_extra"),
                **{c: t.get(c) for c in STAT_COLUMNS},
            }


def to_jsonl(store, run_ids: list[str] | None = None) -> Iterator[str]:
    for rec in sample_records(store, run_ids):
        yield json.dumps(rec, ensure_ascii=False, default=str)


def show(store, run_id: str, example: int | None = None, turn: int | None = None, limit: int = 400) -> str:
    """Readable turns of one run. ``example``: 0-based index among the run's examples (in stored order);
    ``turn``: 1-based turn number."""
    run = store.run(run_id)
    recs = list(sample_records(store, [run["run_id"]]))
    examples = list(dict.fromkeys(r["example"] for r in recs))
    if example is not None:
        if not 0 <= example < len(examples):
            raise ValueError(f"run {run['run_id']} has {len(examples)} example(s): --example takes 0..{len(examples) - 1}")
        recs = [r for r in recs if r["example"] == examples[example]]
    if turn is not None:
        have = sorted({r["turn"] for r in recs})
        recs = [r for r in recs if r["turn"] == turn]
        if not recs:
            raise ValueError(f"no turn {turn} stored for that selection: turns {', '.join(map(str, have)) or 'none'}")
    lines = [f"run {run['run_id']}  {run['task']} {run['mode']} {run['method_label']}  model {run['model']}  "
             f"status {run['status']}  ({len(examples)} example(s), {len(recs)} turn(s) shown)"]
    for r in recs:
        costs = "  ".join(f"{c}={r[c]:.3g}" if isinstance(r[c], float) else f"{c}={r[c]}" for c in COSTS_SHOWN)
        lines += ["", f"--- example {examples.index(r['example'])} (id {r['example']}), turn {r['turn']}",
                  f"question:   {elide(r['question'], limit) if r['question'] is not None else '(not stored by this version)'}",
                  f"prediction: {elide(r['prediction'], limit)}",
                  f"reference:  {elide(r['answer'], limit)}",
                  f"score:      {', '.join(f'{k}={100 * float(v):.1f}' for k, v in r['scores'].items())}",
                  f"costs:      {costs}"]
    return "\n".join(lines)
