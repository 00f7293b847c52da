#!/usr/bin/env bash
# Benchmarks in one line: `bash launch/bench.sh [extra sgjax.bench flags]`.
# On CPU a small routed DiT (minutes); pass e.g. --model=SiT-XL/2 --dtype=bfloat16 --batch=64
# on a GPU. Results go to results/bench-<date>.{json,md}.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m sgjax.bench --suite=all --model=DiT-S/2 --input_size=16 --batch=32 \
  --sample_batch=32 --sample_steps=10 --repeats=3 --steps_per_repeat=2 --matmul_size=1024 "$@"
