"""Linear and hybrid models (Mamba, Mamba-2, Jamba, Zamba2, Falcon-H1, gated DeltaNet, ...): reusing the recurrent
state across turns gives the same greedy output as re-running the whole input, and the state is counted per turn.

Tiny random-weight configs (``scbench.engines.models.RANDOM_PRESETS``) with the embedded tokenizer: outputs are
junk, but they must be identical between the two paths.
"""
from __future__ import annotations

import pytest
import torch

from scbench.data import load_examples
from scbench.records import RunSpec
from scbench.registry import METHODS, TASKS
from scbench.runner import Replay

# The list (Mamba, Mamba-2, Jamba, Zamba2, Falcon-H1, a gated linear attention model: Qwen3-Next's gated
# DeltaNet) runs in CI; the other architectures transformers 5.23 supports are marked slow (reference torch kernels).
ARCHS = ["tiny-mamba", "tiny-mamba2", "tiny-jamba", "tiny-zamba2", "tiny-falcon-h1", "tiny-qwen3-next"] + [
    pytest.param(p, marks=pytest.mark.slow) for p in
    ["tiny-falcon-mamba", "tiny-bamba", "tiny-granitemoehybrid", "tiny-nemotron-h", "tiny-lfm2", "tiny-olmo-hybrid",
     "tiny-kimi-linear"]
]
ATTENTION_FREE = {"tiny-mamba", "tiny-falcon-mamba", "tiny-mamba2"}
_ENGINES: dict = {}


def engine_for(preset, tokenizer):
    if preset not in _ENGINES:
        from scbench.engines.hf import HFEngine
        from scbench.engines.models import random_model

        model = random_model(preset, tokenizer=tokenizer, seed=0)
        _ENGINES[preset] = HFEngine(preset, name=preset, model=model, tokenizer=tokenizer, device="cpu", window=4096)
    return _ENGINES[preset]


def replay(engine, mode, reuse, task_name="scbench_kv", method=None, length=200, turns=2, max_new=6):
    task = TASKS.get(task_name)
    count = lambda t: len(engine.encode(t, add_special_tokens=False))  # noqa: E731
    ex = load_examples(task, "generated", n=1, length=length, turns=turns, seed=0, count=count)[0]
    spec = RunSpec(model={}, method={"name": "full"}, task=task_name, mode=mode, max_turns=turns,
                   max_new_tokens=max_new, reuse=reuse)
    return list(Replay(engine, method or METHODS.get("full")(), task, ex, spec))


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
@pytest.mark.parametrize("preset", ARCHS)
def test_state_reuse_matches_rerun(smol_tokenizer, preset, mode):
    from scbench.engines.recurrent import RecurrentSession

    engine = engine_for(preset, smol_tokenizer)
    assert isinstance(engine.session(METHODS.get("full")()), RecurrentSession)
    reused = replay(engine, mode, reuse=True)
    naive = replay(engine, mode, reuse=False)
    assert [r.prediction for r in reused] == [r.prediction for r in naive]
    assert [r.stats.decode_tokens for r in reused] == [r.stats.decode_tokens for r in naive]
    for i, (a, b) in enumerate(zip(reused, naive)):
        assert a.stats.prompt_tokens == b.stats.prompt_tokens and b.stats.prefill_computed == b.stats.prompt_tokens
        assert a.stats.prefill_computed + a.stats.prefill_reused == a.stats.prompt_tokens
        if i > 0:  # the state carries the shared context: only the turn's new tokens are computed
            assert a.stats.prefill_computed < a.stats.prompt_tokens / 2
    # the recurrent state has a fixed size: the same bytes every turn, in both paths
    states = {r.stats.state_bytes for r in reused + naive}
    assert len(states) == 1 and states.pop() > 0
    for r in reused:
        if preset in ATTENTION_FREE:
            assert r.stats.kv_bytes == r.stats.kv_tokens == r.stats.kv_full_bytes == 0
        else:  # attention layers hold every position, and nothing is evicted
            assert r.stats.kv_tokens == r.stats.prompt_tokens + r.stats.decode_tokens - 1
            assert r.stats.kv_bytes == r.stats.kv_full_bytes > 0


def test_state_bytes_counted_from_tensors(smol_tokenizer):
    """Mamba-2: per layer a conv state [conv_dim, kernel] and an SSM state [heads, head_dim, state], float32."""
    engine = engine_for("tiny-mamba2", smol_tokenizer)
    c = engine.model.config
    conv_dim = c.expand * c.hidden_size + 2 * c.n_groups * c.state_size
    per_layer = 4 * (conv_dim * c.conv_kernel + c.num_heads * c.head_dim * c.state_size)
    res = replay(engine, "multi_turn", reuse=True)
    assert all(r.stats.state_bytes == c.num_hidden_layers * per_layer for r in res)


@pytest.mark.parametrize("preset", ARCHS)
def test_state_carries_the_context(smol_tokenizer, preset):
    """Feeding in pieces (a prefill, then multi-token deltas) on top of the state gives the logits of
    one prefill of everything, and those logits depend on the context (the state is not a no-op)."""
    engine = engine_for(preset, smol_tokenizer)
    full = METHODS.get("full")()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(10, 40000, (70,), generator=g).tolist()
    other = torch.randint(10, 40000, (50,), generator=g).tolist() + ids[50:]
    pieces = engine.session(full)
    for a, b in [(0, 50), (50, 66), (66, 70)]:  # single tokens: generate() in the test above
        pieces.feed(ids[a:b], compress=False, sparse=False)
    whole, changed = engine.session(full), engine.session(full)
    whole.feed(ids, compress=False, sparse=False)
    changed.feed(other, compress=False, sparse=False)
    scale = whole.last_logits.abs().max()
    assert (pieces.last_logits - whole.last_logits).abs().max() < 1e-4 * scale
    assert (changed.last_logits - whole.last_logits).abs().max() > 1e-2 * scale


