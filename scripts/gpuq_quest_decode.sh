#!/usr/bin/env bash
# GPU-queue job (run from a copy of the worktree on the GPU box, scbench installed on PYTHONPATH; < 100 s):
# the CUDA tests of the new kernels, then the Quest / RetrievalAttention-device decode microbenchmark
# (old vs new at 32K and 128K, then per-stage timings and variant sweeps).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 28 python3 -u -P -m pytest -q -x -p no:cacheprovider tests/unit/test_topk_select.py \
  -k "plugin or then or fused or grouped or quest_select_matches" > /tmp/h25q_tests.log 2>&1; echo "tests rc=$?"
tail -8 /tmp/h25q_tests.log
timeout 66 python3 -P scripts/bench_quest_decode.py --lengths 32768 131072 --sweep || echo "bench rc=$?"
