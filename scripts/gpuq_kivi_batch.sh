#!/bin/bash
# Round 9 (h29b): KIVI batched decode on the H200. 1) batched vs sequential KIVI decode at 32K, multi-request,
# random Llama-3.1-8B bf16, 5 requests x 64 tokens (scripts/bench_kivi_batch.py; 2-bit, then 4-bit);
# 2) the CUDA test (float32 tiny model: batched rows == sequential fast-path rows).
# Batch A (02:01 UTC) ran it before the tokenizer lines: results/perf/kivi_batch_h200.json.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 50 python3 -P scripts/bench_kivi_batch.py --length 32768 --turns 5 --max-new 64 --bits 2 4 --tok "$TOK"
echo "bench rc=$?"
# the CUDA test uses the embedded tokenizer (as scripts/gpu_tests.sh sets it up: no GGUF on the box)
export SCBENCH_CACHE=/tmp/scbcache; tok=$SCBENCH_CACHE/models/smollm2-135m-instruct-f32
mkdir -p $tok && cp "$TOK"/* $tok/ && touch $tok/model.safetensors
timeout 33 python3 -m pytest -q -p no:cacheprovider -rfE tests/engines/test_kivi_batch.py -k cuda 2>&1 | tail -25
echo "test rc=$?"