def _logits_after(session, ids):
    session.feed(ids, compress=False, sparse=False)
    return session.last_logits.clone()


@pytest.mark.parametrize("preset", ["tiny-mamba", "tiny-mamba2", "tiny-falcon-h1", "tiny-qwen3-next"])
def test_drop_last_and_rollback_restore_the_state(smol_tokenizer, preset):
    """drop_last into the fed tokens (a forced assistant prefix) and rollback give the state of a fresh prefill."""
    engine = engine_for(preset, smol_tokenizer)
    full = METHODS.get("full")()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 1000, (60,), generator=g).tolist()
    more = torch.randint(10, 1000, (7,), generator=g).tolist()

    s = engine.session(full)
    s.feed(ids, compress=False, sparse=False)
    gen = s.generate(5)
    s.drop_last(len(gen.tokens) - 1 + 3)  # the generated tokens plus the last 3 fed ones
    assert s.pos == 57 and s.memory()["state_bytes"] > 0
    fresh = engine.session(full)
    fresh.feed(ids[:57], compress=False, sparse=False)
    assert torch.allclose(_logits_after(s, more), _logits_after(fresh, more), atol=1e-5, rtol=1e-4)

    s = engine.session(full)
    s.feed(ids, compress=False, sparse=False)
    token = s.checkpoint(rewrites=False)
    first = _logits_after(s, more)
    s.generate(4)
    s.rollback(token)
    assert s.pos == 60
    assert torch.equal(_logits_after(s, more), first)  # bit-exact: the same state, the same forward

    with pytest.raises(RuntimeError, match="cannot be cropped"):
        s.drop_last(30)  # beyond the automatic marks of the last feed


def test_forced_prefix_through_runner(smol_tokenizer):
    """scbench_summary forces "This paper" into later answers: the runner drops it with the generated tokens."""
    engine = engine_for("tiny-jamba", smol_tokenizer)
    kw = dict(task_name="scbench_summary", length=250, turns=2, max_new=4)
    reused = replay(engine, "multi_turn", reuse=True, **kw)
    naive = replay(engine, "multi_turn", reuse=False, **kw)
    assert [r.prediction for r in reused] == [r.prediction for r in naive]
    assert reused[1].stats.prefill_computed + reused[1].stats.prefill_reused == reused[1].stats.prompt_tokens


def test_compression_acts_on_attention_layers_only(smol_tokenizer):
    engine = engine_for("tiny-jamba", smol_tokenizer)
    sl = METHODS.get("streamingllm")(n_init=4, n_local=28)
    res = replay(engine, "multi_request", reuse=True, method=sl, turns=2, max_new=4)
    plain = replay(engine, "multi_request", reuse=True, turns=2, max_new=4)
    for r, p in zip(res, plain):
        assert r.stats.kv_bytes < p.stats.kv_bytes and r.stats.state_bytes == p.stats.state_bytes


def test_clear_errors(smol_tokenizer):
    from scbench.engines.hf import HFEngine
    from scbench.engines.models import random_config, random_model

    engine = engine_for("tiny-mamba2", smol_tokenizer)
    with pytest.raises(ValueError, match="no attention layers"):
        engine.session(METHODS.get("streamingllm")(n_init=4, n_local=28))
    gemma = random_model({"model_type": "recurrent_gemma", "hidden_size": 32, "num_hidden_layers": 3,
                          "num_attention_heads": 2, "intermediate_size": 64, "lru_width": 32}, tokenizer=smol_tokenizer)
    with pytest.raises(ValueError, match="recurrent_gemma.*inside the model"):
        HFEngine("g", model=gemma, tokenizer=smol_tokenizer, device="cpu", window=512).session(METHODS.get("full")())
    with pytest.raises(ValueError, match="unknown random model preset 'tiny-mamba3'.*tiny-mamba2"):
        random_config("tiny-mamba3")
    with pytest.raises(ValueError, match="model_type"):
        random_config({"hidden_size": 8})


def test_run_and_export_from_config(tmp_path):
    """`scbench run model=tiny-mamba2`: the random preset is saved once and loaded like any checkpoint, and the
    state bytes reach the store and the exports."""
    import json

    from omegaconf import OmegaConf

    from scbench.run import run_spec
    from scbench.report.export import records
    from scbench.report.table import leaderboard
    from scbench.store import Store

    model = dict(OmegaConf.load("configs/model/tiny-mamba2.yaml"), device="cpu")
    spec = RunSpec(model=model, method={"name": "full"}, task="scbench_kv", mode="multi_request", max_turns=2,
                   max_new_tokens=4, data={"source": "generated", "n": 1, "length": 200, "turns": 2, "seed": 0})
    store_path = tmp_path / "s.sqlite"
    run_spec(spec, str(store_path), progress=False)
    store = Store(store_path)
    recs = records(store)
    assert len(recs) == 2 and all(r["costs"]["state_bytes"] > 0 and r["costs"]["kv_bytes"] == 0 for r in recs)
    assert json.loads(store.runs()[0]["provenance"])["engine"]["model_class"] == "Mamba2ForCausalLM"
    assert (leaderboard(store)["state MiB (mean/turn)"] > 0).all()
    store.close()
