"""Shared fixtures: the embedded tokenizer/model (converted once per machine) and a tiny random Llama."""
from __future__ import annotations

import pytest

from support import make_tiny_engine


@pytest.fixture(scope="session")
def embedded_folder():
    from scbench.engines.models import resolve

    return resolve("embedded:smollm2")


@pytest.fixture(scope="session")
def smol_tokenizer(embedded_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_folder)


@pytest.fixture(scope="session")
def tiny_engine(smol_tokenizer):
    return make_tiny_engine(smol_tokenizer)


@pytest.fixture(scope="session")
def embedded_engine():
    from scbench.run import get_engine

    return get_engine({"name": "smollm2-135m", "path": "embedded:smollm2", "device": "cpu"})
