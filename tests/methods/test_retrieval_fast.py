"""RetrievalAttention's device-tier captured-step decode (methods/retrieval_fast.py) against the plain loop on a
tiny random Llama (float32, CPU): greedy tokens, loaded bytes and the cache left behind."""
import pytest
import torch

from scbench.methods.retrieval_attention import RetrievalAttention

from support import make_tiny_engine, two_turn_decode


@pytest.mark.parametrize("gqa,top_k,n_init,n_local", [("head", 64, 8, 32), ("group", 48, 0, 16), ("head", 4096, 4, 8),
                                                      ("head", 16, 300, 50)])
def test_fast_retrieval_equals_plain(smol_tokenizer, gqa, top_k, n_init, n_local):
    engine = make_tiny_engine(smol_tokenizer, layers=2)
    g = torch.Generator().manual_seed(top_k + n_init)
    prompt = torch.randint(5, 2000, (290,), generator=g).tolist()
    follow = torch.randint(5, 2000, (17,), generator=g).tolist()
    cfg = dict(top_k=top_k, n_init=n_init, n_local=n_local, gqa=gqa, tier="device")
    plain, ppath, ps, pmem = two_turn_decode(engine, RetrievalAttention(**cfg), prompt, follow, "plain")
    fast, fpath, fs, fmem = two_turn_decode(engine, RetrievalAttention(**cfg), prompt, follow, "fast")
    assert ppath == ["plain"] * 2 and fpath == ["static"] * 2
    assert fast == plain
    assert fmem["loaded_bytes"] == pmem["loaded_bytes"] > 0
    for a, b in zip(fs.cache.layers, ps.cache.layers):
        assert a.n == b.n
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)


def test_host_tier_and_faiss_take_the_plain_loop():
    assert RetrievalAttention(tier="cpu").static_decoder() is None
    assert RetrievalAttention(tier="device", recall=True).static_decoder() is None
    assert RetrievalAttention(tier="device").static_decoder() is not None
