#!/usr/bin/env bash
# One GPU call that checks the merged code: every CUDA test (scripts/gpu_tests.sh), RetrievalAttention's device step
# at 131K with the radix and sampled selects, and Quest's shipped step (+ its rank-threshold select) at 32K / 131K.
#   run(carry=[".gpuwhl"]): bash scripts/gpu_verify.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s); stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }
stamp gpu tests
timeout -k 5 ${TESTS_S:-260} bash scripts/gpu_tests.sh -rfE --durations=12 "$@"; stamp "gpu tests rc $?"
export PYTHONPATH=${SCBENCH_TEST_SITE:-/tmp/scbench-tests-site}  # where gpu_tests.sh installed scbench
timeout -k 5 75 python3 -P scripts/bench_ra_device.py --lengths 131072 --variants step_work sample sample_fuse sample_c16k \
  --budget 60 2>&1 | grep -v "^{" ; stamp "ra device rc $?"
timeout -k 5 75 python3 -P scripts/bench_quest_step.py --plan final --lengths 131000 32000 --budget-s 60 2>&1 | grep -v "^JSON"; stamp "quest rc $?"
timeout -k 5 60 python3 -P scripts/bench_kivi_dequant.py 2>&1; stamp "kivi dequant rc $?"
timeout -k 5 40 python3 -P scripts/bench_ragged_feed.py 2>&1; stamp "ragged feed rc $?"
