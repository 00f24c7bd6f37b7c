"""A method's own warm-up lengths (``Method.warmup_lengths``): fed by the engine's warm-up before the first timed turn;
Tri-shape's cover both compiles of its split-key dense rows (scbench/kernels/flex.split_rows)."""
import pytest
import torch

from scbench.engines.hf import warmup_chunk
from scbench.kernels import flex
from scbench.methods.trishape import TriShape
from scbench.registry import METHODS

from support import make_tiny_engine


def test_warmup_feeds_the_method_lengths(smol_tokenizer, monkeypatch):
    engine = make_tiny_engine(smol_tokenizer)
    snap = METHODS.get("snapkv")(budget=16)
    monkeypatch.setattr(type(snap), "warmup_lengths", (77,), raising=False)
    fed = []
    session = engine.session

    def spy(method):
        s = session(method)
        feed = s.feed
        s.feed = lambda ids, **kw: (fed.append(len(ids)), feed(ids, **kw))[1]
        return s

    monkeypatch.setattr(engine, "session", spy)
    assert engine.warmup(snap, lengths=(40,), force=True) > 0.0
    # each dummy prompt, its later turn, then a short sparse chunk of another length each time
    assert fed == [40, 16, warmup_chunk(0), 77, 16, warmup_chunk(1)] == [40, 16, 20, 77, 16, 32]


@pytest.mark.parametrize("n_last", [64, 100])
def test_trishape_warmup_lengths_split_the_dense_rows_twice(n_last):
    lengths = TriShape(n_last=n_last).warmup_lengths
    segments = [(n - n_last) // flex.SPLIT_SEGMENT for n in lengths]
    tails = [n - s * flex.SPLIT_SEGMENT for n, s in zip(lengths, segments)]
    assert all(n >= 2 * flex.SPLIT_SEGMENT for n in lengths)  # split_rows' threshold: the split path runs
    # two shapes in every dimension that varies with the prompt (static compile, then dynamic), no size-1 batch
    assert len(set(segments)) == len(set(tails)) == 2 and min(segments) >= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention compiles for the GPU)")
def test_split_rows_after_trishape_warmup_shapes_does_not_recompile(monkeypatch):
    """After Tri-shape's warm-up lengths, a 32K prompt's dense rows reuse the compiled kernels."""
    import torch._dynamo

    for n in TriShape().warmup_lengths:
        _rows(64, n, n)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    out = _rows(64, 32000, 1)  # a prompt length of the bench's 32K runs, not a multiple of the segment
    assert torch.isfinite(out).all()


def _rows(tq, tk, seed):
    """``flex.split_rows`` of ``tq`` random bf16 query rows (Llama-3.1-8B heads) over ``tk`` keys, on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, 32, tq, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 8, tk, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    return flex.split_rows(q, k, v, 128**-0.5)
