#!/usr/bin/env bash
# GPU-queue job (run from a copy of the worktree on the GPU box, scbench on PYTHONPATH; < 60 s): Quest's decode
# attention per 32-layer step and per stage at 32K and 128K, select / paged / union kernel variants, page-list
# identity, per-turn bounds load (scripts/bench_quest_step.py); then the CUDA tests of the new Quest kernels
# (TESTS="-k ..." selects them; the full CUDA set: scripts/gpu_tests.sh).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout ${BENCH_S:-44} python3 -P scripts/bench_quest_step.py --lengths 32000 131000 --budget-s ${BUDGET_S:-36} \
  || echo "bench rc=$?"
timeout ${TESTS_S:-13} python3 -P -m pytest -q -x -p no:cacheprovider tests/methods/test_quest_fast.py \
  ${TESTS:--k "select_variants_and_union or paged_dot"} 2>&1 | tail -4
