#!/usr/bin/env bash
# Creates a TPU VM: one host (e.g. v5litepod-8, v4-8) or a pod slice (e.g. v5litepod-16, v4-32),
# on demand (default), as a spot VM (--spot), or through a queued resource (--queued, which waits
# for capacity; with --spot a spot queued resource).
#
#   scripts/tpu_vm/create.sh --name NAME --zone ZONE --accelerator-type TYPE --version RUNTIME
#       [--project PROJECT] [--spot] [--queued [--no-wait] [--timeout-min M]] [--dry-run]
#       [-- EXTRA_GCLOUD_FLAGS...]
#
# RUNTIME is the TPU software version: v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv6e (v6e),
# tpu-ubuntu2204-base (v4, v5p). With --queued the command waits until the queued resource is
# ACTIVE (its node, named NAME, is then ready), polling every 60 s for at most --timeout-min
# minutes (default 120); --no-wait returns at once. Flags after "--" go to gcloud as they are
# (e.g. --network=NET --service-account=SA). --dry-run prints the gcloud commands ("+ " lines)
# and runs nothing.

set -euo pipefail
# shellcheck source=scripts/tpu_vm/common.sh source-path=SCRIPTDIR/../..
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR=''
VERSION=''
SPOT=0
QUEUED=0
WAIT=1
TIMEOUT_MIN=120
EXTRA=()

split_equals "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --accelerator-type)
      ACCELERATOR=$(opt_value "$@")
      shift 2
      ;;
    --version)
      VERSION=$(opt_value "$@")
      shift 2
      ;;
    --timeout-min)
      TIMEOUT_MIN=$(opt_value "$@")
      shift 2
      ;;
    --spot) SPOT=1 && shift ;;
    --queued) QUEUED=1 && shift ;;
    --no-wait) WAIT=0 && shift ;;
    --)
      shift
      no_dry_run_after_dashes "$@"
      EXTRA=("$@")
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
require_opt "$ACCELERATOR" --accelerator-type "e.g. v5litepod-8, v4-32"
require_opt "$VERSION" --version "the TPU runtime, e.g. v2-alpha-tpuv5-lite, tpu-ubuntu2204-base"
[[ $TIMEOUT_MIN =~ ^[0-9]+$ ]] || die "--timeout-min $TIMEOUT_MIN: expected whole minutes"
require_tools gcloud
location_flags

# Polls the queued resource until it is ACTIVE; fails on a state it cannot leave by waiting.
wait_until_active() {
  local deadline=$((SECONDS + TIMEOUT_MIN * 60)) state
  while true; do
    if ! state=$(query gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}" \
      --format='value(state.state)'); then
      ((DRY_RUN)) && return 0
      die "cannot describe queued resource $NAME (see gcloud's message above)"
    fi
    QUERY_QUIET=1
    case $state in
      ACTIVE)
        note "queued resource $NAME is ACTIVE: TPU VM $NAME is ready"
        return 0
        ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING)
        die "queued resource $NAME is $state: delete it (delete.sh --queued) and create it again"
        ;;
    esac
    ((SECONDS < deadline)) || die "queued resource $NAME is still ${state:-not listed} after" \
      "$TIMEOUT_MIN min; it stays queued: run install.sh once it is ACTIVE"
    note "queued resource $NAME is ${state:-not listed yet}; waiting for capacity"
    sleep 60
  done
}

if ((QUEUED)); then
  cmd=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${LOCATION[@]}"
    --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION")
  if ((SPOT)); then cmd+=(--spot); fi
  run "${cmd[@]}" "${EXTRA[@]}"
  if ((WAIT)); then wait_until_active; fi
else
  cmd=(gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}"
    --accelerator-type="$ACCELERATOR" --version="$VERSION")
  if ((SPOT)); then cmd+=(--spot); fi
  run "${cmd[@]}" "${EXTRA[@]}"
fi
