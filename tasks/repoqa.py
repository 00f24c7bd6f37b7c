"""Code.RepoQA (scbench_repoqa): find a function from its description in a long code context and repeat it.

Source: SCBench (arXiv 2412.10319), built on RepoQA "search needle function" (evalplus/repoqa): official
rows carry ``lang`` and ``repo`` per row, ``name`` per turn, the answer is the function's source; category
semantic retrieval. Score (SCBENCH.md s.4): extract the first function of the output's code blocks with
tree-sitter, BLEU (NLTK, smoothing method4) against every gold function of the repo; pass if the best
match is the turn's function with BLEU >= 0.8.

Grouping: the reference compares against all gold functions of the same repo over the run. ``score``
takes them from ``example_extra["needles"]`` ([{"name", "needle"}], see ``code_scoring.repo_needles``)
and, when absent, falls back to the turn's own function alone (then the rule reduces to BLEU >= 0.8).

Offline data: real Python standard-library code (``tasks/pycode.py``); needles are functions with
docstrings, the docstring's first paragraph is the description and is removed from the context.
Python only offline; other languages come with the official data. Version 1.
"""
from __future__ import annotations

from scbench.tasks.base import PromptParts, Task
from scbench.tasks.code_scoring import attach_repo_needles, repoqa_score
from scbench.tasks.material import SOURCE_CODE
from scbench.tasks.pycode import build_code

INSTRUCTION = (
    "Based on the function description and code context, please retrieve and repeat the exact described "
    "function from the code context in a code block wrapped by ```:\n\n"
)
QUESTION = "Function description: {description}\n\nRepeat the complete source code of the described function."


def needles_for(turn, example_extra: dict) -> list[dict]:
    """The repo's gold functions for scoring one turn (see the module docstring)."""
    needles = example_extra.get("needles")
    if needles:
        return list(needles)
    return [{"name": turn.extra.get("name"), "needle": str(turn.answer)}]


def repo_name(rng) -> str:
    return f"python-stdlib-{rng.getrandbits(32):08x}"


class RepoQATask(Task):
    name = "scbench_repoqa"
    category = "semantic_retrieval"
    version = "1"
    max_new_tokens = 1024
    metric = "repoqa"
    offline_source = SOURCE_CODE + " (python only)"

    def first_prompt(self, example, index=0):
        return PromptParts(INSTRUCTION, str(example.context), "\n\n" + example.turns[index].input)

    def prepare_examples(self, examples, max_turns):
        return attach_repo_needles(examples, max_turns)

    def score(self, prediction, turn, example_extra):
        lang = example_extra.get("lang", "python")
        return {self.metric: repoqa_score(prediction, turn.extra.get("name"), lang, needles_for(turn, example_extra))}

    def generate_row(self, rng, idx, length, n_turns, count):
        repo = repo_name(rng)
        context, needles = build_code(rng, length, count, n_turns)
        turns = [{"input": QUESTION.format(description=n.description), "answer": n.answer, "name": n.name}
                 for n in needles]
        return {"id": idx, "context": context, "multi_turns": turns, "lang": "python", "repo": repo,
                "source": SOURCE_CODE}


TASK = RepoQATask()
