#!/usr/bin/env bash
# GPU-queue job (/work/wt/GPUQ.md): where KIVI's end-to-end decode step goes against full attention's at 131K on the
# 8B shape (scripts/profile_kivi_step.py: turn parts, graph step time, kernels of a replayed step).
# Usage (on the GPU box, from a copy of the worktree): bash scripts/gpuq_kivi_e2e.sh [extra args]
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
timeout ${KIVI_E2E_S:-76} python3 -P scripts/profile_kivi_step.py --lengths ${KIVI_LEN:-131000 32000} --tokenizer "$TOK" \
  --budget ${KIVI_BUDGET:-58} "$@" 2>&1 | grep -v -i warn
