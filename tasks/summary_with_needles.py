"""Mix.Sum+NIAH (scbench_summary_with_needles): summary turns and passkey turns over one context.

Source: SCBench (arXiv 2412.10319): the En.Sum papers with 5 passkey needles; each turn carries ``task``
in {scbench_summary, scbench_passkey}; category multi-task. Template ``{context}\\n\\n{input}``; no
"This paper" prefix (the reference adds it to scbench_summary only). Per-turn max new tokens by the
turn's task (800 / 15); the truncation budget reserves ``sum(max_new_tokens) * n_turns // 2``.
Scores: ``{"summary": ROUGE-Lsum F1}`` on summary turns, ``{"passkey": 1 if the first digit run of the
prediction equals the label}`` on passkey turns.

Offline data: the documents of tasks/summary.py (CPython language-reference sections, lead paragraph
as reference summary) with 5 (or more, one per passkey turn) labelled passkey needles between them;
turns alternate summary, passkey, summary, ... Version 1.
"""
from __future__ import annotations

from scbench.tasks.material import SOURCE_DOCS
from scbench.tasks.mixed import MixedTask
from scbench.tasks.scoring import passkey_score, rouge_lsum
from scbench.tasks.summary import pick_documents, place_documents, summary_turn

LABELS = ("amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
          "kestrel", "lagoon", "meadow", "nectar", "onyx", "prairie")
NEEDLE = 'The pass key labelled "{label}" is {key}. Remember it. {key} is the pass key labelled "{label}".'
QUESTION = 'What is the pass key labelled "{label}"? Answer with the number only. The pass key labelled "{label}" is'
N_NEEDLES = 5


class SummaryWithNeedlesTask(MixedTask):
    name = "scbench_summary_with_needles"
    category = "multi_task"
    version = "1"
    max_new_tokens = 800
    turn_tokens = {"scbench_summary": 800, "scbench_passkey": 15}
    metric = "summary"
    metrics = ("summary", "passkey")
    offline_source = SOURCE_DOCS + " + seeded passkey needles"

    def score(self, prediction, turn, example_extra):
        task = turn.extra.get("task")
        if task == "scbench_summary":
            return {"summary": rouge_lsum(prediction, turn.answer)}
        if task == "scbench_passkey":
            return {"passkey": passkey_score(prediction, turn.answer)}
        raise ValueError(f"{self.name}: turn task must be scbench_summary or scbench_passkey, got {task!r}")

    def generate_row(self, rng, idx, length, n_turns, count):
        kinds = ["scbench_summary" if i % 2 == 0 else "scbench_passkey" for i in range(n_turns)]
        n_keys = max(N_NEEDLES, kinds.count("scbench_passkey"))
        if n_keys > len(LABELS):
            raise ValueError(f"scbench_summary_with_needles supports at most {len(LABELS)} passkey turns")
        labels = rng.sample(LABELS, n_keys)
        keys = [str(rng.randint(10_000, 99_999)) for _ in labels]
        needles = [NEEDLE.format(label=lab, key=k) for lab, k in zip(labels, keys)]
        context, placed = place_documents(rng, length, count, kinds.count("scbench_summary"), needles)
        docs = iter(pick_documents(rng, placed, kinds.count("scbench_summary")))
        asked = iter(rng.sample(range(n_keys), kinds.count("scbench_passkey")))
        turns = []
        for kind in kinds:
            if kind == "scbench_summary":
                turns.append({**summary_turn(next(docs)), "task": kind})
            else:
                j = next(asked)
                turns.append({"input": QUESTION.format(label=labels[j]), "answer": keys[j], "task": kind})
        return {"id": idx, "context": context, "multi_turns": turns, "source": SOURCE_DOCS + " + seeded passkeys"}


TASK = SummaryWithNeedlesTask()
