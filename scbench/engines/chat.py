"""The tokenizer and chat-template path every engine shares, so the hf and vLLM engines see identical tokens.

``TokenizerEngine`` holds a transformers tokenizer and renders, encodes and decodes through it once for all
engines; ``stop_ids`` is the stop set both engines end generation on; ``split_model_config`` takes the model-config
keys every engine understands and leaves the engine its own.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

from scbench.engines.base import Engine

CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
"""End-of-turn tokens of the common chat templates: generation also stops on them when the tokenizer has them."""

LONG_TEXT = 20_000
"""Texts of at least this many characters (a shared context's prompts) are encoded once per engine and kept
(``LONG_KEPT`` most recent): every run of a sweep builds the same prompts, and at 131K tokens each encoding takes
~0.23 s of host time on a 2-core CPU."""
LONG_KEPT = 8

COMMON_MODEL_KEYS = {"name": None, "device": None, "dtype": None, "window": None, "trust_remote_code": False,
                     "adapter": None}
"""Model-config keys (configs/model/*.yaml) every engine takes, with their defaults; ``path`` is required."""


def split_model_config(model: dict, engine: str) -> tuple[str, dict, dict]:
    """(path, the keys every engine takes, the remaining keys for the engine to claim) of a model config."""
    rest = dict(model)
    if not rest.get("path"):
        raise ValueError(f"engine {engine}: the model config needs a 'path' (a local folder, hub id or "
                         f"embedded:NAME), got keys {', '.join(sorted(model)) or 'none'}")
    path = rest.pop("path")
    common = {k: rest.pop(k, default) for k, default in COMMON_MODEL_KEYS.items()}
    return path, common, rest


def refuse_unknown_keys(rest: dict, engine: str) -> None:
    """Raise for model-config keys the engine did not claim."""
    if rest:
        raise ValueError(f"unknown model config key(s) for engine {engine}: {', '.join(sorted(rest))}")


def stop_ids(tokenizer, generation_eos, model_name: str) -> set[int]:
    """EOS of the tokenizer and of the generation config, plus the chat end tokens the tokenizer knows."""
    ids = set()
    for source in (tokenizer.eos_token_id, generation_eos):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    for tok in CHAT_END_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    if not ids:
        raise ValueError(f"model {model_name!r} has no EOS token: cannot stop generation")
    return ids


class TokenizerEngine(Engine):
    """An engine whose text goes through a transformers ``tokenizer`` and its chat template."""

    tokenizer: object
    model_name: str

    def render_chat(self, messages, add_generation_prompt):
        if not self.tokenizer.chat_template:
            raise ValueError(f"model {self.model_name!r} has no chat template; set one in the model config")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text, add_special_tokens):
        if len(text) < LONG_TEXT:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        memo = self.__dict__.setdefault("_encoded", OrderedDict())
        key = (id(self.tokenizer), add_special_tokens, text)
        ids = memo.get(key)
        if ids is None:
            ids = memo[key] = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
            while len(memo) > LONG_KEPT:
                memo.popitem(last=False)
        else:
            memo.move_to_end(key)
        return list(ids)  # a copy: callers may cut or extend it

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_template_sha256(self) -> str:
        """First 16 hex digits of the chat template's SHA-256 (stored with every run)."""
        return hashlib.sha256((self.tokenizer.chat_template or "").encode()).hexdigest()[:16]
