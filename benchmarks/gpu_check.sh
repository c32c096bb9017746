#!/usr/bin/env bash
# shellcheck disable=SC2329  # the part_* functions run through `bash -c` under timeout
# Everything the project claims about a GPU, measured in one shot on a borrowed H100/H200 machine
# (no internet; torch and triton as installed there; xformers only if carried as wheels in .whl/).
#
#   benchmarks/gpu_check.sh [OUT_DIR]               # from the repo root; OUT_DIR, else $OUT, else ./gpu_check_out
#   GPU_CHECK_BUDGET=470 benchmarks/gpu_check.sh    # total seconds (default 470); it stops cleanly there
#   GPU_CHECK_DRY=1 benchmarks/gpu_check.sh /tmp/x  # show each part's commands without running them
#
# The parts, in order, each under `timeout` with its own budget, cut to what is left of the total
# (budgets from a run on an H200, 2026-11-28: see benchmarks/RESULTS.md):
#   wheels       .whl/*.whl into /tmp/site (pip --no-index), then PYTHONPATH and the CUDA 12 runtime's lib
#   env          nvidia-smi, versions, `python -m xformers.info` when present    -> env.txt
#   gpu_tests    pytest -m gpu
#   attn_bench   benchmarks/attn_bench.py --quick                                -> attn_bench.json
#   train_bench  benchmarks/train_bench.py, default model, batch 128: every eager switch of both
#                stages (compiled rows left out), as far as its budget goes         -> train_bench.json
#   profile      train_bench.py --profile, compile off, stage 2 at per-GPU batch 128 and 1024 and
#                stage 1 at 256: the update eager (perf.cuda_graph = false) and as one CUDA graph
#                (wall ms, kernels, GPU-busy ms per step), beside benchmarks/step_trace.py's
#                prediction of the same update                                   -> profile.json
#   train_bench_all  stage 2 "all" (torch.compile and the CUDA graph; the first step is the compile
#                time) at batch 1024, then baseline and "all" at 128             -> train_bench_all.json
#   data         the small grid of the bundled data (python -m encdiff.data.synth --grid small)
#   train        train.py, the default recipe less torch.compile, 60 + 60 steps, on that data (the CUDA
#                graph, the live metrics every 30 steps)
#   evaluate     evaluate.py --quick on that run                                 -> metrics.json
# All output also goes to log.txt; the summary table comes last (and goes to summary.md). At most 8
# files land in OUT (what a borrowed machine sends back); data, runs and per-part logs stay in
# $GPU_CHECK_WORK (default /tmp/gpu_check_work), the training logs too. Exit status 0 when every
# part passed.
#
# A budget over 470 s stretches every part's share in proportion; a smaller one cuts the last parts.
# More knobs: PYTHON (default python3); GPU_CHECK_WHEELS (the wheels folder, default .whl);
# GPU_CHECK_TRAIN_ARGS, GPU_CHECK_BENCH_ARGS (extra arguments
# for train.py and train_bench.py); GPU_CHECK_DRY_SLEEP (seconds each command sleeps in a dry run, to
# rehearse the time budget); GPU_CHECK_ALLOW_CPU=1 (run the GPU parts without CUDA: a rehearsal of
# the real commands, e.g. with GPU_CHECK_TRAIN_ARGS="--config configs/smoke.toml --vqvae.steps=4
# --encdiff.steps=4" and GPU_CHECK_BENCH_ARGS="--batch 4 --steps 1 --warmup 1").
set -uo pipefail

