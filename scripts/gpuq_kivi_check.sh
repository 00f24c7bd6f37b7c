#!/usr/bin/env bash
# GPU-queue job (/work/wt/GPUQ.md), small: the CUDA tests of the KIVI plugin's load / store_back / value-layout kernel
# against the plain loop, then key groups per block of the attention kernel (nb) at 131K / 32K
# (scripts/bench_kivi_kernel.py). Usage: bash scripts/gpuq_kivi_check.sh
export PYTHONUNBUFFERED=1
set -f
t=tests/methods/test_kivi_fast.py
timeout ${KIVI_TEST_S:-30} python3 -P -m pytest -q -p no:cacheprovider tests/methods/test_kivi_load.py \
  "$t::test_cuda_graph_plugins_equal_plain[cfg0]" "$t::test_decode_step_triton_matches_torch[2-2-True-dtype1]" 2>&1 | tail -4
timeout ${KIVI_BENCH_S:-30} python3 -P scripts/bench_kivi_kernel.py --lengths 131072 32768 --jobs 4 \
  --variants "v3" "v3 nb8" "v3 nb2" 2>&1 | grep -v -i warn
