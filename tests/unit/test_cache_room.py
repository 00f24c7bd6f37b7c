"""Capacity buffers as a cache's storage (scbench/kv/cache.py ``with_room``, ``room_of``, ``append_in_place``,
``SessionCache``, ``crop_layers``): a plain layer holding the first rows of a marked buffer appends in place and is
cropped to a view; anything else keeps transformers' copy semantics."""
from __future__ import annotations

import gc

import torch
from transformers.cache_utils import DynamicLayer

from scbench.engines.base import cache_kw
from scbench.kv import cache as kvc

from support import random_llama


def layer_of(keys, values):
    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


@torch.inference_mode()  # as the fast decoder makes them: a view then keeps the storage, not the buffer object
def buffers(b=1, h=2, cap=32, d=8, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    kb, vb = (kvc.with_room(torch.randn(b, h, cap, d, generator=g)) for _ in range(2))
    return kb, vb, layer_of(kb[:, :, :n], vb[:, :, :n])


def test_room_of_only_the_first_rows_of_a_marked_buffer_with_room():
    kb, _, layer = buffers()
    assert kvc.room_of(layer.keys) is kb and kvc.room_of(layer.keys, 22) is kb
    assert kvc.room_of(layer.keys, 23) is None  # 10 + 23 > 32 rows
    assert kvc.room_of(kb[:, :, 1:5]) is None  # not the first rows
    assert kvc.room_of(kb[:, :1, :5]) is None  # not every head
    assert kvc.room_of(torch.randn(1, 2, 32, 8)[:, :, :10]) is None  # not marked
    assert kvc.room_of(kb[:, :, :10].contiguous()) is None  # a copy


def test_the_mark_ends_with_the_buffer():
    kb, vb, layer = buffers()
    del kb, vb
    gc.collect()
    assert kvc.room_of(layer.keys) is None  # the view keeps the storage, not the mark
    assert not kvc.append_in_place(layer, torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))


def test_append_in_place_equals_the_concatenation_and_writes_no_new_storage():
    kb, vb, layer = buffers()
    want_k, want_v = layer.keys.clone(), layer.values.clone()
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    assert kvc.append_in_place(layer, k, v)
    assert layer.keys.data_ptr() == kb.data_ptr() and layer.values.data_ptr() == vb.data_ptr()
    assert torch.equal(layer.keys, torch.cat([want_k, k], dim=2))
    assert torch.equal(layer.values, torch.cat([want_v, v], dim=2))
    assert not kvc.append_in_place(layer, torch.randn(1, 2, 18, 8), torch.randn(1, 2, 18, 8))  # 15 + 18 > 32
    assert layer.keys.shape[2] == 15  # nothing changed
    assert not kvc.append_in_place(layer, k.double(), v.double())  # another dtype


def test_crop_keeps_views_of_a_marked_buffer_and_copies_anything_else():
    kb, _, roomy = buffers()
    plain = layer_of(torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8))
    cache = type("C", (), {"layers": [roomy, plain]})()
    before = [layer.keys.clone() for layer in cache.layers]
    kvc.crop_layers(cache, [6, 6])
    assert roomy.keys.data_ptr() == kb.data_ptr() and torch.equal(roomy.keys, before[0][:, :, :6])
    assert plain.keys.is_contiguous() and torch.equal(plain.keys, before[1][:, :, :6])
    assert kvc.room_of(roomy.keys, 26) is kb  # the cropped view appends at row 6 next


def test_session_cache_appends_in_place_through_a_model_and_equals_the_dynamic_cache():
    """A model's later forward over a SessionCache whose layers are views of marked buffers gives the logits and keys
    of the same forward over a DynamicCache, without new storage; layers without room concatenate as before."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    model = random_llama(64).eval()
    ids = torch.randint(0, 64, (1, 20))
    with torch.inference_mode():
        ref, ours = DynamicCache(config=model.config), kvc.SessionCache(config=model.config)
        for cache in (ref, ours):
            model(input_ids=ids[:, :12], **{cache_kw(model): cache}, use_cache=True)
        kbs, vbs = [], []  # the buffers' owner keeps them (the mark lives as long as they do)
        for layer in ours.layers:  # what the fast decoder leaves: views of buffers with room
            n = layer.keys.shape[2]
            for name in ("keys", "values"):
                x = getattr(layer, name)
                buf = kvc.with_room(torch.zeros(*x.shape[:2], 64, x.shape[3]))
                buf[:, :, :n] = x
                setattr(layer, name, buf[:, :, :n])
                (kbs if name == "keys" else vbs).append(buf)
        pos = torch.arange(12, 20).unsqueeze(0)
        a = model(input_ids=ids[:, 12:], position_ids=pos, **{cache_kw(model): ref}, use_cache=True).logits
        b = model(input_ids=ids[:, 12:], position_ids=pos, **{cache_kw(model): ours}, use_cache=True).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for x, y, kb, vb in zip(ours.layers, ref.layers, kbs, vbs):
        assert x.keys.data_ptr() == kb.data_ptr() and x.values.data_ptr() == vb.data_ptr() and x.keys.shape[2] == 20
        torch.testing.assert_close(x.keys, y.keys, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(x.values, y.values, atol=1e-6, rtol=1e-6)
