#!/usr/bin/env bash
# GPU-queue job (/work/wt/GPUQ.md) for the KIVI kernel: the kernel microbenchmark (v2 = the kernel before, v3 variants;
# 32 layers, 128K and 32K; variants compiled first in parallel processes; one decode step's KIVI work with the flush
# separate / fused / in one kernel), then the CUDA tests of the KIVI fast path that fit the remaining time.
# Usage: bash scripts/gpuq_kivi.sh [variants...]; KIVI_TESTS overrides the test list.
export PYTHONUNBUFFERED=1
set -f  # test ids hold brackets: no globbing
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
variants=("$@")
if [ ${#variants[@]} -eq 0 ]; then
  variants=("v2" "v3" "v3 asm2" "v3 c396" "v3 c792" "v3 r96 c660" "v3 w8 r64 c528" "v3 w8 r80 c396" "v3 s2"
            "v3 r168 c396" "v3 pf1 r0 c264" "v3 pf2" "v3 pf2 r168 c396")
fi
timeout ${KIVI_BENCH_S:-33} python3 -P scripts/bench_kivi_kernel.py --lengths 131072 32768 --jobs 16 \
  --variants "${variants[@]}" --step "${KIVI_STEP:-v3}"
t=tests/methods/test_kivi_fast.py
tests=${KIVI_TESTS:-"$t::test_decode_step_triton_matches_torch[2-2-True-dtype1] \
  $t::test_decode_step_triton_matches_torch[0-2-True-dtype1] $t::test_cuda_graph_plugins_equal_plain[cfg0] \
  $t::test_kivi_attention_triton_matches_torch[default-4-4096-1024-64-0-40-dtype1] \
  $t::test_kivi_attention_triton_matches_torch[default-2-8192-8000-320-33-96-dtype2] \
  $t::test_decode_step_triton_matches_torch[1-2-True-dtype1] $t::test_decode_step_triton_matches_torch[2-2-False-dtype1]"}
timeout ${KIVI_TEST_S:-23} python3 -P -m pytest -v -p no:cacheprovider $tests 2>&1 \
  | grep -E "PASS|FAIL|Error|error|passed|failed|assert" | tail -14
