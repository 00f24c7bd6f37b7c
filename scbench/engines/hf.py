"""Hugging Face transformers engine: prefill once, extend per turn, greedy decode in our own loop.

Owning the loop (no ``generate``) is what lets the engine count, per turn, tokens computed vs reused,
time to first token, decode throughput and the bytes the KV cache really holds.
"""
from __future__ import annotations

import hashlib
import logging
import resource
import tempfile
import time
import weakref
from pathlib import Path

import torch

from scbench.engines import attention, fastdecode
from scbench.engines.base import Engine, FeedStats, GenResult, Session, cache_kw
from scbench.engines.models import resolve
from scbench.kv import cache as kvc
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


class HFEngine(Engine):
    """A causal LM from transformers, run with scbench's attention function and a DynamicCache."""

    name = "hf"

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
        from scbench.engines.recurrent import OWN_STATE  # the more precise refusal comes first

        model_type = getattr(cfg, "model_type", "")
        if model_type in OWN_STATE:
            raise ValueError(f"model type {model_type!r} {OWN_STATE[model_type]}: scbench cannot reuse or snapshot its state")
        sliding = sliding_window_layers(cfg)
        if sliding:
            raise ValueError(
                f"model {self.model_name!r} uses sliding-window attention (window {getattr(cfg, 'sliding_window', '?')}, "
                f"layers {sliding[:8]}{'...' if len(sliding) > 8 else ''}): scbench's attention function computes full "
                "causal attention, which differs from the model beyond the window; such models are not supported yet")
        self.stop_ids = self._stop_ids()
        self.num_layers = cfg.num_hidden_layers
        heads = getattr(cfg, "num_attention_heads", None) or 1  # attention-free models (Mamba) have none
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads

    def _stop_ids(self) -> set[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid is not None:
                ids.add(tid)
        if not ids:
            raise ValueError(f"model {self.model_name!r} has no EOS token: cannot stop generation")
        return ids

    @property
    def window(self) -> int:
        return self._window

    def render_chat(self, messages, add_generation_prompt):
        if not self.tokenizer.chat_template:
            raise ValueError(f"model {self.model_name!r} has no chat template; set one in the model config")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text, add_special_tokens):
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def session(self, method) -> "HFSession":
        from scbench.engines.recurrent import make_session  # models with a recurrent state get their own session

        return make_session(self, method)

    def describe(self) -> dict:
        template = self.tokenizer.chat_template or ""
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
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            **self.adapter_info,
        }

    def peak_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class HFSession(Session):
    """One example's cache. ``pos`` counts positions seen, which can exceed the cache length after eviction."""

    def __init__(self, engine: HFEngine, method):
        from transformers import DynamicCache

        self.engine = engine
        self.method = method
        self.cache = DynamicCache(config=engine.model.config)
        self.pos = 0
        self.last_logits: torch.Tensor | None = None
        self.hooks = method.hooks()
        self.tier: kvo.Tier | None = None
        """Where checkpoints wait when the engine offloads them (created at the first checkpoint)."""
        self._parked = 0
        self.decoder: fastdecode.FastDecoder | None = None

    @torch.inference_mode()
    def _forward(self, ids: list[int], ctx: attention.AttnContext | None = None) -> torch.Tensor:
        dev = self.engine.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        position_ids = torch.arange(self.pos, self.pos + len(ids), device=dev).unsqueeze(0)
        ctx = ctx or attention.AttnContext()
        if ctx.method is not None and "decode_attention" in self.hooks:  # loading methods pick their decode keys
            ctx.decode, ctx.cache = True, self.cache
        with attention.active(ctx):
            out = self.engine.model(
                input_ids=input_ids, position_ids=position_ids, **{cache_kw(self.engine.model): self.cache},
                use_cache=True, logits_to_keep=1,
            )
        self.pos += len(ids)
        return out.logits[0, -1]

    def feed(self, ids, *, compress, sparse):
        if not ids:
            raise ValueError("feed() needs at least one token")
        if sparse and self.pos == 0 and "blend_prefill" in self.hooks:  # chunk KV reuse (scbench/engines/blend.py)
            return self.method.blend_prefill(self, ids)
        compress = compress and "compress_cache" in self.hooks
        window = self.method.query_window if compress else 0
        ctx = attention.AttnContext(
            method=self.method, sparse=sparse and "prefill_attention" in self.hooks, capture_queries=window
        )
        reused = self.pos
        _sync(self.engine.device)
        t0 = time.perf_counter()
        self.last_logits = self._prefill(ids, ctx)
        compress_s = 0.0
        if compress:
            _sync(self.engine.device)
            t1 = time.perf_counter()
            self._compress(ctx)
            _sync(self.engine.device)
            compress_s = time.perf_counter() - t1
        _sync(self.engine.device)
        return FeedStats(tokens=len(ids), reused=reused, seconds=time.perf_counter() - t0, compress_s=compress_s,
                         attn_cells=ctx.cells_total, attn_computed=ctx.cells_computed)

    def _prefill(self, ids: list[int], ctx: attention.AttnContext) -> torch.Tensor:
        """Forward ``ids`` in chunks of ``engine.prefill_chunk`` tokens (all at once when unset); the last logits.
        Captured queries are gathered across chunks, so compression sees the same last ``capture_queries``."""
        chunk = self.engine.prefill_chunk
        if not chunk or len(ids) <= chunk:
            return self._forward(ids, ctx)
        parts: dict[int, list[torch.Tensor]] = {}
        for start in range(0, len(ids), chunk):
            ctx.queries = {}
            logits = self._forward(ids[start : start + chunk], ctx)
            for layer, q in ctx.queries.items():
                parts.setdefault(layer, []).append(q)
        if ctx.capture_queries:
            ctx.queries = {layer: torch.cat(qs, dim=-2)[..., -ctx.capture_queries :, :] for layer, qs in parts.items()}
        return logits

    @torch.inference_mode()
    def _compress(self, ctx: attention.AttnContext) -> None:
        self.method.begin_compression(num_layers=len(self.cache.layers), seen_tokens=self.pos)
        for idx, layer in enumerate(self.cache.layers):
            if not layer.is_initialized or getattr(layer, "scbench_compresses_itself", False):
                continue
            queries = ctx.queries.get(idx) if ctx.capture_queries else None
            out = self.method.compress_cache(idx, layer.keys, layer.values, queries)
            if not isinstance(out, tuple):  # a cache layer with its own representation (e.g. KIVI)
                kvc.install_layer(self.cache, idx, out)
                continue
            k, v = out
            if k.shape[:2] != layer.keys.shape[:2] or k.shape[-1] != layer.keys.shape[-1] or k.shape != v.shape:
                raise ValueError(
                    f"{type(self.method).__name__}.compress_cache returned keys {tuple(k.shape)} / values "
                    f"{tuple(v.shape)} for layer {idx} whose cache is {tuple(layer.keys.shape)}"
                )
            kvc.replace_layer(self.cache, idx, k, v)

    @torch.inference_mode()
    def generate(self, max_new_tokens):
        if self.last_logits is None:
            raise RuntimeError("generate() before any feed()")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stop = self.engine.stop_ids
        dev = self.engine.device
        t0 = time.perf_counter()
        tok = int(self.last_logits.argmax())
        first_s = time.perf_counter() - t0
        path = self._decode_path()
        t1 = time.perf_counter()
        if path == "plain":
            out = [tok]
            ctx = attention.AttnContext(method=self.method)
            while tok not in stop and len(out) < max_new_tokens:
                tok = int(self._forward([tok], ctx).argmax())
                out.append(tok)
        else:
            try:
                if self.decoder is None:
                    self.decoder = fastdecode.FastDecoder(self.engine.model, dev)
                out = self.decoder.generate(self.cache, self.pos, tok, max_new_tokens, stop)
            except Exception as e:  # noqa: BLE001 - the session's cache is untouched until the fast path succeeds
                log.warning("fast decode failed (%s: %s); model.decode=plain for this engine from now on",
                            type(e).__name__, e)
                self.engine.decode_mode, self.decoder = "plain", None
                return self.generate(max_new_tokens)
            self.pos += len(out) - 1
        _sync(dev)
        decode_s = time.perf_counter() - t1
        self.last_logits = None
        text = self.engine.decode([t for t in out if t not in stop])
        return GenResult(tokens=out, text=text, first_token_s=first_s, decode_s=decode_s, stopped=out[-1] in stop,
                         decode_path=path)

    def _decode_path(self) -> str:
        """``plain``, or the fast path's name when the engine's decode mode asks for it and the cache allows it."""
        mode = self.engine.decode_mode
        if mode == "plain" or (mode == "auto" and self.engine.device.type != "cuda"):
            return "plain"
        reason = fastdecode.unsupported(self.cache, self.method)
        if reason is not None:
            log.debug("plain decode: %s", reason)
            return "plain"
        return "graph" if self.engine.device.type == "cuda" else "static"

    def drop_last(self, n):
        if n > 0:
            kvc.drop_last(self.cache, n)
            self.pos -= n
            self.last_logits = None

    def checkpoint(self, *, rewrites):
        if self.engine.offload:  # the context KV waits in the slow tier; each rollback loads it back
            if self.tier is None:
                root = None
                if self.engine.offload == "disk":
                    Path(self.engine.offload_dir).mkdir(parents=True, exist_ok=True)
                    root = tempfile.mkdtemp(prefix="session-", dir=self.engine.offload_dir)
                self.tier = kvo.Tier(self.engine.offload, root)
                weakref.finalize(self, self.tier.close)
            self._parked += 1
            return (self.pos, None, kvo.Parked(self.tier, f"checkpoint{self._parked}", kvc.snapshot(self.cache)))
        snap = kvc.snapshot(self.cache) if rewrites or not kvc.crop_is_exact(self.cache) else None
        return (self.pos, kvc.layer_lengths(self.cache), snap)

    def rollback(self, token):
        pos, lengths, snap = token
        if isinstance(snap, kvo.Parked):
            kvc.restore(self.cache, snap.load(self.engine.device))
        elif snap is not None:
            kvc.restore(self.cache, snap)
        else:
            kvc.crop_layers(self.cache, lengths)
        self.pos = pos
        self.last_logits = None

    def memory(self):
        e = self.engine
        lengths = kvc.layer_lengths(self.cache)
        tokens = max(lengths, default=0)
        return {
            "kv_bytes": kvc.kv_nbytes(self.cache),
            "kv_tokens": tokens,
            "kv_full_bytes": kvc.full_nbytes(e.num_layers, e.kv_heads, e.head_dim, self.pos, e.dtype),
            **kvo.take_counters(self.cache, self.tier),  # slow tier, loads since the last call (one call per turn)
            "peak_mem_bytes": e.peak_memory(),
        }
