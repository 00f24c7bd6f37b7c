#!/usr/bin/env bash
# GPU queue check (h25w): `make bench-methods` end to end on CUDA at 8K -- 3 methods x both modes, the sequential
# sweep then the grouped + batched one, merge + tables; must finish within 100 s. Run from the worktree copy.
set -u
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
mkdir -p /tmp/h25w
timeout 92 python3 -P scripts/bench_methods.py --lengths 8000 --methods full kvzip duo_attention --tokenizer "$TOK" \
  --max-new 16 --deadline 86 --out /tmp/h25w/m8k
echo "rc $? after $(( $(date +%s) - t0 )) s"
python3 - <<'PY'
import json
d = json.load(open("/tmp/h25w/m8k.json"))
for s in d["sweeps"]:
    s.pop("predictions", None)
    tail = s.pop("log_tail", "")
    print(json.dumps(s))
    if s.get("rc"):
        print(tail[-2500:])
print(json.dumps(d.get("summary"), indent=1))
for r in d["rows"]:
    print(r["way"], r["mode"], r["method"][:40], r.get("status"), r.get("prefill_s"), r.get("warmup_s"),
          r.get("decode_tok_s"), r.get("decode_path"), r.get("prefill_shared"), r.get("error", ""))
PY
