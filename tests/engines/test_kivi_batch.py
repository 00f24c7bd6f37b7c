"""KIVI's batched decode (methods/kivi_batch.py) stores the rows of its sequential decode (float32, tiny random
model, CPU): predictions and KV bytes, with groups quantised during the feeds and during the decode at different
steps of different rows; the flush schedule against KIVILayer itself."""
from __future__ import annotations

import pytest
import torch

from scbench.batch import BatchedReplay
from scbench.kv.quant import KIVILayer, dequantize, quantize
from scbench.methods.kivi_batch import counts_after, flush_schedule, multi_turn_reason
from scbench.runner import Replay

from support import batch_replay as replay, same_rows, spy_returns

KIVI = {  # 2 / 4 bits; groups quantised during the feeds and the decodes (multi-turn: the last turn's only, as
    # earlier turns that quantise during their decode keep the run sequential, ``multi_turn_reason``)
    "multi_request": [{"name": "kivi", "bits": 2, "group": 8, "residual": 24},
                      {"name": "kivi", "bits": 4, "group": 8, "residual": 20}],
    "multi_turn": [{"name": "kivi", "bits": 2, "group": 16, "residual": 12},
                   {"name": "kivi", "bits": 4, "group": 16, "residual": 14}],
}


@pytest.mark.parametrize("mode", ["multi_request", "multi_turn"])
@pytest.mark.parametrize("which", [0, 1], ids=["2bit", "4bit"])
def test_kivi_batched_equals_sequential(tiny_engine, mode, which, monkeypatch):
    from scbench.methods import kivi_batch

    method, flushed = KIVI[mode][which], spy_returns(monkeypatch, kivi_batch, "flush_schedule")
    seq = replay(tiny_engine, Replay, method, mode)
    bat = replay(tiny_engine, BatchedReplay, method, mode)
    same_rows(seq, bat)
    assert {r.stats.decode_path for r in bat} == {"batched"} and {r.stats.decode_batch for r in bat} == {4}
    assert {r.stats.decode_kernel for r in bat} == {"torch+dequant kivi"}
    steps = {t for s in flushed for t, _, _ in s}
    assert len(steps) > (mode == "multi_request"), f"rows flush during the decode (at different steps): {flushed}"


def test_flush_schedule_follows_kivi_layer():
    """Token by token, KIVILayer quantises the groups ``flush_schedule`` names, and the values it attends after a
    flush are dequantize(quantize(group)) of the exact ones."""
    g = torch.Generator().manual_seed(0)
    for residual, group, n0 in [(4, 4, 13), (6, 2, 9), (0, 4, 3), (8, 8, 5)]:
        k, v = torch.randn(1, 2, n0, 8, generator=g), torch.randn(1, 2, n0, 8, generator=g)
        layer = KIVILayer(k, v, bits=2, group=group, residual=residual)
        start = layer.n_quant
        sched = flush_schedule(n0, start, 20, residual, group)
        exact_k, got = k, []
        for t in range(20):
            nk, nv = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g)
            exact_k = torch.cat([exact_k, nk], dim=2)
            before = layer.n_quant
            layer.update(nk, nv)
            assert counts_after(before, n0 + t, append=1, residual=residual, group=group) == (layer.n_quant, n0 + t + 1)
            if layer.n_quant != before:
                got.append((t, before, layer.n_quant - before))
                keys, _ = layer.dequantized()
                want = dequantize(*quantize(exact_k[:, :, before : layer.n_quant], 2, group, -2), 2, group, -2,
                                  torch.float32)
                assert torch.equal(keys[:, :, before : layer.n_quant], want)
        assert got == sched and sched


def test_multi_turn_reason():
    # earlier turns' decodes never reach a flush: batched; one may (its answer's length decides): sequential
    assert multi_turn_reason([90, 20, 30], [5, 5, 5], [6, 6, 6], residual=24, group=16) is None
    assert multi_turn_reason([90, 20, 30], [5, 5, 5], [6, 6, 60], residual=24, group=16) is None  # the last turn
    assert "turn 1's decode" in multi_turn_reason([90, 20, 30], [5, 5, 5], [6, 20, 6], residual=24, group=16)
    assert "turn 0's decode" in multi_turn_reason([100, 30, 30], [5, 5, 5], [40, 10, 10], residual=4, group=4)


