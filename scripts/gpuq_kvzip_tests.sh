#!/usr/bin/env bash
# GPU-queue job (h27z, issue 23, < 60 s): the CUDA tests of the ragged work-list kernel, KVzip's fused scores and
# split repeat attention, then full vs KVzip first prefill at 32K on a 2-layer Llama-3.1-8B-shaped random model.
export PYTHONUNBUFFERED=1
date
timeout 38 python3 -P -m pytest -q -p no:cacheprovider tests/methods/test_ragged_fast.py tests/methods/test_h2o_kernel.py \
  tests/gpu/test_kvzip_gpu.py -k "cuda or triton_ragged or kvzip or plugin or prefix or lower or chunk or ragged_later" \
  > /tmp/h27z_pytest.log 2>&1; echo "== pytest rc $?"; tail -4 /tmp/h27z_pytest.log
date
timeout 17 python3 -P scripts/profile_kvzip.py --device cuda --shape llama8b --layers 2 --tokens 32768 \
  --tokenizer "$TOK" --methods full,kvzip --warmup --decode 16 2>&1 | grep -v -i warn | tail -3
date
