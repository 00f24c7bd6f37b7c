"""En.MultiChoice (scbench_choice_eng): four-option questions about a long English book.

Source: SCBench (arXiv 2412.10319), from InfiniteBench longbook_choice_eng; each turn has ``options``
(4 strings) and the answer is the correct option's text; category semantic retrieval. First turn
``Read the book and answer the question.\\n\\n{context}\\n\\nQuestion: {question}\\nA. {A}\\nB. {B}\\nC. {C}\\n
D. {D}\\n\\nThe the correct answer is`` (the doubled "The the" is in the original); follow-ups repeat the
question block alone.

Score: InfiniteBench's choice rule with label ``[option text, option letter]`` (tasks/scoring.py
``choice_score``): a leading letter, the exact option text, an "answer is:"-style prefix, or the first
standalone letter.

Offline data: CPython language-reference prose with planted facts about invented people
(tasks/facts.py); the three wrong options are values of the same attribute, preferably ones the book
states for other people, so no option can be ruled out without the book. Version 1.
"""
from __future__ import annotations

from scbench.tasks.base import PromptParts, Task
from scbench.tasks.facts import SOURCES, build_book, options_for
from scbench.tasks.scoring import choice_score

INSTRUCTION = "Read the book and answer the question.\n\n"
QUESTION = "Question: {question}\nA. {o[0]}\nB. {o[1]}\nC. {o[2]}\nD. {o[3]}\n\nThe the correct answer is"
LETTERS = "ABCD"


def choice_label(answer: str, options: list[str]) -> list[str]:
    """[option text, option letter] as the reference builds it (the text alone if it is no option)."""
    return [answer, LETTERS[options.index(answer)]] if answer in options else [answer]


class ChoiceEngTask(Task):
    name = "scbench_choice_eng"
    category = "semantic_retrieval"
    version = "1"
    max_new_tokens = 40
    metric = "choice_eng"
    offline_source = SOURCES["en"] + "; distractor options from the same attribute"

    def first_prompt(self, example, index=0):
        return PromptParts(INSTRUCTION, str(example.context), "\n\n" + self.followup_prompt(example, index))

    def followup_prompt(self, example, index):
        turn = example.turns[index]
        options = turn.extra.get("options")
        if not isinstance(options, list) or len(options) != 4:
            raise ValueError(f"{self.name} example {example.id} turn {index}: 'options' must be a list of 4 strings")
        return QUESTION.format(question=turn.input, o=options)

    def score(self, prediction, turn, example_extra):
        return {self.metric: choice_score(prediction, choice_label(str(turn.answer), list(turn.extra.get("options", []))))}

    def generate_row(self, rng, idx, length, n_turns, count):
        book, asked, facts = build_book(rng, length, count, n_turns, "en")
        turns = [{"input": f.question, "answer": f.value, "options": options_for(rng, f, facts)} for f in asked]
        return {"id": idx, "context": book, "multi_turns": turns, "source": SOURCES["en"]}


TASK = ChoiceEngTask()