@pytest.mark.parametrize("bits,group,residual", [(2, 4, 6), (4, 8, 8), (2, 2, 0), (2, 16, 24)])
def test_rows_attend_what_their_kivi_layers_attend(bits, group, residual):
    """Plugin level: rows fed requests of different lengths after one context; at every decode step each row's
    shared + own keys/values equal what its own KIVILayer.update returns (before the flush), bit for bit."""
    from types import SimpleNamespace

    from scbench.batch_step import SharedPrefixKV
    from scbench.methods.kivi import KIVI

    g = torch.Generator().manual_seed(bits * 100 + group)
    rnd = lambda n: torch.randn(1, 2, n, 16, generator=g)  # noqa: E731
    layers = [KIVILayer(rnd(37), rnd(37), bits=bits, group=group, residual=residual) for _ in range(2)]
    base = [layer.scbench_snapshot() for layer in layers]
    rows, refs = [], []
    for n in (1, 5, 11):
        own, ref = [], []
        for layer, snap in zip(layers, base):
            layer.scbench_restore(snap)
            layer.update(rnd(n), rnd(n))
            own.append(layer.scbench_snapshot())
            mine = KIVILayer(rnd(1), rnd(1), bits=bits, group=group, residual=residual)
            mine.scbench_restore(own[-1])
            ref.append(mine)
        rows.append(SimpleNamespace(own=own, shared_len=None))
        refs.append(ref)
    for layer, snap in zip(layers, base):
        layer.scbench_restore(snap)
    plugin = KIVI(bits=bits, group=group, residual=residual).batch_decoder()
    shared = plugin.prepare(SimpleNamespace(layers=layers), rows)
    n_shared = shared.kivi_plan["shared"]
    assert n_shared == layers[0].n_quant and (n_shared > 0) == (group < 16)  # the context's chunks, de-quantised once
    steps = 3 * group + 2
    kv = SharedPrefixKV(shared, rows, steps, kernel="torch", plugin=plugin)
    flushed = 0
    for t in range(steps):
        for li in range(2):
            nk, nv = rnd(3).transpose(0, 2), rnd(3).transpose(0, 2)  # [3 rows, 2 heads, 1, 16]
            kv.update(nk, nv, li)
            for b in range(3):
                want_k, want_v = refs[b][li].update(nk[b : b + 1], nv[b : b + 1])
                at = int(kv.at[b]) + 1
                got_k = torch.cat([kv.shared[li][0][:, :, :n_shared], kv.k[li][b : b + 1, :, :at]], dim=2)
                got_v = torch.cat([kv.shared[li][1][:, :, :n_shared], kv.v[li][b : b + 1, :, :at]], dim=2)
                assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), (t, li, b)
        kv.at += 1
        plugin.after_step(t)
        flushed += len(plugin.due.get(t, ()))
    assert flushed >= 3
    for b in range(3):
        mem = plugin.row_memory(b, [ref.get_seq_length() for ref in refs[b]], steps)
        assert mem == {"kv_bytes": sum(ref.scbench_nbytes() for ref in refs[b])}


def test_plan_falls_back_when_the_shared_copy_does_not_fit(monkeypatch):
    """On CUDA the de-quantised context must fit free device memory (the allocator's unused cache counts as free);
    the prompt budget bounds it before the context is tokenized."""
    from types import SimpleNamespace

    from scbench.methods.kivi import KIVI

    engine = SimpleNamespace(device="cuda", dtype=torch.bfloat16, num_layers=32, kv_heads=8, head_dim=128)
    spec = SimpleNamespace(mode="multi_request")
    tokenized = []
    builder = SimpleNamespace(budget=131072, context=lambda: tokenized.append(1) or [0] * 32768)
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 2 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: gib)
    plan = KIVI().batch_decoder().plan_reason
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (40 * gib, 140 * gib))
    assert plan(engine, spec, builder, 5) is None and not tokenized  # 16 GiB at the budget fits 41 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (5 * gib, 140 * gib))
    assert plan(engine, spec, builder, 5) is None and tokenized  # 4 GiB for the real 32K context fits 6 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (2 * gib, 140 * gib))
    assert "(4.00 GiB) does not fit free device memory (3.00 GiB)" in plan(engine, spec, builder, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["multi_request", "multi_turn"])
def test_cuda_kivi_batched_equals_sequential(smol_tokenizer, mode):
    """On CUDA (float32, the tiny random Llama of the CPU tests): the batched step (CUDA graph, the shared-prefix
    Triton kernel over the de-quantised context, flushes between replays) stores the rows of the sequential fast path
    (kivi_fast). (The byte tokenizer's 300-token example is too short for 4 keys: the embedded tokenizer's.)"""
    from scbench.engines.hf import HFEngine
    from support import random_llama

    tok = smol_tokenizer
    model = random_llama(len(tok), layers=2, seed=0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    engine = HFEngine("tiny-random-llama", model=model, tokenizer=tok, device="cuda", dtype="float32")
    for method in KIVI[mode] + [dict(KIVI[mode][0], decode_cache="temp")]:  # the reference decode too
        seq = replay(engine, Replay, method, mode)
        bat = replay(engine, BatchedReplay, method, mode)
        same_rows(seq, bat)
        assert {r.stats.decode_path for r in bat} == {"batched"}
        assert {r.stats.decode_kernel for r in bat} == {"triton+dequant kivi"}


def test_kivi_batched_resume(tiny_engine):
    """A resumed run batches the missing requests (and the stored one it checks) over the same shared chunks and
    stores what a resumed sequential run stores."""
    method = KIVI["multi_request"][0]
    full = replay(tiny_engine, Replay, method, "multi_request")
    done = {0: full[0].prediction, 2: full[2].prediction}
    reps = []
    bat = replay(tiny_engine, BatchedReplay, method, "multi_request", done=done, keep=reps)
    seq = replay(tiny_engine, Replay, method, "multi_request", done=done)
    for r in seq + bat:  # (both ways: where the resumed run records the fired promise checks differs, any method)
        r.stats.checks = ""
    same_rows(seq, bat)
    assert [r.prediction for r in bat] == [full[1].prediction, full[3].prediction]
    assert {r.stats.decode_batch for r in bat} == {3} and reps[0].mismatches == []


def test_kivi_batched_context_shorter_than_a_group(tiny_engine):
    """A context with no packed chunk yet (shorter than residual + group): nothing shared, every token the rows' own
    (their feeds quantise part of it), still the sequential rows."""
    method = {"name": "kivi", "bits": 2, "group": 16, "residual": 330}
    seq = replay(tiny_engine, Replay, method, "multi_request")
    bat = replay(tiny_engine, BatchedReplay, method, "multi_request")
    same_rows(seq, bat)
    assert {r.stats.decode_path for r in bat} == {"batched"}
    assert len({r.stats.kv_bytes for r in bat}) > 1


def test_kivi_batch_can_be_switched_off(tiny_engine, monkeypatch):
    monkeypatch.setenv("SCBENCH_KIVI_BATCH", "0")
    rows = replay(tiny_engine, BatchedReplay, KIVI["multi_request"][0], "multi_request")
    assert "batched" not in {r.stats.decode_path for r in rows}
