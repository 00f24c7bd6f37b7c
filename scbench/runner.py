"""Replay shared-context examples through an engine and a method, turn by turn (SCBENCH.md s.3).

The shared context is prefilled once per example. Multi-turn keeps growing the cache: after each
turn the generated tokens are dropped and the next delta (gold answer + follow-up) is appended.
Multi-request rolls the cache back to its post-context state after every request. Compression fires
on the first prefill (``compress=once``, the reference), on every turn's prefill, or on the first prefill and
every ``decode_interval`` decode steps (``decode_every``); sparse prefill on
the first prefill or on every one. ``reuse=False`` replays every turn from an empty cache instead.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Iterator

from scbench import checks as chk
from scbench.prompts import PromptBuilder, TurnPrompt
from scbench.records import Example, RunSpec, TurnResult, TurnStats

log = logging.getLogger(__name__)


def n_turns(example: Example, spec: RunSpec) -> int:
    return min(len(example.turns), spec.max_turns)


def query_blind_split(spec: RunSpec, ids: list[int], query_start: int | None) -> bool:
    """Whether a first prompt is fed in two parts, the context (compression fires on it) and then its query: the
    query is hidden from compression (``policy.query_visible=false``) and the prompt has a query start."""
    return query_start is not None and not spec.query_visible and 0 < query_start < len(ids)


def first_feed_ids(engine, task, example: Example, spec: RunSpec) -> list[int]:
    """The tokens of a run's first feed (the first prefill, what ``Replay`` feeds first with ``reuse``): multi-request
    prompt 0 (the context, cut before the first query); multi-turn the first prompt, up to its query when the query
    is hidden from compression (``query_blind_split``), else whole (context, query, generation prompt and forced
    assistant prefix in one forward). For methods that do not rewrite the context (no ``compress_context``)."""
    builder = PromptBuilder(engine, task, example, mode=spec.mode, n_turns=n_turns(example, spec),
                            max_seq_length=spec.max_seq_length, bos=spec.bos, golden=spec.golden_context,
                            max_new_tokens_cap=spec.max_new_tokens, truncation=spec.truncation)
    if spec.mode != "multi_turn":
        return builder.context()
    tp = builder.first()
    return tp.ids[: tp.query_start] if query_blind_split(spec, tp.ids, tp.query_start) else tp.ids


class Replay:
    """One example's replay; yields a TurnResult per turn that is not already in ``done``."""

    def __init__(self, engine, method, task, example: Example, spec: RunSpec, done: dict[int, str] | None = None,
                 warmup_s: float = 0.0):
        self.engine, self.method, self.task, self.example, self.spec = engine, method, task, example, spec
        self.warmup_s = warmup_s
        """The run's warm-up seconds (``engine.warmup``), charged to this replay's first generated turn."""
        self.done = done or {}
        self.turns = n_turns(example, spec)
        todo = [i for i in range(self.turns) if i not in self.done]
        earlier = [i for i in self.done if todo and i < todo[0]]
        self.check_turn = max(earlier) if earlier else None
        """The stored turn recomputed before the first missing one, to check that the resume reproduces the run."""
        self.mismatches: list[dict] = []
        """Stored turns whose recomputed prediction differs (a resume that does not reproduce the run)."""
        self.context_stats: dict = {}
        if spec.compress == "decode_every" and getattr(engine, "name", "") != "hf":
            raise ValueError(f"policy.compress=decode_every needs the hf engine (it compresses inside its decode loop); "
                             f"engine {getattr(engine, 'name', type(engine).__name__)!r} cannot")
        method.setup(engine)
        if "compress_context" in method.hooks():
            example = self.example = self._compress_context(example)
        self.builder = PromptBuilder(
            engine, task, example, mode=spec.mode, n_turns=self.turns, max_seq_length=spec.max_seq_length,
            bos=spec.bos, golden=spec.golden_context, max_new_tokens_cap=spec.max_new_tokens, truncation=spec.truncation,
        )
        self.session = None
        self.history: list[int] = []  # every token fed so far (multi-turn), for the naive replay
        self._warned_window = False

    def _compress_context(self, example: Example) -> Example:
        """Prompt compression (generation stage): the method rewrites the shared context once, before any
        prompt is built, so every turn (both modes, and the naive replay) sees the compressed context."""
        text = self.task.first_prompt(example, 0).context
        if not text:
            log.warning("%s example %s: empty context, nothing to compress", self.task.name, example.id)
            return example
        t0 = time.perf_counter()
        short = self.method.compress_context(text, engine=self.engine)
        seconds = time.perf_counter() - t0
        before = len(self.engine.encode(text, add_special_tokens=False))
        after = len(self.engine.encode(short, add_special_tokens=False))
        self.context_stats = {"context_rate": after / before, "context_compress_s": seconds}  # HOOK_COSTS
        return dataclasses.replace(example, context=short)

    # --- policies -----------------------------------------------------------------------------------
    def _feed(self, ids: list[int], *, first: bool, query_start: int | None = None):
        """Feed ids; compression / sparse prefill fire according to the run's policies."""
        compress = first or self.spec.compress == "every_turn"
        sparse = first or self.spec.sparse_prefill == "every"
        if first and compress and query_blind_split(self.spec, ids, query_start):
            a = self.session.feed(ids[:query_start], compress=True, sparse=sparse)
            b = self.session.feed(ids[query_start:], compress=False, sparse=sparse)
            return dataclasses.replace(a, tokens=a.tokens + b.tokens, seconds=a.seconds + b.seconds,
                                       attn_cells=a.attn_cells + b.attn_cells,
                                       attn_computed=a.attn_computed + b.attn_computed)
        return self.session.feed(ids, compress=compress, sparse=sparse)

    def __iter__(self) -> Iterator[TurnResult]:
        if self.spec.mode == "multi_turn":
            yield from self._multi_turn()
        else:
            yield from self._multi_request()

    def _multi_turn(self):
        prev_answer = None
        for i in range(self.turns):
            tp = self.builder.first() if i == 0 else self.builder.delta(i, prev_answer)
            if self.spec.reuse:
                if self.session is None:
                    self.session = self.engine.session(self.method)
                fs = self._feed(tp.ids, first=i == 0, query_start=tp.query_start)
            elif i not in self.done or i == self.check_turn:  # naive: everything so far from an empty cache
                self.session = self.engine.session(self.method)
                fs = self._feed(self.history + tp.ids, first=True)
            self.history += tp.ids
            if i in self.done:
                # A stored turn. With a reused cache its decode runs again: decoding can change what stays
                # in the cache after the generated tokens are dropped (KIVI quantises the prompt tail as
                # tokens are appended), so skipping it would leave later turns another cache.
                # The whole turn runs as it did (its counters are read and reset too); only the row is not stored.
                prev_answer = self.done[i]
                if self.spec.reuse:
                    result = self._turn(i, tp, fs)
                    self._compare(i, result.prediction)
                elif i == self.check_turn:
                    self._compare(i, self._generate(i, tp, fs, prompt_tokens=len(self.history))[0].prediction)
                self.history = self.history[: len(self.history) - tp.rewind]
                continue
            result = self._turn(i, tp, fs)
            prev_answer = result.prediction
            self.history = self.history[: len(self.history) - tp.rewind]
            yield result

    def _multi_request(self):
        ctx_ids = self.builder.context()
        ctx_fs = None
        checkpoint = None
        for j in range(self.turns):
            tp = self.builder.request(j)
            if self.spec.reuse:
                if self.session is None:
                    self.session = self.engine.session(self.method)
                    ctx_fs = self._feed(ctx_ids, first=True)
                    checkpoint = self.session.checkpoint(rewrites=self.spec.compress != "once")
                else:
                    self.session.rollback(checkpoint)
                fs = self._feed(tp.ids, first=False)
                if ctx_fs is not None:  # the context prefill is charged to the first request
                    fs = dataclasses.replace(fs, tokens=fs.tokens + ctx_fs.tokens, reused=0,
                                             seconds=fs.seconds + ctx_fs.seconds, compress_s=fs.compress_s + ctx_fs.compress_s,
                                             attn_cells=fs.attn_cells + ctx_fs.attn_cells,
                                             attn_computed=fs.attn_computed + ctx_fs.attn_computed,
                                             prefill_shared=ctx_fs.prefill_shared, scores_shared=ctx_fs.scores_shared)
                    ctx_fs = None
            else:
                self.session = self.engine.session(self.method)
                fs = self._feed(ctx_ids + tp.ids, first=True)
            if j in self.done:
                if j == self.check_turn:  # requests start from the context checkpoint: one recomputed as a check
                    self._compare(j, self._generate(j, tp, fs, prompt_tokens=len(ctx_ids) + len(tp.ids))[0].prediction)
                else:
                    self._discard_counters()
                continue
            # the prompt length from the prompt: an engine whose prefix cache reuses whole blocks (vLLM) recomputes
            # part of the context in the first request, so computed + reused can exceed it
            result, _ = self._generate(j, tp, fs, prompt_tokens=len(ctx_ids) + len(tp.ids))
            yield result

    def _checks(self, i: int, fs, stats: TurnStats, steps: int) -> list[dict]:
        """The method's promises for what fired this turn vs what the engine measured (scbench/checks.py)."""
        comp = getattr(self.session, "last_compression", None)
        if comp is not None:
            self.session.last_compression = None
        first = i == 0 or not self.spec.reuse
        hooks = self.method.hooks()
        e = self.engine
        promised = self.method.promises(
            context_tokens=comp["context_tokens"] if comp else fs.reused + fs.tokens,
            kv_heads=getattr(e, "kv_heads", 1), head_dim=getattr(e, "head_dim", 1),
            elt=getattr(getattr(e, "dtype", None), "itemsize", 2), num_layers=getattr(e, "num_layers", 1),
            q_heads=getattr(getattr(getattr(e, "model", None), "config", None), "num_attention_heads", None)
            or getattr(e, "kv_heads", 1))
        due = set()
        if "compress_cache" in hooks and (first or self.spec.compress == "every_turn" or comp):
            due |= {"kept_tokens", "kv_ratio"}
        if "prefill_attention" in hooks and (first or self.spec.sparse_prefill == "every"):
            due.add("attn_density")
        if "compress_context" in hooks and i == 0:
            due.add("context_rate")
        if "blend_prefill" in hooks and i == 0:
            due.add("recompute_frac")
        dense = chk.dense_load_bytes(stats.kv_full_bytes, getattr(self.session, "pos", 0), steps)
        if "decode_attention" in hooks and i == 0 and dense:  # later turns' prefills load rows too
            due |= {"loaded_ratio", "attended_ratio"}
        measured = {**(comp or {}), "attn_density": fs.attn_density if fs.attn_cells else None,
                    "context_rate": self.context_stats.get("context_rate"),
                    "loaded_ratio": stats.loaded_bytes / dense if dense else None,
                    "recompute_frac": (stats.method_costs or {}).get("recompute_frac"),
                    "attended_ratio": (stats.method_costs or {}).get("attended_ratio")}
        return chk.evaluate({q: p for q, p in promised.items() if q in due}, measured)

    def _discard_counters(self) -> None:
        """A stored request fed but not generated: what the method and the session counted for it (method costs,
        slow-tier loads) must not join the next computed turn's row."""
        self.method.take_costs(self.session)
        self.session.memory()
        if getattr(self.session, "last_compression", None) is not None:  # nor its compression's fired-check
            self.session.last_compression = None

    def _compare(self, i: int, prediction: str) -> None:
        if prediction != self.done[i]:
            log.warning("%s example %s turn %d: resumed run recomputed %r, the store holds %r",
                        self.task.name, self.example.id, i, prediction[:60], self.done[i][:60])
            self.mismatches.append({"example_id": self.example.id, "turn": i,
                                    "stored": self.done[i], "recomputed": prediction})

    def _method_costs(self, i: int, taken: dict | None = None) -> dict:
        """The method's cost columns for turn ``i``: what the runner measured around its hooks (the context
        compression is charged to the first turn) and what the method reports (``take_costs``), every declared
        column present (its default where nothing was measured)."""
        declared = type(self.method).cost_columns()
        reported = dict(self.context_stats)
        if i > 0 and "context_compress_s" in reported:
            reported["context_compress_s"] = 0.0
        reported.update(self.method.take_costs(self.session) if taken is None else taken)
        unknown = sorted(set(reported) - set(declared))
        if unknown:
            raise ValueError(f"{type(self.method).__name__}.take_costs reported {unknown}, not declared in its costs "
                             f"(declared: {sorted(declared)})")
        return {col: reported.get(col, cost.default) for col, cost in declared.items()}

    def _turn(self, i: int, tp: TurnPrompt, fs) -> TurnResult:
        """Multi-turn: generate turn ``i``, then drop the generated tokens and the answer prefix. Compression during
        decoding may have evicted prompt tokens and kept generated ones: the next turn then starts from the cache as
        it was before generating."""
        before = self.session.checkpoint(rewrites=True) if self.spec.compress == "decode_every" else None
        result, gen = self._generate(i, tp, fs, prompt_tokens=len(self.history))
        if before is not None:
            self.session.rollback(before)
            self.session.drop_last(tp.rewind)
        else:
            self.session.drop_last(len(gen.tokens) - 1 + tp.rewind)
        return result

    def _generate(self, i: int, tp: TurnPrompt, fs, prompt_tokens: int | None = None):
        prompt_tokens = fs.reused + fs.tokens if prompt_tokens is None else prompt_tokens
        self._check_window(i, prompt_tokens + tp.max_new_tokens)
        if self.spec.compress == "decode_every":  # the method's compression also fires during generation
            gen = self.session.generate(tp.max_new_tokens, compress_every=self.spec.decode_interval,
                                        compress_cap=self.spec.decode_cap)
        else:
            gen = self.session.generate(tp.max_new_tokens)
        return self._result(i, fs, gen, self.session.memory(), prompt_tokens), gen

    def _check_window(self, i: int, end: int) -> None:
        if end > self.engine.window and not self._warned_window:
            self._warned_window = True
            log.warning("%s example %s turn %d: positions reach %d, beyond the model window of %d",
                        self.task.name, self.example.id, i, end, self.engine.window)

    def _result(self, i: int, fs, gen, mem: dict, prompt_tokens: int, costs: dict | None = None, **extra) -> TurnResult:
        """The stored row of turn ``i`` from its feed, its generation and the cache's memory after it (``costs``:
        what the method reported for the turn, when taken earlier; None: take them now)."""
        turn = self.example.turns[i]
        prediction = gen.text
        stats = TurnStats(
            prompt_tokens=prompt_tokens,
            prefill_computed=fs.tokens,
            prefill_reused=fs.reused,
            prefill_s=fs.seconds,
            ttft_s=fs.seconds + gen.first_token_s,
            decode_tokens=len(gen.tokens),
            decode_s=gen.decode_s,
            decode_tok_s=(len(gen.tokens) - 1) / gen.decode_s if len(gen.tokens) > 1 and gen.decode_s > 0 else 0.0,
            decode_path=gen.decode_path,
            compress_s=fs.compress_s + getattr(gen, "compress_s", 0.0),
            warmup_s=(self.warmup_s if i not in self.done else 0.0) + getattr(gen, "warmup_s", 0.0),
            truncated_tokens=self.builder.truncated if i == 0 else 0,
            attn_density=fs.attn_density,
            prefill_shared=fs.prefill_shared,
            scores_shared=fs.scores_shared,
            method_costs=self._method_costs(i, costs),
            **mem,
            **extra,
        )
        if i not in self.done:  # a stored turn replayed on resume is not stored again: the next new turn carries it
            self.warmup_s = 0.0
        promised = self._checks(i, fs, stats, steps=len(gen.tokens) - 1)
        cap = self.builder.max_new(i)
        capped = not gen.stopped and len(gen.tokens) >= cap and chk.needs_more_tokens(
            turn.answer, cap, lambda t: self.engine.encode(t, add_special_tokens=False))
        stats.flags, stats.checks = chk.flags_of(promised, capped), chk.dumps(promised)
        scores = self.task.score(prediction, turn, self.example.extra)
        reference = {"answer": turn.answer, "question": turn.input, "turn_extra": turn.extra,
                     "example_extra": self.example.extra}
        return TurnResult(self.example.id, i, stats.prompt_tokens, prediction, reference, scores, stats)
