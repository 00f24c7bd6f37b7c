"""KVzip's scoring at long contexts: blocked reconstruction scores equal the unblocked ones and never materialise
a weight block over the configured bound; the dense path's masked fallback in query blocks equals plain SDPA;
ragged later-turn attention goes through the dense kernel (cuDNN off on CUDA)."""
import pytest
import torch
from torch.nn.attention.bias import CausalBias
from torch.utils._python_dispatch import TorchDispatchMode

from scbench.kernels import dense
from scbench.kv import ragged
from scbench.methods import reconstruction as rec
from scbench.registry import METHODS
from support import byte_tokenizer, make_tiny_engine


class LargestOutput(TorchDispatchMode):
    """Records the bytes of the largest tensor any op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("max_bytes", [1, 4096, 45_000, 60_000, 1 << 40])
@pytest.mark.parametrize("sink,start,end", [(4, 10, 90), (0, 0, 120), (8, 3, 40)])
def test_layer_scores_blocked_match_unblocked_and_reference(max_bytes, sink, start, end):
    g = torch.Generator().manual_seed(start + end)
    q, k = torch.randn(3, 2, 23, 16, generator=g), torch.randn(3, 120 + 23, 16, generator=g)
    unblocked = rec.layer_scores(q, k, sink, start, end, max_bytes=1 << 40)
    got = rec.layer_scores(q, k, sink, start, end, max_bytes=max_bytes)
    assert torch.allclose(got, unblocked, rtol=1e-6, atol=1e-7)
    for h in range(3):
        assert torch.allclose(got[h], rec.reference_chunk_scores(q[h], k[h], sink, start, end), atol=1e-6)


def test_scoring_stays_within_the_bound_at_a_long_context(monkeypatch):
    engine = make_tiny_engine(byte_tokenizer())
    ids = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    session = engine.session(METHODS.get("kvzip")(budget=64, chunk=512))
    session.feed(ids, compress=False, sparse=False)
    bound = 256 * 1024
    seen = {}
    original = rec.layer_scores

    def tracked(*args, **kwargs):
        with LargestOutput() as mode:
            out = original(*args, **kwargs)
        key = kwargs.get("max_bytes", args[-1] if len(args) > 5 else None)
        seen[key] = max(seen.get(key, 0), mode.largest)
        return out

    monkeypatch.setattr(rec, "layer_scores", tracked)
    blocked, n = rec.reconstruction_scores(session, ids, 512, 4, max_bytes=bound)
    whole, n2 = rec.reconstruction_scores(session, ids, 512, 4, max_bytes=1 << 40)
    assert n == n2 > 3000 and session.pos == 3000  # the repeat tokens were dropped again
    assert seen[bound] <= bound < seen[1 << 40]  # unblocked, one weight block is ~9 MB here: the bound bites
    for layer in whole:
        for a, b in zip(blocked[layer], whole[layer]):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tq,tk,max_bytes", [(50, 300, 4 * 4 * 300 * 7), (1, 40, 1), (64, 64 + 3, 1 << 30)])
def test_masked_blocks_match_reference(tq, tk, max_bytes):
    g = torch.Generator().manual_seed(tq)
    q = torch.randn(1, 4, tq, 16, generator=g)
    k, v = torch.randn(1, 2, tk, 16, generator=g), torch.randn(1, 2, tk, 16, generator=g)
    got = dense.masked_blocks(q, k, v, None, True, max_bytes)
    assert torch.allclose(got, dense.reference_causal_attention(q, k, v), atol=1e-5)
    assert torch.allclose(got, dense.causal_attention(q, k, v), atol=1e-5)


def test_ragged_heads_use_the_dense_kernel(monkeypatch):
    """A later turn's prefill over a ragged cache: each head through ``causal_attention`` (not plain SDPA)."""
    calls = []

    def spy(q, k, v, scale):
        calls.append(k.shape[-2])
        return dense.causal_attention(q, k, v, scale)

    monkeypatch.setattr(ragged, "causal_attention", spy)
    g = torch.Generator().manual_seed(0)
    layer = ragged.RaggedLayer([torch.randn(n, 16, generator=g) for n in (7, 30)],
                               [torch.randn(n, 16, generator=g) for n in (7, 30)])
    layer.update(torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g))
    q = torch.randn(1, 4, 5, 16, generator=g)
    assert torch.allclose(ragged.ragged_attention(q, layer), ragged.reference_ragged_attention(q, layer), atol=1e-5)
    assert calls == [12, 35]


def test_kvzip_later_turns_score_only_new_tokens_or_nothing():
    """policy once: a later turn re-scores nothing; every_turn: it reconstructs only the tokens fed in that turn."""
    from scbench.records import Example, RunSpec, Turn
    from scbench.registry import TASKS
    from scbench.runner import Replay

    words = " ".join(f"key{i}=val{i * 7 % 97}" for i in range(24))
    example = Example(id="tiny", context=words, turns=tuple(Turn(input=f'Key: "key{i}"\nThe value is: ', answer="v")
                                                            for i in (3, 17)))
    engine = make_tiny_engine(byte_tokenizer())
    for compress in ("once", "every_turn"):
        spec = RunSpec(model={}, method={"name": "kvzip", "budget": 64}, task="scbench_kv", mode="multi_turn",
                       max_turns=2, max_new_tokens=6, compress=compress)
        first, later = Replay(engine, METHODS.get("kvzip")(budget=64), TASKS.get("scbench_kv"), example, spec)
        repeat = rec.repeat_prompts(engine, [0], 2048)[0][2]  # the first chunk's repeat prompt around one token
        assert first.stats.method_costs["score_prefill_tokens"] == first.stats.prefill_computed + len(repeat) - 1
        fed = later.stats.prefill_computed
        assert later.stats.method_costs["score_prefill_tokens"] == (0 if compress == "once" else fed + len(repeat) - 1)


