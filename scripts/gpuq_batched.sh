#!/usr/bin/env bash
# GPU-queue job for issue 19 (< 80 s, run from a copy of the worktree on the GPU box, cwd = the code): the CUDA tests
# of batched decode (the shared-prefix kernel, the ragged shared-prefix kernel, batched vs sequential replay, CUDA
# graph + Triton), then the ragged shared-prefix microbenchmark when it exists (scripts/bench_ragged_shared.py).
export PYTHONUNBUFFERED=1
date
files="tests/engines/test_shared_prefix_kernel.py tests/engines/test_batched_decode.py"
[ -f tests/engines/test_ragged_shared_kernel.py ] && files="$files tests/engines/test_ragged_shared_kernel.py"
[ -f tests/methods/test_ragged_batched.py ] && files="$files tests/methods/test_ragged_batched.py"
timeout ${TEST_S:-45} python3 -m pytest -q -p no:cacheprovider --durations=8 $files -k "cuda" 2>&1 | tail -20
echo "== pytest rc ${PIPESTATUS[0]}"
if [ -f scripts/bench_ragged_shared.py ]; then
  timeout ${BENCH_S:-28} python3 scripts/bench_ragged_shared.py --budget $(( ${BENCH_S:-28} - 6 )); echo "== bench rc $?"
fi
date
