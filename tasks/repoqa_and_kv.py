"""Mix.RepoQA+KV (scbench_repoqa_and_kv): RepoQA and key-value retrieval turns over one code context.

Source: SCBench (arXiv 2412.10319): a RepoQA code context with ~100 JSON key/value pairs of UUIDs
placed between functions; each turn carries ``task`` in {scbench_repoqa, scbench_kv}; category
multi-task. Template ``{context}\\n\\n{input}`` (instructions are in the data). Per-turn max new
tokens by the turn's task (1024 / 80); the truncation budget reserves
``sum(max_new_tokens) * n_turns // 2``. Scores: ``{"repoqa": x}`` on RepoQA turns (see
tasks/repoqa.py, including the needle grouping) and ``{"kv": y}`` on KV turns (substring).

Difference from the reference: in multi-request mode the reference compares each KV label with the
whole prediction record instead of its text, so its KV number there is always 0; this harness scores
KV turns by the per-prediction rule in both modes.

Offline data: Python standard-library code (tasks/pycode.py) with seeded UUID pairs as comment lines
``# KV pair: {"<key>": "<value>"}``; turns alternate RepoQA, KV, RepoQA, ... Version 1.
"""
from __future__ import annotations

import json

from scbench.tasks.base import substring_score, uuid4
from scbench.tasks.code_scoring import attach_repo_needles, repoqa_score
from scbench.tasks.material import SOURCE_CODE
from scbench.tasks.mixed import MixedTask
from scbench.tasks.pycode import build_code
from scbench.tasks.repoqa import needles_for, repo_name

HEADER = (
    "Below is the code of a Python repository. Lines starting with \"# KV pair:\" between the functions hold "
    "key-value pairs of a JSON object.\n\n"
)
REPOQA_INPUT = (
    "Based on the function description and code context, please retrieve and repeat the exact described "
    "function from the code context in a code block wrapped by ```:\n\nFunction description: {description}"
)
KV_INPUT = (
    "Extract the value corresponding to the specified key in the KV pairs of the code above.\n"
    'Key: "{key}"\nThe value associated with the specified key is: '
)


class RepoQAAndKVTask(MixedTask):
    name = "scbench_repoqa_and_kv"
    category = "multi_task"
    version = "1"
    max_new_tokens = 1024
    turn_tokens = {"scbench_repoqa": 1024, "scbench_kv": 80}
    metric = "repoqa"
    metrics = ("repoqa", "kv")
    offline_source = SOURCE_CODE + " (python only) + seeded UUID pairs"

    kv_per_token: float = 100 / 64_000
    """KV pairs per context token (SCBench: ~100 pairs in ~64K tokens of code)."""

    def prepare_examples(self, examples, max_turns):
        return attach_repo_needles(examples, max_turns)

    def score(self, prediction, turn, example_extra):
        task = turn.extra.get("task")
        if task == "scbench_kv":
            return {"kv": substring_score(turn.answer, prediction)}
        if task == "scbench_repoqa":
            lang = example_extra.get("lang", "python")
            return {"repoqa": repoqa_score(prediction, turn.extra.get("name"), lang, needles_for(turn, example_extra))}
        raise ValueError(f"{self.name}: turn task must be scbench_repoqa or scbench_kv, got {task!r}")

    def generate_row(self, rng, idx, length, n_turns, count):
        repo = repo_name(rng)
        kinds = ["scbench_repoqa" if i % 2 == 0 else "scbench_kv" for i in range(n_turns)]
        n_kv_turns = kinds.count("scbench_kv")
        pairs = [(uuid4(rng), uuid4(rng)) for _ in range(max(2 * n_kv_turns, 1, round(length * self.kv_per_token)))]
        lines = ["# KV pair: " + json.dumps({k: v}) for k, v in pairs]
        context, needles = build_code(rng, length - count(HEADER), count, n_turns - n_kv_turns, lines)
        asked = iter(rng.sample(range(len(pairs)), n_kv_turns))
        functions = iter(needles)
        turns = []
        for kind in kinds:
            if kind == "scbench_repoqa":
                n = next(functions)
                turns.append({"input": REPOQA_INPUT.format(description=n.description), "answer": n.answer,
                              "name": n.name, "task": kind})
            else:
                k, v = pairs[next(asked)]
                turns.append({"input": KV_INPUT.format(key=k), "answer": v, "task": kind})
        return {"id": idx, "context": HEADER + context, "multi_turns": turns, "lang": "python", "repo": repo,
                "source": SOURCE_CODE + " + seeded UUID key-value pairs"}


TASK = RepoQAAndKVTask()
