"""``model.path=random:<preset>``: built in memory on the target device (never saved), seeded, with a tokenizer folder."""
from __future__ import annotations

import pytest
import torch

from scbench.engines.models import materialize_random, parse_random


def test_random_engine_in_memory_matches_saved_preset(embedded_folder, tmp_path, monkeypatch):
    from scbench.run import get_engine

    monkeypatch.setenv("SCBENCH_CACHE", str(tmp_path))  # anything written would land here
    eng = get_engine({"name": "r", "path": "random:tiny-llama", "device": "cpu", "tokenizer": embedded_folder})
    assert not (tmp_path / "models").exists()  # nothing written
    monkeypatch.delenv("SCBENCH_CACHE")
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(materialize_random("tiny-llama"))
    for (name, a), (_, b) in zip(eng.model.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), name  # same seed on the same device type: the same weights
    ids = eng.encode("hello there", add_special_tokens=False)
    from scbench.methods.full import FullAttention

    s = eng.session(FullAttention())
    s.feed(ids, compress=False, sparse=False)
    assert len(s.generate(3).tokens) >= 1


def test_random_preset_keeps_its_vocabulary(smol_tokenizer):
    from scbench.engines.models import random_config

    cfg = random_config("llama-3.1-8b", smol_tokenizer)
    assert cfg.vocab_size == 128256 and cfg.num_hidden_layers == 32
    assert random_config("tiny-llama", smol_tokenizer).vocab_size == len(smol_tokenizer)


def test_random_path_errors(tmp_path):
    assert parse_random("random:tiny-llama@3") == ("tiny-llama", 3)
    with pytest.raises(ValueError, match="unknown random preset 'nope'"):
        parse_random("random:nope")
    with pytest.raises(ValueError, match="seed after '@'"):
        parse_random("random:tiny-llama@x")
    from scbench.engines.models import load_random

    with pytest.raises(FileNotFoundError, match="model.tokenizer"):
        load_random("random:tiny-llama", tokenizer=str(tmp_path / "missing"), device="cpu")
