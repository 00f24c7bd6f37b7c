"""Table-driven scorer cases for the semantic-retrieval tasks: qa_eng, qa_chn, choice_eng, repoqa (SCBENCH.md s.4)."""
import pytest

from scbench.records import Turn
from scbench.registry import TASKS
from scbench.tasks.code_scoring import extract_code, first_function, function_bleu, repo_needles, repoqa_score

QA_ENG = [
    # variant, prediction, answer, expected
    ("faithful", "The answer is Tallinn.", "Tallinn", 1.0),
    ("faithful", "  tallinn  ", "Tallinn", 1.0),  # upper-cased on both sides
    ("faithful", "Tall", "Tallinn", 0.0),  # the whole answer must be a substring
    ("faithful", "", "Tallinn", 0.0),
    ("faithful", "Porto or Tallinn", ["Tallinn"], 1.0),  # a list answer keeps its items
    ("token_f1", "Tallinn", "Tallinn", 1.0),
    ("token_f1", "The city is Tallinn.", "Tallinn", 0.5),  # "city is tallinn": P=1/3, R=1
    ("token_f1", "Porto", "Tallinn", 0.0),
]


@pytest.mark.parametrize("variant,prediction,answer,expected", QA_ENG)
def test_qa_eng(variant, prediction, answer, expected):
    t = TASKS.get("scbench_qa_eng").with_variant(variant)
    assert t.score(prediction, Turn("", answer), {}) == {"qa_eng": pytest.approx(expected)}


QA_CHN = [
    # the faithful character loop: 2 / (len(norm_pred) + 1) when any answer character occurs
    ("faithful", "答案是杭州。", "杭州", 2 / 6),
    ("faithful", "杭州", "杭州", 2 / 3),  # even the exact answer scores below 1
    ("faithful", "“杭州”！", "杭州", 2 / 3),  # Chinese punctuation is removed first
    ("faithful", "杭 州", "杭州", 2 / 3),  # whitespace is removed
    ("faithful", "北京", "杭州", 0.0),
    ("faithful", "", "杭州", 0.0),
    ("faithful", "苏州", "杭州", 2 / 3),  # one shared character is enough
    ("char_f1", "答案是杭州。", "杭州", 2 * 0.4 / 1.4),
    ("char_f1", "杭州", "杭州", 1.0),
    ("char_f1", "“杭州”！", "杭州", 1.0),
    ("char_f1", "苏州", "杭州", 0.5),
    ("char_f1", "北京", "杭州", 0.0),
]


@pytest.mark.parametrize("variant,prediction,answer,expected", QA_CHN)
def test_qa_chn(variant, prediction, answer, expected):
    t = TASKS.get("scbench_qa_chn").with_variant(variant)
    assert t.score(prediction, Turn("", answer), {}) == {"qa_chn": pytest.approx(expected)}


OPTIONS = ["Porto", "Tallinn", "Bergen", "Quito"]
CHOICE = [
    ("B", 1.0),  # leading letter
    ("B. Tallinn", 1.0),
    ("A", 0.0),
    ("Tallinn", 1.0),  # the exact option text
    ("The correct answer is: B", 1.0),  # "answer is:" parsing
    ("The answer is Tallinn", 1.0),  # "answer is" then the option text
    ("The answer is Porto, not Tallinn", 0.0),  # the first prefix found decides
    ("My answer is:", 0.0),  # prefix at the very end
    ("I pick B", 1.0),  # first standalone letter
    ("I pick C", 0.0),
    ("Definitely Tallinn", 0.0),  # option text not at the start and no prefix
    ("", 0.0),
    ("   ", 0.0),
    ("b", 0.0),  # lower-case letters do not count
]


@pytest.mark.parametrize("prediction,expected", CHOICE)
def test_choice_eng(prediction, expected):
    t = TASKS.get("scbench_choice_eng")
    turn = Turn("", "Tallinn", {"options": OPTIONS})
    assert t.score(prediction, turn, {}) == {"choice_eng": expected}


ADD = "def add(a, b):\n    total = a + b\n    return total"
SCALE = "def scale(values, factor):\n    out = [v * factor for v in values]\n    return out"
NEEDLES = [{"name": "add", "needle": ADD}, {"name": "scale", "needle": SCALE}]
REPOQA = [
    ("Here it is:\n```python\n" + ADD + "\n```\nDone.", "add", 1.0),  # fenced
    (ADD, "add", 1.0),  # bare code: the whole output
    ("```python\nimport os\n\nX = 1\n\n" + ADD + "\n```", "add", 1.0),  # first function of the block
    ("```\nx = 1\n```\nand\n```python\n" + ADD + "\n```", "add", 1.0),  # function found in a later block
    ("```python\n" + SCALE + "\n```", "add", 0.0),  # closest gold function is another one
    ("```python\ndef add(a, b):\n    return a - b\n```", "add", 0.0),  # BLEU below 0.8
    ("I cannot find it.", "add", 0.0),
]


@pytest.mark.parametrize("prediction,name,expected", REPOQA)
def test_repoqa(prediction, name, expected):
    t = TASKS.get("scbench_repoqa")
    gold = ADD if name == "add" else SCALE
    turn = Turn("", gold, {"name": name})
    assert t.score(prediction, turn, {"lang": "python", "needles": NEEDLES}) == {"repoqa": expected}


def test_repoqa_without_needles_uses_own_function():
    t = TASKS.get("scbench_repoqa")
    assert t.score(ADD, Turn("", ADD, {"name": "add"}), {"lang": "python"}) == {"repoqa": 1.0}
    assert t.score(SCALE, Turn("", ADD, {"name": "add"}), {"lang": "python"}) == {"repoqa": 0.0}


@pytest.mark.parametrize("lang,code,expected", [
    ("python", "class A:\n    def f(self):\n        return 1\n", "def f(self):\n        return 1"),
    ("java", "public class A {\n  int add(int a, int b) { return a + b; }\n}\n", "int add(int a, int b) { return a + b; }"),
    ("typescript", "const x = 1;\nfunction add(a: number): number { return a; }\n", "function add(a: number): number { return a; }"),
    ("rust", "use std::io;\nfn add(a: i32) -> i32 { a }\n", "fn add(a: i32) -> i32 { a }"),
    ("cpp", "#include <x>\nint add(int a) { return a; }\n", "int add(int a) { return a; }"),
    ("go", "package m\nfunc Add(a int) int { return a }\n", "func Add(a int) int { return a }"),
    ("python", "x = 1\n", None),
])
def test_first_function_per_language(lang, code, expected):
    assert first_function(code, lang) == expected


def test_extract_code_rules():
    assert extract_code("```\nx = 1\n```\n```\ny = 2\n```", "python") == "x = 1\n"  # no function: first block
    assert extract_code("  no code  ", "python") == "no code"
    with pytest.raises(ValueError):
        extract_code("```\nx\n```", "cobol")


def test_bleu_and_grouping():
    assert function_bleu(ADD, ADD) == pytest.approx(1.0)
    assert function_bleu(ADD, "    ".join(ADD.split())) == pytest.approx(1.0)  # whitespace tokens only
    assert repoqa_score(ADD, "add", "python", NEEDLES, threshold=1.0) == 1.0
    rows = [{"repo": "r", "multi_turns": [{"name": "add", "answer": ADD}, {"name": "scale", "answer": SCALE}]},
            {"repo": "r", "multi_turns": [{"name": "g", "answer": "x", "task": "scbench_kv"}]}]
    assert repo_needles(rows) == {"r": NEEDLES}
    assert repo_needles(rows, max_turns=1) == {"r": NEEDLES[:1]}
