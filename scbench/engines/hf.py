"""Hugging Face transformers engine: prefill once, extend per turn, greedy decode in our own loop.

Owning the loop (no ``generate``) is what lets the engine count, per turn, tokens computed vs reused,
time to first token, decode throughput and the bytes the KV cache really holds. The sessions live in
scbench/engines/hf_session.py (and recurrent.py for models with a recurrent state).
"""
from __future__ import annotations

import logging
import resource
import time

import torch

from scbench.devices import peak_rss, start_peak
from scbench.engines import attention, sharding
from scbench.engines.chat import TokenizerEngine, refuse_unknown_keys, split_model_config, stop_ids
from scbench.engines.models import check_window, resolve
from scbench.engines.recurrent import RecurrentSession, check_state_in_cache, is_recurrent
from scbench.engines.hf_session import HFSession, _sync
from scbench.kv import offload as kvo

log = logging.getLogger(__name__)


def warmup_chunk(i: int) -> int:
    """Tokens of the short sparse chunk the warm-up feeds after its ``i``-th dummy prompt: another length each time,
    all fewer than Tri-shape's and vertical-slash's 64 query rows (``HFEngine.warmup``)."""
    return 20 + 12 * i


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
    MODEL_KEYS = ("prefill_chunk", "decode", "offload", "offload_dir", "device_map", "max_memory", "tokenizer")
    """Model-config keys of this engine beyond the common ones (scbench/engines/chat.py)."""

    @classmethod
    def from_config(cls, model: dict, options: dict | None = None) -> "HFEngine":
        if options:
            raise ValueError(f"engine hf takes no engine options, got {', '.join(sorted(options))}")
        path, common, rest = split_model_config(model, cls.name)
        own = {k: rest.pop(k) for k in cls.MODEL_KEYS if k in rest}
        refuse_unknown_keys(rest, cls.name)
        if "tokenizer" in own:  # model.tokenizer: a tokenizer folder for model.path=random:<preset>
            own["tokenizer_path"] = own.pop("tokenizer")
        return cls(path, **common, **own)

    def __init__(self, path: str, *, name: str | None = None, device: str | None = None, dtype: str | None = None,
                 window: int | None = None, trust_remote_code: bool = False, model=None, tokenizer=None,
                 adapter: str | None = None, prefill_chunk: int | None = None, decode: str = "auto",
                 offload: str | None = None, offload_dir: str | None = None, device_map=None, max_memory=None,
                 tokenizer_path: str | None = None):
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
        device_map = sharding.check_device_map(device_map)
        if device_map is not None and self.offload:
            raise ValueError("model.offload is not supported with model.device_map (a sharded model): the parked "
                             "context would come back on one device")
        if device_map is not None and adapter:
            raise ValueError("model.adapter is not supported with model.device_map: merge the adapter into the weights")
        attention.register()
        self.model_name = name or path
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        dispatched = False
        if model is None and path.startswith("random:"):  # in memory, never saved
            from scbench.engines.models import load_random, random_config, random_parts

            if device_map is None:
                model, tokenizer = load_random(path, tokenizer=tokenizer_path, device=self.device,
                                               dtype=torch.float32 if adapter else self.dtype)
            else:  # built layer by layer on the devices of the map, never whole on one device
                preset, seed, tokenizer = random_parts(path, tokenizer_path)
                config = random_config(preset, tokenizer)
                mapping = device_map if isinstance(device_map, dict) else sharding.plan(
                    config, self._budget(max_memory), dtype=self.dtype, strategy=device_map)
                model, dispatched = sharding.random_sharded(config, mapping, seed=seed, dtype=self.dtype), True
                model.set_attn_implementation(attention.NAME)
        elif tokenizer_path is not None:
            raise ValueError(f"model.tokenizer is only used with model.path=random:<preset>, got path {path!r}")
        if model is None:
            folder = resolve(path)
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
            placed = {}
            if device_map is not None:
                placed = {"device_map": self._plan(folder, device_map, max_memory, trust_remote_code)}
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32 if adapter else self.dtype, trust_remote_code=trust_remote_code,
                attn_implementation=attention.NAME, **placed,
            )
        elif not dispatched:
            model.set_attn_implementation(attention.NAME)
            if device_map is not None:
                mapping = device_map if isinstance(device_map, dict) else sharding.plan(
                    model.config, self._budget(max_memory), dtype=self.dtype, strategy=device_map)
                model = sharding.dispatch(model.to(self.dtype), mapping)
        self.adapter_info: dict = {}
        if adapter:  # LoRA delta merged in float32, then cast once to the run's dtype
            from scbench.engines.models import merge_adapter

            self.adapter_info = merge_adapter(model, adapter)
            model = model.to(self.dtype)
        if device_map is None:
            self.model = model.to(self.device).eval()
        else:  # accelerate's hooks keep each layer (and its KV cache) on its device; input ids go to the embedding's
            self.model = model.eval()
            self.device = sharding.input_device(model)
        self.devices = sharding.devices_of(self.model)
        """Every device holding weights (more than one: a sharded model, ``model.device_map``)."""
        self.warmed: set[str] = set()
        """Labels of the methods ``warmup`` already ran (once per engine and method)."""
        self.plain_methods: set[str] = set()
        """Labels of the methods whose fast decode path failed on this engine: they decode with the plain loop."""
        self.tokenizer = tokenizer
        cfg = self.model.config
        self._window = int(window or getattr(cfg, "max_position_embeddings", 0) or 0)
        if self._window <= 0:
            raise ValueError(f"model {self.model_name!r}: set model.window, the config gives no max_position_embeddings")
        check_window(self.model_name, self._window, cfg)
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
            **({"devices": [str(d) for d in self.devices],
                "layers_per_device": {str(d): n for d, n in sharding.count(sharding.layer_devices(self.model)).items()}}
               if len(self.devices) > 1 else {}),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "window": self.window,
            "decode": self.decode_mode,
            "prefill_chunk": self.prefill_chunk,
            "offload": self.offload or "none",
            "chat_template_sha256": self.chat_template_sha256(),
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            **self.adapter_info,
        }

    @torch.inference_mode()
    def warmup(self, method, lengths: tuple[int, ...] = (4608, 5376), force: bool = False) -> float:
        """Run ``method`` on dummy prompts before the first timed turn; returns the seconds (0 when already done).

        One-time work (Triton / torch.compile compilation, FlexAttention's first and dynamic-shape compiles, mask
        building, the decode step's warm-up) happens here instead of inside a turn's prefill or decode time. Each
        dummy prompt is fed as a first prefill (compression and sparse prefill on), decoded for a few tokens, then
        extended by a later turn, then by a short chunk with sparse prefill on, of another length after each prompt:
        the first turn's query fed after its context (``policy.query_visible=false``) or ``sparse_prefill=every``
        runs the method's hooks on a few rows over a long past, shapes the prompts never meet (vertical-slash's
        line-score kernels at a new row count, the chunked path's SDPA). That multi-turn first turn was still 1.2-1.4 s
        slower than multi-request's at 131K with this warm-up (H200, bbcf731, results/perf/query_hidden_131k_h200.md),
        in later examples too: not compilation but the chunked path's per-head GQA form, since replaced
        (``pattern.chunked_attention``'s ``fast``). Only on CUDA (CPU runs have no compilation worth separating)
        unless ``force``."""
        if self.device.type != "cuda" and not force:
            return 0.0
        if method.label() in self.warmed:
            return 0.0
        self.warmed.add(method.label())
        gen = torch.Generator().manual_seed(0)
        vocab = min(len(self.tokenizer), self.model.config.vocab_size)
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            for i, n in enumerate((*lengths, *getattr(method, "warmup_lengths", ()))):  # the method's shapes too
                ids = torch.randint(0, vocab, (max(8, min(n, self.window // 2)),), generator=gen).tolist()
                session = self.session(method)
                session.feed(ids, compress=True, sparse=True)
                out = session.generate(4)
                session.drop_last(len(out.tokens) - 1)
                session.feed(ids[:16], compress=False, sparse=False)
                out = session.generate(4)
                session.drop_last(len(out.tokens) - 1)
                try:  # a query-sized chunk through the sparse kernels, its rows unlike every earlier chunk's
                    session.feed(ids[: warmup_chunk(i)], compress=False, sparse=True)
                    session.generate(4)
                except Exception as e:  # noqa: BLE001 - the other prompts' warm-up still runs
                    log.warning("warm-up of %s: the short sparse chunk failed (%s: %s)", method.label(),
                                type(e).__name__, e)
                method.take_costs(session)  # the dummy prompts' method counters are not the first turn's
                del session
        except Exception as e:  # noqa: BLE001 - a warm-up is an optimisation: the timed run reports what it meets
            log.warning("warm-up of %s stopped early (%s: %s)", method.label(), type(e).__name__, e)
        _sync(self.device)
        return time.perf_counter() - t0

    def peak_memory(self) -> int:
        """Peak accelerator bytes summed over the model's devices (CUDA), else the process's peak RSS; both since
        ``reset_peak_memory`` (the run's start), else since the process started."""
        per_device = sharding.peak_memory_per_device(self.devices)
        if per_device:
            return sum(per_device.values())
        rss = peak_rss()
        return rss if rss is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def reset_peak_memory(self) -> None:
        """A run starts: its peak memory is counted from here, not from an earlier run's in this process
        (``devices.start_peak``)."""
        start_peak(self.devices)

    def _budget(self, max_memory) -> dict:
        budget = dict(max_memory) if max_memory else sharding.gpu_budget()
        if not budget:
            raise ValueError("model.device_map needs GPUs (none visible) or an explicit model.max_memory "
                             "{device: bytes}")
        return budget

    def _plan(self, folder, device_map, max_memory, trust_remote_code) -> dict:
        """The device map for ``folder``'s model: the explicit mapping, or accelerate's plan over the budget."""
        if isinstance(device_map, dict):
            return device_map
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        return sharding.plan(config, self._budget(max_memory), dtype=self.dtype, strategy=device_map)
