"""Did the method fire? Every method's promise is checked per turn (scbench/checks.py); a constructed case per method
makes the ``unfired`` flag fire (budget >= context, compression never applied, a sparse mask that came out dense, a
context that came out uncompressed), a normal one keeps it quiet; strict=true fails the run; capped turns are
flagged and counted (issue 20, defect 3: a 24-token cap on a UUID answer scored 0 without a word)."""
from __future__ import annotations

import json
import logging

import pytest

from scbench import checks
from scbench.records import RunSpec
from scbench.run import run_spec
from scbench.store import Store


def spec(method: dict, **kw) -> RunSpec:
    base = dict(model={"name": "tiny"}, method=method, task="scbench_kv", mode="multi_turn",
                data={"source": "generated", "n": 1, "length": 400, "turns": 2, "seed": 1}, max_turns=2,
                max_new_tokens=4)
    return RunSpec(**{**base, **kw})


def turns_of(tiny_engine, tmp_path, method: dict, timing: str = "sequential", **kw) -> list[dict]:
    db = tmp_path / f"{method['name']}.sqlite"
    rid = run_spec(spec(method, **kw), str(db), engine=tiny_engine, progress=False, timing=timing)
    return Store(db).turns(rid)


def unfired(turn: dict) -> bool:
    return checks.has_flag(turn["flags"], checks.UNFIRED)


CASES = [  # method that fires, the same method constructed not to fire (and why)
    ({"name": "streamingllm", "n_init": 4, "n_local": 60}, {"name": "streamingllm", "n_init": 4, "n_local": 100000}),
    ({"name": "snapkv", "budget": 0.25, "window": 8}, {"name": "snapkv", "budget": 100000, "window": 8}),
    ({"name": "pyramidkv", "budget": 96, "window": 8, "beta": 2}, {"name": "pyramidkv", "budget": 100000, "window": 8}),
    ({"name": "h2o", "budget": 64}, {"name": "h2o", "budget": 100000}),
    ({"name": "adakv", "budget": 64, "window": 8}, {"name": "adakv", "budget": 100000, "window": 8}),
    ({"name": "kvzip", "budget": 64}, {"name": "kvzip", "budget": 100000}),
    ({"name": "ashape", "n_init": 4, "n_local": 32}, {"name": "ashape", "n_init": 4, "n_local": 100000}),
    ({"name": "trishape", "n_init": 4, "n_local": 32, "n_last": 8},
     {"name": "trishape", "n_init": 4, "n_local": 100000, "n_last": 8}),
    ({"name": "quest", "budget": 64, "page_size": 16, "dense_layers": 0}, {"name": "quest", "budget": 100000}),
    ({"name": "retrieval_attention", "top_k": 48, "n_init": 4, "n_local": 16},
     {"name": "retrieval_attention", "top_k": 100000, "n_init": 4, "n_local": 16}),
    ({"name": "cacheblend", "chunk_size": 64, "recompute_ratio": 0.2},
     {"name": "cacheblend", "chunk_size": 64, "recompute_ratio": 1.0}),
    ({"name": "vertical_slash", "vertical_size": 16, "slash_size": 32, "last_q": 8, "init_cols": 4, "local_diags": 8},
     {"name": "vertical_slash", "vertical_size": 100000, "slash_size": 100000, "last_q": 8}),
]


@pytest.mark.parametrize("fires, silent", CASES, ids=[c[0]["name"] for c in CASES])
def test_unfired_flag(tiny_engine, tmp_path, fires, silent):
    good = turns_of(tiny_engine, tmp_path / "good", fires)
    assert not any(unfired(t) for t in good), [t["checks"] for t in good]
    first = json.loads(good[0]["checks"])
    assert first and all(c["ok"] for c in first)  # the first turn was checked
    bad = turns_of(tiny_engine, tmp_path / "bad", silent)
    assert unfired(bad[0]), bad[0]["checks"]
    (c,) = json.loads(bad[0]["checks"])
    assert not c["ok"] and c["measured"] is not None


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_batched_decode_keeps_the_checks(tiny_engine, tmp_path, mode):
    """The batched executor (scbench/batch.py) decodes the turns together: the same checks and flags per turn."""
    good = turns_of(tiny_engine, tmp_path / "good", {"name": "snapkv", "budget": 0.25, "window": 8}, "batched",
                    mode=mode, max_new_tokens=2)
    assert json.loads(good[0]["checks"])[0]["ok"] and all(checks.has_flag(t["flags"], "capped") for t in good)
    bad = turns_of(tiny_engine, tmp_path / "bad", {"name": "snapkv", "budget": 100000, "window": 8}, "batched",
                   mode=mode)
    assert unfired(bad[0])


