#!/usr/bin/env bash
# Starts `python -m dermjax.main` on every worker of a TPU VM (--worker=all), the same command on
# each, in the background (nohup); each worker's output is appended to ~/dermjax-run.log there.
#
#   scripts/tpu_vm/launch.sh --name NAME --zone ZONE [--project PROJECT] --config CONFIG
#       --save-dir gs://BUCKET/PATH [--log-dir DIR] [--env KEY=VALUE]... [--dry-run]
#       [-- DERMJAX_FLAGS...]
#
# CONFIG is a path in the checkout that install.sh copied (e.g. configs/tpu_resnet101.py).
# Checkpoints go to --save-dir (output.save_dir: experiment E writes gs://BUCKET/PATH/E), so they
# outlive the VM. metrics.jsonl, train.log, summary.json and the run lock go to the local folder
# --log-dir (output.log_dir; default ~/dermjax-runs) on worker 0 (gone with the VM: copy it with
# `gcloud compute tpus tpu-vm scp --recurse NAME:dermjax-runs . --worker=0` before delete.sh).
# No --workdir: dermjax keeps a --workdir's checkpoints inside it, on the worker's disk.
# DERMJAX_FLAGS go to dermjax.main as they are (e.g. --config.training.batch_size=128).
# The launch first reads worker 0's internal IP and sets JAX_COORDINATOR_ADDRESS=IP:8482, which
# makes every worker call jax.distributed.initialize() (JAX reads the process count and id from
# the TPU VM metadata). Re-running the same command resumes from the newest checkpoint in
# --save-dir (checkpoint.auto_resume). --dry-run prints the gcloud commands ("+ " lines).

set -euo pipefail
# shellcheck source=scripts/tpu_vm/common.sh source-path=SCRIPTDIR/../..
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=''
SAVE_DIR=''
LOG_DIR=''
ENVS=()
FLAGS=()
COORDINATOR_PORT=8482 # JAX's own default on Cloud TPU

split_equals "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --config)
      CONFIG=$(opt_value "$@")
      shift 2
      ;;
    --save-dir)
      SAVE_DIR=$(opt_value "$@")
      shift 2
      ;;
    --log-dir)
      LOG_DIR=$(opt_value "$@")
      shift 2
      ;;
    --env)
      ENVS+=("$(opt_value "$@")")
      shift 2
      ;;
    --)
      shift
      no_dry_run_after_dashes "$@"
      FLAGS=("$@")
      break
      ;;
    *)
      common_option "$@"
      ((CONSUMED)) || unknown_option "$1"
      shift "$CONSUMED"
      ;;
  esac
done
require_name_zone
require_opt "$CONFIG" --config "e.g. configs/tpu_resnet101.py"
require_opt "$SAVE_DIR" --save-dir "a gs:// folder for the checkpoints"
[[ $SAVE_DIR == gs://* ]] ||
  die "--save-dir $SAVE_DIR: expected gs://BUCKET/PATH (checkpoints must outlive the VM)"
for env in "${ENVS[@]}"; do
  [[ $env =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $env: expected KEY=VALUE"
done
for flag in "${FLAGS[@]}"; do
  case $flag in
    --workdir | --workdir=*)
      die "$flag: with --workdir dermjax keeps checkpoints on the worker's disk; use --log-dir"
      ;;
    --config.output.save_dir* | --config.output.log_dir*)
      die "$flag: use launch.sh's --save-dir / --log-dir"
      ;;
  esac
done
require_tools gcloud
location_flags

# The command every worker runs (one line; $HOME is the worker's).
# shellcheck disable=SC2016  # expanded on the worker
remote_command() {
  local coordinator=$1 log_dir='"$HOME/dermjax-runs"' flag args=() envs=()
  [[ -z $LOG_DIR ]] || log_dir=$(quote "$LOG_DIR")
  envs=("JAX_COORDINATOR_ADDRESS=$coordinator:$COORDINATOR_PORT" "${ENVS[@]}")
  for flag in "${envs[@]}"; do
    args+=("$(quote "$flag")")
  done
  args+=('"$HOME/'"$REMOTE_VENV"'/bin/python"' -m dermjax.main "$(quote "--config=$CONFIG")")
  args+=("$(quote "--config.output.save_dir=$SAVE_DIR")" "--config.output.log_dir=$log_dir")
  for flag in "${FLAGS[@]}"; do
    args+=("$(quote "$flag")")
  done
  printf '%s' "cd \"\$HOME/$REMOTE_SRC\" &&"
  printf ' %s' "echo \"== launch \$(date -u +%FT%TZ)\" >> $REMOTE_LOG &&"
  printf ' %s' "nohup env ${args[*]} >> $REMOTE_LOG 2>&1 < /dev/null &"
}

if ! coordinator=$(query gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" \
  --format='value(networkEndpoints[0].ipAddress)'); then
  ((DRY_RUN)) || die "cannot describe TPU VM $NAME (see gcloud's message above)"
  coordinator=WORKER0_IP
fi
[[ -n $coordinator ]] || die "TPU VM $NAME lists no network endpoint: is it READY? (describe it)"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${LOCATION[@]}" \
  --command="$(remote_command "$coordinator")"
if ((!DRY_RUN)); then
  note "started on every worker of $NAME; follow it with: $SCRIPT_DIR/logs.sh --name $NAME" \
    "--zone $ZONE${PROJECT:+ --project $PROJECT}"
fi
