"""Math.Find (scbench_mf): a statistic (largest, smallest, median, ...) of a long list of integers.

Source: SCBench (arXiv 2412.10319), from InfiniteBench math_find; context is a list of integers rendered
as Python's ``str(list)``; answer int; category global information.

Prompt (SCBENCH.md s.2): ``{prefix}\\n\\n{context}\\n\\n{input}`` with prefix ``What is {target}?``, target
= the match of ``The .+ is`` in the input, lower-cased, " is" removed. Follow-ups ``{prefix}\\n\\n{input}``;
faithful quirk: every follow-up reuses the LAST kept turn's prefix. Variant ``fixed``: each follow-up
uses its own prefix and the scorer keeps a minus sign.

Multi-request mode needs one text before the context for every request, so ``first_prompt`` always
puts turn 0's prefix before the context (what the reference's first turn shows); request j > 0 then
states its own prefix after the context: ``\\n\\n{prefix_j}\\n\\n{input_j}``. The reference's own
multi-request prompt 0 puts turn 0's whole input before the context instead.

Score: first ``\\d+\\.\\d+|\\d+`` of the prediction, ``int(float(match)) == label`` (minus sign ignored).
Offline data: seeded uniform 3-digit integers (as in the paper), with a unique mode planted and an odd
length so the median is an element. Version 1.
"""
from __future__ import annotations

import re
from collections import Counter

from scbench.tasks.base import PromptParts, Task, fit_length
from scbench.tasks.scoring import first_number_score

QUESTION = "You should answer with only one number, no other words. The {what} of the list is: "
STATS = {
    "largest number": lambda xs: max(xs),
    "smallest number": lambda xs: min(xs),
    "median": lambda xs: sorted(xs)[len(xs) // 2],
    "most frequent number": lambda xs: Counter(xs).most_common(1)[0][0],
    "second largest distinct number": lambda xs: sorted(set(xs))[-2],
    "second smallest distinct number": lambda xs: sorted(set(xs))[1],
}


def mf_prefix(text: str) -> str:
    """``What is {target}?`` from the first ``The .+ is`` match of a turn input."""
    m = re.search(r"The .+ is", text)
    if m is None:
        raise ValueError(f"scbench_mf: no 'The ... is' in the turn input {text!r}")
    return f"What is {m.group(0).lower()[:-3]}?"


class MathFindTask(Task):
    name = "scbench_mf"
    category = "global_information"
    version = "1"
    max_new_tokens = 5
    metric = "mf"
    variants = ("faithful", "fixed")
    offline_source = "seeded random 3-digit integers (paper construction)"

    def first_prompt(self, example, index=0):
        turns = example.turns
        after = "\n\n" + turns[index].input
        if index > 0:
            after = "\n\n" + mf_prefix(turns[index].input) + after
        return PromptParts(mf_prefix(turns[0].input) + "\n\n", render_context(example.context), after)

    def followup_prompt(self, example, index):
        source = example.turns[index] if self.variant == "fixed" else example.turns[-1]
        return mf_prefix(source.input) + "\n\n" + example.turns[index].input

    def score(self, prediction, turn, example_extra):
        return {self.metric: first_number_score(prediction, turn.answer, signed=self.variant == "fixed")}

    def generate_row(self, rng, idx, length, n_turns, count):
        if n_turns > len(STATS):
            raise ValueError(f"scbench_mf has {len(STATS)} distinct questions; asked for {n_turns} turns")
        pool = [rng.randint(100, 999) for _ in range(max(64, int(length * 1.2)))]
        n, _ = fit_length(lambda k: str(pool[:k]), length, count, start=max(8, length // 2))
        numbers = pool[: n - 1 if n % 2 == 0 else n]
        counts = Counter(numbers)
        mode, top = counts.most_common(1)[0]
        slots = [i for i, x in enumerate(numbers) if x != mode]
        if slots and sum(1 for c in counts.values() if c == top) > 1:
            numbers[rng.choice(slots)] = mode  # one more copy breaks a tie for the most frequent number
        if len(set(numbers)) < 3:
            raise ValueError(f"length={length} is too short for scbench_mf")
        asked = rng.sample(sorted(STATS), n_turns)
        turns = [{"input": QUESTION.format(what=w), "answer": int(STATS[w](numbers))} for w in asked]
        return {"id": idx, "context": numbers, "multi_turns": turns, "source": self.offline_source}


def render_context(context) -> str:
    return str(list(context)) if isinstance(context, (list, tuple)) else str(context)


TASK = MathFindTask()
