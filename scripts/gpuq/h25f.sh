#!/bin/bash
# GPU queue job (issue 18, fused decode step): fused-vs-unfused step bench (+ split-KV variants), sweep, CUDA test.
# (batch 1 also ran: timeout 8 python3 -P tests/engines/fused_kernels_check.py -> ok)
date
timeout 62 python3 -P scripts/bench_decode_step.py --tokenizer "$TOK" --lengths 32000 131072 --budget 32 --steps 128 \
  --split-kv '{"launch": {}}' '{"max_splits": 128}' --out /tmp/bench_decode_step.json
echo "== bench rc $?"; cat /tmp/bench_decode_step.json; echo
timeout 12 python3 -P scripts/bench_split_kv.py --lengths 32768 --budget 10 --bn 64 --splits 256 512 1024 --warps 4 --stages 2 3 4
timeout 17 python3 -m pytest -q -x tests/engines/test_fast_decode.py -k cuda_graph -p no:cacheprovider > /tmp/pt.log 2>&1; echo "== pytest rc $?"; tail -5 /tmp/pt.log
date
