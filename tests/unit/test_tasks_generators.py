"""Offline generators of the nine semantic / global / mixed tasks: deterministic, schema-valid, on length."""
import pytest

from scbench.data import generate_rows, parse_row
from scbench.registry import TASKS
from scbench.tasks.base import approx_tokens

NEW_TASKS = ["scbench_repoqa", "scbench_qa_eng", "scbench_qa_chn", "scbench_choice_eng", "scbench_mf",
             "scbench_many_shot", "scbench_summary", "scbench_summary_with_needles", "scbench_repoqa_and_kv"]
LENGTH, TURNS = 4000, 5


def context_text(row):
    return str(row["context"])


@pytest.fixture(scope="module")
def rows():
    return {name: generate_rows(TASKS.get(name), 2, LENGTH, TURNS, seed=0) for name in NEW_TASKS}


@pytest.mark.parametrize("name", NEW_TASKS)
def test_deterministic_per_seed(name, rows):
    task = TASKS.get(name)
    assert generate_rows(task, 2, LENGTH, TURNS, seed=0) == rows[name]
    assert generate_rows(task, 1, LENGTH, TURNS, seed=1)[0] != rows[name][0]


@pytest.mark.parametrize("name", NEW_TASKS)
def test_schema_length_and_turns(name, rows):
    for i, row in enumerate(rows[name]):
        ex = parse_row(row, f"{name}:{i}")
        assert len(ex.turns) == TURNS
        assert abs(approx_tokens(context_text(row)) - LENGTH) <= 0.1 * LENGTH
        inputs = [t.input for t in ex.turns]
        assert len(set(inputs)) == len(inputs), "per-turn questions must differ"
        assert row.get("source"), "generated rows state their source"
        task = TASKS.get(name)
        for j in range(TURNS):  # every turn is answerable by its task's rules
            assert task.turn_max_new_tokens(ex, j) > 0


def test_extra_fields(rows):
    for row in rows["scbench_repoqa"]:
        assert row["lang"] == "python" and row["repo"]
        for t in row["multi_turns"]:
            assert t["name"] and row["context"].count(t["answer"]) == 1
            assert f"def {t['name']}(" in t["answer"] or f"def {t['name']} (" in t["answer"]
    for row in rows["scbench_choice_eng"]:
        for t in row["multi_turns"]:
            assert len(t["options"]) == 4 and len(set(t["options"])) == 4 and t["answer"] in t["options"]
    for row in rows["scbench_mf"]:
        assert isinstance(row["context"], list) and all(100 <= x <= 999 for x in row["context"])
        assert all(isinstance(t["answer"], int) for t in row["multi_turns"])
    for row in rows["scbench_many_shot"]:
        assert row["task"] in ("date_understanding", "tracking_shuffled_objects_seven_objects")
        assert all(t["answer"][0] == "(" and t["answer"][2] == ")" for t in row["multi_turns"])
    for name in ("scbench_qa_eng", "scbench_qa_chn"):
        for row in rows[name]:
            assert all(t["answer"] in row["context"] for t in row["multi_turns"])
    for row in rows["scbench_summary_with_needles"]:
        tasks = [t["task"] for t in row["multi_turns"]]
        assert set(tasks) == {"scbench_summary", "scbench_passkey"}
        for t in row["multi_turns"]:
            if t["task"] == "scbench_passkey":
                assert t["answer"].isdigit() and t["answer"] in row["context"]
    for row in rows["scbench_repoqa_and_kv"]:
        assert row["lang"] == "python"
        for t in row["multi_turns"]:
            assert t["task"] in ("scbench_repoqa", "scbench_kv")
            assert t["answer"] in row["context"]
            assert ("name" in t) == (t["task"] == "scbench_repoqa")


def test_mf_answers_are_right(rows):
    import statistics
    for row in rows["scbench_mf"]:
        xs = row["context"]
        assert len(xs) % 2 == 1
        truth = {"largest number": max(xs), "smallest number": min(xs), "median": statistics.median(xs),
                 "most frequent number": statistics.mode(xs)}
        for t in row["multi_turns"]:
            what = t["input"].split("The ")[1].split(" of the list")[0]
            if what in truth:
                assert t["answer"] == truth[what]


def test_many_shot_items_are_right():
    import random
    from datetime import datetime, timedelta
    from scbench.tasks.bbh import date_item, tracking_item
    rng = random.Random(0)
    for _ in range(50):
        q, a = date_item(rng)
        letter = a[1]
        picked = [line[4:] for line in q.splitlines() if line.startswith(f"({letter})")][0]
        if "days ago" in q:
            today = datetime.strptime(q.split("Today is ")[1][:10], "%m/%d/%Y")
            n = int(q.split("the date ")[1].split(" days")[0])
            assert picked == (today - timedelta(n)).strftime("%m/%d/%Y")
    q, a = tracking_item(rng)
    assert q.count("\n(") == 7 and a in {f"({c})" for c in "ABCDEFG"}


def test_summary_reference_is_removed_from_the_document(rows):
    for row in rows["scbench_summary"]:
        for t in row["multi_turns"]:
            assert t["answer"] not in row["context"]


@pytest.mark.parametrize("name", NEW_TASKS)
def test_local_directory_round_trip(name, rows, tmp_path):
    """Rows written by the generator load back through the official-schema local path unchanged."""
    from scbench.data import load_examples, write_jsonl

    write_jsonl(rows[name], tmp_path / f"{name}.jsonl")
    examples = load_examples(TASKS.get(name), "local", path=str(tmp_path))
    assert [e.context for e in examples] == [r["context"] for r in rows[name]]
    assert [t.extra for t in examples[0].turns] == [
        {k: v for k, v in t.items() if k not in ("input", "answer")} for t in rows[name][0]["multi_turns"]]
    assert examples[0].extra == {k: v for k, v in rows[name][0].items() if k not in ("id", "context", "multi_turns")}
