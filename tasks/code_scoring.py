"""RepoQA scoring: pull the answered function out of a model output and match it by BLEU (SCBENCH.md s.4).

The rule as coded in the reference (after evalplus/repoqa): collect fenced code blocks (none: the whole
stripped output); in block order, the first function a tree-sitter query finds for the repo language
is the answer, else the first block; compute sentence BLEU (NLTK, whitespace tokens, smoothing
method4) against every gold function of the repo; the turn passes if the best-scoring function (strictly
above 0) has the turn's name and its BLEU is >= 0.8. Grammars come from the PyPI tree-sitter-<lang> wheels.
"""
from __future__ import annotations

import importlib
import re
from functools import lru_cache
from typing import Iterable, Mapping

FUNCTION_QUERY = {
    "python": "(function_definition name: (_)) @fdef",
    "java": "(method_declaration name: (_)) @fdef",
    "typescript": "(function_declaration name: (_)) @fdef",
    "rust": "(function_item name: (_)) @fdef",
    "cpp": "(function_definition declarator: (function_declarator declarator: (identifier))) @fdef",
    "go": "(function_declaration name: (_)) @fdef",
}
_GRAMMAR = {  # language -> (module, function returning the grammar pointer)
    "python": ("tree_sitter_python", "language"),
    "java": ("tree_sitter_java", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "rust": ("tree_sitter_rust", "language"),
    "cpp": ("tree_sitter_cpp", "language"),
    "go": ("tree_sitter_go", "language"),
}
CODE_BLOCK = re.compile(r"^```(?:\w+)?\s*\n(.*?)(?=^```)```", re.DOTALL | re.MULTILINE)
THRESHOLD = 0.8


@lru_cache(maxsize=None)
def _parser_and_query(lang: str):
    import tree_sitter as ts

    if lang not in _GRAMMAR:
        raise ValueError(f"no tree-sitter grammar for language {lang!r}; known: {', '.join(sorted(_GRAMMAR))}")
    module, attr = _GRAMMAR[lang]
    language = ts.Language(getattr(importlib.import_module(module), attr)())
    return ts.Parser(language), ts.Query(language, FUNCTION_QUERY[lang])


def first_function(code: str, lang: str) -> str | None:
    """Source text of the first function (by start position) the language query finds, or None."""
    import tree_sitter as ts

    parser, query = _parser_and_query(lang)
    data = code.encode("utf8")
    captures = ts.QueryCursor(query).captures(parser.parse(data).root_node)
    nodes = sorted((n for ns in captures.values() for n in ns), key=lambda n: n.start_byte)
    return data[nodes[0].start_byte:nodes[0].end_byte].decode("utf8") if nodes else None


def extract_code(output: str, lang: str) -> str:
    """The answered function: first function in the fenced blocks, else the first block, else the output."""
    output = output.strip()
    blocks = CODE_BLOCK.findall(output)
    if not blocks:
        return output
    _parser_and_query(lang)  # an unknown language is an error, not a silent fallback
    for block in blocks:
        try:
            found = first_function(block, lang)
        except Exception:  # a parser failure falls back to the first block, as in the reference
            found = None
        if found is not None:
            return found
    return blocks[0]


def function_bleu(candidate: str, reference: str) -> float:
    """Sentence BLEU of whitespace tokens with NLTK's smoothing method4."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    cand = re.split(r"\s+", candidate.strip())
    ref = re.split(r"\s+", reference.strip())
    return float(sentence_bleu([ref], cand, smoothing_function=SmoothingFunction().method4))


def best_match(prediction: str, lang: str, needles: Iterable[Mapping[str, str]]) -> tuple[str | None, float]:
    """(name, BLEU) of the gold function closest to the extracted answer; (None, 0) when none scores > 0.
    ``needles``: [{"name": ..., "needle": source}, ...], the gold functions of the repo."""
    answer = extract_code(prediction, lang)
    best_name, best = None, 0.0
    for needle in needles:
        score = function_bleu(answer, needle["needle"])
        if score > best:
            best_name, best = needle["name"], score
    return best_name, best


def repoqa_score(prediction: str, name: str, lang: str, needles: Iterable[Mapping[str, str]],
                 threshold: float = THRESHOLD) -> float:
    """1 if the best-matching gold function is ``name`` with BLEU >= ``threshold`` (pass@1 of one sample)."""
    best_name, best = best_match(prediction, lang, needles)
    return float(best_name == name and best >= threshold)


def repo_needles(rows: Iterable[Mapping], max_turns: int | None = None) -> dict[str, list[dict]]:
    """Group the gold functions by repo over official-schema rows, as the reference does over a run's
    predictions (only the first ``max_turns`` turns of each row; mixed rows: RepoQA turns only)."""
    out: dict[str, list[dict]] = {}
    for row in rows:
        for turn in row["multi_turns"][:max_turns]:
            if turn.get("task", "scbench_repoqa") != "scbench_repoqa":
                continue
            out.setdefault(row["repo"], []).append({"name": turn["name"], "needle": turn["answer"]})
    return out


def attach_repo_needles(examples, max_turns: int):
    """Examples with ``extra["needles"]``: the gold functions of their repo over the whole run (first
    ``max_turns`` turns of each example, RepoQA turns only), as the reference scorer groups them."""
    import dataclasses

    rows = [{"repo": e.extra.get("repo"), "multi_turns": [{"name": t.extra.get("name"), "answer": t.answer,
                                                          "task": t.extra.get("task", "scbench_repoqa")} for t in e.turns]}
            for e in examples]
    groups = repo_needles(rows, max_turns)
    return [dataclasses.replace(e, extra={**e.extra, "needles": groups.get(e.extra.get("repo"), [])}) for e in examples]
