#!/usr/bin/env bash
# Installs this checkout of dermjax on every worker of a TPU VM (--worker=all).
#
#   scripts/tpu_vm/install.sh --name NAME --zone ZONE [--project PROJECT]
#       [--weights FILE]... [--python VERSION] [--extras LIST] [--dry-run]
#
# Packs the files `git ls-files --cached --others --exclude-standard` lists (committed and new
# files, uncommitted edits included; nothing git ignores) into $TMPDIR/dermjax-src-NAME.tar.gz,
# copies it with `gcloud compute tpus tpu-vm scp` to every worker, unpacks it to ~/dermjax there
# and installs "dermjax[EXTRAS]" from it (default extras tpu,gcs,wandb) into ~/dermjax-venv with
# Python VERSION (default 3.11, fetched by uv: TPU VM images ship an older Python). Each --weights
# FILE (converted backbone weights, e.g. ~/.cache/dermjax/weights/resnet101.safetensors) is copied
# to ~/.cache/dermjax/weights/ on every worker, where dermjax looks for them. Re-running replaces
# the code and keeps the environment. --dry-run prints the gcloud commands ("+ " lines).

set -euo pipefail
# shellcheck source=scripts/tpu_vm/common.sh source-path=SCRIPTDIR/../..
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WEIGHTS=()
PYTHON_VERSION=3.11
EXTRAS=tpu,gcs,wandb

split_equals "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --weights)
      WEIGHTS+=("$(opt_value "$@")")
      shift 2
      ;;
    --python)
      PYTHON_VERSION=$(opt_value "$@")
      shift 2
      ;;
    --extras)
      EXTRAS=$(opt_value "$@")
      shift 2
      ;;
    *)
      common_option "$@"
      ((CONSUMED)) || unknown_option "$1"
      shift "$CONSUMED"
      ;;
  esac
done
require_name_zone
for file in "${WEIGHTS[@]}"; do
  [[ -f $file ]] || die "--weights $file: no such file (convert it first: see README.md)"
done
require_tools gcloud git tar
location_flags

ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
ARCHIVE="${TMPDIR:-/tmp}/dermjax-src-$NAME.tar.gz"

# Packs the checkout's files (those git lists that exist on disk) into ARCHIVE.
pack_source() {
  note "packing $ROOT (git ls-files --cached --others --exclude-standard) into $ARCHIVE"
  ((DRY_RUN)) && return 0
  git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "$ROOT is not a git checkout: install.sh copies the files git lists"
  (
    cd "$ROOT"
    git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' file; do
        if [[ -f $file ]]; then printf '%s\0' "$file"; fi
      done |
      tar -czf "$ARCHIVE" --null -T -
  )
}

# The install command each worker runs (one line; $HOME and $PATH are the worker's).
# shellcheck disable=SC2016  # expanded on the worker
remote_install() {
  local home='"$HOME/' file
  local py="$home$REMOTE_VENV/bin/python\"" req="\"dermjax[$EXTRAS] @ file://\$HOME/$REMOTE_SRC\""
  local steps=(
    'export PATH="$HOME/.local/bin:$PATH"'
    'command -v uv >/dev/null || python3 -m pip install --user --quiet uv ||
      curl -LsSf https://astral.sh/uv/install.sh | sh'
    "rm -rf $home$REMOTE_SRC\""
    "mkdir -p $home$REMOTE_SRC\""
    "tar -xzf $home$(basename "$ARCHIVE")\" -C $home$REMOTE_SRC\""
  )
  if ((${#WEIGHTS[@]})); then
    steps+=("mkdir -p $home.cache/dermjax/weights\"")
    for file in "${WEIGHTS[@]}"; do
      steps+=("mv -f $home\"$(quote "$(basename "$file")") $home.cache/dermjax/weights/\"")
    done
  fi
  steps+=(
    "uv venv --allow-existing --python $(quote "$PYTHON_VERSION") $home$REMOTE_VENV\""
    "uv pip install --python $py --reinstall-package dermjax $req"
  )
  local IFS=$'\n'
  local joined="${steps[*]}"
  joined=${joined//$'\n      '/ }
  printf '%s' "set -e; ${joined//$'\n'/; }"
}

pack_source
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "${WEIGHTS[@]}" "$NAME:" --worker=all "${LOCATION[@]}"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${LOCATION[@]}" \
  --command="$(remote_install)"
if ((!DRY_RUN)); then
  note "dermjax is installed on every worker of $NAME; start a run with launch.sh"
fi
