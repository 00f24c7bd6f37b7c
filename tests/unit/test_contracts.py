"""Explicit contracts: cache layers with their own representation implement CacheLayer; a method names its budget."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers.cache_utils import DynamicCache, DynamicLayer

from scbench.kv import cache as kvc
from scbench.kv.offload import TieredLayer
from scbench.kv.quant import KIVILayer
from scbench.report.export import method_budget

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "method"


def layers():
    k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    return [KIVILayer(k, v, bits=2, group=8, residual=8), TieredLayer(k, v, storage="device")]


def test_custom_layers_implement_the_protocol():
    for layer in layers():
        assert isinstance(layer, kvc.CacheLayer) and kvc.compresses_itself(layer)
    plain = DynamicLayer()
    assert not isinstance(plain, kvc.CacheLayer) and not kvc.compresses_itself(plain)

    class Partial(DynamicLayer):  # a layer that forgot part of the contract is a plain layer
        def scbench_nbytes(self):
            return 0

    assert not isinstance(Partial(), kvc.CacheLayer)


def test_cache_helpers_go_through_the_protocol():
    """kv_nbytes / crop / snapshot / restore on a cache mixing a plain layer and protocol layers."""
    cache = DynamicCache()
    k = torch.randn(1, 2, 40, 8)
    cache.update(k, k.clone(), 0)
    kivi, tiered = layers()
    cache.layers += [kivi, tiered]
    assert kvc.kv_nbytes(cache) == 2 * k.numel() * 4 + kivi.scbench_nbytes() + tiered.scbench_nbytes()
    assert not kvc.crop_is_exact(cache)  # KIVI's quantized groups
    snap = kvc.snapshot(cache)
    kvc.crop_layers(cache, [30, 30, 30])
    assert kvc.layer_lengths(cache) == [30, 30, 30]
    kvc.restore(cache, snap)
    assert kvc.layer_lengths(cache) == [40, 40, 40]


def old_method_budget(method: dict) -> str:
    """The knob-name rule export.method_budget used before methods named their budget (the reference)."""
    p = {k: v for k, v in method.items() if k != "name"}
    if "budget" in p:
        b = p["budget"]
        if isinstance(b, float) and 0 < b < 1:
            return f"1/{round(1 / b)}" if abs(1 / b - round(1 / b)) < 1e-6 else f"{b:g}"
        return str(b)
    if "bits" in p:  # KIVI; decode_cache=temp (the reference's decode, newer than the rule) is told apart
        return f"{p['bits']}bit" + ("-temp" if p.get("decode_cache") == "temp" else "")
    if "top_k" in p:
        return f"top{p['top_k']}"
    if "n_init" in p and "n_local" in p:
        return f"{p['n_init']}+{p['n_local']}"
    if "vertical_size" in p:
        return f"{p['vertical_size']}v+{p.get('slash_size')}s"
    return "full" if not p else ",".join(f"{k}={v}" for k, v in sorted(p.items()))


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_budget_label_matches_the_old_rule_on_every_config(config):
    method = yaml.safe_load((CONFIGS / config).read_text())
    assert method_budget(method) == old_method_budget(method)


def test_unknown_method_gets_the_base_rule():
    assert method_budget({"name": "retired", "top_k": 8}) == "top_k=8"
    assert method_budget({"name": "retired"}) == "full"
