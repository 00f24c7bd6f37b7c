"""Hugging Face transformers engine: prefill once, extend per turn, greedy decode in our own loop.

Owning the loop (no ``generate``) is what lets the engine count, per turn, tokens computed vs reused,
time to first token, decode throughput and the bytes the KV cache really holds. The sessions live in
scbench/engines/hf_session.py (and recurrent.py for models with a recurrent state).
"""
from __future__ import annotations

import logging
import resource

import torch

from scbench.engines import attention
from scbench.engines.chat import TokenizerEngine, refuse_unknown_keys, split_model_config, stop_ids
from scbench.engines.models import resolve
from scbench.engines.recurrent import RecurrentSession, check_state_in_cache, is_recurrent
from scbench.engines.hf_session import HFSession
from scbench.kv import offload as kvo

log = logging.getLogger(__name__)


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"model.dtype must be auto, float32, bfloat16 or float16, got {dtype!r}") from None


DECODE_MODES = ("auto", "fast", "plain")
"""model.decode: ``fast`` = pre-allocated cache (+ CUDA graph on a GPU) where the method allows it, ``plain`` = the
reference loop, ``auto`` = fast on CUDA, plain on CPU (no launch overhead to remove there)."""


def sliding_window_layers(cfg) -> list[int]:
    """Indices of the layers a transformers config runs with sliding-window attention (Mistral v0.1, Gemma-2/3,
    Qwen2 with ``use_sliding_window``); empty for full attention everywhere."""
    types = getattr(cfg, "layer_types", None)
    if types:
        return [i for i, t in enumerate(types) if t == "sliding_attention"]
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) is not False:
        return list(range(getattr(cfg, "num_hidden_layers", 0) or 0))
    return []


class HFEngine(TokenizerEngine):
    """A causal LM from transformers, run with scbench's attention function and a DynamicCache."""

    name = "hf"
    MODEL_KEYS = ("prefill_chunk", "decode", "offload", "offload_dir")
    """Model-config keys of this engine beyond the common ones (scbench/engines/chat.py)."""

    @classmethod
    def from_config(cls, model: dict, options: dict | None = None) -> "HFEngine":
        if options:
            raise ValueError(f"engine hf takes no engine options, got {', '.join(sorted(options))}")
        path, common, rest = split_model_config(model, cls.name)
        own = {k: rest.pop(k) for k in cls.MODEL_KEYS if k in rest}
        refuse_unknown_keys(rest, cls.name)
        return cls(path, **common, **own)

    def __init__(self, path: str, *, name: str | None = None, device: str | None = None, dtype: str | None = None,
                 window: int | None = None, trust_remote_code: bool = False, model=None, tokenizer=None,
                 adapter: str | None = None, prefill_chunk: int | None = None, decode: str = "auto",
                 offload: str | None = None, offload_dir: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"model.prefill_chunk must be null or an integer >= 1, got {prefill_chunk!r}")
        if decode not in DECODE_MODES:
            raise ValueError(f"model.decode must be one of {DECODE_MODES}, got {decode!r}")
        if offload not in (None, "none", *kvo.TIERS):
            raise ValueError(f"model.offload must be none, {' or '.join(kvo.TIERS)}, got {offload!r}")
        self.offload = None if offload in (None, "none") else offload
        """Multi-request: keep the checkpointed context KV in this tier between requests and load it back."""
        self.offload_dir = offload_dir or "results/offload"
        """Folder of the ``disk`` tier's safetensors files (one sub-folder per session, removed with it)."""
        self.prefill_chunk = prefill_chunk
        """Prefill at most this many tokens per forward (None: the whole feed at once)."""
        self.decode_mode = decode
        attention.register()
        self.model_name = name or path
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        if model is None:
            folder = resolve(path)
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32 if adapter else self.dtype, trust_remote_code=trust_remote_code,
                attn_implementation=attention.NAME,
            )
        else:
            model.set_attn_implementation(attention.NAME)
        self.adapter_info: dict = {}
        if adapter:  # LoRA delta merged in float32, then cast once to the run's dtype
            from scbench.engines.models import merge_adapter

            self.adapter_info = merge_adapter(model, adapter)
            model = model.to(self.dtype)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        cfg = self.model.config
        self._window = int(window or getattr(cfg, "max_position_embeddings", 0) or 0)
        if self._window <= 0:
            raise ValueError(f"model {self.model_name!r}: set model.window, the config gives no max_position_embeddings")
        check_state_in_cache(cfg)  # the more precise refusal comes first
        sliding = sliding_window_layers(cfg)
        if sliding:
            raise ValueError(
                f"model {self.model_name!r} uses sliding-window attention (window {getattr(cfg, 'sliding_window', '?')}, "
                f"layers {sliding[:8]}{'...' if len(sliding) > 8 else ''}): scbench's attention function computes full "
                "causal attention, which differs from the model beyond the window; such models are not supported yet")
        self.session_class = RecurrentSession if is_recurrent(self.model) else HFSession
        """The session class for this model, chosen once: a recurrent state needs its own snapshots."""
        self.stop_ids = stop_ids(tokenizer, getattr(self.model.generation_config, "eos_token_id", None), self.model_name)
        self.num_layers = cfg.num_hidden_layers
        heads = getattr(cfg, "num_attention_heads", None) or 1  # attention-free models (Mamba) have none
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads

    @property
    def window(self) -> int:
        return self._window

    def session(self, method) -> HFSession:
        return self.session_class(self, method)

    def describe(self) -> dict:
        return {
            "engine": self.name,
            "model": self.model_name,
            "model_class": type(self.model).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "window": self.window,
            "decode": self.decode_mode,
            "prefill_chunk": self.prefill_chunk,
            "offload": self.offload or "none",
            "chat_template_sha256": self.chat_template_sha256(),
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            **self.adapter_info,
        }

    def peak_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
