#!/usr/bin/env bash
# GPU-queue job for issue 19 (< 60 s, run from a copy of the worktree on the GPU box): the shared-prefix kernel and
# batched step microbenchmark (scripts/bench_shared_prefix.py), then the CUDA tests of the kernel and of batched vs
# sequential decode, whatever finishes in time.
export PYTHONUNBUFFERED=1
date
timeout 38 python3 -P scripts/bench_shared_prefix.py --lengths 131072 32768 --batches 1 2 4 8 --layers 8 --steps 20 \
  --budget 33; echo "== bench rc $?"
timeout 18 python3 -P -m pytest -q -x -p no:cacheprovider tests/engines/test_shared_prefix_kernel.py \
  tests/engines/test_batched_decode.py -k "cuda" 2>&1 | tail -4; echo "== pytest rc $?"
date
