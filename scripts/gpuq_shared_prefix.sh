#!/usr/bin/env bash
# GPU-queue job for issue 19 (< 60 s, run from a copy of the worktree on the GPU box). Batch 1 ran the kernel + step
# microbenchmark (results/perf/shared_prefix_batch1.*); this one: the CUDA tests of the kernel and of batched vs
# sequential decode, then the kernel's knobs at B=8 (scripts/bench_shared_prefix.py --sweep), whatever fits.
export PYTHONUNBUFFERED=1
date
timeout 27 python3 -P -m pytest -q -p no:cacheprovider tests/engines/test_shared_prefix_kernel.py \
  tests/engines/test_batched_decode.py -k "cuda" 2>&1 | tail -6; echo "== pytest rc ${PIPESTATUS[0]}"
date
timeout 27 python3 -P scripts/bench_shared_prefix.py --lengths 32768 131072 --batches 8 --skip-kernels --skip-steps \
  --sweep --budget 23; echo "== sweep rc $?"
date
