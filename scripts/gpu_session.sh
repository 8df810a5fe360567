#!/usr/bin/env bash
# The one script a session with a lent GPU runs (issue 16). It installs what the image lacks from
# the carried wheels (scripts/gpu_wheels.py; that machine reaches no package index), then runs,
# one process per model, the same-process step benchmark (dermjax vs torch eager vs torch.compile,
# batch 256, 224 px, bf16, the full step with on-device augmentation on both sides): resnet50,
# efficientnet_b0, vit_b_16 (the issue's goals) with jax and torch profiles; then the end-to-end
# benchmark (grain loader + step); then dermjax's step alone for resnet101, densenet121, vit_l_16
# in one process, as many as the time left allows (each row is written when measured). JSON, logs
# and profiles go under $OUT; a summary table is printed at the end. Every job is time-boxed and
# skipped once the overall budget (BUDGET_S, default 480 s) is spent.
#
#   python scripts/gpu_wheels.py download                  # here, once: .whl/ (~6 MB)
#   OUT=/tmp/out bash scripts/gpu_session.sh                # there, with carry=[".whl"]
#
# Compilation caches live in $CACHE_DIR (default bench_out/, git-ignored), so a rerun on the same
# machine compiles faster: compare compile seconds of first runs only (status.txt says whether
# caches were warm). SMOKE=1 rehearses every job on the CPU at toy sizes (no install, no GPU
# check): tests/scripts/test_gpu_session.py runs it, so the lent minutes are not spent on a bug.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:?set OUT to the output folder}"
BUDGET_S="${BUDGET_S:-480}"
PY="${PYTHON:-python3}"
CACHE_DIR="${CACHE_DIR:-$PWD/bench_out}"
SMOKE="${SMOKE:-0}"
SITE="${SITE:-/tmp/site}"
mkdir -p "$OUT/logs" "$OUT/profiles" "$CACHE_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="$CACHE_DIR/jax_cache"
export TORCHINDUCTOR_CACHE_DIR="$CACHE_DIR/inductor_cache"

if [[ "$SMOKE" == 1 ]]; then
  shape=(--batch 2 --img 32 --dtype float32 --compile-backend aot_eager)
  main=(--steps 1 --windows 1 --profile "$OUT/profiles" --profile-steps 1)
  goal_models=(resnet50)
  extra_models=()
  e2e=(--images 8 --workers 1 --size 32 --batch-size 2 --dtype float32 --steps 2)
  box_scale=3  # a busy CPU compiles slowly: the rehearsal checks that the jobs run, not speed
else
  shape=(--batch 256 --img 224 --dtype bfloat16)
  main=(--steps 10 --windows 3 --profile "$OUT/profiles" --profile-steps 3)
  goal_models=(resnet50 efficientnet_b0 vit_b_16)
  extra_models=(resnet101 densenet121 vit_l_16)
  e2e=(--images 1024 --workers 16 --steps 10)
  box_scale=1
fi

log() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*"; }

# ---- Environment ---------------------------------------------------------------------------
if [[ "$SMOKE" != 1 ]]; then
  # The GPU machine reaches no package index: what its image lacks travels as wheels in .whl/
  # (`python scripts/gpu_wheels.py download` here; the device call carries .whl).
  if ! "$PY" scripts/gpu_wheels.py install --wheels .whl --target "$SITE"; then
    log "wheel install failed: nothing can run without them; stopping"
    exit 2
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
{
  "$PY" -c "import jax, torch; print(jax.__version__, jax.devices(), torch.__version__, torch.cuda.is_available())"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  "$PY" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|optax|orbax|torch|grain|array.record|ml.collections|fairlearn|nvidia-cudnn)'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [[ "$SMOKE" != 1 ]] && ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  log "no GPU visible to jax: stopping"
  exit 2
