"""Zh.QA (scbench_qa_chn): free-form questions about a long Chinese book.

Source: SCBench (arXiv 2412.10319), from InfiniteBench longbook_qa_chn; answer str; category semantic
retrieval. First turn ``阅读以下书籍然后回答问题。\\n\\n{context}\\n\\n问题：{question}\\n答案：``; follow-ups
``问题：{question}\\n答案：``.

Score: character F1 after normalisation (lower-case, Chinese and English punctuation and whitespace
removed), max over ground truths. Faithful quirk: the reference passes the answer string as the list
of ground truths, so the max runs over its characters: the score is ``2 / (len(norm_pred) + 1)`` when
any answer character occurs in the prediction, else 0. Variant ``char_f1``: the real character F1
against the whole answer.

Offline data: no Chinese book ships with Python; the book is synthetic Chinese narrative from
sentence templates with planted facts about invented people (tasks/facts.py). Version 1.
"""
from __future__ import annotations

from scbench.tasks.base import PromptParts, Task
from scbench.tasks.facts import SOURCES, build_book
from scbench.tasks.scoring import char_f1_zh

INSTRUCTION = "阅读以下书籍然后回答问题。\n\n"
FOLLOWUP = "问题：{question}\n答案："


class QAChnTask(Task):
    name = "scbench_qa_chn"
    category = "semantic_retrieval"
    version = "1"
    max_new_tokens = 40
    metric = "qa_chn"
    variants = ("faithful", "char_f1")
    offline_source = SOURCES["zh"]

    def first_prompt(self, example, index=0):
        return PromptParts(INSTRUCTION, str(example.context), "\n\n" + self.followup_prompt(example, index))

    def followup_prompt(self, example, index):
        return FOLLOWUP.format(question=example.turns[index].input)

    def score(self, prediction, turn, example_extra):
        answer = turn.answer
        if self.variant == "char_f1":
            truths = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
        else:  # the reference iterates whatever it is given: a string yields its characters
            truths = answer if isinstance(answer, list) else str(answer)
        return {self.metric: char_f1_zh(prediction, truths)}

    def generate_row(self, rng, idx, length, n_turns, count):
        book, asked, _ = build_book(rng, length, count, n_turns, "zh")
        turns = [{"input": f.question, "answer": f.value} for f in asked]
        return {"id": idx, "context": book, "multi_turns": turns, "source": SOURCES["zh"]}


TASK = QAChnTask()
