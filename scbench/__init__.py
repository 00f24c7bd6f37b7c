"""scbench: a KV-cache-centric harness for long-context methods on shared-context (multi-turn, multi-request) workloads."""

__version__ = "0.1.0"
RESULTS_SCHEMA_VERSION = 2
"""v2: method-specific cost columns in one JSON column (turns.method_costs); v1 stores are migrated on open."""


def score_turns(task, turns, variant=None):
    """Score predictions made elsewhere; see scbench.scoring.score_turns."""
    from scbench.scoring import score_turns as _score_turns

    return _score_turns(task, turns, variant)
