"""``scbench score | export | plot | merge``: what is done with a results store after the runs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_score(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="scbench score", description="Re-score stored predictions (no generation).")
    p.add_argument("run", help="run id or unique prefix")
    p.add_argument("--store", default="results/scbench.sqlite")
    p.add_argument("--variant", default=None,
                   help="score with this task variant and store the scores beside the run's own (which stay, as does "
                        "the run's spec); `scbench export --variant NAME` shows them")
    a = p.parse_args(argv)
    import json

    from scbench.records import Turn
    from scbench.registry import TASKS
    from scbench.store import Store

    Store(a.store, readonly=True).close()  # a missing or corrupt store is an error, not created
    store = Store(a.store)
    run = store.run(a.run)
    spec = json.loads(run["spec"])
    own = spec.get("task_variant")
    task = TASKS.get(run["task"]).with_variant(a.variant or own)
    beside = a.variant is not None and a.variant != own  # another variant: kept beside the run's own scores
    changed = 0
    total = 0.0
    rows = store.turns(run["run_id"])
    for r in rows:
        ref = r["reference"]
        scores = task.score(r["prediction"], Turn(input="", answer=ref["answer"], extra=ref.get("turn_extra", {})),
                            ref.get("example_extra", {}))
        changed += scores != r["scores"]
        total += sum(scores.values()) / max(len(scores), 1)
        if beside:
            store.put_rescore(run["run_id"], r["example_id"], r["turn"], a.variant, scores)
        else:
            store.update_scores(run["run_id"], r["example_id"], r["turn"], scores)
    print(f"re-scored {len(rows)} turns of run {run['run_id']} ({task.name}, variant {task.variant}): "
          f"{changed} changed, mean {100 * total / max(len(rows), 1):.1f}"
          + (f"; stored beside the run's own scores (scbench export --variant {a.variant})" if beside else ""))


def cmd_export(argv: list[str]) -> None:
    import json

    p = argparse.ArgumentParser(prog="scbench export")
    p.add_argument("--store", default="results/scbench.sqlite")
    p.add_argument("--format", choices=["md", "csv", "json", "jsonl", "html", "paper"], default=None,
                   help="md (default), csv; json: versioned records (docs/results_schema.md); html: one self-contained "
                        "page; jsonl: one line per record (with --samples, the default: per stored turn); paper: the "
                        "SCBench paper's table layout")
    p.add_argument("--anchors", action="store_true", help="paper format: the paper's Llama-3.1-8B numbers beside ours")
    p.add_argument("--samples", action="store_true",
                   help="per-turn samples (question, prediction, answer, scores, every cost column); --format jsonl")
    p.add_argument("--run", action="append", default=None, help="with --samples: only this run (repeatable)")
    p.add_argument("--out", default=None, help="write to this file instead of stdout")
    p.add_argument("--include-incomplete", action="store_true",
                   help="put unfinished runs (failed, interrupted, running, partial) in the board and its averages")
    p.add_argument("--variant", default=None,
                   help="scores of this task variant where `scbench score --variant` stored them (else the run's own)")
    a = p.parse_args(argv)
    from scbench.store import Store

    if a.samples and a.format not in (None, "jsonl"):
        raise ValueError(f"--samples writes JSON lines (--format jsonl), not {a.format}")
    a.format = a.format or ("jsonl" if a.samples else "md")
    store = Store(a.store, readonly=True)
    full = a.include_incomplete
    if a.samples:
        from scbench.report.samples import to_jsonl

        runs = [store.run(r)["run_id"] for r in a.run] if a.run else None
        out = open(a.out, "w", encoding="utf-8") if a.out else sys.stdout  # noqa: SIM115 - streamed, closed below
        try:
            for line in to_jsonl(store, runs):
                out.write(line + "\n")
        finally:
            store.close()
            if a.out:
                out.close()
                print(f"wrote {a.out}")
        return
    if a.format == "jsonl":
        from scbench.report.export import records

        text = "\n".join(json.dumps(r, default=str) for r in records(store, variant=a.variant, include_incomplete=full))
    elif a.format == "json":
        from scbench.report.export import to_json

        text = to_json(store, variant=a.variant, include_incomplete=full)
    elif a.format == "paper":
        from scbench.report.paper import paper_table

        text = paper_table(store, anchors=a.anchors, include_incomplete=full)
    elif a.format == "html":
        from scbench.report.html import build_html

        text = build_html(store, variant=a.variant, include_incomplete=full)
    else:
        from scbench.report.table import category_averages, incomplete_runs, leaderboard, to_markdown

        board = leaderboard(store, variant=a.variant, include_incomplete=full)
        if a.format == "md":
            text = to_markdown(board) + "\n\nCategory averages\n\n" + to_markdown(category_averages(board, store, a.variant, full)) + "\n"
            left = incomplete_runs(store)
            if len(left):
                text += ("\n" + ("Unfinished runs (in the board above)" if full else
                                 "Unfinished runs (left out of the board and its averages; --include-incomplete adds them)")
                         + "\n\n" + to_markdown(left) + "\n")
        else:
            text = board.to_csv(index=False)
    store.close()
    if a.out:
        write_output(Path(a.out), text)
        print(f"wrote {a.out}")
    else:
        print(text)


def write_output(path: Path, text: str) -> None:
    """Write an export; a path that cannot be written (a folder, a path under a file, a full disk) is one line."""
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a directory; --out names a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from None


def cmd_plot(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="scbench plot", description="Leaderboard figures as PNG and SVG files.")
    p.add_argument("--store", default="results/scbench.sqlite")
    p.add_argument("--out", default="results/figures", help="output folder")
    p.add_argument("--formats", default="png,svg")
    a = p.parse_args(argv)
    from scbench.report.export import records
    from scbench.report.figures import write_figures
    from scbench.store import Store

    store = Store(a.store, readonly=True)
    recs = records(store)
    store.close()
    for path in write_figures(recs, a.out, tuple(f for f in a.formats.split(",") if f)):
        print(f"wrote {path}")


def cmd_merge(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="scbench merge", description="Merge per-shard results stores into one.")
    p.add_argument("out", help="output store (created or extended)")
    p.add_argument("inputs", nargs="+", help="input stores")
    a = p.parse_args(argv)
    from scbench.store_merge import merge_stores

    rep = merge_stores(a.out, a.inputs)
    print(f"merged {len(a.inputs)} store(s) into {a.out}: {rep['runs_added']} runs and {rep['turns_added']} turns added, "
          f"{rep['duplicates']} identical duplicate turns skipped, {len(rep['conflicts'])} conflicts"
          + (f"; {len(rep['completed'])} run(s) now complete (every shard's turns present)" if rep.get("completed") else ""))
    for c in rep["conflicts"]:
        print(f"conflict: run {c['run_id']} example {c['example_id']} turn {c['turn']} differs in "
              f"{', '.join(c['columns'])} ({c['source']}); kept the first", file=sys.stderr)
    if rep["conflicts"]:
        sys.exit(1)