OUT_DIR="${1:-${OUT:-gpu_check_out}}"  # a folder given wins over the environment
BUDGET="${GPU_CHECK_BUDGET:-470}"  # under 8 minutes, the grace of a killed part included
export GPU_CHECK_DRY="${GPU_CHECK_DRY:-0}" GPU_CHECK_DRY_SLEEP="${GPU_CHECK_DRY_SLEEP:-0}"
export WORK="${GPU_CHECK_WORK:-/tmp/gpu_check_work}" PY="${PYTHON:-python3}" WHEELS="${GPU_CHECK_WHEELS:-.whl}"
export GPU_CHECK_TRAIN_ARGS="${GPU_CHECK_TRAIN_ARGS:-}" GPU_CHECK_BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:-}" PYTHONUNBUFFERED=1
GRACE=10     # seconds between timeout's TERM and KILL: train.py saves a checkpoint on TERM
RESERVE=15   # seconds kept back for the grace and the summary
MIN_START=5  # a part that would get less than this is not started

for value in "$BUDGET" "$GPU_CHECK_DRY_SLEEP"; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "gpu_check: GPU_CHECK_BUDGET and GPU_CHECK_DRY_SLEEP must be whole seconds, got '$value'" >&2; exit 2; }
done
[[ "$GPU_CHECK_DRY" =~ ^[01]$ ]] || { echo "gpu_check: GPU_CHECK_DRY must be 0 or 1, got '$GPU_CHECK_DRY'" >&2; exit 2; }
mkdir -p "$OUT_DIR" "$WORK/logs" || { echo "gpu_check: cannot create $OUT_DIR or $WORK" >&2; exit 2; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export OUT_DIR
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2  # the repo root
LOG="$OUT_DIR/log.txt"
: >"$LOG"
# no file of an earlier run may pass for this one's
rm -f "$WORK"/logs/*.log "$OUT_DIR"/{env.txt,summary.md,attn_bench.json,train_bench.json,train_bench_all.json,profile.json,metrics.json}

# ------------------------------------------------------------------------------------------------
# the parts (each runs in its own bash under timeout; `run` shows a command, and runs it unless dry)

run() {
  echo "+ $*"
  if [ "$GPU_CHECK_DRY" = 1 ]; then
    sleep "$GPU_CHECK_DRY_SLEEP"
    return 0
  fi
  "$@"
}

part_env() {
  {
    run date -u
    run uname -a
    run nproc
    if command -v nvidia-smi >/dev/null || [ "$GPU_CHECK_DRY" = 1 ]; then
      run nvidia-smi
      run nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    else
      echo "nvidia-smi: not found"
    fi
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain 2>/dev/null | grep -q . && echo ' (with uncommitted changes)')"
    run "$PY" - <<'EOF'
import importlib, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}")
found = {}
for name in ("triton", "xformers", "numpy", "h5py", "sklearn", "safetensors", "einops", "tqdm", "PIL"):
    try:
        found[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as e:  # a wheel for another CUDA can fail to load: say why
        found[name] = f"missing ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
print(", ".join(f"{k} {v}" for k, v in found.items()))
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"env: {gpu}, torch {torch.__version__}, triton {found['triton']}, xformers {found['xformers'].split(' (')[0]}")
EOF
    if [ "$GPU_CHECK_DRY" = 1 ] || "$PY" -c "import xformers" 2>/dev/null; then
      run "$PY" -m xformers.info
    fi
  } 2>&1 | tee "$OUT_DIR/env.txt"
}

part_wheels() {
  run "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl &&
    echo "installed: $(for f in "$WHEELS"/*.whl; do printf '%s ' "${f##*/}"; done)"
}

part_gpu_tests() {
  run "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
}

part_attn_bench() {
  run "$PY" benchmarks/attn_bench.py --quick --json "$OUT_DIR/attn_bench.json"
}

EAGER_ROWS="baseline,bf16,channels_last,attention auto,attention triton,attention sdpa,attention xformers,fused AdamW,TF32,cached latents,dataset on device,grad checkpointing off,CUDA graph"
export EAGER_ROWS

