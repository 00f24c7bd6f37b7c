"""En.Sum (scbench_summary): summarise one of several concatenated long documents per turn.

Source: SCBench (arXiv 2412.10319): ~8 concatenated papers, one summary asked per turn; category global
information. Template ``{context}\\n\\n{input}``; follow-ups (turn >= 2) force the literal "This paper"
at the start of the assistant's answer (``assistant_prefix``), as the reference appends it after the
generation prompt. Score: ROUGE-Lsum F1 as HF evaluate computes it (rouge-score, no stemmer).

Offline data: the paper's arXiv papers are not reachable offline. Documents are the Python
language-reference sections shipped with CPython (``pydoc_data.topics``, see tasks/material.py). The
reference summary of a document is its lead paragraph, which is removed from the document (the way a
paper's abstract summarises the rest). Documents are numbered; bodies are cut at a paragraph boundary
so that at least ``n_turns + 1`` fit; past ~110K tokens the material repeats (asked documents are
chosen among those that occur once when possible). Version 1.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from scbench.tasks.base import Task, TokenCounter
from scbench.tasks.material import SOURCE_DOCS, Document, documents
from scbench.tasks.scoring import rouge_lsum

HEADER = "Below are numbered documents from the Python language reference.\n\n"
QUESTION = 'Summarize Document {number} ("{title}") from the documents above in a few sentences.'


@dataclass
class Placed:
    number: int
    doc: Document
    text: str


def place_documents(rng: random.Random, length: int, count: TokenCounter, n_asked: int,
                    needles: list[str] = ()) -> tuple[str, list[Placed]]:
    """Numbered documents (and ``needles`` between them) filling about ``length`` tokens."""
    docs = list(documents())
    rng.shuffle(docs)
    budget = length - count(HEADER) - sum(count(n + "\n\n") for n in needles)
    cap = max(100, budget // (n_asked + 1))
    placed: list[Placed] = []
    used, misses, i = 0, 0, 0
    while misses < len(docs):
        doc = docs[i % len(docs)]
        i += 1
        number = len(placed) + 1
        head = f"Document {number}: {doc.title}\n\n"
        body = [doc.paragraphs[0]]
        for p in doc.paragraphs[1:]:
            if count(head + "\n\n".join(body + [p])) > cap:
                break
            body.append(p)
        text = head + "\n\n".join(body)
        cost = count(text + "\n\n")
        if used + cost > budget:
            misses += 1
            continue
        placed.append(Placed(number, doc, text))
        used, misses = used + cost, 0
    if len(placed) < n_asked:
        raise ValueError(f"length={length} is too short for {n_asked} documents to summarise")
    pieces = [p.text for p in placed]
    for needle in needles:
        pieces.insert(rng.randint(0, len(pieces)), needle)
    return HEADER + "\n\n".join(pieces), placed


def pick_documents(rng: random.Random, placed: list[Placed], n: int) -> list[Placed]:
    """``n`` placed documents, those whose source section occurs once first."""
    keys = [p.doc.key for p in placed]
    once = [p for p in placed if keys.count(p.doc.key) == 1]
    rest = [p for p in placed if keys.count(p.doc.key) > 1 and p.doc.key not in {q.doc.key for q in once}]
    seen, pool = set(), []
    for p in rng.sample(once, len(once)) + rng.sample(rest, len(rest)):
        if p.doc.key not in seen:
            seen.add(p.doc.key)
            pool.append(p)
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} distinct documents fit; asked for {n}")
    return pool[:n]


def summary_turn(p: Placed) -> dict:
    return {"input": QUESTION.format(number=p.number, title=p.doc.title), "answer": p.doc.lead}


class SummaryTask(Task):
    name = "scbench_summary"
    category = "global_information"
    version = "1"
    max_new_tokens = 200
    metric = "summary"
    offline_source = SOURCE_DOCS + "; lead paragraph as reference summary"

    def assistant_prefix(self, example, index):
        return "This paper" if index >= 1 else ""

    def score(self, prediction, turn, example_extra):
        return {self.metric: rouge_lsum(prediction, turn.answer)}

    def generate_row(self, rng, idx, length, n_turns, count):
        context, placed = place_documents(rng, length, count, n_turns)
        turns = [summary_turn(p) for p in pick_documents(rng, placed, n_turns)]
        return {"id": idx, "context": context, "multi_turns": turns, "source": SOURCE_DOCS}


TASK = SummaryTask()
