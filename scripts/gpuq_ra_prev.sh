#!/bin/bash
# GPU queue job (round 9, h29r): RetrievalAttention device tier, the previous-step-threshold select
# (scbench/kernels/prev_select.py) against the radix select: 32-layer attention step at 131K and 32K (CUDA graphs,
# random Llama-3.1-8B-shaped K/V), max |diff| against radix, the selected sets compared, the stages alone, and the
# captured step with fresh queries every step (whole-row fallbacks counted). Then the CUDA test of the plugin.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
start=$(date +%s)
timeout 78 python3 -P scripts/bench_ra_device.py --lengths 131072 32768 --budget 62 \
  --variants prev prev_fused step_work prev_one prev_atomic prev_c2k prev_fused_w8 prev_fused_t4 prev_m8 prev_fallback prev_fallback_split16 \
  --later prev prev_fused step_work prev_one \
  --sets --stages stage_scores_matmul stage_radix_select stage_prev_select stage_prev_fused_scores_select stage_paged_attn \
  --drift prev prev_m8 --extra prev_split16 prev_c1k_w4_atomic prev_c2k_atomic prev_c8k prev_fused_bn256
echo "bench rc=$? after $(( $(date +%s) - start )) s"
left=$(( 86 - ($(date +%s) - start) ))
if [ "$left" -gt 8 ]; then
  timeout "$left" python3 -m pytest -q -x tests/unit/test_prev_select.py -k plugin -p no:cacheprovider
  echo "pytest rc=$?"
fi
