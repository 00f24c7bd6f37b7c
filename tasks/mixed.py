"""Base of the multi-task sessions: every turn names its sub-task, which picks its generation budget.

SCBENCH.md s.2: per-turn max new tokens follow the turn's ``task``; the first prompt's truncation
budget reserves ``sum(max_new_tokens.values()) * n_turns // 2`` (as the reference computes it).
"""
from __future__ import annotations

from typing import ClassVar

from scbench.tasks.base import Task


class MixedTask(Task):
    turn_tokens: ClassVar[dict[str, int]]
    """Sub-task name -> max new tokens of its turns."""
    metrics: ClassVar[tuple[str, ...]]
    """Score keys, one per sub-task."""

    def turn_task(self, example, index: int) -> str:
        task = example.turns[index].extra.get("task")
        if task not in self.turn_tokens:
            raise ValueError(f"{self.name} example {example.id} turn {index}: task must be one of "
                             f"{sorted(self.turn_tokens)}, got {task!r}")
        return task

    def turn_max_new_tokens(self, example, index):
        return self.turn_tokens[self.turn_task(example, index)]

    def reserved_tokens(self, example, n_turns):
        return sum(self.turn_tokens.values()) * n_turns // 2
