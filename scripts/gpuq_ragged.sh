#!/usr/bin/env bash
# GPU-queue job for the ragged fast decode (issue 23; < 100 s, run from a copy of the worktree on the GPU box):
# the Triton ragged kernel's tests on CUDA, then correctness + the attention microbenchmark (scripts/bench_ragged_decode.py).
export PYTHONUNBUFFERED=1
date
timeout 30 python3 -P -m pytest -q -x -p no:cacheprovider tests/methods/test_ragged_fast.py 2>&1 | tail -5; echo "== pytest rc $?"
timeout 60 python3 -P scripts/bench_ragged_decode.py --tokenizer "$TOK"; echo "== bench rc $?"
date