part_train_bench() {
  # eager rows only: about 4 s each on an H200; its own --budget leaves room for the row in flight
  # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS holds several arguments on purpose
  run "$PY" benchmarks/train_bench.py --quick --stages encdiff,vqvae --batch 128 --warmup 2 --steps 6 \
    --configs "$EAGER_ROWS" --budget $((PART_BUDGET - 10)) --json "$OUT_DIR/train_bench.json" $GPU_CHECK_BENCH_ARGS
}

PROFILES="encdiff:128 encdiff:1024 vqvae:256"  # stage:per-GPU batch, the step budget's settings
export PROFILES

part_profile() {
  # each setting's update eager (perf.cuda_graph = false) and as one CUDA graph, compile off (its
  # cost is train_bench_all's), beside benchmarks/step_trace.py's prediction of the same update;
  # all of it goes into profile.json (at most 8 files come back)
  local spec stage batch mode
  for spec in $PROFILES; do
    stage=${spec%%:*} batch=${spec##*:}
    for mode in eager graph; do
      # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS holds several arguments on purpose
      run "$PY" benchmarks/train_bench.py --profile "$WORK/profile_${stage}_${batch}_$mode" --stages "$stage" \
        --batch "$batch" --warmup 3 --steps 3 --perf.compile=off \
        --perf.cuda_graph="$([ $mode = graph ] && echo true || echo false)" \
        --json "$WORK/profile_${stage}_${batch}_$mode.json" $GPU_CHECK_BENCH_ARGS || return 1
    done
    run "$PY" benchmarks/step_trace.py --stage "$stage" --batch "$batch" --top 5 \
      --json "$WORK/trace_${stage}_${batch}.json" || return 1
  done
  run "$PY" -c '
import json, os, sys
work, report = sys.argv[1], {}
for spec in os.environ["PROFILES"].split():
    stage, batch = spec.split(":")
    files = {"eager": "profile_{}_{}_eager", "graph": "profile_{}_{}_graph", "predicted": "trace_{}_{}"}
    report[spec] = {key: json.load(open(f"{work}/{name.format(stage, batch)}.json")) for key, name in files.items()}
json.dump(report, open(sys.argv[2], "w"), indent=1)' "$WORK" "$OUT_DIR/profile.json"
}

part_train_bench_all() {
  # the headline rows: every switch, torch.compile and the CUDA graph included (the first step is
  # the compile time): stage 2 at per-GPU batch 1024 (the 20,000 img/s target), then at 128 beside
  # its own baseline (the 10x target) with what is left; both tables go into one file
  local t0=$SECONDS
  # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS holds several arguments on purpose
  run "$PY" benchmarks/train_bench.py --quick --stages encdiff --batch 1024 --configs all \
    --json "$WORK/train_bench_all_1024.json" $GPU_CHECK_BENCH_ARGS || return 1
  # shellcheck disable=SC2086
  run "$PY" benchmarks/train_bench.py --quick --stages encdiff --batch 128 --configs "baseline,all" \
    --budget $((PART_BUDGET - (SECONDS - t0) - 120)) --json "$WORK/train_bench_all_128.json" $GPU_CHECK_BENCH_ARGS
  local rc=$?
  run "$PY" -c '
import json, os, sys
work = sys.argv[1]
found = {b: f"{work}/train_bench_all_{b}.json" for b in ("1024", "128")}
json.dump({b: json.load(open(f)) for b, f in found.items() if os.path.exists(f)}, open(sys.argv[2], "w"), indent=1)' \
    "$WORK" "$OUT_DIR/train_bench_all.json"
  return $rc
}

part_data() {
  run "$PY" -m encdiff.data.synth --out "$WORK/synth3d_small.h5" --grid small
}

part_train() {
  run rm -rf "$WORK/run"
  # shellcheck disable=SC2086  # GPU_CHECK_TRAIN_ARGS holds several arguments on purpose
  run "$PY" train.py --config config.toml --data.path="$WORK/synth3d_small.h5" --data.grid=small \
    --run.out_dir="$WORK/run" --vqvae.steps=60 --encdiff.steps=60 --encdiff.warmup_steps=20 --run.log_every=20 \
    --perf.compile=off --eval.every=30 \
    $GPU_CHECK_TRAIN_ARGS
}

part_evaluate() {
  run "$PY" evaluate.py "$WORK/run" --quick --out "$WORK/eval" &&
    run cp "$WORK/eval/metrics.json" "$OUT_DIR/metrics.json"
}

export -f run part_env part_wheels part_gpu_tests part_attn_bench part_train_bench part_profile part_train_bench_all \
  part_data part_train part_evaluate

# ------------------------------------------------------------------------------------------------
# running the parts within the budget

START=$SECONDS
NAMES=() STATUS=() TOOK=() LIMITS=()

record() {  # name status seconds limit
  NAMES+=("$1") STATUS+=("$2") TOOK+=("$3") LIMITS+=("$4")
  echo "=== $1: $2 (${3} s of ${4} s)" | tee -a "$LOG"
}

skip() {  # name reason
  record "$1" "skipped: $2" 0 -
}

part() {  # name nominal-seconds: run part_<name> under timeout, within what is left of the budget
  local name=$1 nominal=$(($2 * (BUDGET > 470 ? BUDGET : 470) / 470))  # a larger budget: every part gets more
  local left=$((BUDGET - (SECONDS - START) - RESERVE))
  local limit=$((nominal < left ? nominal : left))
  if [ "$limit" -lt "$MIN_START" ]; then
    skip "$name" "no time left (budget $BUDGET s)"
    return
  fi
  echo "=== $name (budget $limit s)" | tee -a "$LOG"
  local t0=$SECONDS
  PART_BUDGET=$limit timeout -k "$GRACE" "$limit" bash -c "part_$name" 2>&1 | tee -a "$LOG" | tee "$WORK/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  local status="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="TIMEOUT"
  elif [ "$rc" -ne 0 ]; then
    status="FAIL (exit $rc)"
  fi
  record "$name" "$status" $((SECONDS - t0)) "$limit"
}

status_of() {
  local i
  for i in "${!NAMES[@]}"; do
    [ "${NAMES[$i]}" = "$1" ] && { echo "${STATUS[$i]}"; return; }
  done
  echo "not run"
}

echo "gpu_check: budget $BUDGET s, output $OUT_DIR, work $WORK$([ "$GPU_CHECK_DRY" = 1 ] && echo ', DRY RUN')" | tee -a "$LOG"
# the wheels first, so that env reports the xformers they bring
if [ -d "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  part wheels 15
  if [ "$(status_of wheels)" = ok ] && [ "$GPU_CHECK_DRY" = 0 ]; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    # an xformers wheel built for CUDA 12 loads its runtime from the nvidia-cuda-runtime-cu12 wheel
    if [ -d /tmp/site/nvidia/cuda_runtime/lib ]; then
      export LD_LIBRARY_PATH="/tmp/site/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
  fi
else
  skip wheels "no $WHEELS/*.whl (xformers is tested only when carried as wheels)"
fi
part env 15

GPU_PARTS=(gpu_tests attn_bench train_bench profile train_bench_all data train evaluate)
if [ "$GPU_CHECK_DRY" = 0 ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  for name in "${GPU_PARTS[@]}"; do skip "$name" "no CUDA device ($PY: torch.cuda.is_available() is False)"; done
else
  part gpu_tests 50
  part attn_bench 40
  part train_bench 30
  part profile 80
  part train_bench_all 180
  part data 5
  if [ "$(status_of data)" = ok ]; then part train 35; else skip train "no data (the data part did not pass)"; fi
  # a timed-out train.py still leaves a checkpoint (it saves one on SIGTERM): evaluate that
  if [ "$(status_of train)" = ok ] || compgen -G "$WORK/run/encdiff/ckpt_*.safetensors" >/dev/null; then
    part evaluate 30
  else
    skip evaluate "no EncDiff checkpoint (the train part did not get that far)"
  fi
fi

# ------------------------------------------------------------------------------------------------
# summary, printed last

result_of() {  # one line of what a part found, read from its log and files
  local log="$WORK/logs/$1.log"
  [ -f "$log" ] || return 0
  case $1 in
    env) grep -m1 '^env: ' "$log" | cut -c6- ;;
    wheels) grep '^installed: ' "$log" | tail -n1 ;;
    gpu_tests) grep -E '[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' "$log" | tail -n1 ;;
    attn_bench) grep -E '^target |SOME CHECKS FAILED|all checks passed' "$log" | tail -n1 ;;
    train_bench) grep -cE '^ *(encdiff|vqvae) \| .* img/s' "$log" | sed 's/$/ eager rows measured (the tables are in train_bench.json)/' ;;
    profile) [ -f "$OUT_DIR/profile.json" ] && "$PY" -c '
