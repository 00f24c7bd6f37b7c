"""Retr.KV (scbench_kv): find the value of a key in a JSON object of random UUID pairs.

Source: SCBench (arXiv 2412.10319), built from InfiniteBench kv_retrieval; category string retrieval.
Score: 1 if the gold value is a case-sensitive substring of the prediction. Version 1.
"""
from __future__ import annotations

import json
import random

from scbench.tasks.base import PromptParts, Task, fit_length, substring_score, uuid4

INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below.\n\n"
QUESTION = 'Key: "{key}"\nThe value associated with the specified key is: '


class KVTask(Task):
    name = "scbench_kv"
    category = "string_retrieval"
    version = "1"
    max_new_tokens = 150
    offline_source = "seeded random UUID key/value pairs as a JSON object (paper construction)"
    metric = "kv"

    def first_prompt(self, example, index=0):
        return PromptParts(INSTRUCTION, str(example.context), "\n\n" + example.turns[index].input)

    def score(self, prediction, turn, example_extra):
        return {self.metric: substring_score(turn.answer, prediction)}

    def generate_row(self, rng, idx, length, n_turns, count):
        pairs = [(uuid4(rng), uuid4(rng)) for _ in range(max(n_turns, length // 40 + 1) * 2)]

        def build(n: int) -> str:
            return json.dumps(dict(pairs[:n]), ensure_ascii=False)

        n, context = fit_length(build, length, count, start=max(n_turns, length // 55))
        if n < n_turns:
            raise ValueError(f"length={length} is too short for {n_turns} distinct keys in scbench_kv")
        asked = rng.sample(range(n), n_turns)
        turns = [{"input": QUESTION.format(key=pairs[i][0]), "answer": pairs[i][1]} for i in asked]
        return {"id": idx, "context": context, "multi_turns": turns}


TASK = KVTask()
