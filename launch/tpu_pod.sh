#!/usr/bin/env bash
# A Cloud TPU VM pod for sgjax: create, set up every worker, run, stop, delete.
#
#   bash launch/tpu_pod.sh [options] create
#   bash launch/tpu_pod.sh [options] setup          # copy this checkout to all workers, install
#   bash launch/tpu_pod.sh [options] run -- --config=configs/imagenet256.py:model=SiT-XL/2 \
#       --workdir=/mnt/bucket/sit_xl --config.data.path='/mnt/bucket/latents/train-*'
#   bash launch/tpu_pod.sh [options] stop           # SIGTERM: the run checkpoints and exits
#   bash launch/tpu_pod.sh [options] delete
#
# Options (or the environment variables in brackets):
#   --name=NAME [TPU_NAME, sgjax-pod]         --zone=ZONE [TPU_ZONE, us-central2-b]
#   --project=PROJECT [TPU_PROJECT, gcloud's default]
#   --type=TYPE [TPU_TYPE, v4-32]              --version=V [TPU_VERSION, tpu-ubuntu2204-base]
#   --spot (create a Spot VM; restart `run` after preemption: it resumes from the workdir)
#   --module=M [sgjax.train] (run: also sgjax.sample)   --detach (run: nohup, log on workers)
#   --dry-run: print the exact commands without running them.
# Every worker runs the same command with --distributed=tpu (sgjax/distributed.py), so the
# workdir must be storage all workers share: a gs:// URL (the TPU VM's service account needs
# write access to the bucket), or a folder mounted at the same path on every worker.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  sed -n '2,21p' "$0" >&2
  exit 2
}

DRY_RUN=0 SPOT=0 DETACH=0 MODULE=sgjax.train
NAME="${TPU_NAME:-sgjax-pod}" ZONE="${TPU_ZONE:-us-central2-b}" PROJECT="${TPU_PROJECT:-}"
TYPE="${TPU_TYPE:-v4-32}" VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
ACTION=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --detach) DETACH=1 ;;
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --module=*) MODULE="${1#*=}" ;;
    --help|-h) usage ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1" >&2; usage ;;
    *) [[ -z "$ACTION" ]] || { echo "error: one action at a time (got $ACTION and $1)" >&2
                                exit 2; }
       ACTION="$1" ;;
  esac
  shift
done
ARGS=("$@")
case "$ACTION" in
  create|setup|run|stop|delete) ;;
  "") echo "error: expected an action: create, setup, run, stop or delete" >&2; usage ;;
  *) echo "error: unknown action $ACTION: choose create, setup, run, stop or delete" >&2
     exit 2 ;;
esac
if [[ "$ACTION" != run && ${#ARGS[@]} -gt 0 ]]; then
  echo "error: only 'run' takes arguments after --" >&2; exit 2
fi

do_cmd() {  # prints the command, shell-quoted, then runs it (unless --dry-run)
  local line
  line="$(printf '%q ' "$@")"
  echo "${line% }"
  [[ $DRY_RUN == 1 ]] || "$@"
}

do_sh() {  # the same for a shell pipeline given as one string
  echo "$1"
  [[ $DRY_RUN == 1 ]] || bash -o pipefail -c "$1"
}

WHERE=(--zone="$ZONE")
[[ -z "$PROJECT" ]] || WHERE+=(--project="$PROJECT")
REMOTE_DIR='~/sgjax'  # expanded by the workers' shell
TARBALL="/tmp/sgjax-$NAME.tar.gz"
# Unpack, create .venv from requirements.txt, add libtpu for the same jax version.
SETUP_REMOTE="mkdir -p $REMOTE_DIR && tar -xzf ~/sgjax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR"
SETUP_REMOTE+=" && bash launch/setup.sh && .venv/bin/pip install -q"
SETUP_REMOTE+=" \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""

case "$ACTION" in
  create)
    extra=()
    [[ $SPOT == 0 ]] || extra+=(--spot)
    do_cmd gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" \
      --version="$VERSION" "${extra[@]}"
    ;;
  setup)
    # This checkout's tracked and untracked-but-not-ignored files (no .venv, no runs).
    root_q="$(printf '%q' "$ROOT")" tarball_q="$(printf '%q' "$TARBALL")"
    listing="git -C $root_q ls-files --cached --others --exclude-standard -z"
    do_sh "$listing | tar --null -czf $tarball_q -C $root_q -T -"
    do_cmd gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:sgjax.tar.gz" --worker=all \
      "${WHERE[@]}"
    do_cmd gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${WHERE[@]}" \
      --command="$SETUP_REMOTE"
    ;;
  run)
    remote="cd $REMOTE_DIR && .venv/bin/python -m $MODULE --distributed=tpu"
    for arg in "${ARGS[@]}"; do remote+=" $(printf '%q' "$arg")"; done
    if [[ $DETACH == 1 ]]; then
      remote="cd $REMOTE_DIR && nohup bash -c $(printf '%q' "$remote") > $REMOTE_DIR/run.log 2>&1 &"
    fi
    do_cmd gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${WHERE[@]}" --command="$remote"
    ;;
  stop)
    # The first SIGTERM makes training save a checkpoint and exit (sgjax/train.py).
    do_cmd gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${WHERE[@]}" \
      --command="pkill -TERM -f 'python -m sgjax[.]' || true"
    ;;
  delete)
    do_cmd gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
    ;;
esac
