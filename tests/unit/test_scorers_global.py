"""Table-driven scorer cases for the global-information tasks: mf, many_shot, summary (SCBENCH.md s.4)."""
import pytest

from scbench.records import Turn
from scbench.registry import TASKS
from scbench.tasks.scoring import rouge_lsum

MF = [
    # variant, prediction, label, expected
    ("faithful", "42", 42, 1.0),
    ("faithful", "The answer is 42.7", 42, 1.0),  # decimals: int(float(match))
    ("faithful", "042", 42, 1.0),
    ("faithful", "3.5 then 42", 42, 0.0),  # only the first number counts
    ("faithful", "forty-two", 42, 0.0),  # no number
    ("faithful", "-42", 42, 1.0),  # minus sign ignored
    ("faithful", "-42", -42, 0.0),
    ("faithful", "42", [42], 1.0),  # a list label: its first item
    ("fixed", "-42", 42, 0.0),
    ("fixed", "-42", -42, 1.0),
    ("fixed", "The answer is 42.7", 42, 1.0),
]


@pytest.mark.parametrize("variant,prediction,label,expected", MF)
def test_mf(variant, prediction, label, expected):
    t = TASKS.get("scbench_mf").with_variant(variant)
    assert t.score(prediction, Turn("", label), {}) == {"mf": expected}


MANY_SHOT = [
    ("faithful", "(C)", "(C)", 1.0),
    ("faithful", "(A)", "(C)", 1.0),  # leniency: "(" of the label occurs in the prediction
    ("faithful", "A", "(C)", 0.0),
    ("faithful", "c", "(C)", 1.0),  # upper-cased prediction
    ("faithful", "", "(C)", 0.0),
    ("faithful", "B", "C", 0.0),
    ("exact_letter", "(C)", "(C)", 1.0),
    ("exact_letter", "(A)", "(C)", 0.0),
    ("exact_letter", "C", "(C)", 1.0),
    ("exact_letter", "The answer is (C).", "(C)", 1.0),
    ("exact_letter", "I think (B), not (C)", "(C)", 0.0),
    ("exact_letter", "The answer is C", "(C)", 1.0),
    ("exact_letter", "none", "(C)", 0.0),
]


@pytest.mark.parametrize("variant,prediction,answer,expected", MANY_SHOT)
def test_many_shot(variant, prediction, answer, expected):
    t = TASKS.get("scbench_many_shot").with_variant(variant)
    assert t.score(prediction, Turn("", answer), {}) == {"many_shot": expected}


SUMMARY = [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("the cat on the mat", "the cat sat on the mat", 2 * (5 / 6) / (1 + 5 / 6)),  # LCS 5 of 6
    ("", "the cat sat on the mat", 0.0),
    ("c d\na b", "a b\nc d", 1.0),  # sentences are split on newlines (union LCS)
    ("The Cat, sat!", "the cat sat", 1.0),  # lower-cased, punctuation dropped
    ("cats sat", "cat sat", 0.5),  # no stemmer
]


@pytest.mark.parametrize("prediction,reference,expected", SUMMARY)
def test_summary(prediction, reference, expected):
    t = TASKS.get("scbench_summary")
    assert t.score(prediction, Turn("", reference), {}) == {"summary": pytest.approx(expected)}


def test_rouge_flat_vs_lsum_and_cjk():
    assert rouge_lsum("c d a b", "a b c d") == pytest.approx(0.5)  # one sentence: plain LCS
    assert rouge_lsum("杭州很美", "杭州很美") == 0.0  # rouge-score's default tokenizer drops CJK
    assert rouge_lsum("杭州很美", "杭州很美", keep_cjk=True) == pytest.approx(1.0)
    assert rouge_lsum("杭州 is nice", "杭州 is nice", keep_cjk=True) == pytest.approx(1.0)
