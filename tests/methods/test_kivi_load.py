"""KIVI's fast-decode plugin across turns (methods/kivi_fast.py): ``load`` copies only the chunks its buffers do not
hold yet, and the tokens stay those of the plain loop, in the multi-request pattern (checkpoint, rollback, a new
query each turn) and the multi-turn one (a follow-up fed after the answer). ``values_to_words_fast`` (one Triton
kernel) against the torch ``values_to_words``: in Triton's interpreter on CPU, on CUDA at the 8B shape."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from scbench.kernels import kivi_flush
from scbench.methods.kivi import KIVI

from support import make_tiny_engine


def _requests(engine, mode, context, queries, n):
    """Multi-request turns: the tokens of each, and per turn the chunks at load / in the checkpoint, and copies."""
    engine.decode_mode = mode
    try:
        s = engine.session(KIVI(bits=2, group=16, residual=16))
        s.feed(context, compress=True, sparse=False)
        ck = s.checkpoint(rewrites=True)
        held_at_ck = sum(len(layer.kchunks) for layer in s.cache.layers)
        out, copies = [], []
        for q in queries:
            s.rollback(ck)
            s.feed(q, compress=False, sparse=False)
            chunks = sum(len(layer.kchunks) for layer in s.cache.layers)
            before = s.decoder.plugin.copies if s.decoder is not None else 0
            g = s.generate(n)
            out.append(g.tokens)
            if mode == "fast":
                assert g.decode_path == "static"
                copies.append((chunks, s.decoder.plugin.copies - before))
        return out, copies, held_at_ck
    finally:
        engine.decode_mode = "auto"


def test_requests_copy_only_new_chunks(smol_tokenizer):
    engine = make_tiny_engine(smol_tokenizer, layers=2)
    g = torch.Generator().manual_seed(5)
    context = torch.randint(5, 2000, (230,), generator=g).tolist()
    queries = [torch.randint(5, 2000, (n,), generator=g).tolist() for n in (40, 9, 33)]
    plain, _, _ = _requests(engine, "plain", context, queries, 30)
    fast, copies, at_ck = _requests(engine, "fast", context, queries, 30)
    assert fast == plain
    (c0, n0), *later = copies
    assert n0 == c0  # the first turn loads every chunk
    for chunks, n in later:  # later turns: only the chunks the query's feed added after the checkpoint
        assert n == chunks - at_ck
    assert sum(n for _, n in later) < sum(c for c, _ in later)


def test_follow_up_turns_copy_only_new_chunks(smol_tokenizer):
    """Multi-turn: the chunk store_back handed back stays held; the next turn copies the follow-up's chunks only."""
    engine = make_tiny_engine(smol_tokenizer, layers=2)
    g = torch.Generator().manual_seed(6)
    prompt = torch.randint(5, 2000, (201,), generator=g).tolist()
    follows = [torch.randint(5, 2000, (n,), generator=g).tolist() for n in (37, 20)]
    runs = {}
    for mode in ("plain", "fast"):
        engine.decode_mode = mode
        s = engine.session(KIVI(bits=2, group=16, residual=16))
        s.feed(prompt, compress=True, sparse=False)
        toks, copies = [s.generate(40).tokens], []
        for f in follows:
            s.feed(f, compress=False, sparse=False)  # the last generated token is not in the cache: part of f here
            before = s.decoder.plugin.copies if mode == "fast" else 0
            held = sum(len(x) for x in s.decoder.plugin.held.values()) if mode == "fast" else 0
            chunks = sum(len(layer.kchunks) for layer in s.cache.layers)
            toks.append(s.generate(25).tokens)
            if mode == "fast":
                copies.append((s.decoder.plugin.copies - before, chunks - held))
        runs[mode] = toks, copies
    engine.decode_mode = "auto"
    assert runs["fast"][0] == runs["plain"][0]
    for got, new in runs["fast"][1]:
        assert got == new


def test_values_to_words_fast_falls_back_on_cpu():
    vp = torch.randint(0, 256, (1, 2, 32, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert torch.equal(kivi_flush.values_to_words_fast(vp, 2), kivi_flush.values_to_words(vp, 2))


_CHECK = """
import torch
from scbench.kernels.kivi_flush import values_to_words, values_to_words_fast
g = torch.Generator().manual_seed(2)
for bits, d, n, ch in ((2, 128, 64, 4), (4, 128, 32, 4), (2, 64, 48, 4), (4, 32, 24, 2), (2, 32, 16, 8)):
    vp = torch.randint(0, 256, (2, 3, n, d * bits // 8), dtype=torch.uint8, generator=g)
    assert torch.equal(values_to_words_fast(vp, bits, ch), values_to_words(vp, bits)), (bits, d, n, ch)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its CPU interpreter)")
def test_values_to_words_kernel_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available() or kivi_flush.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("bits", [2, 4])
def test_values_to_words_kernel_cuda(bits):
    vp = torch.randint(0, 256, (1, 8, 8192, 128 * bits // 8), dtype=torch.uint8, device="cuda")
    assert torch.equal(kivi_flush.values_to_words_fast(vp, bits), kivi_flush.values_to_words(vp, bits))


def test_plugin_warmup_booked_as_warmup(smol_tokenizer, monkeypatch):
    """One-time work of the plugin's allocate (the value-layout kernel's compile on CUDA) is the turn's warmup_s,
    not decode time."""
    from scbench.methods import kivi_fast

    alloc = kivi_fast.KIVIDecode.allocate

    def slow_allocate(self, kv, cache):
        alloc(self, kv, cache)
        self.warmup_s += 0.3

    monkeypatch.setattr(kivi_fast.KIVIDecode, "allocate", slow_allocate)
    engine = make_tiny_engine(smol_tokenizer, layers=2)
    engine.decode_mode = "fast"
    s = engine.session(KIVI(bits=2, group=16, residual=16))
    s.feed(list(range(5, 120)), compress=True, sparse=False)
    g = s.generate(8)
    assert g.decode_path == "static" and g.warmup_s >= 0.3 and g.decode_s < 0.3
    s.feed([7, 8, 9], compress=False, sparse=False)
    assert s.generate(8).warmup_s < 0.3  # buffers reused: no allocate, nothing booked
