#!/usr/bin/env bash
# GPU-queue job (run from a copy of the worktree on the GPU box, scbench on PYTHONPATH; < 60 s): Quest's decode
# attention per 32-layer step and per stage at 32K and 128K, select / paged-kernel variants, page-list identity,
# per-turn bounds load (scripts/bench_quest_step.py). Optional: CUDA tests of the Quest kernels (GPUQ_TESTS=1).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 52 python3 -P scripts/bench_quest_step.py --lengths 32000 131000 --budget-s 42 || echo "bench rc=$?"
if [ "${GPUQ_TESTS:-0}" = 1 ]; then
  timeout 25 python3 -P -m pytest -q -x -p no:cacheprovider tests/methods/test_quest_fast.py tests/unit/test_topk_select.py \
    -k "quest or paged" 2>&1 | tail -6
fi
