#!/usr/bin/env bash
# The one script a session with a lent GPU runs (issue 16). It installs what the image lacks,
# then runs, one process per model, the same-process step benchmark (dermjax vs torch eager vs
# torch.compile, batch 256, 224 px, bf16): resnet50, efficientnet_b0, vit_b_16 with jax and torch
# profiles, then resnet101, densenet121, vit_l_16, then the end-to-end benchmark (grain loader +
# step). JSON, logs and profiles go under $OUT; a summary table is printed at the end.
# Every job is time-boxed and skipped once the overall budget (BUDGET_S, default 480 s) is spent.
#
#   OUT=/tmp/out bash scripts/gpu_session.sh
#
# Compilation caches live in bench_out/ (git-ignored), so a rerun on the same machine compiles
# faster: compare compile seconds of first runs only (status.txt says whether caches were warm).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:?set OUT to the output folder}"
BUDGET_S="${BUDGET_S:-480}"
PY="${PYTHON:-python}"
mkdir -p "$OUT/logs" "$OUT/profiles" bench_out
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR="$PWD/bench_out/jax_cache"
export TORCHINDUCTOR_CACHE_DIR="$PWD/bench_out/inductor_cache"

log() { echo "[$(date +%H:%M:%S) +${SECONDS}s] $*"; }

# ---- Environment ---------------------------------------------------------------------------
missing=()
for module in grain array_record ml_collections wandb gcsfs optax flax; do
  "$PY" -c "import $module" 2>/dev/null || missing+=("$module")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  "$PY" -m pip install -q "${missing[@]}" || log "pip install failed: ${missing[*]}"
fi
if ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  log "jax has no GPU backend; trying jax[cuda13]"
  "$PY" -m pip install -q "jax[cuda13]" || log "pip install jax[cuda13] failed"
fi
{
  "$PY" -c "import jax, torch; print(jax.__version__, jax.devices(), torch.__version__, torch.cuda.is_available())"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
  "$PY" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|optax|torch|grain|nvidia-cudnn)'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  log "no GPU visible to jax: stopping"
  exit 2
fi
if [[ -d bench_out/jax_cache ]]; then cache="warm"; else cache="cold"; fi
echo "compilation caches: $cache" >"$OUT/status.txt"

# ---- Jobs ----------------------------------------------------------------------------------
# run_job NAME BOX_S COMMAND...: runs COMMAND under `timeout`, at most the budget left.
run_job() {
  local name=$1 box=$2 left rc
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

# step MODEL BOX_S [EXTRA ARGS...]
step() {
  local model=$1 box=$2
  shift 2
  run_job "step_$model" "$box" "$PY" scripts/benchmark.py step --torch --models "$model" \
    --batch 256 --img 224 --dtype bfloat16 --out "$OUT/step_$model.json" "$@"
}

main=(--steps 20 --windows 3 --profile "$OUT/profiles" --profile-steps 5)
step resnet50 150 "${main[@]}"
step efficientnet_b0 200 "${main[@]}"
step vit_b_16 130 "${main[@]}"
for model in resnet101 densenet121 vit_l_16; do
  step "$model" 150 --steps 10 --windows 2
done
run_job e2e 150 "$PY" scripts/benchmark.py e2e --model resnet50 --images 2048 --workers 16 \
  --steps 20 --out "$OUT/e2e.json"

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
        ops = (row["dermjax"].get("profile") or {}).get("top_ops") or []
        for op in ops[:5]:
            print(f"  {row['model']} jax top op: {op['share']:.1%} {op['ms']} ms {op['op'][:90]}")
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
