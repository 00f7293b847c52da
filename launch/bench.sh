#!/usr/bin/env bash
# Benchmarks in one line: `bash launch/bench.sh [extra sgjax.bench flags]`.
# On CPU a DiT-S/2 on 64 tokens routed 1->10 of its 12 blocks (the share of blocks the
# paper's SiT-XL/2 route covers, 2->24 of 28), in minutes. On a GPU use
# launch/bench_gpu.sh (SiT-XL/2, bf16, 256 tokens, 40 sampling steps). Results:
# results/bench-<date>.*
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m sgjax.bench --suite=all --model=DiT-S/2 --input_size=16 --route=1,10 \
  --batch=32 --sample_batch=32 --sample_steps=3 --repeats=4 --steps_per_repeat=1 \
  --settings=unguided,cfg,sg_flops,sg_0.5_0.8,sg_fid --forward_gammas=0.5,0.9 \
  --matmul_size=1024 "$@"
