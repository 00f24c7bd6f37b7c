"""The engine's attention function against a plain float64 reference, on random inputs."""
import pytest
import torch

from scbench.engines.attention import causal_attention, reference_causal_attention


@pytest.mark.parametrize("tq,tk", [(1, 9), (7, 7), (5, 17), (33, 64)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
def test_causal_attention_matches_reference(tq, tk, hq, hkv):
    g = torch.Generator().manual_seed(tq * 100 + tk)
    q = torch.randn(2, hq, tq, 16, generator=g)
    k = torch.randn(2, hkv, tk, 16, generator=g)
    v = torch.randn(2, hkv, tk, 16, generator=g)
    torch.testing.assert_close(causal_attention(q, k, v), reference_causal_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_reference_is_bottom_right_causal():
    q = torch.randn(1, 1, 2, 4)
    k = torch.randn(1, 1, 5, 4)
    v = torch.zeros(1, 1, 5, 4)
    v[..., 4, :] = 1.0  # only the last key carries value
    out = reference_causal_attention(q, k, v)
    assert out[0, 0, 0].abs().max() == 0  # query 0 sits at position 3: cannot see key 4
    assert out[0, 0, 1].abs().max() > 0


def test_cache_passed_under_the_forward_s_own_name(tiny_engine):
    """transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (the old name warns); the engine passes
    the cache under whichever name the installed release's forward declares (5.17: past_key_values)."""
    import inspect

    from scbench.engines.base import cache_kw
    from scbench.registry import METHODS

    want = "cache" if "cache" in inspect.signature(tiny_engine.model.forward).parameters else "past_key_values"
    assert cache_kw(tiny_engine.model) == want
    seen = []
    handle = tiny_engine.model.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    try:
        s = tiny_engine.session(METHODS.get("full")())
        s.feed(list(range(10, 30)), compress=False, sparse=False)
        s.generate(3)
    finally:
        handle.remove()
    assert seen and all(want in kw and ({"cache", "past_key_values"} - {want}).isdisjoint(kw) for kw in seen)
