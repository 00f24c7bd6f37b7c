"""KIVI's ``decode_cache=temp`` (SCBench's reference KiviCache): tokens after the freeze mark stay full precision and
are dropped exactly. Layer level (append / crop / snapshot), replay level (multi-turn histories and multi-request
requests independent of the decodes, where ``quantized`` is not), the fast path (static plugin, no flush) and the
batched decode (multi-turn batched whatever the answers' lengths) against the plain / sequential ones. Float32, CPU,
tiny random model."""
from __future__ import annotations

import pytest
import torch

from scbench.batch import BatchedReplay
from scbench.engines.hf_session import HFSession
from scbench.kv.quant import KIVILayer
from scbench.methods.kivi import KIVI
from scbench.runner import Replay

from support import batch_replay, same_rows, spy_returns, two_turn_decode


def _state(layer: KIVILayer):
    """Everything a KIVILayer holds (tensors cloned)."""
    chunks = [tuple(t.clone() for t in c) for c in (*layer.kchunks, *layer.vchunks)]
    return layer.n_quant, chunks, layer.keys.clone(), layer.values.clone()


def _same(a, b) -> bool:
    (na, ca, ka, va), (nb, cb, kb, vb) = a, b
    return (na == nb and len(ca) == len(cb) and all(torch.equal(x, y) for p, q in zip(ca, cb) for x, y in zip(p, q))
            and torch.equal(ka, kb) and torch.equal(va, vb))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("decode_cache", ["temp", "quantized"])
def test_frozen_layer_never_quantizes_and_crops_back_exactly(bits, decode_cache):
    g = torch.Generator().manual_seed(bits)
    rnd = lambda n: torch.randn(1, 2, n, 8, generator=g)  # noqa: E731
    layer = KIVILayer(rnd(45), rnd(45), bits=bits, group=4, residual=4, decode_cache=decode_cache)
    assert layer.n_quant == 40
    before = _state(layer)
    layer.scbench_freeze()
    snap = layer.scbench_snapshot()
    for n in (1, 1, 7, 1, 13, 1):  # decode steps and a longer append (a multi-request prompt)
        layer.update(rnd(n), rnd(n))
    if decode_cache == "quantized":  # the default: appended tokens are quantized a group at a time, as before
        assert layer.frozen is None and layer.n_quant > 40
        return
    assert layer.frozen == 45 and layer.n_quant == 40 and layer.get_seq_length() == 69
    assert layer.scbench_nbytes() > before[2].numel() * 8  # the temp tokens are held (and counted) at full precision
    layer.scbench_crop(45)
    assert _same(_state(layer), before)
    layer.update(rnd(3), rnd(3))
    layer.scbench_restore(snap)  # a snapshot carries the mark
    assert layer.frozen == 45 and _same(_state(layer), before)
    layer.scbench_thaw()
    layer.update(rnd(3), rnd(3))  # thawed: the usual rule again (48 tokens: 44 packed, 4 exact)
    assert layer.frozen is None and layer.n_quant == 44


def test_bad_decode_cache_is_refused():
    with pytest.raises(ValueError, match=r"KIVI.decode_cache must be one of \('quantized', 'temp'\), got 'tmp'"):
        KIVI(decode_cache="tmp")


def test_reference_config_and_notes():
    from pathlib import Path

    import yaml

    from scbench.run import build_method

    configs = Path(__file__).parents[2] / "configs/method"
    ref = build_method(yaml.safe_load((configs / "kivi.yaml").read_text()))  # faithful first: the reference decode
    assert (ref.bits, ref.group, ref.residual, ref.decode_cache) == (2, 32, 32, "temp")
    assert build_method(yaml.safe_load((configs / "kivi-4bit.yaml").read_text())).decode_cache == "temp"
    paper = build_method(yaml.safe_load((configs / "kivi-paper.yaml").read_text()))
    assert (paper.bits, paper.decode_cache) == (2, "quantized") and paper.label() == KIVI().label()
    assert "temporary cache" in KIVI().approximation and "temporary cache" not in ref.approximation
    assert "residual rule" in ref.approximation
    assert KIVI().label() == "kivi(bits=2,group=32,residual=32)"  # the default's label as before the knob
    assert ref.label() == "kivi(bits=2,group=32,residual=32,decode_cache=temp)"
    # the end-of-run table shows the method's name and budget: the two decodes must differ there too
    assert KIVI.budget_label({"bits": 2, "decode_cache": "temp"}) == "2bit-temp"
    assert KIVI.budget_label({"bits": 2, "group": 32}) == "2bit"
    assert KIVI.budget_label({"bits": 2, "decode_cache": "quantized"}) == "2bit"


