"""Every task runs end to end through run_spec from local files in the official schema, in both modes.

The fixtures (tests/fixtures/scbench/<task>.jsonl) were written by the generators:
``scbench data generate task=<task> length=400 n=1 turns=2 seed=42 out=tests/fixtures/scbench model=none``.
"""
from pathlib import Path

import pytest

from scbench.run import run_spec
from scbench.records import RunSpec
from scbench.registry import TASKS
from scbench.store import Store

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "scbench"


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
@pytest.mark.parametrize("task", TASKS.names())
def test_task_from_local_files(tiny_engine, tmp_path, task, mode):
    spec = RunSpec(model={"name": "tiny"}, method={"name": "full"}, task=task, mode=mode,
                   data={"source": "local", "path": str(FIXTURES)}, max_turns=2, max_new_tokens=3)
    rid = run_spec(spec, str(tmp_path / "s.sqlite"), engine=tiny_engine, progress=False)
    store = Store(tmp_path / "s.sqlite")
    assert store.run(rid)["status"] == "done"
    rows = store.turns(rid)
    assert [r["turn"] for r in rows] == [0, 1]
    t = TASKS.get(task)
    allowed = set(getattr(t, "metrics", None) or (t.metric,))
    for r in rows:
        assert r["scores"] and set(r["scores"]) <= allowed
        assert all(0.0 <= v <= 1.0 for v in r["scores"].values())
        assert r["prefill_computed"] > 0
