"""En.QA (scbench_qa_eng): free-form questions about a long English book.

Source: SCBench (arXiv 2412.10319), from InfiniteBench longbook_qa_eng (novels); answer str; category
semantic retrieval. First turn ``Read the book and answer the question. Be very concise in your
answer.\\n\\n{context}\\n\\nQuestion: {question}\\nAnswer:``; follow-ups ``Question: {question}\\nAnswer:``.

Score (faithful, as coded in the reference): the label is wrapped as ``[answer]`` and scored by
InfiniteBench's long-dialogue rule: 1 if ``answer.upper()`` is a substring of ``pred.strip().upper()``.
Variant ``token_f1``: InfiniteBench's word F1 after normalisation (lower-case, no punctuation or articles).

Offline data: the paper's books are not reachable offline; the book is CPython language-reference prose
with planted facts about invented people (tasks/facts.py), one question per turn. Version 1.
"""
from __future__ import annotations

from scbench.tasks.base import PromptParts, Task
from scbench.tasks.facts import SOURCES, build_book
from scbench.tasks.scoring import any_item_upper_in, token_f1_en

INSTRUCTION = "Read the book and answer the question. Be very concise in your answer.\n\n"
FOLLOWUP = "Question: {question}\nAnswer:"


def answers(answer) -> list[str]:
    return [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]


class QAEngTask(Task):
    name = "scbench_qa_eng"
    category = "semantic_retrieval"
    version = "1"
    max_new_tokens = 40
    metric = "qa_eng"
    variants = ("faithful", "token_f1")
    offline_source = SOURCES["en"]

    def first_prompt(self, example, index=0):
        return PromptParts(INSTRUCTION, str(example.context), "\n\n" + self.followup_prompt(example, index))

    def followup_prompt(self, example, index):
        return FOLLOWUP.format(question=example.turns[index].input)

    def score(self, prediction, turn, example_extra):
        if self.variant == "token_f1":
            return {self.metric: token_f1_en(prediction, answers(turn.answer))}
        return {self.metric: any_item_upper_in(prediction, answers(turn.answer))}

    def generate_row(self, rng, idx, length, n_turns, count):
        book, asked, _ = build_book(rng, length, count, n_turns, "en")
        turns = [{"input": f.question, "answer": f.value} for f in asked]
        return {"id": idx, "context": book, "multi_turns": turns, "source": SOURCES["en"]}


TASK = QAEngTask()
