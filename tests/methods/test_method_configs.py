"""Every method config (configs/method/*.yaml) builds and runs one turn through run_spec on the tiny random Llama, in
both shared-context modes. Skipped, with the reason, only what needs an engine or a model that is not here; configs
that need the embedded model run on it and are marked slow. A new config joins the matrix by existing."""
from __future__ import annotations

import importlib.util

import pytest
from omegaconf import OmegaConf

from scbench.cli import config_dir
from scbench.records import RunSpec
from scbench.registry import METHODS
from scbench.run import run_spec
from scbench.store import Store

CONFIGS = sorted((config_dir() / "method").glob("*.yaml"))
MODES = ("multi_turn", "multi_request")

ON_EMBEDDED = {"vertical_slash-searched": "its per-head patterns were searched on the embedded model's 30 x 9 heads",
               "duo_attention": "its gates were calibrated on the embedded model's 30 x 3 KV heads",
               "duo_attention-1k": "its gates were calibrated on the embedded model's 30 x 3 KV heads",
               "duo_attention-1k-r10": "its gates were calibrated on the embedded model's 30 x 3 KV heads"}
"""Configs that only fit the embedded model: they run on it (slow)."""
ON_LLAMA8B = {"duo_attention-llama8b": "its (timing-only) gates have the Llama-3.1-8B shape, 32 x 8 KV heads: it runs "
                                      "in the GPU methods bench (scripts/bench_methods.py)"}
"""Configs for the GPU bench's random Llama-3.1-8B shape only (skipped here, with the reason)."""


def skip_reason(stem: str, cfg: dict) -> str | None:
    """Why a config cannot run here (None: it runs)."""
    cls = METHODS.get(cfg["name"])
    if stem in ON_LLAMA8B:
        return ON_LLAMA8B[stem]
    if "hf" not in cls.engines:
        return f"method {cfg['name']!r} runs on engines {', '.join(cls.engines)} only, and its run on the hf engine is " \
               "refused before loading (tests/engines/test_vllm.py)"
    if cfg["name"] == "llmlingua2" and not cfg.get("path"):
        if importlib.util.find_spec("llmlingua") is None:
            return "needs the llmlingua package (pip install -e '.[llmlingua]')"
        return f"needs the LLMLingua-2 compressor model {cfg['model']} (hub download or method.path)"
    if cfg.get("index", "").startswith("faiss") and importlib.util.find_spec("faiss") is None:
        return "needs the faiss package (pip install -e '.[faiss]')"
    return None


def cases():
    for path in CONFIGS:
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        reason = skip_reason(path.stem, cfg)
        slow = path.stem in ON_EMBEDDED or str(cfg.get("scorer", "")).startswith("embedded:")
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        yield pytest.param(path.stem, cfg, marks=marks + ([pytest.mark.slow] if slow else []), id=path.stem)


def test_every_method_has_a_config():
    assert {OmegaConf.load(p)["name"] for p in CONFIGS} == set(METHODS.names())


@pytest.mark.parametrize("stem,cfg", list(cases()))
def test_config_runs_one_turn(stem, cfg, tiny_engine, request, tmp_path):
    engine = request.getfixturevalue("embedded_engine") if stem in ON_EMBEDDED else tiny_engine
    db = str(tmp_path / "s.sqlite")
    for mode in MODES:
        spec = RunSpec(model={"name": "tiny"}, method=cfg, task="scbench_kv", mode=mode, max_turns=1, max_new_tokens=4,
                       data={"source": "generated", "n": 1, "length": 1200, "turns": 1, "seed": 0})
        run_id = run_spec(spec, db, engine=engine, progress=False)
        store = Store(db)
        try:
            (run,) = [r for r in store.runs() if r["run_id"] == run_id]
            turns = store.turns(run_id)
        finally:
            store.close()
        assert run["status"] == "done" and run["method"] == cfg["name"], (mode, run)
        assert [t["turn"] for t in turns] == [0], mode
        t = turns[0]
        assert 1 <= t["decode_tokens"] <= 4, (mode, t)
        if "compress_context" in METHODS.get(cfg["name"]).hooks():  # prompt compression shortens the ~1,200 tokens
            assert 0 < t["prompt_tokens"] < 1000, (mode, t)
        else:
            assert t["prompt_tokens"] > 1000, (mode, t)
        assert t["prefill_computed"] > 0 and t["kv_bytes"] > 0 and t["kv_full_bytes"] > 0, (mode, t)


def test_runner_sets_the_method_up_with_its_engine(tiny_engine):
    """``Method.setup(engine)`` runs before each example's replay, so a method gets what it needs (e.g. a scorer
    model) from the run, not from the runner's module."""
    from dataclasses import dataclass

    from scbench.data import load_examples
    from scbench.methods.full import FullAttention
    from scbench.registry import TASKS
    from scbench.runner import Replay

    @dataclass
    class Recording(FullAttention):
        def setup(self, engine):
            calls.append(engine)

    calls = []
    task, method = TASKS.get("scbench_kv"), Recording()
    count = lambda t: len(tiny_engine.encode(t, add_special_tokens=False))  # noqa: E731
    examples = load_examples(task, "generated", n=2, length=200, turns=1, seed=0, count=count)
    spec = RunSpec(model={}, method={"name": "full"}, task="scbench_kv", max_turns=1, max_new_tokens=2)
    for ex in examples:
        assert len(list(Replay(tiny_engine, method, task, ex, spec))) == 1
    assert calls == [tiny_engine, tiny_engine]
