"""Record what ran: code version, packages, machine."""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("scbench", "torch", "transformers", "datasets", "hydra-core", "gguf", "pandas", "numpy")


def git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> dict:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def collect(engine_info: dict, method_info: dict, task) -> dict:
    return {
        "git": git_state(),
        "packages": versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "engine": engine_info,
        "method": method_info,
        "task": {"name": task.name, "version": task.version, "category": task.category, "variant": task.variant},
    }


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
