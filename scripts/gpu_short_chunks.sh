#!/usr/bin/env bash
# The GPU checks of sessions 25-28's CPU-only changes, for the next GPU session (what 28 changed first):
#   run(carry=[".gpuwhl"], timeout_s=600):  SCBENCH_COMMIT=<git rev-parse --short HEAD, here> TESTS_S=180 \
#                                           PARTS="1 2 6 7" bash scripts/gpu_short_chunks.sh
#   run(carry=[".gpuwhl"], timeout_s=600):  SCBENCH_COMMIT=<...> PARTS=5 BLEND_S=400 bash scripts/gpu_short_chunks.sh
# (all parts exceed one 600 s call; PARTS picks them, default all; the copy's .git there may be the last landed
# commit, not this tree's, hence SCBENCH_COMMIT). Ran: parts 1, 2, 4 on 92234a9; 1, 3, 5 on 1091f4e (5 partial:
# CacheBlend's 131K first turn outlasted BLEND_S=150); 6, 7, 5 on 22aa9c7 (an H100: CacheBlend at 131K out of
# memory, fixed in b9157db; results/perf/{chunk_kv,prefix_rows}_h100.json, cacheblend_h100_22aa9c7.md); 1, 5, 8 on
# 67808f7 at 131K and 5, 8 at 32K (an H200: CacheBlend fits at 131K, the MLP row blocks cut full attention's peak
# 45.2 -> 37.9 GiB; results/perf/cacheblend_h200_67808f7_{32k,131k}.md, mlp_rows_h200.md).
# Next: PARTS="1 10" (the CUDA tests incl. H2O's in-forward scores; H2O's, Quest's, RetrievalAttention's 131K
# peaks), part 5 at 131K on an H100 (80 GB; the H200 run peaked at 38 GiB), and
# `python3 -P scripts/probe_blend_memory.py --device cuda --tokens 131072 --layers 8` (the blend's peak alone).
# 1. the CUDA tests of the changed paths (short sparse chunks, CacheBlend's row blocks, the warm-up, each run's own
#    peak memory, one copy of a conversation's cache);
# 2. scripts/probe_query_chunk.py: a 50 / 100-row sparse chunk over 131K keys, per-head vs fast form, per layer, and
#    dense attention of those rows as split-KV flash vs one call (a later turn's prompt over its context);
# 3. the 131K query-hidden pair of results/perf/query_hidden_131k_h200.md again (full, Tri-shape, vertical-slash,
#    both modes, 2 examples): the multi-turn first turn should now cost what multi-request's does, and every later
#    prefill (0.075-0.092 s at bbcf731 for full attention) less with the split; SCBENCH_SPLIT_KV_ROWS=0 for the before;
#    at INFO, so the logs give each turn's decode-buffer allocation and copy seconds (the first decode turn's deficit);
#    the peak GiB column is now each run's own and full attention's should drop by ~16 GB (the cache held once);
# 4. scripts/probe_decode_memory.py: a conversation's peak memory with the decode buffers as its cache's storage and
#    as a copy (SCBENCH_DECODE_ADOPT=0), both modes, 131K, 8 layers of Llama-3.1-8B's shape;
# 5. CacheBlend through `scbench run` at 32K and 131K, both modes (never benched on the GPU; before its row blocks
#    the recompute's attention held [Hq, rows, n] float32 scores: ~20 GB at 32K, ~330 GB at 131K).
# 6. scripts/probe_chunk_kv.py: CacheBlend's chunk KV at 32K and 131K (8B shape, 32 layers), one forward per chunk
#    against the chunks batched (SCBENCH_BLEND_BATCH_TOKENS).
# 7. scripts/probe_prefix_rows.py: CacheBlend's recomputed rows over 32K / 131K keys, one layer: the masked row
#    blocks against the split (SCBENCH_PREFIX_ROWS=auto, the default: the split from 80K keys).
# 8. the before of scbench/engines/mlp_rows.py (a long prefill's MLP in row blocks, the CUDA default): full attention
#    through `scbench run` with SCBENCH_MLP_ROWS=0 at BLEND_LENGTHS, multi-request; part 5's full rows are the after
#    (first prefill s and peak GiB).
# 9. every default method of scripts/bench_methods.py at 131K, multi-request, sequential: the methods table's 131K
#    column again, each run's own peak with the MLP row blocks (METHODS_S: the sweep's deadline).
# 10. H2O's scores summed in the forward (Method.scores_in_forward) and Quest's / RetrievalAttention's layers adopting
#    the decode buffers (adopt_layers): full attention, H2O, Quest, RetrievalAttention's device tier at 131K,
#    multi-request; part 9's rows on b6b0f5e are the before (peaks on an H100: 70.3 / 51.3 / 49.5 GiB, full 37.8).
# Everything writes under $OUT (default /tmp/out).
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
PARTS=" ${PARTS:-1 2 3 4 5 6 7} "
part() { [[ "$PARTS" == *" $1 "* ]]; }
mkdir -p "$OUT"
if part 1; then
  GPU_TESTS="tests/gpu/test_sparse_gpu.py tests/engines/test_warmup_lengths.py tests/unit/test_split_kv_prefill.py tests/methods/test_cacheblend.py tests/unit/test_prefix_rows.py tests/unit/test_mlp_rows.py tests/methods/test_h2o_in_forward.py tests/gpu/test_group_memory_gpu.py tests/gpu/test_decode_memory_gpu.py" \
    timeout ${TESTS_S:-120} bash scripts/gpu_tests.sh -k "short_chunk or warmup or trishape or cuda" | tail -8
