#!/usr/bin/env bash
# GPU-queue job (h27z, issue 23, < 60 s): the CUDA tests of the ragged work-list kernel and KVzip's fused scores,
# then first prefill and decode per method through the engine at 131K on a 2-layer Llama-3.1-8B-shaped random
# model (scripts/profile_kvzip.py --warmup: compiles and short-shape plans before the timed feeds): full vs KVzip
# (fused scores + split repeat attention) vs DuoAttention (work-list decode).
export PYTHONUNBUFFERED=1
date
timeout 15 python3 -P -m pytest -q -p no:cacheprovider tests/methods/test_ragged_fast.py tests/methods/test_h2o_kernel.py \
  -k "cuda or triton_ragged or kvzip or plugin" 2>&1 | tail -3
date
timeout 41 python3 -P scripts/profile_kvzip.py --device cuda --shape llama8b --layers 2 --tokens 131072 \
  --tokenizer "$TOK" --methods full,kvzip,duo_attention --warmup --decode 64 2>&1 | grep -v -i warn | tail -6
date
