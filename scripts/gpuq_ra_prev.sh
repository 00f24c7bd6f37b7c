#!/bin/bash
# GPU queue job (round 9, h29r): RetrievalAttention device tier, the previous-step-threshold select
# (scbench/kernels/prev_select.py) against the radix select: 32-layer attention step at 131K and 32K (CUDA graphs,
# random Llama-3.1-8B-shaped K/V), max |diff| against radix, the selected sets compared, the stages alone, and the
# captured step with fresh queries every step (whole-row fallbacks counted).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
start=$(date +%s)
timeout 82 python3 -P scripts/bench_ra_device.py --lengths 131072 32768 --budget 66 \
  --variants prev prev_c2k prev_m8 prev_fallback prev_fallback_split16 prev_c2k_l4 prev_c1k_w4 prev_l4 prev_p512 prev_hist prev_c2k_m8 \
  --later prev prev_c2k step_work \
  --sets --stages stage_scores_matmul stage_radix_select stage_prev_select stage_prev_filter stage_paged_attn \
  --drift prev prev_m8 --extra prev_split16 prev_p2k_w8
echo "bench rc=$? after $(( $(date +%s) - start )) s"
