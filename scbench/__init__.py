"""scbench: a KV-cache-centric harness for long-context methods on shared-context (multi-turn, multi-request) workloads."""

__version__ = "0.1.0"
RESULTS_SCHEMA_VERSION = 1
