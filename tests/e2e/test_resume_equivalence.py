"""Resume reproduces the uninterrupted run, for every method config: stop after turn k, re-launch, compare rows.

Every ``configs/method/*.yaml`` runs on the tiny random Llama (hf engine, CPU); a config that cannot run there is
skipped with the reason. Rows are compared on every column but timings (``store.VOLATILE_TURN_COLUMNS``): the
prediction, the scores and the cache sizes (a cache rebuilt differently, e.g. KIVI's prompt tail left unquantised,
shows in ``kv_bytes`` even when a random model's predictions happen to agree).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from scbench.records import RunSpec
from scbench.run import run_spec
from scbench.store import VOLATILE_TURN_COLUMNS, Store
from support import make_tiny_engine

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "method").glob("*.yaml"))
TURNS = 3
CANNOT_RUN = {  # method name or config -> why it cannot run on the tiny model on the hf engine, CPU, no downloads
    "vllm_kv_quant": "vLLM engine only",
    "llmlingua2": "needs the LLMLingua-2 compressor model (a download)",
    "vertical_slash-searched": "its head patterns were searched for smollm2-135m (30 layers x 9 heads)",
    "duo_attention": "its gates were calibrated for smollm2-135m (30 layers x 3 KV heads)",
    "duo_attention-1k": "its gates were calibrated for smollm2-135m (30 layers x 3 KV heads)",
    "duo_attention-1k-r10": "its gates were calibrated for smollm2-135m (30 layers x 3 KV heads)",
}


@pytest.fixture(scope="module")
def engine(smol_tokenizer):
    """Weights large enough (std 0.3) that a differently rebuilt cache changes the predictions."""
    return make_tiny_engine(smol_tokenizer, initializer_range=0.3)


def spec(method: dict, mode: str = "multi_turn", **kw) -> RunSpec:
    data = {"source": "generated", "n": 2, "length": 600, "turns": TURNS, "seed": 3}
    return RunSpec(model={"name": "tiny"}, method=method, task="scbench_kv", mode=mode, data=data,
                   max_turns=TURNS, max_new_tokens=24, **kw)


class Stop(BaseException):
    """A kill: raised by the store after the k-th committed turn (BaseException, like KeyboardInterrupt)."""


def _stable(column: str, value):
    """A JSON column (method costs) without its timings (keys ending in ``_s``), as merge compares it."""
    return {k: v for k, v in value.items() if not k.endswith("_s")} if isinstance(value, dict) else value


def rows(db) -> dict:
    store = Store(db, readonly=True)
    try:
        return {(r["example_id"], r["turn"]): {k: _stable(k, v) for k, v in r.items() if k not in VOLATILE_TURN_COLUMNS}
                for r in store.turns()}
    finally:
        store.close()


def stop_after(monkeypatch, k: int):
    real = Store.put
    count = {"n": 0}

    def put(self, run_id, result):
        real(self, run_id, result)
        count["n"] += 1
        if count["n"] == k:
            raise Stop(f"stopped after turn {k}")

    monkeypatch.setattr(Store, "put", put)
    return real


def check_resume(engine, s: RunSpec, tmp_path, monkeypatch):
    clean = tmp_path / "clean.sqlite"
    run_spec(s, str(clean), engine=engine, progress=False)
    want = rows(clean)
    assert len(want) == 2 * TURNS
    for k in range(1, 2 * TURNS):  # stop after every committed turn (both examples), then resume
        db = tmp_path / f"stop{k}.sqlite"
        real = stop_after(monkeypatch, k)
        with pytest.raises(Stop):
            run_spec(s, str(db), engine=engine, progress=False)
        monkeypatch.setattr(Store, "put", real)
        assert len(rows(db)) == k
        rid = run_spec(s, str(db), engine=engine, progress=False)
        got = rows(db)
        diff = sorted(key for key in want if got.get(key) != want[key])
        assert not diff, f"stopped after {k} turns: rows {diff} differ after resume"
        store = Store(db, readonly=True)
        assert store.run(rid)["status"] == "done" and not store.run(rid).get("resume_mismatch")
        store.close()
    return 2 * TURNS - 1  # the stops compared


SLOW = {"ppl_compress": "its compressor is the embedded SmolLM2"}


@pytest.mark.parametrize("config", [pytest.param(c, id=c.stem, marks=[pytest.mark.slow] if c.stem in SLOW else [])
                                    for c in CONFIGS])
def test_resume_equals_uninterrupted(config, engine, tmp_path, monkeypatch):
    method = OmegaConf.to_container(OmegaConf.load(config))
    why = CANNOT_RUN.get(config.stem) or CANNOT_RUN.get(method["name"])
    if why:
        pytest.skip(f"{config.stem}: {why}")
    assert check_resume(engine, spec(method), tmp_path, monkeypatch) == 2 * TURNS - 1


@pytest.mark.parametrize("method", [{"name": "kivi", "bits": 2, "group": 8, "residual": 8},
                                    {"name": "snapkv", "budget": 0.25, "window": 8, "kernel": 5}],
                         ids=["kivi-g8", "snapkv"])
@pytest.mark.parametrize("kw", [{"mode": "multi_request"}, {"reuse": False}, {"compress": "every_turn"},
                                {"compress": "decode_every", "decode_interval": 4}],
                         ids=["multi_request", "naive", "every_turn", "decode_every"])
def test_resume_other_policies(method, kw, engine, tmp_path, monkeypatch):
    assert check_resume(engine, spec(method, **kw), tmp_path, monkeypatch) == 2 * TURNS - 1


def test_resume_kivi_small_groups(engine, tmp_path, monkeypatch):
    """The reported case: KIVI at group 8 / residual 8, multi-turn (12 of 18 rows differed)."""
    assert check_resume(engine, spec({"name": "kivi", "bits": 2, "group": 8, "residual": 8}), tmp_path, monkeypatch) == 2 * TURNS - 1


@pytest.mark.parametrize("kw", [{}, {"mode": "multi_request"}, {"reuse": False}], ids=["multi_turn", "multi_request", "naive"])
def test_resume_flags_a_stored_turn_it_does_not_reproduce(kw, engine, tmp_path, monkeypatch):
    s = spec({"name": "full"}, **kw)
    db = tmp_path / "r.sqlite"
    real = stop_after(monkeypatch, 2)
    with pytest.raises(Stop):
        run_spec(s, str(db), engine=engine, progress=False)
    monkeypatch.setattr(Store, "put", real)
    store = Store(db)
    store.db.execute("UPDATE turns SET prediction='tampered' WHERE turn=1")
    store.close()
    rid = run_spec(s, str(db), engine=engine, progress=False)
    store = Store(db, readonly=True)
    run = store.run(rid)
    import json

    (m,) = json.loads(run["resume_mismatch"])
    assert (m["example_id"], m["turn"], m["stored"]) == ("0", 1, "tampered") and m["recomputed"] != "tampered"
    assert run["status"] == "done"
