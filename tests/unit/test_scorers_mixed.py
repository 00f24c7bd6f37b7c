"""Scorer cases for the multi-task sessions: one score key per sub-task (SCBENCH.md s.4)."""
import pytest

from scbench.records import Turn
from scbench.registry import TASKS

ADD = "def add(a, b):\n    total = a + b\n    return total"

CASES = [
    # task, turn task, prediction, answer, extra, expected
    ("scbench_summary_with_needles", "scbench_summary", "the cat sat", "the cat sat", {}, {"summary": 1.0}),
    ("scbench_summary_with_needles", "scbench_passkey", "The pass key is 12345.", "12345", {}, {"passkey": 1.0}),
    ("scbench_summary_with_needles", "scbench_passkey", "123456", "12345", {}, {"passkey": 0.0}),  # maximal run
    ("scbench_summary_with_needles", "scbench_passkey", "key 7: 12345", "12345", {}, {"passkey": 0.0}),  # first run
    ("scbench_summary_with_needles", "scbench_passkey", "none", "12345", {}, {"passkey": 0.0}),
    ("scbench_summary_with_needles", "scbench_passkey", "12345", 12345, {}, {"passkey": 1.0}),
    ("scbench_repoqa_and_kv", "scbench_kv", "value: abc-123", "abc-123", {}, {"kv": 1.0}),
    ("scbench_repoqa_and_kv", "scbench_kv", "value: ABC-123", "abc-123", {}, {"kv": 0.0}),  # case-sensitive
    ("scbench_repoqa_and_kv", "scbench_repoqa", "```python\n" + ADD + "\n```", ADD, {"name": "add"}, {"repoqa": 1.0}),
    ("scbench_repoqa_and_kv", "scbench_repoqa", "no idea", ADD, {"name": "add"}, {"repoqa": 0.0}),
]


@pytest.mark.parametrize("task,turn_task,prediction,answer,extra,expected", CASES)
def test_mixed_scores(task, turn_task, prediction, answer, extra, expected):
    t = TASKS.get(task)
    turn = Turn("", answer, {"task": turn_task, **extra})
    scores = t.score(prediction, turn, {"lang": "python", "repo": "r"})
    assert scores == expected
    assert set(scores) <= set(t.metrics)


@pytest.mark.parametrize("task", ["scbench_summary_with_needles", "scbench_repoqa_and_kv"])
def test_mixed_unknown_turn_task(task):
    with pytest.raises(ValueError):
        TASKS.get(task).score("x", Turn("", "y", {"task": "scbench_vt"}), {})