import json, sys
out = []
for spec, r in json.load(open(sys.argv[1])).items():
    stage = spec.split(":")[0]
    steps = {m: r[m]["profile"][stage]["steps"] for m in ("eager", "graph")}
    ms = {m: sum(x["wall_ms"] for x in s) / len(s) for m, s in steps.items()}
    kernels = sum(x["kernels"] for x in steps["graph"]) / len(steps["graph"])
    predicted = r["predicted"]["totals"]["launches"]
    out.append("{} {:.1f} ms graphed ({:.1f} eager), {:,.0f} kernels (predicted {:,})".format(spec, ms["graph"], ms["eager"], kernels, predicted))
print("; ".join(out))' "$OUT_DIR/profile.json" 2>/dev/null ;;
    train_bench_all) grep -E '^target: ' "$log" | cut -c9- | paste -sd ';' - ;;
    data) grep '^wrote ' "$log" | tail -n1 ;;
    train) [ -f "$WORK/run/encdiff/log.jsonl" ] && "$PY" -c '
import json, sys
r = [json.loads(line) for line in open(sys.argv[1]) if line.strip()][-1]
print("encdiff step {step}: loss {loss:.4f}, {images_per_s:.0f} img/s, peak {peak_mem_mb:.0f} MB".format(**r))' \
      "$WORK/run/encdiff/log.jsonl" 2>/dev/null ;;
    evaluate) [ -f "$OUT_DIR/metrics.json" ] && "$PY" -c '
