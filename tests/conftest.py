"""Shared fixtures: the embedded tokenizer/model (converted once per machine) and a tiny random Llama."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def embedded_folder():
    from scbench.engines.models import resolve

    return resolve("embedded:smollm2")


@pytest.fixture(scope="session")
def smol_tokenizer(embedded_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_folder)


def make_tiny_engine(tokenizer, seed: int = 0, layers: int = 2):
    """HFEngine over a random-weight Llama (hidden 64, 4 query / 2 KV heads) with the embedded tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from scbench.engines.hf import HFEngine

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    return HFEngine("tiny-random-llama", name="tiny-random-llama", model=model, tokenizer=tokenizer, device="cpu")


@pytest.fixture(scope="session")
def tiny_engine(smol_tokenizer):
    return make_tiny_engine(smol_tokenizer)


@pytest.fixture(scope="session")
def embedded_engine():
    from scbench.evaluate import get_engine

    return get_engine({"name": "smollm2-135m", "path": "embedded:smollm2", "device": "cpu"})
