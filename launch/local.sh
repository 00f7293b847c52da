#!/usr/bin/env bash
# The main job, on the embedded digits (no download): train a routed SiT, sample it with
# unguided, CFG, SG at two settings and CFG+SG over three seeds, evaluate every setting, sweep
# SG's (gamma_strong, gamma_weak) for a heatmap, and write RUN/report.md.
# Re-running reuses everything already done.   Usage: bash launch/local.sh [RUN=runs/demo]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
RUN="${1:-runs/demo}"
PY=.venv/bin/python
mkdir -p "$RUN"

SECONDS=0
$PY -m sgjax.train --config=configs/digits.py --workdir="$RUN/model"
TRAIN_S=$SECONDS

SECONDS=0
SAMPLE=(--workdir="$RUN/model" --num_samples=200 --batch_size=200 --steps=40)
$PY -m sgjax.sweep "${SAMPLE[@]}" --out="$RUN/compare" --seeds=0,1,2 \
  --grid='rule=none' --grid='rule=cfg;omega=1.5' \
  --grid='rule=sg;omega=4;gamma_strong=0.7;gamma_weak=0.9' \
  --grid='rule=sg;omega=4;gamma_strong=0;gamma_weak=0.7' \
  --grid='rule=cfg+sg;omega=1.5;gamma_strong=0.2;gamma_weak=0.7'
$PY -m sgjax.sweep "${SAMPLE[@]}" --out="$RUN/heatmap" --seeds=0 \
  --grid='rule=sg;omega=2,4;gamma_strong=0,0.3,0.5;gamma_weak=0.7,0.9'
SWEEP_S=$SECONDS

$PY -m sgjax.report --run="$RUN" --train_seconds="$TRAIN_S" --sweep_seconds="$SWEEP_S"
echo "wrote $RUN/report.md"
