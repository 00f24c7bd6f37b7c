"""Table-driven scorer cases for the three string-retrieval tasks (SCBENCH.md s.4)."""
import pytest

from scbench.records import Turn
from scbench.registry import TASKS

CASES = [
    # task, prediction, answer, expected
    ("scbench_kv", "The value is 3f2b-11", "3f2b-11", 1.0),
    ("scbench_kv", "The value is 3F2B-11", "3f2b-11", 0.0),  # case-sensitive
    ("scbench_kv", "", "3f2b-11", 0.0),
    ("scbench_kv", "prefix3f2b-11suffix", "3f2b-11", 1.0),  # substring, not exact match
    ("scbench_prefix_suffix", "Answer: abcXYZ123", "abcXYZ123", 1.0),
    ("scbench_prefix_suffix", "abcXYZ12", "abcXYZ123", 0.0),
    ("scbench_vt", "they are: AAAAA, BBBBB, CCCCC", ["AAAAA", "BBBBB", "CCCCC"], 1.0),
    ("scbench_vt", "they are: aaaaa and bbbbb", ["AAAAA", "BBBBB", "CCCCC"], 0.67),  # case-insensitive, rounded
    ("scbench_vt", "nothing", ["AAAAA", "BBBBB"], 0.0),
    ("scbench_vt", "AAAAA", ["AAAAA", "BBBBB", "CCCCC"], 0.33),
]


@pytest.mark.parametrize("task,prediction,answer,expected", CASES)
def test_scorer_table(task, prediction, answer, expected):
    t = TASKS.get(task)
    scores = t.score(prediction, Turn(input="", answer=answer), {})
    assert scores == {t.metric: expected}
