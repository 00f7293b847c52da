#!/usr/bin/env bash
# The main job, on the embedded digits (no download): train a routed SiT, then sample and
# evaluate, over three seeds (the same noise and labels for every setting): unguided sampling at
# gamma 0, 0.5 and 0.75 (sparsity alone), CFG and SG over omega, and CFG+SG; write
# RUN/report.md with 95% intervals and paired differences against unguided sampling and CFG.
# Re-running reuses everything already done.
# Usage: [SEEDS=0,1,2] bash launch/local.sh [RUN=runs/demo]   (SEEDS: the sampling seeds)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
RUN="${1:-runs/demo}"
PY=.venv/bin/python
mkdir -p "$RUN"

source "$ROOT/launch/cpu_devices.sh"

SECONDS=0
$PY -m sgjax.train --config=configs/digits.py --workdir="$RUN/model"
TRAIN_S=$SECONDS

SECONDS=0
$PY -m sgjax.sweep --workdir="$RUN/model" --out="$RUN/compare" --seeds="${SEEDS:-0,1,2}" \
  --num_samples=1000 --batch_size=500 --steps=10 \
  --grid='rule=none;gamma_strong=0,0.5,0.75' --grid='rule=cfg;omega=1.25,1.5' \
  --grid='rule=sg;omega=2,4;gamma_strong=0;gamma_weak=0.7' \
  --grid='rule=cfg+sg;omega=1.5;gamma_strong=0.2;gamma_weak=0.7'
SWEEP_S=$SECONDS

$PY -m sgjax.report --run="$RUN" --train_seconds="$TRAIN_S" --sweep_seconds="$SWEEP_S"
echo "wrote $RUN/report.md"
