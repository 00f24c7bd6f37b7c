#!/bin/bash
# h25r: RetrievalAttention host tier (split decode) vs the loading path, 8B random model, 32K (+128K if time)
nproc; lscpu | grep -E "Model name|Socket|Core|Thread|L2|L3|NUMA node0|Flags" | cut -c1-200
free -g | head -2
python3 -P scripts/bench_ra_host.py --budget 92 2>&1
