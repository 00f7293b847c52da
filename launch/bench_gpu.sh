#!/usr/bin/env bash
# The GPU benchmark set, on one GPU (about 8 minutes on an H100, estimated from earlier runs'
# compile and step times):
#
#   bash launch/bench_gpu.sh [--dry-run] [--out=DIR] [--only=train-xla,train-cudnn,sample]
#
# SiT-XL/2 in bfloat16 on 32x32x4 latents (256 tokens), random weights:
#   train-xla    dense and routed (2->24, gamma 0.5) training, batch 64, XLA attention
#   train-cudnn  the same with cuDNN flash attention (--attention=cudnn)
#   sample       unguided, CFG, SG 0.5/0.9 (SG_FLOPS) and AG+SG with cosine schedules
#                (SG_FID), batch 64, 40 Euler steps, XLA attention
# Each part writes DIR/bench-<date>.json/.md (DIR: results/). Uses $PYTHON, else
# .venv/bin/python (from bash launch/setup.sh with jax[cuda]), else python; the benchmark
# needs jax, flax, optax and absl only. --dry-run prints the commands.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

DRY_RUN=0 OUT=results ONLY=train-xla,train-cudnn,sample
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --out=*) OUT="${arg#*=}" ;;
    --only=*) ONLY="${arg#*=}" ;;
    *) echo "error: unknown argument $arg" >&2; sed -n '2,14p' "$0" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python; fi
fi
COMMON=(-m sgjax.bench --model=SiT-XL/2 --dtype=bfloat16 --input_size=32 --repeats=3
        --out="$OUT")
TRAIN=(--suite=train --modes=dense,routing --batch=64 --steps_per_repeat=5)
SAMPLE=(--suite=sample --settings=unguided,cfg,sg_flops,sg_fid --sample_batch=64
        --sample_steps=40 --attention=xla)

run() {
  local line
  line="$(printf '%q ' "$@")"
  echo "${line% }"
  if [[ $DRY_RUN == 0 ]]; then (cd "$ROOT" && "$@"); fi
}

IFS=, read -ra PARTS <<< "$ONLY"
for part in "${PARTS[@]}"; do
  case "$part" in
    train-xla|train-cudnn|sample) ;;
    *) echo "error: --only: unknown part '$part' (train-xla, train-cudnn, sample)" >&2; exit 2 ;;
  esac
done
for part in "${PARTS[@]}"; do
  case "$part" in
    train-xla) run "$PY" "${COMMON[@]}" "${TRAIN[@]}" --attention=xla ;;
    train-cudnn) run "$PY" "${COMMON[@]}" "${TRAIN[@]}" --attention=cudnn ;;
    sample) run "$PY" "${COMMON[@]}" "${SAMPLE[@]}" ;;
  esac
done
