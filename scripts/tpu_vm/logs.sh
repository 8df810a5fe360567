#!/usr/bin/env bash
# Shows the output of the run launch.sh started: worker 0's ~/dermjax-run.log (where process 0
# logs the run), or worker N's with --worker N. Follows it until Ctrl-C, or prints the last lines
# and returns with --no-follow.
#
#   scripts/tpu_vm/logs.sh --name NAME --zone ZONE [--project PROJECT] [--worker N]
#       [--lines N] [--no-follow] [--dry-run]
#
# --dry-run prints the gcloud command ("+ " line) and runs nothing.

set -euo pipefail
# shellcheck source=scripts/tpu_vm/common.sh source-path=SCRIPTDIR/../..
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=0
LINES=100
FOLLOW=1

split_equals "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --worker)
      WORKER=$(opt_value "$@")
      shift 2
      ;;
    --lines)
      LINES=$(opt_value "$@")
      shift 2
      ;;
    --no-follow) FOLLOW=0 && shift ;;
    *)
      common_option "$@"
      ((CONSUMED)) || unknown_option "$1"
      shift "$CONSUMED"
      ;;
  esac
done
require_name_zone
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker $WORKER: expected a worker number (0 is process 0)"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines $LINES: expected a number"
require_tools gcloud
location_flags

tail_cmd="tail -n $LINES"
if ((FOLLOW)); then tail_cmd+=" -F"; fi
run gcloud compute tpus tpu-vm ssh "$NAME" --worker="$WORKER" "${LOCATION[@]}" \
  --command="$tail_cmd $REMOTE_LOG"