def _record(monkeypatch):
    """Wrap HFSession so every feed / generate / drop_last of a replay is logged, with each KIVI layer's state
    after every drop_last and after every generate."""
    log = []
    feed, gen, drop = HFSession.feed, HFSession.generate, HFSession.drop_last

    def _feed(self, ids, **kw):
        log.append(("feed", list(ids), kw))
        return feed(self, ids, **kw)

    def _gen(self, n, **kw):
        out = gen(self, n, **kw)
        log.append(("generate", len(out.tokens), [_state(layer) for layer in self.cache.layers]))
        return out

    def _drop(self, n):
        drop(self, n)
        log.append(("drop", n, [_state(layer) for layer in self.cache.layers]))

    monkeypatch.setattr(HFSession, "feed", _feed)
    monkeypatch.setattr(HFSession, "generate", _gen)
    monkeypatch.setattr(HFSession, "drop_last", _drop)
    return log


def _multi_turn_history_matches_prompts_only(engine, method, monkeypatch) -> bool:
    """Replay multi-turn; then feed the same prompts to a fresh session without decoding (dropping only each turn's
    rewind): is the cache after every turn's crop the same, bit for bit?"""
    log = _record(monkeypatch)
    rows = batch_replay(engine, Replay, method, "multi_turn")
    monkeypatch.undo()
    assert len(rows) == 4
    ref, decoded, same, drops = engine.session(KIVI(**{k: v for k, v in method.items() if k != "name"})), 0, [], 0
    for kind, arg, *rest in log:
        if kind == "feed":
            ref.feed(arg, **rest[0])
        elif kind == "generate":
            decoded = arg - 1
        else:
            ref.drop_last(arg - decoded)
            drops += 1
            same.append(all(_same(a, _state(b)) for a, b in zip(rest[0], ref.cache.layers)))
    assert drops == 4 and decoded > 4
    return all(same)


@pytest.mark.parametrize("bits", [2, 4])
def test_multi_turn_history_does_not_depend_on_the_answers(tiny_engine, monkeypatch, bits):
    temp = {"name": "kivi", "bits": bits, "group": 4, "residual": 4, "decode_cache": "temp"}
    assert _multi_turn_history_matches_prompts_only(tiny_engine, temp, monkeypatch)
    # today's default quantizes decoded groups with prompt tokens in them: the crop leaves those de-quantized
    assert not _multi_turn_history_matches_prompts_only(tiny_engine, {**temp, "decode_cache": "quantized"},
                                                        monkeypatch)


@pytest.mark.parametrize("decode_cache", ["temp", "quantized"])
def test_multi_request_prompts_and_decodes_stay_full_precision(tiny_engine, monkeypatch, decode_cache):
    """Each request's decode sees the shared context's quantized chunks and nothing else quantized: its prompt and
    its decoded tokens are exact (``temp``); the default quantizes them."""
    log = _record(monkeypatch)
    batch_replay(tiny_engine, Replay, {"name": "kivi", "bits": 2, "group": 4, "residual": 4,
                                       "decode_cache": decode_cache}, "multi_request")
    monkeypatch.undo()
    ctx = log[0][1]
    s = tiny_engine.session(KIVI(bits=2, group=4, residual=4, decode_cache=decode_cache))
    s.feed(ctx, compress=True, sparse=False)
    shared = [_state(layer) for layer in s.cache.layers]
    gens = [e for e in log if e[0] == "generate"]
    assert len(gens) == 4
    untouched = []
    for _, _, states in gens:
        for (nq, chunks, keys, _), (nq0, chunks0, keys0, _) in zip(states, shared):
            same = torch.equal(keys[:, :, : keys0.shape[2]], keys0)
            untouched.append(nq == nq0 and len(chunks) == len(chunks0) and same)
    assert all(untouched) == (decode_cache == "temp")


