#!/usr/bin/env bash
# GPU-queue job (run from a copy of the worktree on the GPU box, scbench installed on PYTHONPATH; < 100 s):
# the CUDA tests of the new kernels' pipelines, then the Quest / RetrievalAttention-device decode microbenchmark
# (old vs new at 32K and 128K, then per-stage timings and kernel-size sweeps).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 15 python3 -P -m pytest -q -x -p no:cacheprovider tests/unit/test_topk_select.py \
  -k "plugin or then or fused or grouped" 2>&1 | tail -8 || echo "tests rc=$?"
timeout 75 python3 -P scripts/bench_quest_decode.py --lengths 32768 131072 --sweep || echo "bench rc=$?"
