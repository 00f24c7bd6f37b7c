#!/usr/bin/env bash
# Issue 24, item 4: a random-weight Llama-3.1-70B-shaped model split over two GPUs (model.device_map=balanced), at 32K
# in both modes, through the real CLI (scripts/bench_methods.py -> scbench run -m), with full attention and one method
# of each stage: A-shape (sparse prefill), SnapKV (eviction), KIVI (quantisation), Quest (loading).
# Needs a lent 2-GPU machine (kind nvidia-h200-x2); not run yet (no such machine was lent in the session that wrote it).
#   run(kind=nvidia-h200-x2, carry=[".gpuwhl"]):  bash scripts/multi_gpu/sharded_70b.sh
# .gpuwhl: the wheels the GPU box lacks (hydra-core, omegaconf, antlr4 4.9.3 sdist, gguf, joblib launcher) and
# smol_tok/ (the embedded model's tokenizer files): `bash scripts/gpu_wheels.sh` builds it.
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/sharded70b}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpuwhl/*.whl .gpuwhl/*.tar.gz
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site . 2>&1 \
  | grep -v -i -E "deprecat|license|\*\*\*|!!|^ *$" || true
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=index,name,memory.total --format=csv
python3 -c "import torch; assert torch.cuda.device_count() >= 2, 'needs two GPUs'"
python3 scripts/bench_methods.py --model random-llama-3.1-70b --tokenizer .gpuwhl/smol_tok --lengths 32000 \
  --modes multi_turn multi_request --methods full ashape snapkv kivi quest --max-new 64 --out "$OUT/sharded_70b"
