#!/usr/bin/env bash
# GPU-queue job for issue 23 (< 100 s, run from a copy of the worktree on the GPU box): the Triton ragged kernel's
# tests on CUDA, correctness + the attention microbenchmark (scripts/bench_ragged_decode.py), then a smoke run of the
# new methods' bench configs through the CLI at 32K (what scripts/bench_methods.py runs), whatever finishes in time.
export PYTHONUNBUFFERED=1
date
timeout 12 python3 -P -m pytest -q -x -p no:cacheprovider tests/methods/test_ragged_fast.py -k triton 2>&1 | tail -3
echo "== pytest rc $?"
timeout 33 python3 -P scripts/bench_ragged_decode.py --tokenizer "$TOK"; echo "== bench rc $?"
rm -f /tmp/h25s_smoke.sqlite
timeout 40 python3 -P -m scbench.cli run -m model=random-llama-3.1-8b "model.tokenizer=$TOK" \
  method=adakv,kvzip,duo_attention-llama8b task=scbench_kv mode=multi_turn data.length=32000 data.n=1 data.turns=2 \
  max_turns=2 max_new_tokens=32 store=/tmp/h25s_smoke.sqlite progress=false hydra.sweep.dir=/tmp/h25s_hydra 2>&1 | tail -15
echo "== smoke rc $?"
timeout 8 python3 -P - <<'PY'
from scbench.store import Store
s = Store("/tmp/h25s_smoke.sqlite")
for r in s.runs():
    print(r["method_label"], r["status"], (r["error"] or "").splitlines()[-1:] if r["error"] else "")
    for t in s.turns(r["run_id"]):
        print(f"  turn {t['turn']}: prefill {t['prefill_s']:.2f} s (compress {t['compress_s']:.2f}), decode "
              f"{t['decode_tok_s']:.1f} tok/s {t['decode_path']}, kv {t['kv_bytes'] / 2**20:.0f} MiB of "
              f"{t['kv_full_bytes'] / 2**20:.0f}, warmup {t['warmup_s']:.1f} s, {t['method_costs']}")
PY
date
