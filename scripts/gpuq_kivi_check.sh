#!/usr/bin/env bash
# GPU-queue job (/work/wt/GPUQ.md), small: the CUDA tests of the KIVI plugin's load / store_back / value-layout kernel
# against the plain loop, then the 32K decode profile with the default flush mode (0) against mode 1 and full
# attention (scripts/profile_kivi_step.py). Usage: bash scripts/gpuq_kivi_check.sh
export PYTHONUNBUFFERED=1
set -f
t=tests/methods/test_kivi_fast.py
timeout ${KIVI_TEST_S:-28} python3 -P -m pytest -q -p no:cacheprovider tests/methods/test_kivi_load.py \
  "$t::test_cuda_graph_plugins_equal_plain[cfg0]" 2>&1 | tail -4
timeout ${KIVI_E2E_S:-46} python3 -P scripts/profile_kivi_step.py --lengths 32000 --tokenizer "$TOK" \
  --methods kivi kivi-f1 full --budget 36 2>&1 | grep -v -i warn | grep -v "^JSON"
