"""Retr.Prefix-Suffix (scbench_prefix_suffix): find the one string with a given prefix and suffix.

Source: SCBench (arXiv 2412.10319), a dictionary of random strings of length 65-122; category string
retrieval. Score: 1 if the gold string is a case-sensitive substring of the prediction. Version 1.
The wording of generated rows is ours (the official rows carry their own instruction in the data).
"""
from __future__ import annotations

import random
import string

from scbench.tasks.base import Task, fit_length, substring_score

HEADER = "Below is a dictionary of strings. Each line is one string.\n\n"
QUESTION = (
    'Which string in the dictionary above starts with "{prefix}" and ends with "{suffix}"? '
    "Answer with the string only.\nAnswer: "
)
ALPHABET = string.ascii_letters + string.digits
AFFIX = 5


class PrefixSuffixTask(Task):
    name = "scbench_prefix_suffix"
    category = "string_retrieval"
    version = "1"
    max_new_tokens = 150
    offline_source = "seeded random alphanumeric strings of length 65-122 (paper construction)"
    metric = "prefix_suffix"

    def score(self, prediction, turn, example_extra):
        return {self.metric: substring_score(turn.answer, prediction)}

    def generate_row(self, rng, idx, length, n_turns, count):
        pool = ["".join(rng.choices(ALPHABET, k=rng.randint(65, 122))) for _ in range(max(8, length // 25))]

        def build(n: int) -> str:
            return HEADER + "\n".join(pool[:n])

        n, context = fit_length(build, length, count, start=max(n_turns, length // 40))
        strings = pool[:n]
        affixes = [(s[:AFFIX], s[-AFFIX:]) for s in strings]
        unique = [i for i, a in enumerate(affixes) if affixes.count(a) == 1]
        if len(unique) < n_turns:
            raise ValueError(f"length={length} is too short for {n_turns} questions in scbench_prefix_suffix")
        asked = rng.sample(unique, n_turns)
        turns = [
            {"input": QUESTION.format(prefix=strings[i][:AFFIX], suffix=strings[i][-AFFIX:]), "answer": strings[i]}
            for i in asked
        ]
        return {"id": idx, "context": context, "multi_turns": turns}


TASK = PrefixSuffixTask()
