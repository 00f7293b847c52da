#!/usr/bin/env bash
# N local processes of one command, joined by jax.distributed (sgjax/distributed.py):
#
#   bash launch/multiprocess_local.sh [--dry-run] [--cpu-devices=K] [--port=P] [--log-dir=D] \
#       N CMD...
#   bash launch/multiprocess_local.sh --cpu-devices=4 2 \
#       .venv/bin/python -m sgjax.train --config=configs/digits.py:runlocal --workdir=runs/mp
#
# Process i runs CMD with SGJAX_COORDINATOR=localhost:P, SGJAX_NUM_PROCESSES=N,
# SGJAX_PROCESS_ID=i (a free port unless --port). --cpu-devices=K gives each process K fake
# CPU devices (JAX_PLATFORMS=cpu). With --log-dir, process i writes D/process_i.log; otherwise
# all share this terminal. When one process fails, the others are stopped (their collectives
# would hang) and this script exits with the failing status; SIGINT/SIGTERM are passed on
# (training then checkpoints and stops, status 75: rerun to resume).
set -euo pipefail

usage() {
  sed -n '2,14p' "$0" >&2
  exit 2
}

DRY_RUN=0 CPU_DEVICES="" PORT="" LOG_DIR=""
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --cpu-devices=*) CPU_DEVICES="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --log-dir=*) LOG_DIR="${1#*=}" ;;
    --help|-h) usage ;;
    *) echo "error: unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 2 ]] || { echo "error: expected N and a command" >&2; usage; }
N="$1"; shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "error: N=$N must be a positive integer" >&2; exit 2; }
[[ -z "$CPU_DEVICES" || "$CPU_DEVICES" =~ ^[1-9][0-9]*$ ]] || {
  echo "error: --cpu-devices=$CPU_DEVICES must be a positive integer" >&2; exit 2; }

if [[ -z "$PORT" ]]; then
  PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0))
print(s.getsockname()[1])')"
fi

ENV_COMMON=(SGJAX_COORDINATOR="localhost:$PORT" SGJAX_NUM_PROCESSES="$N")
if [[ -n "$CPU_DEVICES" ]]; then
  # Replaces any device count already in XLA_FLAGS (e.g. a test runner's 8).
  OTHER_XLA_FLAGS="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/^ +| +$//g' \
    <<< "${XLA_FLAGS:-}")"
  DEVICE_COUNT="--xla_force_host_platform_device_count=$CPU_DEVICES"
  ENV_COMMON+=(JAX_PLATFORMS=cpu XLA_FLAGS="${OTHER_XLA_FLAGS:+$OTHER_XLA_FLAGS }$DEVICE_COUNT")
fi

command_of() {  # the exact command line of process $1, shell-quoted
  local out
  out="env $(printf '%q ' "${ENV_COMMON[@]}" "SGJAX_PROCESS_ID=$1" "${@:2}")"
  [[ -z "$LOG_DIR" ]] || out+="> $(printf '%q' "$LOG_DIR/process_$1.log") 2>&1"
  echo "${out% }"
}

if [[ $DRY_RUN == 1 ]]; then
  for ((i = 0; i < N; i++)); do command_of "$i" "$@"; done
  exit 0
fi

[[ -z "$LOG_DIR" ]] || mkdir -p "$LOG_DIR"
# Job control: each process gets its own process group, so a terminal's Ctrl-C reaches only
# this script, which passes on exactly one SIGTERM (training checkpoints on the first signal
# and aborts on a second).
set -m
declare -A ALIVE=()
signal_all() {  # $1: signal; to each live process's group (grain workers included)
  for pid in "${!ALIVE[@]}"; do kill -s "$1" -- "-$pid" 2>/dev/null || true; done
}
STOPPING=0
on_signal() {
  if [[ $STOPPING == 0 ]]; then STOPPING=1; signal_all TERM; fi
}
trap on_signal INT TERM
for ((i = 0; i < N; i++)); do
  if [[ -n "$LOG_DIR" ]]; then
    env "${ENV_COMMON[@]}" SGJAX_PROCESS_ID="$i" "$@" > "$LOG_DIR/process_$i.log" 2>&1 &
  else
    env "${ENV_COMMON[@]}" SGJAX_PROCESS_ID="$i" "$@" &
  fi
  ALIVE[$!]=$i
done

STATUS=0
while [[ ${#ALIVE[@]} -gt 0 ]]; do
  DONE=""
  set +e
  wait -n -p DONE "${!ALIVE[@]}"
  CODE=$?
  set -e
  if [[ -z "${DONE:-}" ]]; then
    # A trapped signal interrupted the wait, or bash's job control already reaped a process
    # (after a failure, when its status no longer matters): forget those that are gone.
    for pid in "${!ALIVE[@]}"; do kill -0 "$pid" 2>/dev/null || unset "ALIVE[$pid]"; done
    continue
  fi
  echo "multiprocess_local: process ${ALIVE[$DONE]} (pid $DONE) exited with status $CODE" >&2
  unset "ALIVE[$DONE]"
  if [[ $CODE -eq 75 ]]; then
    # sgjax.train stopped on a signal with a checkpoint; the others stop at the same step.
    [[ $STATUS -ne 0 ]] || STATUS=75
    continue
  fi
  if [[ $CODE -ne 0 && ($STATUS -eq 0 || $STATUS -eq 75) ]]; then
    STATUS=$CODE
    if [[ ${#ALIVE[@]} -gt 0 ]]; then
      # The others would wait forever in collectives with the dead process: stop them,
      # forcefully after a grace period.
      echo "multiprocess_local: stopping the other ${#ALIVE[@]} process(es)" >&2
      STOPPING=1
      signal_all TERM
      for ((t = 0; t < 40; t++)); do
        live=0
        for pid in "${!ALIVE[@]}"; do kill -0 "$pid" 2>/dev/null && live=1; done
        [[ $live == 1 ]] || break
        sleep 0.5
      done
      signal_all KILL
    fi
  fi
done
exit "$STATUS"
