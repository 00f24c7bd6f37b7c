"""Small typed records that flow through the harness: data in, results out."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Turn:
    """One question asked against the shared context."""

    input: str
    """The query text of this turn (for vt, the first turn's input may also carry the context)."""
    answer: Any
    """Gold answer as stored in the data (str, list[str], int, ... depending on the task)."""
    extra: dict = field(default_factory=dict)
    """Task-specific per-turn fields (options, name, task of a mixed turn, ...)."""


@dataclass(frozen=True)
class Example:
    """One SCBench session: a shared context and the turns asked about it."""

    id: str
    context: Any
    """str for most tasks, list[int] for scbench_mf."""
    turns: tuple[Turn, ...]
    extra: dict = field(default_factory=dict)
    """Row-level extra fields (lang, repo, task, ...)."""
    source: str = ""
    """Where the row came from ("file.jsonl:row 3", "hub:microsoft/SCBench/scbench_kv:7", "generated:seed=1:3")."""


AGGREGATIONS = ("mean", "sum", "max", "min")


@dataclass(frozen=True)
class Cost:
    """Declaration of one method-specific cost column (``Method.costs``: column name -> Cost).

    The universal columns are the typed fields of ``TurnStats``; a column that only one method family measures
    is declared by that method and stored in ``TurnStats.method_costs``. Export, leaderboard, HTML page, figures
    and docs/results_schema.md read these declarations (``scbench.report.costs``).
    """

    unit: str
    """What the value counts: ``s``, ``bytes``, ``tokens``, ``ratio``, ..."""
    doc: str
    """One line for docs/results_schema.md: what the value means and when it is set."""
    agg: str = "mean"
    """How the examples of one turn combine into an export record (one of AGGREGATIONS)."""
    default: float | int | None = None
    """The value of a turn that did not measure it (0 for a time, 1.0 for a kept fraction; None: not measured).
    Runs of other methods show it in the export; the leaderboard hides the column where every row has it."""
    label: str | None = None
    """Leaderboard / HTML column header; None keeps the cost in the export only."""

    def __post_init__(self) -> None:
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"Cost.agg must be one of {AGGREGATIONS}, got {self.agg!r}")


