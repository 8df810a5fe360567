#!/usr/bin/env bash
# Deletes a TPU VM (all its workers, with their local disks: copy the run folder first, see
# launch.sh), or with --queued the queued resource that created it together with its TPU VM.
# The run's checkpoints in gs:// stay.
#
#   scripts/tpu_vm/delete.sh --name NAME --zone ZONE [--project PROJECT] [--queued] [--dry-run]
#
# Does not ask for confirmation. --dry-run prints the gcloud command ("+ " line), runs nothing.

set -euo pipefail
# shellcheck source=scripts/tpu_vm/common.sh source-path=SCRIPTDIR/../..
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0

split_equals "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --queued) QUEUED=1 && shift ;;
    *)
      common_option "$@"
      ((CONSUMED)) || unknown_option "$1"
      shift "$CONSUMED"
      ;;
  esac
done
require_name_zone
require_tools gcloud
location_flags

if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
fi
