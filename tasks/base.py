"""The task interface: prompt pieces, per-turn generation budget, a pure scorer and an offline generator.

A task never touches the model: the runner asks it for text and scores, and the prompt builder turns
text into tokens. Facts (templates, scoring rules) follow ../shared/SCBENCH.md sections 2 and 4.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from scbench.records import Example, Turn

TokenCounter = Callable[[str], int]


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 3.6 characters per token for English/code-like text)."""
    return max(1, round(len(text) / 3.6))


@dataclass(frozen=True)
class PromptParts:
    """A first-turn user message split around the context: ``before + context + after``."""

    before: str
    context: str
    after: str

    @property
    def text(self) -> str:
        return self.before + self.context + self.after


class Task:
    """Base of every task. Subclasses set the class attributes and implement the three methods."""

    name: ClassVar[str]
    category: ClassVar[str]
    """SCBench category: string_retrieval, semantic_retrieval, global_information, multi_task."""
    version: ClassVar[str] = "1"
    max_new_tokens: ClassVar[int]
    metric: ClassVar[str]
    """Name of the score key (mixed tasks return several keys)."""
    variants: ClassVar[tuple[str, ...]] = ("faithful",)
    """Scoring variants; the first is the reference behaviour and the default."""
    variant: str = "faithful"
    offline_source: ClassVar[str] = "seeded synthetic data (see the task docstring)"
    """Where the offline generator's material comes from (shown by ``scbench ls tasks``)."""

    def prepare_examples(self, examples: list[Example], max_turns: int) -> list[Example]:
        """Run-level preparation before replay (default: none). RepoQA uses it to give every example the gold
        functions of its repo over the whole run, which the reference scorer compares against."""
        return examples

    def with_variant(self, variant: str | None) -> "Task":
        """A copy of the task that scores with ``variant`` (None: the default)."""
        import copy

        if variant is None or variant == self.variant:
            return self
        if variant not in self.variants:
            raise ValueError(f"task {self.name} has no variant {variant!r}; variants: {', '.join(self.variants)}")
        other = copy.copy(self)
        other.variant = variant
        return other

    # --- prompts ---------------------------------------------------------------------------------
    def first_prompt(self, example: Example, index: int = 0) -> PromptParts:
        """The user message that carries the context and asks turn ``index`` (index > 0 serves
        multi-request mode, where every request is a first turn). Default template
        ``{context}\\n\\n{input}`` (the instruction is inside the data)."""
        return PromptParts("", str(example.context), "\n\n" + example.turns[index].input)

    def followup_prompt(self, example: Example, index: int) -> str:
        """User message of turn ``index`` >= 1 (default: the turn's input as is)."""
        return example.turns[index].input

    def turn_max_new_tokens(self, example: Example, index: int) -> int:
        return self.max_new_tokens

    def reserved_tokens(self, example: Example, n_turns: int) -> int:
        """Generation budget subtracted from the window when truncating the first prompt."""
        return self.max_new_tokens * n_turns

    def assistant_prefix(self, example: Example, index: int) -> str:
        """Text forced at the start of the assistant's answer of turn ``index`` (default none)."""
        return ""

    def answer_text(self, turn: Turn) -> str:
        """The gold answer as the assistant message of the golden history."""
        if isinstance(turn.answer, list):
            return ", ".join(str(a) for a in turn.answer)
        return str(turn.answer)

    # --- scoring ---------------------------------------------------------------------------------
    def score(self, prediction: str, turn: Turn, example_extra: dict) -> dict[str, float]:
        raise NotImplementedError

    # --- offline data ----------------------------------------------------------------------------
    def generate_row(self, rng: random.Random, idx: int, length: int, n_turns: int, count: TokenCounter) -> dict:
        """One row in the official schema with a context of about ``length`` tokens."""
        raise NotImplementedError


def fit_length(build: Callable[[int], str], length: int, count: TokenCounter, start: int) -> tuple[int, str]:
    """The item count whose built context comes closest to ``length`` tokens without going over it.

    ``build(n)`` renders a context of n roughly uniform items. A few proportional corrections, then
    small steps down until the context fits.
    """
    n = max(1, start)
    for _ in range(4):
        got = count(build(n))
        new = max(1, int(n * length / max(got, 1)))
        if new == n:
            break
        n = new
    text = build(n)
    while n > 1 and count(text) > length:
        n -= max(1, n // 50)
        text = build(n)
    return n, text


def uuid4(rng: random.Random) -> str:
    """A UUID4-shaped string from a seeded RNG (deterministic, unlike uuid.uuid4)."""
    h = "%032x" % rng.getrandbits(128)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[rng.randrange(4)]}{h[17:20]}-{h[20:32]}"


def substring_score(label: str, prediction: str) -> float:
    """1.0 if ``label`` is a case-sensitive substring of ``prediction`` (SCBench string retrieval)."""
    return 1.0 if str(label) in prediction else 0.0


Row = dict[str, Any]
