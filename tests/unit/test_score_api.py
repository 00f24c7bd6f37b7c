"""scbench.score_turns: the public scoring API for predictions made elsewhere."""
import pytest

import scbench

BODY = "".join(f"    step_{i} = compute(values, limit, offset={i}) + scale * {i}\n" for i in range(12))
FOO = "def foo(values, limit, scale):\n" + BODY + "    return step_11\n"
FOO2 = FOO.replace("def foo(", "def foo2(").replace("return step_11", "return step_10")


def test_string_tasks_and_variants():
    assert scbench.score_turns("scbench_kv", [{"prediction": "it is abc-1", "answer": "abc-1"},
                                              {"prediction": "ABC-1", "answer": "abc-1"}]) == [1.0, 0.0]
    faithful = scbench.score_turns("scbench_qa_chn", [{"prediction": "北京。", "answer": "北京"}])
    corrected = scbench.score_turns("scbench_qa_chn", [{"prediction": "北京。", "answer": "北京"}], variant="char_f1")
    assert faithful[0] == pytest.approx(2 / 3) and corrected == [1.0]  # the reference's character-loop quirk


def test_mixed_task_turns_use_their_subtask():
    turns = [{"prediction": "The passkey is 12345.", "answer": "12345", "task": "scbench_passkey"},
             {"prediction": "The passkey is 1234.", "answer": "12345", "task": "scbench_passkey"}]
    assert scbench.score_turns("scbench_summary_with_needles", turns) == [1.0, 0.0]


def test_repoqa_groups_gold_functions_by_repo():
    """The prediction copies foo2; asked for foo it is wrong once foo2 is among the repo's gold functions."""
    pred = f"```python\n{FOO2}```"
    alone = scbench.score_turns("scbench_repoqa", [{"prediction": pred, "answer": FOO, "name": "foo", "lang": "python", "repo": "r"}])
    grouped = scbench.score_turns("scbench_repoqa", [
        {"prediction": pred, "answer": FOO, "name": "foo", "lang": "python", "repo": "r"},
        {"prediction": pred, "answer": FOO2, "name": "foo2", "lang": "python", "repo": "r"},
    ])
    assert alone == [1.0]  # BLEU(foo2, foo) >= 0.8 with nothing closer to compare against
    assert grouped == [0.0, 1.0]


def test_bad_turns():
    with pytest.raises(ValueError, match="turn 0: missing 'prediction'"):
        scbench.score_turns("scbench_kv", [{"answer": "x"}])
    with pytest.raises(KeyError, match="Did you mean"):
        scbench.score_turns("scbench_kw", [{"prediction": "x", "answer": "x"}])
