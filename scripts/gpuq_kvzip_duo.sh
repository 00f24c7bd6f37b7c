#!/usr/bin/env bash
# GPU-queue job (h27z, issue 23, < 60 s, run from a copy of the worktree on the GPU box): the CUDA tests of the
# KVzip score passes, the repeat forwards' split attention and the ragged work-list kernel, then
# scripts/bench_kvzip_duo.py at 131K (scores, repeat-forward attention, 32-layer Duo-shaped decode step).
export PYTHONUNBUFFERED=1
date
timeout 22 python3 -P -m pytest -q -x -p no:cacheprovider tests/gpu/test_kvzip_gpu.py tests/methods/test_ragged_fast.py \
  tests/methods/test_h2o_kernel.py -k "not interpreter_run and not fast_ragged_equals_plain" 2>&1 | tail -4
echo "== pytest rc $?"
timeout 34 python3 -P scripts/bench_kvzip_duo.py --tokens 131072; echo "== bench rc $?"
date
