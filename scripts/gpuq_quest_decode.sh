#!/usr/bin/env bash
# GPU-queue job (run from a copy of the worktree on the GPU box, scbench installed on PYTHONPATH; < 100 s):
# Quest / RetrievalAttention-device decode microbenchmark old vs new, then the CUDA tests of the new kernels.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 18 python3 -P -m pytest -q -x -p no:cacheprovider tests/unit/test_topk_select.py \
  tests/methods/test_quest_fast.py -k "triton or fused or select or radix" 2>&1 | tail -15 || echo "tests rc=$?"
timeout 76 python3 -P scripts/bench_quest_decode.py --lengths 32768 131072 --sweep || echo "bench rc=$?"
