"""A model.window above the positions the model takes is refused, unless the config's RoPE scaling extends it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from scbench.engines.hf import HFEngine
from scbench.engines.models import position_limit
from support import random_llama


def engine(tokenizer, window, **rope):
    model = random_llama(len(tokenizer), layers=1, hidden=32, intermediate=64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **rope)
    return HFEngine("tiny", model=model, tokenizer=tokenizer, device="cpu", window=window)


def test_window_above_max_positions_is_refused(smol_tokenizer):
    assert engine(smol_tokenizer, 4096).window == 4096
    assert engine(smol_tokenizer, None).window == 4096
    with pytest.raises(ValueError, match=r"model.window=54875 is above the 4096 positions .*max_position_embeddings=4096"):
        engine(smol_tokenizer, 54875)


def test_rope_scaling_extends_the_limit(smol_tokenizer):
    linear = {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    assert engine(smol_tokenizer, 16384, **linear).window == 16384
    with pytest.raises(ValueError, match=r"above the 16384 positions .*RoPE linear scaling x4.0 of 4096"):
        engine(smol_tokenizer, 16385, **linear)


def test_limit_from_configs():
    llama31 = SimpleNamespace(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "rope_theta": 500000.0})
    assert position_limit(llama31)[0] == 131072
    yarn = SimpleNamespace(max_position_embeddings=32768, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6})
    assert position_limit(yarn)[0] == 131072
    per_layer = SimpleNamespace(max_position_embeddings=8192, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0}, "sliding_attention": {"rope_type": "default"}})
    assert position_limit(per_layer)[0] == 65536
    assert position_limit(SimpleNamespace(max_position_embeddings=2048, rope_parameters=None))[0] == 2048
    assert position_limit(SimpleNamespace())[0] == 0  # attention-free: no limit from the config