fi
# Everything the jobs import, at once: a missing wheel costs seconds here, not a job's time box.
if ! "$PY" -c "import dermjax.train.bench, dermjax.train.bench_torch, dermjax.data.cache, torchvision" \
  >>"$OUT/env.txt" 2>&1; then
  tail -n 3 "$OUT/env.txt"
  log "an import failed (see env.txt): stopping"
  exit 2
fi
if [[ -d "$CACHE_DIR/jax_cache" ]]; then cache="warm"; else cache="cold"; fi
echo "compilation caches: $cache" >"$OUT/status.txt"

# ---- Jobs ----------------------------------------------------------------------------------
# run_job NAME BOX_S COMMAND...: runs COMMAND under `timeout`, at most the budget left.
run_job() {
  local name=$1 box=$(($2 * box_scale)) left rc
  shift 2
  left=$((BUDGET_S - SECONDS))
  if ((left < 40)); then
    log "skip $name: budget spent"
    echo "$name skipped (budget)" >>"$OUT/status.txt"
    return
  fi
  if ((box > left)); then box=$left; fi
  log "start $name (time box ${box} s)"
  timeout --signal=INT --kill-after=15 "$box" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  log "end $name: rc=$rc"
  echo "$name rc=$rc box=${box}s" >>"$OUT/status.txt"
  tail -n 4 "$OUT/logs/$name.log"
}

# step MODEL BOX_S [EXTRA ARGS...]: the full train step, augmentation on both sides.
step() {
  local model=$1 box=$2
  shift 2
  run_job "step_$model" "$box" "$PY" scripts/benchmark.py step --torch --augment \
    --models "$model" "${shape[@]}" --out "$OUT/step_$model.json" "$@"
}

# The goal models measure dermjax first: a torch.compile that compiles past the time box then
# costs torch.compile's figures only (eager's are written before it compiles). Both sides fit on
# the card together at these sizes (backward-pass activations: resnet50 ~18 GB, efficientnet_b0
# ~18 GB, vit_b_16 ~31 GB at batch 256, docs/performance.md). Boxes: compilation (dermjax 19-67
# s, torch.compile about as long) dominates, 30 timed steps take seconds; 110 + 140 + 110 + 60
# leave the extras (dermjax alone) what remains of the budget.
boxes=(110 140 110)
for i in "${!goal_models[@]}"; do
  step "${goal_models[$i]}" "${boxes[$i]}" "${main[@]}" --first dermjax
done
run_job e2e 60 "$PY" scripts/benchmark.py e2e --model "${goal_models[0]}" "${e2e[@]}" \
  --out "$OUT/e2e.json"
if ((${#extra_models[@]})); then
  run_job step_extras 300 "$PY" scripts/benchmark.py step --augment --models "${extra_models[@]}" \
    "${shape[@]}" --steps 10 --windows 3 --out "$OUT/step_extras.json"
fi

# ---- Summary -------------------------------------------------------------------------------
log "summary"
"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys

sys.path.insert(0, "scripts")
import benchmark

out = sys.argv[1]
for path in sorted(glob.glob(os.path.join(out, "step_*.json")), key=os.path.getmtime):
    result = json.load(open(path))
    benchmark.print_step_table(result)
    for row in result["rows"]:
        profile = (row.get("dermjax") or {}).get("profile") or {}
        if "error" in profile:
            print(f"  {row['model']} jax profile failed: {profile['error']}")
        for what in ("kinds", "ops"):
            for op in (profile.get(what) or [])[:6]:
                print(f"  {row['model']} jax top {what}: {op['share']:.1%} {op['ms']} ms "
                      f"x{op['count']} {op['op'][:90]}")
e2e = os.path.join(out, "e2e.json")
if os.path.exists(e2e):
    result = json.load(open(e2e))
    step = result["step"]["main_img_s"]
    for row in result["rows"]:
        print(f"e2e {row['model']} from {row['source']}: {row['img_s']} img/s "
              f"({row['img_s'] / step:.0%} of step-only {step})")
EOF
cat "$OUT/status.txt"
log "done"