@dataclass
class TurnStats:
    """What one turn cost. Token counts are exact; times are wall-clock seconds; bytes are counted from tensors.

    The fields are the universal columns, measured by the engine and runner for every method; a method's own
    columns are in ``method_costs`` (declared by the method, see ``Cost``)."""

    prompt_tokens: int = 0
    """Length of the full prompt this turn sees (cache + new tokens), as a naive replay would prefill it."""
    prefill_computed: int = 0
    """Tokens forwarded through the model for this turn's prompt."""
    prefill_reused: int = 0
    """Prompt tokens served from the KV cache instead of being recomputed."""
    prefill_s: float = 0.0
    """Time of this turn's prefill forward passes (includes compression when it fires)."""
    ttft_s: float = 0.0
    """Time to first token: this turn's prefill plus the first greedy pick."""
    decode_tokens: int = 0
    """Tokens generated (including the stop token if one was produced)."""
    decode_s: float = 0.0
    decode_tok_s: float = 0.0
    """Decode throughput after the first token (tokens/s); 0 when fewer than two tokens were generated."""
    decode_path: str = ""
    """Decode loop that ran: plain (reference), static or graph (pre-allocated cache; graph: CUDA graph replay)."""
    compress_s: float = 0.0
    """Time spent inside the method's compression hook this turn."""
    warmup_s: float = 0.0
    """One-time costs paid during this turn and kept out of ``prefill_s``, ``ttft_s`` and the decode rate: the
    run's warm-up on dummy prompts (kernel compilation, mask building; charged to the run's first turn) and
    CUDA-graph capture of the decode step (each time the static buffers are re-allocated)."""
    retry_s: float = 0.0
    """Seconds of attempts thrown away before this turn's rows came out, kept out of every other time: in a grouped
    sweep (scbench/group_example.py) a run's preparation that ran out of memory next to other runs' prepared batches
    and was prepared again alone, or a decode of several runs' batches that failed and was redone one run at a time
    (split evenly among those runs); charged to the first turn the run stored after it. 0 when nothing was redone."""
    kv_bytes: int = 0
    """KV bytes resident on the compute device after this turn's generation (real tensors)."""
    kv_tokens: int = 0
    """Cache length in tokens after generation (max over layers)."""
    kv_full_bytes: int = 0
    """Bytes a full-attention cache of the same token count would hold (for the effective ratio)."""
    state_bytes: int = 0
    """Recurrent / hybrid models: conv + recurrent state bytes of the linear layers (real tensors), next to the
    attention layers' ``kv_bytes``; 0 for attention-only models."""
    slow_tier_bytes: int = 0
    """Bytes held in a slower tier (CPU / disk) by methods that offload; 0 otherwise."""
    loaded_bytes: int = 0
    """Bytes brought back from a slower tier during decode; 0 for methods that do not load."""
    load_s: float = 0.0
    """Time spent moving those bytes from host memory to the accelerator (0 when the tier is the accelerator)."""
    attn_recall: float | None = None
    """Loading methods with ``recall=true``: mean share of the exact attention mass held by the keys attended
    (over decode steps and selecting layers); None when not measured."""
    peak_mem_bytes: int = 0
    """Peak allocated accelerator memory (CUDA) or peak RSS of the process (CPU) since this run started in its process
    (a grouped sweep: since the group started; a resumed run: since the resume), up to the end of this turn."""
    truncated_tokens: int = 0
    """Tokens removed from the first prompt by middle truncation (0 when it fit)."""
    attn_density: float = 1.0
    """Fraction of the causal attention score matrix computed by this turn's prefill (1.0: dense)."""
    prefill_shared: int = 1
    """Runs of a grouped sweep that shared this turn's prefill (scbench/group.py: one dense first prefill, its cache
    forked per method); 1 when the run prefilled alone. ``prefill_s`` stays the measured time of that prefill."""
    scores_shared: int = 1
    """Runs of a grouped sweep that shared this turn's compression scores: after one shared prefill, the runs whose
    methods score alike (``Method.score_key()``: e.g. KVzip at several budgets) compute the scores once; 1 when
    scored alone. ``compress_s`` counts the shared computation's measured time as the run's own."""
    decode_batch: int = 1
    """Requests decoded together in this turn's batch (scbench/batch.py, shared-prefix attention); 1: decoded alone."""
    decode_runs: int = 1
    """Runs of a grouped sweep whose turns were decoded in this turn's batch (scbench/group.py: each run's rows attend
    to its own cache, the weights are read once per step for all; ``decode_batch`` counts every run's rows and
    ``decode_s`` is this turn's share of each step among them); 1: the batch held this run's turns only."""
    decode_step_s: float = 0.0
    """Batched turns: mean wall time of one decode step of the whole batch; ``decode_s`` is this turn's share
    (its steps x step time / batch size). 0 for turns decoded alone."""
    decode_kernel: str = ""
    """Batched turns: the shared-prefix attention that ran (``triton``: scbench/kernels/shared_prefix.py, ``torch``:
    scbench/batch_step.py's float32 products); empty for turns decoded alone."""
    device_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    """Sharded models (``model.device_map``): per device, ``kv_bytes`` of the layers it holds and its
    ``peak_mem_bytes``; ``kv_bytes`` and ``peak_mem_bytes`` above are the sums. Empty on one device."""
    method_costs: dict[str, float | int | None] = field(default_factory=dict)
    """The method's own cost columns (name -> value), as declared in its ``Method.costs`` (every declared name
    present, its ``Cost.default`` where the method measured nothing this turn); empty for methods without any.
    Stored as one JSON column, so a method adds a column in its own file (CONTRIBUTING.md)."""
    flags: str = ""
    """Comma-separated trust flags (scbench/checks.py): ``unfired`` (a promise of the method failed this turn),
    ``capped`` (generation stopped at the cap while the reference needs more tokens); empty when none."""
    checks: str = ""
    """JSON list of this turn's promise checks: quantity, op, promised, measured, ok (empty: nothing promised)."""


