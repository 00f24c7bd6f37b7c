#!/usr/bin/env bash
# GPU-queue job for issue 19 (< 80 s, run from a copy of the worktree on the GPU box, cwd = the code): the CUDA tests
# of batched decode (the dense and ragged shared-prefix kernels; batched vs sequential replay with the CUDA graph and
# Triton, ragged caches included), then the ragged shared-prefix microbenchmark and batched step
# (scripts/bench_ragged_shared.py). Each part has its own time slot (env: KERNEL_S, REPLAY_S, BENCH_S).
export PYTHONUNBUFFERED=1
date
if [ "${REPLAY_S:-40}" -gt 0 ]; then
  timeout ${REPLAY_S:-40} python3 -m pytest -v -p no:cacheprovider --durations=5 tests/engines/test_batched_decode.py \
    -k "cuda" 2>&1 | grep -E "PASS|FAIL|ERROR|Error|assert|passed|failed|s call" | tail -30
  echo "== replay tests rc ${PIPESTATUS[0]}"
fi
if [ "${KERNEL_S:-30}" -gt 0 ]; then
  timeout ${KERNEL_S:-30} python3 -m pytest -v -p no:cacheprovider --durations=5 tests/engines/test_ragged_shared_kernel.py \
    tests/engines/test_shared_prefix_kernel.py -k "cuda" 2>&1 | grep -E "PASS|FAIL|ERROR|Error|assert|passed|failed|s call" | tail -25
  echo "== kernel tests rc ${PIPESTATUS[0]}"
fi
B=${BENCH_S:-0}  # batch 1 measured it (results/perf/ragged_shared_h200.md): off unless asked for
if [ "$B" -gt 0 ]; then
  timeout $B python3 scripts/bench_ragged_shared.py --lengths ${LENGTHS:-131072} --batches ${BATCHES:-1 2 4 8} \
    --budget $(( B / 3 )) --step-budget $(( B / 3 )) --layers 4 --steps 20 --step-cache ${STEP_CACHE:-duo}
  echo "== bench rc $?"
fi
date
