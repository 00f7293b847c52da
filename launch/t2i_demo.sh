#!/usr/bin/env bash
# The text-to-image demo, on captioned scenes of the bundled digits (no download): train a
# routed TR-DiT with the built-in word encoder, sample unguided (also at inference sparsity),
# CFG, SG and CFG+SG from the same 100 prompts over three seeds, score every sample with the
# scene checker (digits, colours, relation) and write RUN/report.md.
# Re-running reuses everything already done.
# Usage: [TRAIN_SEED=0] bash launch/t2i_demo.sh [RUN=runs/t2i_demo]   (TRAIN_SEED: config.seed)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
RUN="${1:-runs/t2i_demo}"
PY=.venv/bin/python
mkdir -p "$RUN"
source "$ROOT/launch/cpu_devices.sh"

SECONDS=0
$PY -m sgjax.train --config=configs/t2i.py:model=demo --config.seed="${TRAIN_SEED:-0}" \
  --workdir="$RUN/model"
TRAIN_S=$SECONDS

SECONDS=0
$PY -m sgjax.sweep --workdir="$RUN/model" --metric=scenes --num_samples=400 --batch_size=200 \
  --steps=20 --out="$RUN/compare" --seeds=0,1,2 \
  --grid='rule=none;gamma_strong=0,0.5,0.75' --grid='rule=cfg;omega=1.5,3' \
  --grid='rule=sg;omega=2,4;gamma_strong=0;gamma_weak=0.7' \
  --grid='rule=cfg+sg;omega=2.5;gamma_strong=0.2;gamma_weak=0.7'
SWEEP_S=$SECONDS

$PY -m sgjax.report --run="$RUN" --train_seconds="$TRAIN_S" --sweep_seconds="$SWEEP_S"
echo "wrote $RUN/report.md"
