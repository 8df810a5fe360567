# shellcheck shell=bash disable=SC2034
# Helpers sourced by every scripts/tpu_vm/*.sh: options shared by all of them (--name, --zone,
# --project, --dry-run, --help), the `run` wrapper that prints each command before running it
# (and only prints it under --dry-run), `query` for commands whose output a script reads, and
# one-line errors. Each printed command is one line starting with "+ ", quoted so that it can be
# pasted into a shell.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: these scripts need bash >= 4.4 (macOS: brew install bash)" >&2
  exit 2
fi

# Where a run's output goes on each worker (expanded there: $HOME is the worker's home).
# shellcheck disable=SC2016  # expanded by the worker's shell, not here
REMOTE_LOG='$HOME/dermjax-run.log'
REMOTE_SRC='dermjax'          # the code, under the worker's home
REMOTE_VENV='dermjax-venv'    # the virtual environment dermjax is installed in, under home
CMD_PREFIX='+ '

DRY_RUN=0
NAME=''
ZONE=''
PROJECT=''
CONSUMED=0
exec 3>&1 # printed commands go to the script's stdout, also from inside $(...)

die() {
  echo "error: $*" >&2
  exit 2
}

note() {
  echo "$*" >&2
}

usage() {
  # The script's header comment, without the leading "# ".
  sed -n '2,/^$/{/^#/s/^# \{0,1\}//p}' "$0"
}

# quote ARG: ARG as a shell word (unchanged when it needs no quoting).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# quote_all ARGS...: the arguments as one shell command line.
quote_all() {
  local out='' arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s' "$out"
}

print_cmd() {
  printf '%s%s\n' "$CMD_PREFIX" "$(quote_all "$@")" >&3
}

# run CMD ARGS...: prints the command, then runs it unless --dry-run.
run() {
  print_cmd "$@"
  ((DRY_RUN)) || "$@"
}

# query CMD ARGS...: like run, for a command whose output the caller reads; runs nothing and
# returns 1 under --dry-run (the answer is unknown). QUERY_QUIET=1 skips printing (polling).
QUERY_QUIET=0
query() {
  ((QUERY_QUIET)) || print_cmd "$@"
  ((DRY_RUN)) && return 1
  "$@"
}

# opt_value OPTION [VALUE ...]: VALUE, or a one-line error when it is missing.
opt_value() {
  if (($# < 2)) || [[ $2 == --* ]]; then
    die "$1 needs a value (see --help)"
  fi
  printf '%s' "$2"
}

# split_equals ARGS...: sets ARGS to the arguments with --opt=value split into --opt value
# (arguments after "--" are kept as they are).
split_equals() {
  ARGS=()
  local arg rest=0
  for arg in "$@"; do
    if ((rest)) || [[ $arg != --*=* ]]; then
      ARGS+=("$arg")
      if [[ $arg == -- ]]; then rest=1; fi
    else
      ARGS+=("${arg%%=*}" "${arg#*=}")
    fi
  done
}

# common_option ARGS...: handles an option every script takes; sets CONSUMED to the number of
# arguments used (0: not a common option).
common_option() {
  CONSUMED=1
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --name)
      NAME=$(opt_value "$@")
      CONSUMED=2
      ;;
    --zone)
      ZONE=$(opt_value "$@")
      CONSUMED=2
      ;;
    --project)
      PROJECT=$(opt_value "$@")
      CONSUMED=2
      ;;
    *) CONSUMED=0 ;;
  esac
}

unknown_option() {
  die "unknown option $1 (see --help)"
}

# no_dry_run_after_dashes ARGS...: the arguments after `--` go to another program, so a
# --dry-run among them would leave this script running its commands for real.
no_dry_run_after_dashes() {
  local arg
  for arg in "$@"; do
    [[ $arg != --dry-run ]] ||
      die "--dry-run after --: it would be passed on and the commands run for real; put it before --"
  done
}

# require_opt VALUE OPTION WHAT: a one-line error naming OPTION when VALUE is empty.
require_opt() {
  [[ -n $1 ]] || die "missing $2 ($3; see --help)"
}

# Google Cloud's rules; they also keep both safe inside the remote commands built from them.
require_name_zone() {
  require_opt "$NAME" --name "the TPU VM's name"
  require_opt "$ZONE" --zone "e.g. us-central2-b"
  [[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "--name '$NAME': a TPU VM name is lowercase letters, digits and '-', starting with a letter"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE': expected a zone such as us-central2-b"
}

# require_tools TOOL...: each must be on PATH (not checked under --dry-run, which runs nothing).
require_tools() {
  ((DRY_RUN)) && return 0
  local tool hint
  for tool in "$@"; do
    hint=''
    [[ $tool != gcloud ]] || hint=' (install the Google Cloud CLI: https://cloud.google.com/sdk)'
    command -v "$tool" >/dev/null || die "$tool not found on PATH$hint"
  done
}

# Sets LOCATION to the zone and project flags of every gcloud call.
location_flags() {
  LOCATION=(--zone="$ZONE")
  [[ -z $PROJECT ]] || LOCATION+=(--project="$PROJECT")
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