fi
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target $site .gpuwhl/*.whl \
  .gpuwhl/*.tar.gz
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target $site . >/dev/null 2>&1
export PYTHONPATH=$site SCBENCH_CACHE=/tmp/scbcache SCBENCH_COMMIT=${SCBENCH_COMMIT:-$(git rev-parse --short HEAD)}
part 2 && timeout ${PROBE_S:-60} python3 -P scripts/probe_query_chunk.py --out "$OUT/query_chunk_h200.json" | tail -12
bench() {  # bench_methods.py with the random 8B model and the embedded tokenizer
  python3 -P scripts/bench_methods.py --model random-llama-3.1-8b --tokenizer .gpuwhl/smol_tok --turns 5 "$@" 2>&1 \
    | grep -E "^\| [0-9]+ |rc [0-9]"
}
if part 3; then
  SCBENCH_LOG_LEVEL=INFO bench --lengths 131000 --modes multi_turn multi_request --ways sequential \
    --methods full trishape vertical_slash --examples 2 --extra policy.query_visible=false policy.truncation=context \
    --out "$OUT/query_hidden.json" --logs "$OUT/logs_query_hidden" --deadline ${PAIR_S:-240}
  grep -h "decode buffers" "$OUT"/logs_query_hidden/* 2>/dev/null | head -20  # allocation / copy seconds per turn
fi
if part 4; then
  timeout ${MEM_S:-150} python3 -P scripts/probe_decode_memory.py --device cuda --tokens 131072 --layers 8 \
    --out "$OUT/decode_memory_h200.json" 2>&1 | grep -E "^\|"
fi
if part 6; then  # CacheBlend's chunk KV, one forward per chunk against the chunks batched (blend.chunk_kv)
  timeout ${CHUNK_S:-150} python3 -P scripts/probe_chunk_kv.py --device cuda --model llama8b --tokens 32768 131072 \
    --out "$OUT/chunk_kv_h200.json" 2>&1 | grep -E "^\|"
fi
if part 7; then  # CacheBlend's recomputed rows: masked row blocks against the split (dense.prefix_rows)
  timeout ${ROWS_S:-120} python3 -P scripts/probe_prefix_rows.py --tokens 32768 131072 \
    --out "$OUT/prefix_rows_h200.json" 2>&1 | grep -E "^\|"
fi
if part 5; then
  bench --lengths ${BLEND_LENGTHS:-32000 131000} --modes multi_turn multi_request --ways sequential \
    --methods ${BLEND_METHODS:-full cacheblend} \
    --out "$OUT/cacheblend.json" --logs "$OUT/logs" --deadline ${BLEND_S:-200}
fi
if part 8; then
  SCBENCH_MLP_ROWS=0 bench --lengths ${BLEND_LENGTHS:-32000 131000} --modes multi_request --ways sequential \
    --methods full --out "$OUT/mlp_rows_off.json" --logs "$OUT/logs_mlp_off" --deadline ${MLP_S:-120}
fi
if part 9; then
  bench --lengths 131000 --modes multi_request --ways sequential --out "$OUT/methods_131k.json" \
    --logs "$OUT/logs_methods" --deadline ${METHODS_S:-400}
fi
if part 10; then
  bench --lengths 131000 --modes multi_request --ways sequential --methods full h2o quest retrieval_attention-device \
    --out "$OUT/peaks_131k.json" --logs "$OUT/logs_peaks" --deadline ${PEAKS_S:-200}
fi
exit 0
