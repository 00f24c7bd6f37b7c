#!/bin/bash
# Round 9 (h29b): KIVI batched decode on the H200. 1) batched vs sequential KIVI decode at 32K, multi-request,
# random Llama-3.1-8B bf16, 5 requests x 64 tokens (scripts/bench_kivi_batch.py; 2-bit, then 4-bit);
# 2) the CUDA test (float32 tiny model: batched rows == sequential fast-path rows).
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 50 python3 -P scripts/bench_kivi_batch.py --length 32768 --turns 5 --max-new 64 --bits 2 4 --tok "$TOK"
echo "bench rc=$?"
timeout 33 python3 -m pytest -q -p no:cacheprovider -rfE tests/engines/test_kivi_batch.py -k cuda 2>&1 | tail -25
echo "test rc=$?"
