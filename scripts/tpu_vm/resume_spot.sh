#!/usr/bin/env bash
# Brings a spot TPU VM run back after a preemption. When the TPU VM is PREEMPTED, TERMINATED,
# STOPPED or gone, deletes what is left of it, creates it again as a spot VM (create.sh --spot),
# installs dermjax (install.sh) and re-runs the same launch command (launch.sh): the run resumes
# from its newest checkpoint in --save-dir (checkpoint.auto_resume). When it is READY it does
# nothing (the run may still be going; launch.sh restarts a run that stopped); in any other state
# (CREATING, REPAIRING, ...) it does nothing and says so. Only gcloud's NOT_FOUND counts as gone:
# when the state cannot be read (auth, network, project), nothing is deleted (exit 2).
#
#   scripts/tpu_vm/resume_spot.sh --name NAME --zone ZONE [--project PROJECT]
#       --accelerator-type TYPE --version RUNTIME [--queued] [--timeout-min M]
#       [--weights FILE]... [--python VERSION] [--extras LIST]
#       --config CONFIG --save-dir gs://BUCKET/PATH [--log-dir DIR] [--env KEY=VALUE]...
#       [--dry-run] [-- DERMJAX_FLAGS...]
#
# The options are those of create.sh, install.sh and launch.sh; pass the ones the first launch
# used. To watch a run unattended: while sleep 600; do scripts/tpu_vm/resume_spot.sh ...; done
# --dry-run prints the describe command and then every command of the recreate path ("+ " lines).

set -euo pipefail
# shellcheck source=scripts/tpu_vm/common.sh source-path=SCRIPTDIR/../..
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CREATE=()
INSTALL=()
LAUNCH=()
FLAGS=()
QUEUED=0
ACCELERATOR=''
VERSION=''
CONFIG=''
SAVE_DIR=''

split_equals "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --accelerator-type | --version | --timeout-min)
      CREATE+=("$1" "$(opt_value "$@")")
      [[ $1 != --accelerator-type ]] || ACCELERATOR=$2
      [[ $1 != --version ]] || VERSION=$2
      shift 2
      ;;
    --queued)
      CREATE+=("$1")
      QUEUED=1
      shift
      ;;
    --weights | --python | --extras)
      INSTALL+=("$1" "$(opt_value "$@")")
      shift 2
      ;;
    --config | --save-dir | --log-dir | --env)
      LAUNCH+=("$1" "$(opt_value "$@")")
      [[ $1 != --config ]] || CONFIG=$2
      [[ $1 != --save-dir ]] || SAVE_DIR=$2
      shift 2
      ;;
    --)
      shift
      no_dry_run_after_dashes "$@"
      FLAGS=(-- "$@")
      break
      ;;
    *)
      common_option "$@"
      ((CONSUMED)) || unknown_option "$1"
      shift "$CONSUMED"
      ;;
  esac
done
# Everything the recreate path needs is checked before anything is deleted.
require_name_zone
require_opt "$ACCELERATOR" --accelerator-type "as when it was created, e.g. v5litepod-16"
require_opt "$VERSION" --version "the TPU runtime it was created with"
require_opt "$CONFIG" --config "the config of the launch to resume"
require_opt "$SAVE_DIR" --save-dir "the gs:// folder of the run's checkpoints"
[[ $SAVE_DIR == gs://* ]] || die "--save-dir $SAVE_DIR: expected the run's gs://BUCKET/PATH"
require_tools gcloud
location_flags

COMMON=(--name "$NAME" --zone "$ZONE")
[[ -z $PROJECT ]] || COMMON+=(--project "$PROJECT")
if ((DRY_RUN)); then COMMON+=(--dry-run); fi
DELETE=()
if ((QUEUED)); then DELETE=(--queued); fi

describe_error=$(mktemp)
trap 'rm -f "$describe_error"' EXIT
if state=$(query gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" \
  --format='value(state)' 2>"$describe_error"); then
  state=${state:-GONE}
elif ((DRY_RUN)); then
  state=UNKNOWN
  note "dry run: the state is not read; these are the commands of the recreate path"
elif grep -q NOT_FOUND "$describe_error"; then
  state=GONE
else # auth, network, permission, project: the VM may be running, so delete nothing
  die "cannot read the state of TPU VM $NAME ($(tr '\n' ' ' <"$describe_error" | cut -c1-300 | sed 's/ *$//')):" \
    "nothing was deleted; check gcloud auth, --project and --zone, then run this again"
fi

case $state in
  READY)
    note "TPU VM $NAME is READY: nothing to do (launch.sh restarts a run that has stopped)"
    exit 0
    ;;
  PREEMPTED | TERMINATED | STOPPED | UNKNOWN)
    note "TPU VM $NAME is $state: deleting and creating it again"
    "$SCRIPT_DIR/delete.sh" "${COMMON[@]}" "${DELETE[@]}"
    ;;
  GONE)
    note "TPU VM $NAME does not exist: creating it"
    if ((QUEUED)); then # its queued resource may still be there
      "$SCRIPT_DIR/delete.sh" "${COMMON[@]}" "${DELETE[@]}" ||
        note "no queued resource $NAME to delete"
    fi
    ;;
  *)
    note "TPU VM $NAME is $state: nothing done; run this again once it has settled"
    exit 0
    ;;
esac
"$SCRIPT_DIR/create.sh" "${COMMON[@]}" "${CREATE[@]}" --spot
"$SCRIPT_DIR/install.sh" "${COMMON[@]}" "${INSTALL[@]}"
"$SCRIPT_DIR/launch.sh" "${COMMON[@]}" "${LAUNCH[@]}" "${FLAGS[@]}"
