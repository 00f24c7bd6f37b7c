"""The CI regression slice: a few cells of the all-methods reference table, re-run on CPU with the probe model.

The table is ``results/reference/all_methods_probe.{md,json}`` (``scbench run -m sweep=reference``, exported by
``scripts/probe/reference_table.py``). Each cell of the slice is composed from the same Hydra preset
(``sweep=reference`` plus its task / mode / method), so its run id (the hash of the whole run spec) must equal the
id of the table's row: the slice re-runs exactly what the table recorded, not a look-alike. Cells (2 generated
examples at ~900 tokens x 3 turns, seed 0, 110 new tokens at most), chosen to cover each lifecycle stage with a
score that a broken method would move:

- scbench_kv multi-turn: full attention (100 on every turn), StreamingLLM-1k (0: the needed pair is evicted),
  A-shape-1k sparse prefill (0 on turn 1, 100 after: only the first turn is sparse), KIVI 4-bit (100),
  RetrievalAttention-1k (100, through the CPU tier and exact top-k);
- scbench_vt multi-turn: SnapKV-1k (100, 66.5, 66.5);
- scbench_kv multi-request: full attention and StreamingLLM-1k.

    python scripts/probe/ci_slice.py            # re-run the slice and compare with the table (exit 1 on a move)

``tests/e2e/test_probe_regression.py`` does the same under pytest.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "results" / "reference" / "all_methods_probe.json"
CELLS = [
    ("scbench_kv", "multi_turn", "full"),
    ("scbench_kv", "multi_turn", "streamingllm-1k"),
    ("scbench_kv", "multi_turn", "ashape-1k"),
    ("scbench_kv", "multi_turn", "kivi-4bit"),
    ("scbench_kv", "multi_turn", "retrieval_attention-1k"),
    ("scbench_vt", "multi_turn", "snapkv-1k"),
    ("scbench_kv", "multi_request", "full"),
    ("scbench_kv", "multi_request", "streamingllm-1k"),
]
TOLERANCE = 25.0
"""Allowed change of any per-turn score (points of 100). With 2 examples a cell moves in steps of 50 (vt: ~16.7),
so a flipped kv answer fails the test; the tolerance only absorbs nothing-changed float noise."""


def cell_spec(task: str, mode: str, method: str):
    """The RunSpec of one cell, composed exactly as ``scbench run -m sweep=reference`` composes it."""
    from hydra import compose, initialize_config_dir

    from scbench.cli import config_dir, spec_from_cfg

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["sweep=reference", f"task={task}", f"mode={mode}", f"method={method}"])
    return spec_from_cfg(cfg)


def cpu_model() -> dict:
    """The slice's model config on CPU in float32, as the table was made (also on a machine with a GPU)."""
    return dict(cell_spec(*CELLS[0]).model, device="cpu", dtype="float32")


def per_run(store, run_id: str) -> dict:
    """Per-turn mean score x 100 and the predictions (example, turn, text) of one stored run."""
    rows = store.turns(run_id)
    metric = None
    by_turn: dict[int, list[float]] = {}
    for r in rows:
        metric = metric or next(iter(r["scores"]))
        by_turn.setdefault(r["turn"], []).append(r["scores"][metric])
    return {"per_turn": [round(100 * sum(v) / len(v), 1) for _, v in sorted(by_turn.items())],
            "predictions": [[r["example_id"], r["turn"], r["prediction"]] for r in rows]}


def run_slice(engine=None) -> dict:
    """Run every cell into a temporary store; returns ``{run_id: {cell, per_turn, predictions}}``."""
    from scbench.run import get_engine, run_spec
    from scbench.store import Store

    specs = [(cell, cell_spec(*cell)) for cell in CELLS]
    if engine is None:
        engine = get_engine(cpu_model())
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "slice.sqlite")
        for cell, spec in specs:
            run_id = run_spec(spec, path, engine=engine, progress=False)
            store = Store(path)
            try:
                out[run_id] = {"cell": list(cell), **per_run(store, run_id)}
            finally:
                store.close()
    return out


def compare(got: dict, table: dict, tolerance: float = TOLERANCE) -> list[str]:
    """Differences between the slice and the table beyond ``tolerance`` (empty: the slice matches)."""
    rows = {r["run_id"]: r for r in table["runs"]}
    problems = []
    for run_id, g in got.items():
        want = rows.get(run_id)
        if want is None:
            problems.append(f"cell {g['cell']}: run id {run_id} is not in the table (the preset or the method "
                            "config changed since the table was made: rerun the reference sweep)")
            continue
        if len(g["per_turn"]) != len(want["per_turn"]):
            problems.append(f"cell {g['cell']}: {len(g['per_turn'])} turns vs {len(want['per_turn'])} in the table")
        for turn, (a, b) in enumerate(zip(g["per_turn"], want["per_turn"]), start=1):
            if abs(a - b) > tolerance:
                diff = [(p, q) for p, q in zip(g["predictions"], want["predictions"]) if p != q]
                problems.append(f"cell {g['cell']} turn {turn}: score {a} vs table {b} (tolerance {tolerance}); "
                                f"changed predictions (now, table): {diff[:4]}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default=str(TABLE))
    args = ap.parse_args()
    table = json.loads(Path(args.table).read_text())
    got = run_slice()
    for run_id, g in got.items():
        print(run_id, *g["cell"], g["per_turn"])
    problems = compare(got, table)
    print("\n".join(problems) or "slice matches the table")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