def test_lower_right_path_and_its_fallbacks_on_cpu_tensors(monkeypatch):
    """``_lower_right_cuda`` (the CUDA branch) run on CPU bfloat16 tensors: torch's lower-right CausalBias, then
    repeated keys where GQA is refused, then the masked blocks; each equal to the reference."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 50, 64, generator=g).bfloat16()
    k, v = torch.randn(1, 2, 300, 64, generator=g).bfloat16(), torch.randn(1, 2, 300, 64, generator=g).bfloat16()
    ref = dense.reference_causal_attention(q, k, v).float()
    sdpa = dense.F.scaled_dot_product_attention
    for refuse, expect in (("nothing", [True]), ("gqa", [True, False, "mask"]), ("bias", [True, False, "mask"])):
        calls = []

        def picky(*args, refuse=refuse, **kwargs):
            bias = isinstance(kwargs.get("attn_mask"), CausalBias)
            calls.append(kwargs.get("enable_gqa") if bias else "mask")
            if bias and (refuse == "bias" or refuse == "gqa" and kwargs.get("enable_gqa")):
                raise RuntimeError("no kernel")
            return sdpa(*args, **kwargs)

        monkeypatch.setattr(dense.F, "scaled_dot_product_attention", picky)
        assert (dense._lower_right_cuda(q, k, v, None, True).float() - ref).abs().max() < 1e-2
        assert calls[: len(expect)] == expect


def test_prefix_split_merge_on_cpu_tensors(monkeypatch):
    """KVzip's repeat forwards: the context part and the chunk's causal square, merged by log-sum-exp, equal
    lower-right causal attention (CPU: a float64 stand-in for cuDNN; tests/gpu/test_kvzip_gpu.py runs cuDNN)."""
    def fake_cudnn(q, k, v, causal, scale):
        kk, vv = (x.double().repeat_interleave(q.shape[1] // k.shape[1], 1) for x in (k, v))
        s = q.double() @ kk.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        return (s.softmax(-1) @ vv).to(q.dtype), s.logsumexp(-1).float()

    monkeypatch.setattr(dense, "_cudnn_lse", fake_cudnn)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 9, 16, generator=g)
    k, v = torch.randn(1, 2, 30, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g)
    got = dense.prefix_split_cudnn(q, k, v, None)
    torch.testing.assert_close(got, dense.reference_causal_attention(q, k, v), atol=1e-5, rtol=1e-5)

    def refuse(*a):
        raise RuntimeError("no cuDNN kernel")

    monkeypatch.setattr(dense, "_cudnn_lse", refuse)
    assert dense.prefix_split_cudnn(q, k, v, None) is None


def test_split_prefix_only_over_dense_caches(monkeypatch):
    """The repeat forwards take the split attention (dense.split_prefix) over a dense cache, never over ragged heads
    (cuDNN would plan once per head length)."""
    seen = []
    original = dense.causal_attention

    def spy(q, k, v, scale=None):
        if q.shape[-2] > 1 and q.shape[-2] != k.shape[-2]:
            seen.append(dense.SPLIT_PREFIX.get())
        return original(q, k, v, scale)

    monkeypatch.setattr(dense, "causal_attention", spy)
    monkeypatch.setattr(ragged, "causal_attention", spy)
    monkeypatch.setattr("scbench.engines.attention.causal_attention", spy)
    monkeypatch.setattr(rec, "SPLIT_MIN_KEYS", 100)
    engine = make_tiny_engine(byte_tokenizer())
    ids = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    session = engine.session(METHODS.get("kvzip")(budget=64, chunk=128))
    session.feed(ids, compress=False, sparse=False)
    rec.reconstruction_scores(session, ids, 128, 4)
    assert seen and all(seen)
    session.feed(ids[:50], compress=True, sparse=False)  # ragged from here
    seen.clear()
    rec.reconstruction_scores(session, ids[:30], 128, 4)
    assert seen and not any(seen)


def test_split_prefix_not_over_short_contexts(monkeypatch):
    seen = []
    monkeypatch.setattr(dense, "split_prefix", lambda: seen.append(1) or __import__("contextlib").nullcontext())
    engine = make_tiny_engine(byte_tokenizer())
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    session = engine.session(METHODS.get("kvzip")(budget=64, chunk=128))
    session.feed(ids, compress=False, sparse=False)
    monkeypatch.setattr(rec, "SPLIT_MIN_KEYS", 301)
    rec.reconstruction_scores(session, ids, 128, 4)
    assert not seen
    monkeypatch.setattr(rec, "SPLIT_MIN_KEYS", 300)
    rec.reconstruction_scores(session, ids, 128, 4)
    assert len(seen) == 3  # one per chunk
