"""`scbench export --format paper`: the SCBench paper's table layout (arXiv 2412.10319, Table 4).

One block per (model, mode); methods as rows; columns grouped by the four task categories, each category's tasks
(paper names) followed by the category average, then the overall average (mean of the category averages present).
A cell is the mean score (0-100) over every example, turn and metric of the run. Runs that collide on (model,
method, task, mode) stay separate rows, labelled with their ``setting`` (scbench/report/trust.py). With
``anchors=True`` each block also lists the paper's Llama-3.1-8B-Instruct numbers (the reference facts, second-hand
copies of Table 4, to verify) as ``paper:`` rows, side by side with ours; a paper number exists only for the
overall average and, in multi-turn, string retrieval.
"""
from __future__ import annotations

from collections import defaultdict

from scbench.report.trust import settings

CATEGORIES = {  # paper order; config -> paper name
    "string_retrieval": {"scbench_kv": "Retr.KV", "scbench_prefix_suffix": "Retr.PS", "scbench_vt": "Retr.MH"},
    "semantic_retrieval": {"scbench_repoqa": "Code.RepoQA", "scbench_qa_eng": "En.QA", "scbench_qa_chn": "Zh.QA",
                           "scbench_choice_eng": "En.MC"},
    "global_information": {"scbench_mf": "Math.Find", "scbench_many_shot": "ICL.ManyShot", "scbench_summary": "En.Sum"},
    "multi_task": {"scbench_summary_with_needles": "Mix.Sum+NIAH", "scbench_repoqa_and_kv": "Mix.RepoQA+KV"},
}
SHORT = {"string_retrieval": "String", "semantic_retrieval": "Semantic", "global_information": "Global",
         "multi_task": "Multi-task"}
ANCHORS = {  # SCBENCH.md s.6: method -> {mode: {"avg": ..., "string_retrieval": ...}}; None: not published
    "full attention": {"multi_turn": {"avg": 48.7, "string_retrieval": 57.1}, "multi_request": {"avg": 37.2}},
    "StreamingLLM (1/32)": {"multi_turn": {"avg": 15.5, "string_retrieval": 0.4}, "multi_request": {"avg": 14.5}},
    "SnapKV (1/32)": {"multi_turn": {"avg": 20.9, "string_retrieval": 6.1}, "multi_request": {"avg": 15.2}},
    "PyramidKV (1/32)": {"multi_turn": {"avg": 21.0}, "multi_request": {"avg": 15.3}},
    "KIVI (2-bit)": {"multi_turn": {"avg": 32.0, "string_retrieval": 12.0}},
}
ANCHOR_MODEL = "Llama-3.1-8B-Instruct"


def task_scores(store, include_incomplete: bool = False) -> dict[tuple, dict[str, float]]:
    """(model, mode, row label) -> {task: mean score 0-100}; runs that are not complete only when asked."""
    runs = store.runs()
    setting = settings(runs)
    by_run = {r["run_id"]: r for r in runs}
    acc: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for t in store.turns():
        r = by_run[t["run_id"]]
        if not (include_incomplete or r.get("complete", True)):
            continue
        label = r["method_label"] + (f" [{setting[r['run_id']]}]" if setting[r["run_id"]] else "")
        for v in t["scores"].values():
            acc[(r["model"], r["mode"], label)][r["task"]].append(100.0 * float(v))
    return {k: {task: sum(v) / len(v) for task, v in d.items()} for k, d in acc.items()}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def paper_table(store, anchors: bool = False, include_incomplete: bool = False) -> str:
    scores = task_scores(store, include_incomplete)
    if not scores:
        return "(no results)"
    present = {task for d in scores.values() for task in d}
    cats = {c: [t for t in tasks if t in present] for c, tasks in CATEGORIES.items()}
    cats = {c: ts for c, ts in cats.items() if ts}
    unknown = sorted(present - {t for ts in CATEGORIES.values() for t in ts})
    if unknown:
        cats["other"] = unknown
    header = ["method"]
    for c, ts in cats.items():
        header += [CATEGORIES.get(c, {}).get(t, t) for t in ts] + [f"{SHORT.get(c, c)} avg"]
    header.append("Avg.")
    blocks = []
    for model, mode in sorted({(m, md) for m, md, _ in scores}):
        lines = [f"### {mode} · {model}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (m, md, label), d in sorted(scores.items()):
            if (m, md) != (model, mode):
                continue
            cells, cat_avgs = [label], []
            for c, ts in cats.items():
                vals = [d.get(t) for t in ts]
                got = [v for v in vals if v is not None]
                avg = sum(got) / len(got) if got else None
                cells += [_fmt(v) for v in vals] + [_fmt(avg)]
                if avg is not None:
                    cat_avgs.append(avg)
            cells.append(_fmt(sum(cat_avgs) / len(cat_avgs) if cat_avgs else None))
            lines.append("| " + " | ".join(cells) + " |")
        if anchors:
            for name, modes in ANCHORS.items():
                a = modes.get(mode)
                if not a:
                    continue
                cells = [f"paper: {name}, {ANCHOR_MODEL}"]
                for c, ts in cats.items():
                    cells += ["-"] * len(ts) + [_fmt(a.get(c))]
                cells.append(_fmt(a.get("avg")))
                lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    note = ("\n\npaper rows: SCBench (arXiv 2412.10319) Table 4, Llama-3.1-8B-Instruct, averages over all 12 tasks "
            "at full length; ours cover only the tasks and lengths above." if anchors else "")
    return "\n\n".join(blocks) + note + "\n"