@dataclass
class TurnResult:
    """One row of the results store."""

    example_id: str
    turn: int
    """0-based turn index."""
    prompt_tokens: int
    prediction: str
    reference: Any
    scores: dict[str, float]
    """Metric name -> value in [0, 1] (mixed tasks report one key per sub-task)."""
    stats: TurnStats

    def to_row(self) -> dict:
        row = asdict(self)
        row["stats"] = asdict(self.stats)
        return row


COMPRESS_POLICIES = ("once", "every_turn", "decode_every")
SPARSE_POLICIES = ("first", "every")


@dataclass
class RunSpec:
    """Everything that decides a run's results; its hash is the run id (so a re-launch resumes)."""

    model: dict
    """name, path (hub id, local folder or ``embedded:smollm2``), dtype, device, window."""
    method: dict
    """``name`` plus the method's knobs."""
    task: str
    task_variant: str | None = None
    """Scoring variant of the task (None: the reference behaviour)."""
    mode: str = "multi_turn"
    data: dict = field(default_factory=dict)
    """source (generated | local | hub), path, n, length, turns, seed, hub_id, split."""
    max_turns: int = 5
    max_seq_length: int = 131072
    max_new_tokens: int | None = None
    """Cap on every turn's generation budget (None: the task's own, as in the reference)."""
    compress: str = "once"
    """When compression fires: once after the first prefill (reference), after every turn's prefill, or
    ``decode_every``: after the first prefill and every ``decode_interval`` decode steps (keeps long outputs within
    the budget)."""
    decode_interval: int = 64
    """decode_every: decode steps between compression firings."""
    decode_cap: int | None = None
    """decode_every: fire only when the cache holds more than this many tokens (None: at every interval)."""
    query_visible: bool = True
    """Multi-turn: whether the first query is in the cache when compression first fires (reference: yes)."""
    sparse_prefill: str = "first"
    """Sparse prefill on the first prefill only (reference) or on every prefill."""
    truncation: str = "reference"
    """How an over-long first prompt is cut (scbench/prompts.py): ``reference``: multi-turn middle-truncates its whole
    first prompt to the window less the generation budget, multi-request its context alone to 1,000 tokens fewer
    (SCBench's rule: at 128K the two modes see different contexts); ``context``: both modes middle-truncate the
    context alone to the multi-request budget and append the query whole (one context for both modes: compared at
    equal context, and with ``query_visible=false`` a grouped sweep shares its prefill between them)."""
    golden_context: bool = True
    bos: str = "faithful"
    reuse: bool = True
    """False replays every turn from scratch (a naive harness), for comparisons."""

    def validate(self) -> None:
        from scbench.prompts import BOS_POLICIES, MODES, TRUNCATIONS

        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.compress in COMPRESS_POLICIES, f"compress must be one of {COMPRESS_POLICIES}, got {self.compress!r}"),
            (isinstance(self.decode_interval, int) and not isinstance(self.decode_interval, bool)
             and self.decode_interval >= 1, f"decode_interval must be an integer >= 1, got {self.decode_interval!r}"),
            (self.decode_cap is None or (isinstance(self.decode_cap, int) and self.decode_cap >= 1),
             f"decode_cap must be null or an integer >= 1, got {self.decode_cap!r}"),
            (self.sparse_prefill in SPARSE_POLICIES, f"sparse_prefill must be one of {SPARSE_POLICIES}, got {self.sparse_prefill!r}"),
            (self.truncation in TRUNCATIONS, f"truncation must be one of {TRUNCATIONS}, got {self.truncation!r}"),
            (self.bos in BOS_POLICIES, f"bos must be one of {BOS_POLICIES}, got {self.bos!r}"),
            (isinstance(self.max_turns, int) and self.max_turns >= 1, f"max_turns must be an integer >= 1, got {self.max_turns!r}"),
            (isinstance(self.max_seq_length, int) and self.max_seq_length >= 64, f"max_seq_length must be an integer >= 64, got {self.max_seq_length!r}"),
            (self.max_new_tokens is None or (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1),
             f"max_new_tokens must be null or an integer >= 1, got {self.max_new_tokens!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
