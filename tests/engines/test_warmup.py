"""One-time costs apart: the engine's warm-up on dummy prompts, charged to the run's first turn as ``warmup_s``."""
import pytest

from scbench.records import Example, RunSpec, Turn
from scbench.registry import METHODS, TASKS
from scbench.runner import Replay

from support import make_tiny_engine


def test_warmup_runs_once_per_method_and_only_when_asked(smol_tokenizer):
    engine = make_tiny_engine(smol_tokenizer)
    snap = METHODS.get("snapkv")(budget=64)
    assert engine.warmup(snap) == 0.0  # CPU: nothing to compile, no warm-up unless forced
    assert engine.warmup(snap, lengths=(100, 140), force=True) > 0.0
    assert engine.warmup(snap, lengths=(100, 140), force=True) == 0.0  # once per method label
    assert engine.warmup(METHODS.get("quest")(budget=32, page_size=8), lengths=(90,), force=True) > 0.0


def test_warmup_is_charged_to_the_first_turn_only(tiny_engine):
    words = " ".join(f"key{i}=val{i}" for i in range(40))
    ex = Example(id="w", context=words, turns=tuple(Turn(input=f"key{i}?", answer=f"val{i}") for i in (1, 2, 3)))
    spec = RunSpec(model={}, method={"name": "full"}, task="scbench_kv", max_turns=3, max_new_tokens=4)
    results = list(Replay(tiny_engine, METHODS.get("full")(), TASKS.get("scbench_kv"), ex, spec, warmup_s=1.5))
    assert [r.stats.warmup_s for r in results] == [pytest.approx(1.5), 0.0, 0.0]
