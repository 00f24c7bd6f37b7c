#!/usr/bin/env bash
# GPU-queue job for issue 19, batch 3 (< 80 s): batched vs sequential replay on CUDA for one dense and three ragged
# configs, stopping at the first failure with its traceback (batch 2 ran out of time before pytest printed any:
# warmup_s, a timing column, was compared), then the ragged kernel's knob sweep (scripts/bench_ragged_shared.py).
export PYTHONUNBUFFERED=1
date
timeout 42 python3 -m pytest -q -x --tb=short -p no:cacheprovider tests/engines/test_batched_decode.py \
  -k "cuda and (full-multi_request or adakv-multi_request or duo_attention-multi_turn or kvzip_pair-multi_turn)" \
  2>&1 | tail -45
echo "== replay tests rc ${PIPESTATUS[0]}"
timeout 22 python3 scripts/bench_ragged_shared.py --lengths 131072 --batches 2 8 --skip-kernels --skip-steps --sweep \
  --sweep-budget 14
echo "== sweep rc $?"
date
