"""Pure scoring helpers shared by the SCBench tasks (SCBENCH.md section 4).

Each function reproduces one per-prediction rule of the reference harness, quirks included; the
corrected variants sit beside them. Everything returns a float in [0, 1].
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Iterable

CN_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCT = set(string.punctuation)
_ALL_PUNCT = set(string.punctuation + CN_PUNCTUATION)


# --- text normalisation and F1 --------------------------------------------------------------------
def normalize_en(text: str) -> str:
    """Lower-case, drop ASCII punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh(text: str) -> str:
    """Lower-case, drop Chinese and ASCII punctuation, remove all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ALL_PUNCT).split())


def f1(prediction: list, reference: list) -> float:
    """Bag-of-items F1 between two token lists (0 when nothing is shared)."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    p, r = same / len(prediction), same / len(reference)
    return 2 * p * r / (p + r)


def token_f1_en(prediction: str, references: Iterable[str]) -> float:
    """Max over references of the word F1 after ``normalize_en`` (InfiniteBench qa_f1_score)."""
    return max((f1(normalize_en(prediction).split(), normalize_en(r).split()) for r in references), default=0.0)


def char_f1_zh(prediction: str, references: Iterable[str]) -> float:
    """Max over references of the character F1 after ``normalize_zh``. Passing a plain string as
    ``references`` iterates its characters, which is the reference's qa_chn quirk."""
    pred = list(normalize_zh(prediction))
    return max((f1(pred, list(normalize_zh(r))) for r in references), default=0.0)


# --- substring / choice rules ---------------------------------------------------------------------
def any_item_upper_in(prediction: str, label: Any) -> float:
    """1 if any item of ``label`` (upper-cased) is a substring of the stripped, upper-cased prediction.

    A string label iterates its characters (the many_shot leniency); a list label its answers.
    """
    pred = prediction.strip().upper()
    return 1.0 if any(str(item).upper() in pred for item in label) else 0.0


CHOICE_PREFIXES = ("answer is:", "answer:", "answer is", "option is")


def choice_score(prediction: str, label: list[str]) -> float:
    """InfiniteBench longbook_choice_eng rule; ``label`` = [option text, option letter]."""
    pred = prediction.strip()
    if not pred:
        return 0.0
    if pred[0] in "ABCD":
        return float(pred[0] in label)
    if pred in label:
        return 1.0
    for c in ("\n", '"', "'", ".", ",", "?", "!", "{", "}"):
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in CHOICE_PREFIXES:
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return 0.0
        after = pred[idx + len(prefix) + 1:]
        return float(any(after.startswith(s) for s in label))
    for word in pred.split():
        if word in "ABCD":  # note: a substring test, as in the reference ("AB" counts)
            return float(word in label)
    return 0.0


# --- numbers ----------------------------------------------------------------------------------------
def first_number_score(prediction: str, label: Any, signed: bool = False) -> float:
    """Math.Find: the first ``\\d+\\.\\d+|\\d+`` in the prediction equals the label (int labels compare
    ``int(float(match))``). The reference ignores a minus sign; ``signed=True`` keeps it."""
    if isinstance(label, list):
        label = label[0]
    pattern = r"-?\d+\.\d+|-?\d+" if signed else r"\d+\.\d+|\d+"
    m = re.search(pattern, prediction)
    if m is None:
        return 0.0
    if isinstance(label, float):
        return float(float(m.group(0)) == label)
    return float(int(float(m.group(0))) == int(label))


def first_int_run(prediction: str) -> str:
    """The first maximal run of ASCII digits in the prediction ('' when there is none)."""
    m = re.search(r"[0-9]+", prediction)
    return m.group(0) if m else ""


def passkey_score(prediction: str, label: Any) -> float:
    """1 if the first digit run of the prediction equals the label string."""
    if isinstance(label, list):
        label = label[0]
    return float(first_int_run(prediction) == str(label))


# --- ROUGE ------------------------------------------------------------------------------------------
class CJKTokenizer:
    """rouge-score's default tokenisation (lower-case, runs of [a-z0-9]) plus every CJK character as a
    token of its own; the default tokenizer drops CJK text, which scores Chinese 0."""

    _token = re.compile(r"[a-z0-9]+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

    def tokenize(self, text: str) -> list[str]:
        return self._token.findall(text.lower())


_ROUGE: dict[bool, Any] = {}


def rouge_lsum(prediction: str, reference: str, keep_cjk: bool = False) -> float:
    """ROUGE-Lsum F1 as HF evaluate's "rouge" computes it by default (no stemmer, sentences split on
    newlines). ``keep_cjk`` swaps in ``CJKTokenizer``."""
    if keep_cjk not in _ROUGE:
        from rouge_score import rouge_scorer

        _ROUGE[keep_cjk] = rouge_scorer.RougeScorer(
            ["rougeLsum"], use_stemmer=False, tokenizer=CJKTokenizer() if keep_cjk else None
        )
    return _ROUGE[keep_cjk].score(str(reference), prediction)["rougeLsum"].fmeasure
