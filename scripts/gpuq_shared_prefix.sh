#!/usr/bin/env bash
# GPU-queue job for issue 19 (< 60 s, run from a copy of the worktree on the GPU box). Batch 1 ran the kernel + step
# microbenchmark (results/perf/shared_prefix_batch1.*), batch 2 the knob sweep at B=8 (shared_prefix_sweep_batch2.*);
# this one: the CUDA tests of the kernel and of batched vs sequential decode (as scripts/gpu_tests.sh runs them).
export PYTHONUNBUFFERED=1
date
timeout 52 python3 -P -m pytest -q -p no:cacheprovider --durations=8 tests/engines/test_shared_prefix_kernel.py \
  tests/engines/test_batched_decode.py -k "cuda" 2>&1 | tail -16; echo "== pytest rc ${PIPESTATUS[0]}"
date
