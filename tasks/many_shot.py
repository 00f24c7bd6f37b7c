"""ICL.ManyShot (scbench_many_shot): many in-context demonstrations, then new questions of the same kind.

Source: SCBench (arXiv 2412.10319): ~150 BIG-Bench-Hard demonstrations (date understanding, salient
translation, tracking seven shuffled objects); row field ``task``; the answer is an option letter
string; category global information. Template ``{context}\\n\\n{input}``.

Score (faithful, as coded in the reference): the long-dialogue QA rule applied to a string label, so it
iterates the label's CHARACTERS: 1 if any character of the answer (e.g. "(", "C" or ")" of "(C)")
occurs in the upper-cased prediction. Variant ``exact_letter``: the first option letter of the
prediction ("(C)", else a standalone capital letter) must equal the answer's letter.

Offline data: exactly computable BBH-style items (tasks/bbh.py: tracking seven shuffled objects, date
understanding; salient translation needs a parallel corpus and is left to the official data). The
number of demonstrations fills the requested length (about 150 at ~40K tokens). Version 1.
"""
from __future__ import annotations

import re

from scbench.tasks.base import Task, fit_length
from scbench.tasks.bbh import ITEMS, TASK_DESCRIPTIONS
from scbench.tasks.scoring import any_item_upper_in

HEADER = ("The following are examples of {what}. Answer the last question in the same format as the examples, "
          "with the letter of the correct option in parentheses.\n\n")


def option_letter(text: str) -> str | None:
    """The first "(X)" letter of the text, else its first standalone capital letter."""
    m = re.search(r"\(([A-Z])\)", text) or re.search(r"\b([A-Z])\b", text)
    return m.group(1) if m else None


class ManyShotTask(Task):
    name = "scbench_many_shot"
    category = "global_information"
    version = "1"
    max_new_tokens = 10
    metric = "many_shot"
    variants = ("faithful", "exact_letter")
    offline_source = "seeded BBH-style items (tracking 7 shuffled objects, date understanding)"

    def score(self, prediction, turn, example_extra):
        if self.variant == "exact_letter":
            gold = option_letter(str(turn.answer))
            return {self.metric: float(gold is not None and option_letter(prediction.strip()) == gold)}
        label = turn.answer if isinstance(turn.answer, list) else str(turn.answer)
        return {self.metric: any_item_upper_in(prediction, label)}

    def generate_row(self, rng, idx, length, n_turns, count):
        task = sorted(ITEMS)[rng.randrange(len(ITEMS))]
        make = ITEMS[task]
        header = HEADER.format(what=TASK_DESCRIPTIONS[task])
        asked, seen = [], set()
        while len(asked) < n_turns:
            q, a = make(rng)
            if q not in seen:
                seen.add(q)
                asked.append((q, a))
        demos = []
        for _ in range(max(4, length // 40)):
            q, a = make(rng)
            if q not in seen:
                seen.add(q)
                demos.append(f"Q: {q}\nA: {a}")

        def build(n: int) -> str:
            return header + "\n\n".join(demos[:n])

        n, context = fit_length(build, length, count, start=max(1, length // 250))
        turns = [{"input": f"Q: {q}\nA:", "answer": a} for q, a in asked]
        return {"id": idx, "context": context, "multi_turns": turns, "task": task, "source": self.offline_source}


TASK = ManyShotTask()