import json, sys
m = json.load(open(sys.argv[1]))
keys = (("FactorVAE", "factor_vae", "eval_accuracy"), ("DCI", "dci", "disentanglement"), ("MIG", "mig", "discrete_mig"))
print(", ".join(f"{label} {m[a][b]:.3f}" for label, a, b in keys if b in m.get(a, {})) + " (--quick, a short run: a pipeline check)")' \
      "$OUT_DIR/metrics.json" 2>/dev/null ;;
  esac
}

FAILED=0
{
  echo
  echo "## gpu_check summary: $(date -u +%Y-%m-%dT%H:%M:%SZ), budget $BUDGET s, used $((SECONDS - START)) s$([ "$GPU_CHECK_DRY" = 1 ] && echo ', DRY RUN')"
  echo
  echo "| part | status | seconds | limit s | result |"
  echo "|---|---|---:|---:|---|"
  for i in "${!NAMES[@]}"; do
    result="$(result_of "${NAMES[$i]}" | head -n1 | tr '|' '/' | cut -c1-320)"
    echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${TOOK[$i]} | ${LIMITS[$i]} | ${result:--} |"
  done
} >"$OUT_DIR/summary.md"
for i in "${!NAMES[@]}"; do
  case ${STATUS[$i]} in
    ok | "skipped: no $WHEELS/"*) ;;
    *) FAILED=1 ;;
  esac
done
tee -a "$LOG" <"$OUT_DIR/summary.md"
exit $FAILED
