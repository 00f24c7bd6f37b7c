"""Retr.MultiHop (scbench_vt): RULER-style variable tracking through chains of assignments.

Source: SCBench (arXiv 2412.10319) / RULER (arXiv 2404.06654); category string retrieval. Each turn asks
for every variable of one chain. Score: mean over gold names of ``name.lower() in pred.lower()``,
rounded to 2 decimals (as coded in the reference). Official rows may carry the context inside the
first turn's ``input`` with an empty ``context``; the default template handles both. Version 1.
"""
from __future__ import annotations

import random
import string

from scbench.tasks.base import Task, fit_length

INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = (
    "Question: Find all variables that are assigned the value {value} in the text above. Answer: According to "
    "the chain(s) of variable assignment in the text above, {n} variables are assigned the value {value}, "
    "they are: "
)


def vt_score(prediction: str, names: list[str]) -> float:
    if not names:
        return 0.0
    hits = sum(1.0 for n in names if str(n).lower() in prediction.lower())
    return round(hits / len(names), 2)


class VTTask(Task):
    name = "scbench_vt"
    category = "string_retrieval"
    version = "1"
    max_new_tokens = 30
    offline_source = "seeded RULER-style variable chains in repeated filler sentences (paper construction)"
    metric = "vt"

    hops: int = 2
    """Assignments after the first one in each chain (SCBench: 2 chains x 2 hops; one chain per turn here)."""

    def score(self, prediction, turn, example_extra):
        names = turn.answer if isinstance(turn.answer, list) else [turn.answer]
        return {self.metric: vt_score(prediction, names)}

    def generate_row(self, rng, idx, length, n_turns, count):
        n_chains = max(2, n_turns)
        names: set[str] = set()
        chains = []
        values: set[str] = set()
        for _ in range(n_chains):
            value = str(rng.randint(10000, 99999))
            while value in values:
                value = str(rng.randint(10000, 99999))
            values.add(value)
            chain = []
            while len(chain) < self.hops + 1:
                name = "".join(rng.choices(string.ascii_uppercase, k=5))
                if name not in names:
                    names.add(name)
                    chain.append(name)
            chains.append((value, chain))
        statements = []
        for value, chain in chains:
            statements.append([f"VAR {chain[0]} = {value}."] + [
                f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])
            ])
        layout_seed = rng.getrandbits(32)

        def build(n_noise: int) -> str:
            r = random.Random(layout_seed)
            sentences = [NOISE] * n_noise
            flat = [s for chain in statements for s in chain]
            # keep each chain's order: assign sorted random slots to the statements of all chains
            slots = sorted(r.sample(range(n_noise + len(flat)), len(flat)))
            order = list(range(len(flat)))
            r.shuffle(order)
            # reorder so that within a chain the statements stay in sequence
            per_chain_positions = {}
            k = 0
            for c, chain in enumerate(statements):
                per_chain_positions[c] = sorted(slots[o] for o in order[k:k + len(chain)])
                k += len(chain)
            placed = {}
            for c, chain in enumerate(statements):
                for pos, stmt in zip(per_chain_positions[c], chain):
                    placed[pos] = stmt
            out, it = [], iter(sentences)
            for i in range(n_noise + len(flat)):
                out.append(placed[i] if i in placed else next(it))
            return INSTRUCTION + " ".join(out)

        _, context = fit_length(build, length, count, start=max(1, length // 24))
        asked = rng.sample(range(n_chains), n_turns)
        turns = [
            {"input": QUESTION.format(value=chains[c][0], n=len(chains[c][1])), "answer": chains[c][1]}
            for c in asked
        ]
        return {"id": idx, "context": context, "multi_turns": turns}


TASK = VTTask()