@pytest.mark.parametrize("bits,group,residual", [(2, 16, 16), (4, 8, 5), (2, 4, 4)])
def test_fast_temp_equals_plain(smol_tokenizer, bits, group, residual):
    """The static path (plugin, no flush) against the plain loop: tokens over two turns and the cache left."""
    from support import make_tiny_engine

    engine = make_tiny_engine(smol_tokenizer, layers=2)
    g = torch.Generator().manual_seed(bits * group + residual)
    prompt = torch.randint(5, 2000, (201,), generator=g).tolist()
    follow = torch.randint(5, 2000, (13,), generator=g).tolist()
    cfg = dict(bits=bits, group=group, residual=residual, decode_cache="temp")
    plain, ppath, ps, _ = two_turn_decode(engine, KIVI(**cfg), prompt, follow, mode="plain", first=45, second=38)
    fast, fpath, fs, _ = two_turn_decode(engine, KIVI(**cfg), prompt, follow, mode="fast", first=45, second=38)
    assert ppath == ["plain"] * 2 and fpath == ["static"] * 2
    assert fast == plain and len(fast[1]) == 38
    assert fs.memory()["kv_bytes"] == ps.memory()["kv_bytes"]
    for a, b in zip(fs.cache.layers, ps.cache.layers):
        assert a.frozen == b.frozen == 201 + 13 and a.n_quant == b.n_quant  # the mark: after the follow-up
        assert a.get_seq_length() - a.n_quant >= 37  # every decoded token exact
        for x, y in zip(a.dequantized(), b.dequantized()):  # (the static step's attention rounds differently)
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


MT = {"name": "kivi", "bits": 2, "group": 4, "residual": 4, "decode_cache": "temp"}


@pytest.mark.parametrize("mode", ["multi_request", "multi_turn"])
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_temp_batched_equals_sequential(tiny_engine, mode, bits, monkeypatch):
    """Batched: no flush scheduled; multi-turn batches although every earlier decode would quantise with the
    default (group 4, residual 4, 10 new tokens: ``quantized`` stays sequential)."""
    from scbench.methods import kivi_batch

    method, flushed = {**MT, "bits": bits}, spy_returns(monkeypatch, kivi_batch, "flush_schedule")
    seq = batch_replay(tiny_engine, Replay, method, mode)
    bat = batch_replay(tiny_engine, BatchedReplay, method, mode)
    same_rows(seq, bat)
    assert {r.stats.decode_path for r in bat} == {"batched"} and {r.stats.decode_batch for r in bat} == {4}
    assert flushed == []
    if mode == "multi_turn":
        dflt = batch_replay(tiny_engine, BatchedReplay, {**method, "decode_cache": "quantized"}, mode)
        assert "batched" not in {r.stats.decode_path for r in dflt}


def test_temp_on_a_hybrid_model(smol_tokenizer, monkeypatch):
    """A recurrent/hybrid session (Jamba: attention layers become KIVILayers) freezes at the checkpoint and before
    each decode and thaws after each drop, as HFSession does: every request's decode leaves the context's chunks."""
    from scbench.engines.recurrent import RecurrentSession

    from engines import test_hybrid_models as hybrid

    engine = hybrid.engine_for("tiny-jamba", smol_tokenizer)
    seen = []
    gen, drop = RecurrentSession.generate, RecurrentSession.drop_last

    def _gen(self, n, **kw):
        out = gen(self, n, **kw)
        seen.append([(layer.frozen, layer.n_quant) for layer in self.cache.layers if isinstance(layer, KIVILayer)])
        return out

    def _drop(self, n):
        drop(self, n)
        seen.append([layer.frozen for layer in self.cache.layers if isinstance(layer, KIVILayer)])

    monkeypatch.setattr(RecurrentSession, "generate", _gen)
    monkeypatch.setattr(RecurrentSession, "drop_last", _drop)
    kivi = KIVI(bits=2, group=4, residual=4, decode_cache="temp")
    for mode in ("multi_request", "multi_turn"):
        seen.clear()
        rows = hybrid.replay(engine, mode, reuse=True, method=kivi, turns=2, max_new=12)
        assert len(rows) == 2 and seen and all(seen[0])
        gens = [s for s in seen if s and isinstance(s[0], tuple)]
        assert all(f is not None for g in gens for f, _ in g)
        if mode == "multi_request":  # the context's chunks only, through every request's decode
            assert gens[0] == gens[1]
        else:
            assert all(f is None for s in seen if s and not isinstance(s[0], tuple) for f in s)  # thawed


def test_plugin_needs_the_freeze_mark(tiny_engine):
    """The static plugin skips the flush for decode_cache=temp: it declines a temp layer the session has not marked."""
    from scbench.engines import fastdecode
    from scbench.kv import cache as kvc

    s = tiny_engine.session(KIVI(group=4, residual=4, decode_cache="temp"))
    s.feed([5, 6, 7] * 30, compress=True, sparse=False)
    assert "has no freeze mark" in fastdecode.unsupported(s.cache, s.method)
    kvc.freeze(s.cache)
    assert fastdecode.unsupported(s.cache, s.method) is None
    assert "other settings" in fastdecode.unsupported(s.cache, KIVI(group=4, residual=4))  # quantized vs temp layers
