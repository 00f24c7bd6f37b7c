"""Turn task text into the token ids each turn feeds, for both shared-context modes (SCBENCH.md s.2-3).

Multi-turn: turn 0 is the chat-templated first user message with the generation prompt; turn i > 0
feeds only the delta: the previous answer as the assistant message (gold by default, the model's own
with ``golden=False``), the follow-up user message and the generation prompt. The delta is the text
the template adds, tokenized alone, so the reuse path and a naive replay see the same tokens.

Multi-request: prompt 0 is the chat-templated user turn cut right after the context; request j is
the rest of a first-turn user message asking turn j (query, end of the user turn, generation prompt).
Truncation (keep the first L//2 and last L//2 tokens) applies to the first prompt only.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

MODES = ("multi_turn", "multi_request")
BOS_POLICIES = ("faithful", "single_bos")
TRUNCATIONS = ("reference", "context")
MULTI_REQUEST_MARGIN = 1000


@dataclass
class TurnPrompt:
    ids: list[int]
    """Tokens to feed for this turn (on top of the cache)."""
    max_new_tokens: int
    rewind: int = 0
    """Tokens at the end of ``ids`` that belong to the assistant's answer (a forced prefix) and are
    dropped with the generated tokens before the next turn."""
    query_start: int | None = None
    """Index into ``ids`` where the query starts (first multi-turn prompt only), for query-blind compression."""


class PromptBuilder:
    def __init__(self, engine, task, example, *, mode: str, n_turns: int, max_seq_length: int,
                 bos: str = "faithful", golden: bool = True, max_new_tokens_cap: int | None = None,
                 truncation: str = "reference"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if bos not in BOS_POLICIES:
            raise ValueError(f"bos must be one of {BOS_POLICIES}, got {bos!r}")
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        self.truncation = truncation
        if 0 < n_turns < len(example.turns):  # the reference cuts the rows to the kept turns first
            example = dataclasses.replace(example, turns=example.turns[:n_turns])
        self.engine, self.task, self.example = engine, task, example
        self.mode, self.n_turns, self.golden = mode, n_turns, golden
        self.add_special = bos == "faithful"
        self.cap = max_new_tokens_cap
        limit = min(max_seq_length, engine.window)
        budget = limit - task.reserved_tokens(example, n_turns)
        if mode == "multi_request" or truncation == "context":
            budget -= MULTI_REQUEST_MARGIN
        if budget < 16:
            raise ValueError(
                f"{task.name} example {example.id}: no room for the prompt: window {limit} minus the generation "
                f"budget leaves {budget} tokens; raise max_seq_length or lower max_turns"
            )
        self.budget = budget
        self.truncated = 0
        self._history: list[dict] = []
        self._rendered = ""

    # --- shared helpers -------------------------------------------------------------------------
    def max_new(self, index: int) -> int:
        n = self.task.turn_max_new_tokens(self.example, index)
        return min(n, self.cap) if self.cap else n

    def _truncate(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.budget:
            return ids
        half = self.budget // 2
        self.truncated = len(ids) - 2 * half
        log.warning(
            "%s example %s: first prompt of %d tokens exceeds the budget of %d; middle-truncated to %d (removed %d)",
            self.task.name, self.example.id, len(ids), self.budget, 2 * half, self.truncated,
        )
        return ids[:half] + ids[-half:]

    def _prefix(self, index: int) -> list[int]:
        text = self.task.assistant_prefix(self.example, index)
        return self.engine.encode(text, add_special_tokens=False) if text else []

    # --- multi-turn -----------------------------------------------------------------------------
    def first(self) -> TurnPrompt:
        parts = self.task.first_prompt(self.example, 0)
        self._history = [{"role": "user", "content": parts.text}]
        text = self.engine.render_chat(self._history, add_generation_prompt=True)
        self._rendered = text
        cut = text.find(parts.text)
        end = cut + len(parts.before) + len(parts.context)
        if self.truncation == "context":  # multi-request's request 0: its context (cut alone), then the query whole
            if cut < 0:
                raise ValueError("the chat template changes the user message; cannot cut the first prompt after the "
                                 "context (policy.truncation=context)")
            ids = self._truncate(self.engine.encode(text[:end], add_special_tokens=self.add_special))
            prefix = self._prefix(0)
            return TurnPrompt(ids + self.engine.encode(text[end:], add_special_tokens=False) + prefix, self.max_new(0),
                              rewind=len(prefix), query_start=len(ids))
        ids = self.engine.encode(text, add_special_tokens=self.add_special)
        query_tokens = None
        if cut >= 0:  # tokenize only the text after the context, not the (long) context a second time
            tail_ids = self.engine.encode(text[end:], add_special_tokens=False)
            if tail_ids and ids[-len(tail_ids):] == tail_ids:
                query_tokens = len(tail_ids)
        ids = self._truncate(ids)
        prefix = self._prefix(0)
        qs = len(ids) - query_tokens if query_tokens is not None and query_tokens < self.budget // 2 else None
        return TurnPrompt(ids + prefix, self.max_new(0), rewind=len(prefix), query_start=qs)

    def delta(self, index: int, previous_answer: str | None = None) -> TurnPrompt:
        """Turn ``index`` >= 1 of multi-turn mode. ``previous_answer`` is the model's answer to the
        previous turn, used instead of the gold one when ``golden`` is False."""
        prev_turn = self.example.turns[index - 1]
        answer = self.task.answer_text(prev_turn) if self.golden else (previous_answer or "")
        answer = self.task.assistant_prefix(self.example, index - 1) + answer
        self._history += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": self.task.followup_prompt(self.example, index)},
        ]
        text = self.engine.render_chat(self._history, add_generation_prompt=True)
        if not text.startswith(self._rendered):
            raise ValueError(
                f"the chat template of {self.engine.describe()['model']} does not render the conversation as a "
                "growing prefix, so the multi-turn delta is undefined"
            )
        ids = self.engine.encode(text[len(self._rendered):], add_special_tokens=False)
        self._rendered = text
        prefix = self._prefix(index)
        return TurnPrompt(ids + prefix, self.max_new(index), rewind=len(prefix))

    # --- multi-request --------------------------------------------------------------------------
    def _split_request(self, index: int) -> tuple[str, str]:
        parts = self.task.first_prompt(self.example, index)
        text = self.engine.render_chat([{"role": "user", "content": parts.text}], add_generation_prompt=True)
        cut = text.find(parts.text)
        if cut < 0:
            raise ValueError("the chat template changes the user message; cannot cut prompt 0 after the context")
        end = cut + len(parts.before) + len(parts.context)
        return text[:end], text[end:]

    def context(self) -> list[int]:
        """Prompt 0 of multi-request mode: the templated user turn up to the end of the context."""
        head, _ = self._split_request(0)
        self._head = head
        return self._truncate(self.engine.encode(head, add_special_tokens=self.add_special))

    def request(self, index: int) -> TurnPrompt:
        head, tail = self._split_request(index)
        if head != self._head:
            raise ValueError(
                f"{self.task.name} example {self.example.id}: request {index} changes the text before the context; "
                "multi-request mode needs one shared prompt 0"
            )
        ids = self.engine.encode(tail, add_special_tokens=False)
        # no forced assistant prefix here: the reference adds it to multi-turn follow-ups only
        return TurnPrompt(ids, self.max_new(index))