def test_kivi_compression_never_applied(tiny_engine, tmp_path, monkeypatch):
    from scbench.methods.kivi import KIVI

    good = turns_of(tiny_engine, tmp_path / "good", {"name": "kivi", "bits": 2, "group": 16, "residual": 16})
    (c,) = json.loads(good[0]["checks"])
    assert c["ok"] and c["measured"] < 0.5, c
    monkeypatch.setattr(KIVI, "compress_cache", lambda self, i, k, v, q: (k, v))  # compression silently skipped
    bad = turns_of(tiny_engine, tmp_path / "bad", {"name": "kivi", "bits": 2, "group": 16, "residual": 16})
    (c,) = json.loads(bad[0]["checks"])
    assert unfired(bad[0]) and c["measured"] == 1.0


def test_compression_hook_never_called(tiny_engine, tmp_path, monkeypatch):
    from scbench.engines import hf

    monkeypatch.setattr(hf.HFSession, "_compress", lambda self, ctx, ids: None)  # a broken engine path
    bad = turns_of(tiny_engine, tmp_path, {"name": "snapkv", "budget": 0.25, "window": 8})
    (c,) = json.loads(bad[0]["checks"])
    assert unfired(bad[0]) and c["measured"] is None


def test_prompt_compression_that_compressed_nothing(tiny_engine, tmp_path, monkeypatch):
    from scbench.methods.prompt_compression import PerplexityCompress

    monkeypatch.setattr(PerplexityCompress, "compress_context", lambda self, text, engine: text)
    bad = turns_of(tiny_engine, tmp_path, {"name": "ppl_compress", "rate": 0.5, "scorer": "engine"})
    assert unfired(bad[0]) and not unfired(bad[1])  # checked where it fires: the first turn


def test_strict_fails_the_run(tiny_engine, tmp_path):
    db = tmp_path / "s.sqlite"
    with pytest.raises(RuntimeError, match="strict: method snapkv did not keep its promise"):
        run_spec(spec({"name": "snapkv", "budget": 100000, "window": 8}), str(db), engine=tiny_engine,
                 progress=False, strict=True)
    (run,) = Store(db).runs()
    assert run["status"] == "failed" and "kept_tokens" in run["error"]


def test_capped_turns_flagged_and_counted(tiny_engine, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="scbench"):
        capped = turns_of(tiny_engine, tmp_path / "cap", {"name": "full"}, max_new_tokens=2)
    assert all(checks.has_flag(t["flags"], checks.CAPPED) for t in capped)  # a UUID needs more than 2 tokens
    assert "2 of 2 turns stopped at the generation cap" in caplog.text
    roomy = turns_of(tiny_engine, tmp_path / "roomy", {"name": "full"}, max_new_tokens=None)
    assert not any(checks.has_flag(t["flags"], checks.CAPPED) for t in roomy)  # the task's own cap fits the answer


def test_needs_more_tokens():
    enc = lambda s: s.split()  # noqa: E731
    assert checks.needs_more_tokens("a b c", 2, enc) and not checks.needs_more_tokens("a b", 2, enc)
    assert not checks.needs_more_tokens(["a b c", "a"], 2, enc)  # one acceptable answer fits
    assert not checks.needs_more_tokens(None, 2, enc)


def test_evaluate_rules():
    got = checks.evaluate({"kept_tokens": ("eq", 100), "attn_density": ("lt", 1.0)},
                          {"kept_tokens": 101, "attn_density": 1.0})
    assert [c["ok"] for c in got] == [True, False]
    assert not checks.evaluate({"kv_ratio": ("eq", 0.2)}, {"kv_ratio": 0.21})[0]["ok"]
    with pytest.raises(ValueError, match="unknown promised quantity"):
        checks.evaluate({"bogus": ("eq", 1)}, {})
