#!/usr/bin/env bash
# Builds .gpuwhl/ (git-ignored), what scripts/gpu_tests.sh and scripts/bench_methods_gpu.sh carry to the lent GPU box,
# which has torch, transformers and triton but no package index: the pure-Python wheels scbench needs that the box
# lacks (the versions .venv holds), and smol_tok/, the embedded model's tokenizer (random-weight models use it).
#   bash scripts/gpu_wheels.sh          (after `make run` or `make test` built .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
out=.gpuwhl
mkdir -p $out
pins=$($py - <<'PY'
from importlib.metadata import version
names = ["hydra-core", "omegaconf", "antlr4-python3-runtime", "gguf", "hydra-joblib-launcher"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PY
)
$py -m pip download -q --no-deps -d $out $pins
$py - <<'PY'
import shutil
from pathlib import Path

from transformers import AutoTokenizer
from scbench.engines.models import resolve
folder = resolve("embedded:smollm2")
AutoTokenizer.from_pretrained(folder).save_pretrained(".gpuwhl/smol_tok")
# the converted model's config too: scripts/gpu_tests.sh lays the folder out as the converted model's (config.json and
# an empty model.safetensors), so the tests that only need the tokenizer find it without the GGUF
shutil.copy(Path(folder) / "config.json", ".gpuwhl/smol_tok/config.json")
PY
ls $out $out/smol_tok
