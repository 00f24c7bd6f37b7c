#!/usr/bin/env bash
# GPU-queue job (/work/wt/GPUQ.md) for the KIVI kernel: the kernel microbenchmark (v2 = the kernel before, v3 variants;
# 32 layers, 32K and 128K; variants compiled first in parallel processes), then the CUDA tests of the KIVI fast path
# that fit the remaining time. Usage: bash scripts/gpuq_kivi.sh [variants...]
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
variants=("$@")
if [ ${#variants[@]} -eq 0 ]; then
  variants=("v2" "v3 asm1 tr0" "v3 asm2 tr0" "v3 asm3 tr0" "v3 asm3 tr0 r160 c392" "v3 asm3 tr0 r128 c528"
            "v3 asm3 tr0 pf0" "v3 asm3 tr0 pf0 r128 c528" "v3 asm3 tr0 pf0 r128 c1056" "v3 asm2 tr1"
            "v3 asm2 tr1 r168 c392" "v3 asm3 tr0 pf0 nb8" "v3 asm3 tr0 w8")
fi
timeout ${KIVI_BENCH_S:-46} python3 -P scripts/bench_kivi_kernel.py --lengths 131072 32768 --jobs 16 --variants "${variants[@]}" \
  --step "${KIVI_STEP:-asm3 tr0 pf0 r128 c528}"
t=tests/methods/test_kivi_fast.py
tests=${KIVI_TESTS:-"$t::test_cuda_graph_plugins_equal_plain[cfg0] $t::test_decode_step_triton_matches_torch[2-2-True-dtype1]"}
timeout ${KIVI_TEST_S:-12} python3 -P -m pytest -v -x -p no:cacheprovider $tests 2>&1 \
  | grep -E "PASS|FAIL|Error|error|passed|failed|assert" | tail -12
