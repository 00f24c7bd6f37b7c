#!/usr/bin/env bash
# GPU-queue job for issue 19 (< 80 s, run from a copy of the worktree on the GPU box, cwd = the code): the CUDA tests
# of batched decode (the dense and ragged shared-prefix kernels; batched vs sequential replay with the CUDA graph and
# Triton, ragged caches included), then the ragged shared-prefix microbenchmark (scripts/bench_ragged_shared.py).
export PYTHONUNBUFFERED=1
date
timeout ${KERNEL_S:-24} python3 -m pytest -q -p no:cacheprovider --durations=5 tests/engines/test_ragged_shared_kernel.py \
  tests/engines/test_shared_prefix_kernel.py -k "cuda" 2>&1 | tail -12
echo "== kernel tests rc ${PIPESTATUS[0]}"
timeout ${REPLAY_S:-30} python3 -m pytest -q -p no:cacheprovider --durations=5 tests/engines/test_batched_decode.py \
  -k "cuda" 2>&1 | tail -12
echo "== replay tests rc ${PIPESTATUS[0]}"
timeout ${BENCH_S:-20} python3 scripts/bench_ragged_shared.py --lengths ${LENGTHS:-131072} --budget $(( ${BENCH_S:-20} - 7 ))
echo "== bench rc $?"
date
