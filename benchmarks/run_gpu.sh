#!/usr/bin/env bash
# The GPU speed benchmark in one command: first the compile report on this GPU (benchmarks/compile_only.py with
# --targets attached: our and the plain program's compile, autotuning, memory and measured images/s), then the
# training loop's own step (JAX/Flax) against the HuggingFace CvT doing the same recipe (torch eager and
# torch.compile) on one GPU, bf16, plus a profile of our steps.
#
#   ../shared/device/stage.sh                      # here, once: the kit (ml_collections, clu, ...) in .device/
#   bash benchmarks/run_gpu.sh [OUT_DIR]           # there, from the repository root, with .device carried
#
# OUT_DIR defaults to $OUT, else ./bench_out. Needs jax (CUDA), flax, optax, torch and transformers, and the
# kit's ml_collections and clu (the step is built from a training config); `.device/setup.sh` installs the kit
# when it is there. Each part has a time budget so that the whole stays under TOTAL_S; what does not fit is
# skipped and says so. Results in OUT_DIR (at most 8 files, as the device tool brings back):
#   summary.md     all tables, ratios, the profile digest, ready to paste into README
#   compile.json   the compile report on this GPU (part C: compile, autotuning, memory, measured img/s)
#   compare.json   every record (images/s, step times, compile times, memory, MFU, profile digests)
#   profile.txt    per-operation device time of our train steps (one table per variant)
#   env.txt        GPU, driver, package versions
#   results.tgz    logs, part JSONs and the Chrome-format traces (open in Perfetto / chrome://tracing)
# Knobs (environment):
#   TOTAL_S=500        overall budget in seconds for the measured parts (start-up and imports included)
#   COMPILE_REPORT=1 CR_S=200  part C and its budget. Sized from the compile-only figures (README "Compile-only
#                      figures": on a 2-core host the H100 program of ours reaches its first step in ~54 s, plain in
#                      ~121 s, 75 s of it its jitted init; the GPU host's 16 cores run LLVM/ptxas in parallel, autotuning adds to it), so both
#                      programs, 10 timed steps each and the autotuning probe fit; what does not fit is cut
#   CR_MODEL=cvt_13 CR_SIZE=224 CR_BATCH=128 CR_RECIPE=configs/imagenet.py:variant=13 CR_PROGRAMS=ours,plain
#   STEPS=10 WARMUP=2  timed / untimed steps per measurement
#   V1=cvt_13@224:128/256,cvt_13_32@32:256/512   part 1 (all torch modes)
#   V2=cvt_21@224:128/256,cvt_w24@224:32/64      part 2 (torch.compile only when time allows)
#   EXTRA_ATTENTION=cudnn   part 3: other JAX attention kernels on V3=cvt_13@224:128/256 ('' to skip)
#   P1_RESERVE=150     seconds of TOTAL_S that part 1 leaves to the later parts
#   SMOKE=0            part 0 (1: on): our step on cvt_tiny@32 (60 s limit), from before part C existed
#   XLA_AUTOTUNE=      e.g. 0: --xla_gpu_autotune_level for our rows (compile time vs kernel choice)
#   TORCH_MODES=eager,compile  JAX_TIMEOUT_S=150 TORCH_TIMEOUT_S=210  DTYPE=bfloat16  FIND_MAX=0  FED=auto
#   PYTHON=python3  EXPECT=gpu (JAX rows not on this platform are errors; '' to allow any, e.g. a CPU dry run)
# CPU dry run (what tests/test_benchmarks.py does):
#   V1=cvt_tiny@32:4/4 V2=cvt_tiny@32:4/4 V3=cvt_tiny@32:4/4 TORCH_MODES=eager DTYPE=float32 EXPECT= \
#     EXTRA_ATTENTION=xla STEPS=2 WARMUP=1 EXTRA_ARGS="--fast-compile --set optimizer=sgd" bash benchmarks/run_gpu.sh /tmp/dry
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-./bench_out}}
TOTAL_S=${TOTAL_S:-500}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
EXTRA_ATTENTION=${EXTRA_ATTENTION-cudnn}
FIND_MAX=${FIND_MAX:-0}
FED=${FED:-auto}
PY=${PYTHON:-python3}
V1=${V1:-cvt_13@224:128/256,cvt_13_32@32:256/512}
V2=${V2-cvt_21@224:128/256,cvt_w24@224:32/64}
V3=${V3:-cvt_13@224:128/256}
TORCH_MODES=${TORCH_MODES:-eager,compile}
DTYPE=${DTYPE:-bfloat16}
JAX_TIMEOUT_S=${JAX_TIMEOUT_S:-}
COMPILE_REPORT=${COMPILE_REPORT:-1}
CR_S=${CR_S:-200}
CR_MODEL=${CR_MODEL:-cvt_13}
CR_SIZE=${CR_SIZE:-224}
CR_BATCH=${CR_BATCH:-128}
CR_RECIPE=${CR_RECIPE:-configs/imagenet.py:variant=13}
CR_PROGRAMS=${CR_PROGRAMS:-ours,plain}
CR_PARTS=${CR_PARTS:-init,train,eval}
SMOKE=${SMOKE:-0}
TORCH_TIMEOUT_S=${TORCH_TIMEOUT_S:-210}
EXPECT=${EXPECT-gpu}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
START=$SECONDS
left() { echo $((TOTAL_S - (SECONDS - START))); }
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cvt_bench.XXXXXX")
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX and torch share the GPU (compare.py sets it too)
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
# JAX_LOG_COMPILES=1: every jit's compile time in the logs (long lines); the [bench] lines time each stage anyway.
export JAX_LOG_COMPILES=${JAX_LOG_COMPILES:-0}
[ -n "${XLA_AUTOTUNE:-}" ] && export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=$XLA_AUTOTUNE"

# ------------------------------------------------------------------ set-up: the kit, the environment
if [ -f .device/setup.sh ]; then bash .device/setup.sh > "$WORK/setup.log" 2>&1 || cat "$WORK/setup.log"; fi
if ! $PY -c "import ml_collections, clu.metrics" 2>/dev/null; then
  echo "run_gpu.sh: ml_collections and clu are missing. On the lent GPU machine run ../shared/device/stage.sh here" \
       "first and carry .device (the script installs it); elsewhere: pip install -r requirements.txt." >&2
  exit 2
fi
{
  echo "# environment"; date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv 2>&1 || true
  $PY - <<'EOF' 2>&1
import importlib
for m in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy", "ml_collections", "clu"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "missing:", e)
import jax
print("jax devices:", jax.devices())
EOF
} > "$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt"

# ------------------------------------------------------------------ C. the compile report on this GPU, first
# Our and the plain program compiled for this device (autotuning included), their memory, and 10 measured train
# steps each: the figures a short window must not lose. Then our train step once more with autotuning off, so
# that autotuning's share of the compile time is known.
if [ "$COMPILE_REPORT" = 1 ]; then
  echo "== part C: compile report on this device ($(left) s left, budget $CR_S s)"
  CR_START=$SECONDS
  timeout "$CR_S" $PY -m benchmarks.compile_only --targets attached --programs "$CR_PROGRAMS" --parts "$CR_PARTS" \
    --model "$CR_MODEL" --image-size "$CR_SIZE" --global-batch "$CR_BATCH" --recipe "$CR_RECIPE" --dtype "$DTYPE" \
    --run-steps "$STEPS" --timeout-s "$((CR_S - 10))" --json "$OUT_DIR/compile.json" --markdown "$WORK/compile.md" \
    --log-dir "$WORK/compile_logs" 2>&1 | tee "$WORK/compile.log"
  CR_LEFT=$((CR_S - (SECONDS - CR_START)))
  if command -v nvidia-smi > /dev/null && [ "$CR_LEFT" -gt 40 ]; then
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" timeout "$CR_LEFT" $PY -m benchmarks.compile_only \
      --targets attached --programs ours --parts train --model "$CR_MODEL" --image-size "$CR_SIZE" \
      --global-batch "$CR_BATCH" --recipe "$CR_RECIPE" --dtype "$DTYPE" --timeout-s "$((CR_LEFT - 5))" \
      --json "$WORK/compile_noautotune.json" > "$WORK/compile_noautotune.log" 2>&1
  fi
fi
# Our rows' limit: three times our measured time to first step (+60 s) when part C measured it, else 240 s.
if [ -z "$JAX_TIMEOUT_S" ]; then
  JAX_TIMEOUT_S=$($PY -c "import json,sys
try:
    r=[x for x in json.load(open(sys.argv[1]))['records'] if x['program']=='ours' and 'error' not in x][0]
    print(min(300, max(120, int(3*r['time_to_first_step_s'])+60)))
except Exception: print(240)" "$OUT_DIR/compile.json" 2>/dev/null || echo 240)
  echo "our rows' time limit: $JAX_TIMEOUT_S s"
fi

COMMON=(--dtype "$DTYPE" --steps "$STEPS" --warmup "$WARMUP" --jax-attention explicit --expect-platform "$EXPECT"
        --jax-timeout-s "$JAX_TIMEOUT_S" --torch-timeout-s "$TORCH_TIMEOUT_S" --profile-dir "$WORK/profile" "${EXTRA[@]}")

# ------------------------------------------------------------------ 0. smoke: does our step run on this GPU, how fast does it compile
if [ "$SMOKE" = 1 ]; then
  echo "== part 0: our step on cvt_tiny@32 ($(left) s left)"
  timeout 60 $PY -m benchmarks.throughput --model cvt_tiny --image-size 32 --train-batch 64 --infer-batch 64 \
    --dtype "$DTYPE" --steps 3 --warmup 1 --json "$WORK/smoke.json" "${EXTRA[@]}" 2>&1 | tee "$WORK/smoke.log" \
    | grep -v "Finished XLA compilation\|Finished tracing\|Finished jaxpr"
  echo "part 0 exit status: ${PIPESTATUS[0]}"
fi

# ------------------------------------------------------------------ 1. the two most-used variants, all modes
# Per variant: our step first (its own child process and time limit), then torch eager and torch.compile.
echo "== part 1: $V1 ($(left) s left)"
$PY -m benchmarks.compare --variants "$V1" "${COMMON[@]}" --torch-modes "$TORCH_MODES" \
  --budget-s "$(( $(left) - ${P1_RESERVE:-150} ))" --json "$WORK/part1.json" --markdown "$WORK/part1.md" 2>&1 | tee "$WORK/part1.log"

# ------------------------------------------------------------------ 2. the larger variants with what is left
if [ -n "$V2" ] && [ "$(left)" -gt 100 ]; then
  MODES=${TORCH_MODES%%,*}
  [ "$(left)" -gt 300 ] && MODES=$TORCH_MODES
  echo "== part 2: $V2, torch $MODES ($(left) s left)"
  $PY -m benchmarks.compare --variants "$V2" "${COMMON[@]}" --torch-modes "$MODES" \
    --budget-s "$(( $(left) - 90 ))" --json "$WORK/part2.json" --markdown "$WORK/part2.md" 2>&1 | tee "$WORK/part2.log"
else
  echo "== part 2 skipped: $(left) s left or V2 empty"
fi

# ------------------------------------------------------------------ 3. other JAX attention kernels
if [ -n "$EXTRA_ATTENTION" ] && [ "$(left)" -gt 60 ]; then
  echo "== part 3: JAX attention $EXTRA_ATTENTION on $V3 ($(left) s left)"
  timeout "$(( $(left) + 20 ))" $PY -m benchmarks.compare --variants "$V3" --dtype "$DTYPE" --steps "$STEPS" \
    --warmup "$WARMUP" --torch-modes "" --jax-attention "$EXTRA_ATTENTION" --expect-platform "$EXPECT" \
    --jax-timeout-s "$(left)" "${EXTRA[@]}" --json "$WORK/part3.json" --quiet 2>&1 | tee "$WORK/part3.log"
else
  echo "== part 3 skipped ($(left) s left or EXTRA_ATTENTION empty)"
fi

# ------------------------------------------------------------------ 4. optional: largest training batch
if [ "$FIND_MAX" = 1 ] && [ "$(left)" -gt 100 ]; then
  echo "== part 4: largest training batch of ${V3%%:*} ($(left) s left)"
  timeout "$(left)" $PY -m benchmarks.compare --variants "$V3" --dtype "$DTYPE" --steps 2 --warmup 1 \
    --torch-modes eager --find-max-batch --max-batch-limit 4096 "${EXTRA[@]}" --json "$WORK/part4.json" --quiet \
    2>&1 | tee "$WORK/part4.log"
fi

# ------------------------------------------------------------------ 5. device-fed ratio (staged data only)
if [ "$FED" != 0 ] && [ -d .device/tfds ] && [ "$(left)" -gt 60 ]; then
  echo "== part 5: device-fed ratio, device pipeline, Fashion-MNIST 32x32, cvt_13_32 ($(left) s left)"
  timeout "$(left)" $PY -m benchmarks.input_pipeline --recipes "" --fed --pipeline device --data-dir .device/tfds \
    --fed-model cvt_13_32 --fed-batch 256 --fed-steps 20 --fed-dtype "$DTYPE" --json "$WORK/fed.json" \
    2>&1 | tee "$WORK/fed.log"
else
  echo "== part 5 skipped (FED=$FED, .device/tfds: $([ -d .device/tfds ] && echo yes || echo no), $(left) s left)"
fi

# ------------------------------------------------------------------ results
$PY -m benchmarks.compare --merge "$WORK"/part[1-4].json --json "$OUT_DIR/compare.json" \
  --markdown "$WORK/tables.md" --quiet
: > "$OUT_DIR/profile.txt"
for t in "$WORK"/profile/*/op_table.txt; do
  [ -f "$t" ] && { echo "=== $(basename "$(dirname "$t")")"; cat "$t"; echo; } >> "$OUT_DIR/profile.txt"
done
{
  KIND=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['meta'].get('device_kind'))" "$OUT_DIR/compare.json" 2>/dev/null)
  echo "## Speed on ${KIND:-?}, $(date -u +%Y-%m-%d)"
  echo
  echo "Command: \`bash benchmarks/run_gpu.sh\` (TOTAL_S=$TOTAL_S STEPS=$STEPS WARMUP=$WARMUP DTYPE=$DTYPE)."
  echo
  if [ -f "$WORK/compile.md" ]; then
    echo "### Compile report on this device (part C)"; echo; cat "$WORK/compile.md"
    $PY -c "import json,sys
a=[x for x in json.load(open(sys.argv[1]))['records'] if x['program']=='ours' and 'train' in x]
b=[x for x in json.load(open(sys.argv[2]))['records'] if 'train' in x]
if a and b: print(f\"\nautotuning of our train step: {a[0]['train']['compile_s']-b[0]['train']['compile_s']:.1f} s (compile {a[0]['train']['compile_s']:.1f} s with it, {b[0]['train']['compile_s']:.1f} s with --xla_gpu_autotune_level=0)\")" "$OUT_DIR/compile.json" "$WORK/compile_noautotune.json" 2>/dev/null
    echo
  fi
  cat "$WORK/tables.md"
  [ -f "$WORK/part4.json" ] && $PY -c "import json,sys
for r in json.load(open(sys.argv[1]))['rows']:
    if 'max_batch_search' in r: print(f\"\nlargest {r['model']}@{r['image_size']} training batch, {r['framework']}/{r['mode']}: {r['max_train_batch']} (tries: {[(t['batch'], t['fits']) for t in r['max_batch_search']['tries']]})\")" "$WORK/part4.json"
  [ -f "$WORK/fed.json" ] && $PY -c "import json,sys; f=json.load(open(sys.argv[1])).get('fed', {}); print(f\"\ndevice-fed ratio ({f.get('pipeline')}, {f.get('model')}, batch {f.get('batch')}): {f.get('ratio')} (real {f.get('real_steps_per_s')} vs synthetic {f.get('synthetic_steps_per_s')} steps/s)\" if 'error' not in f else f\"\ndevice-fed: ERROR {f['error']}\")" "$WORK/fed.json"
  $PY -c "import json,sys
rows=[r for r in json.load(open(sys.argv[1]))['rows'] if r.get('profile') and 'kinds' in r['profile']]
for r in rows:
    p=r['profile']; k=sorted(p['kinds'].items(), key=lambda kv: -kv[1])[:5]
    print(f\"\nprofile {r['model']}@{r['image_size']} {r['mode']}: {p['device_ms_per_step']:.1f} ms of operations per step ({p['source']}); \" + ', '.join(f'{n} {v:.1f} ms' for n, v in k))" "$OUT_DIR/compare.json"
  echo; echo "total wall time: $((SECONDS - START)) s"
} > "$OUT_DIR/summary.md"
# Logs, part JSONs and the Chrome-format traces (not the large xplane.pb files) in one archive.
(cd "$WORK" && find . -name '*.log' -o -name 'part*.json' -o -name 'fed.json' -o -name '*.trace.json.gz' \
   -o -name 'op_table.txt' -o -name 'compile*.json' | tar czf "$OUT_DIR/results.tgz" -T - 2>/dev/null)
if [ "$(stat -c %s "$OUT_DIR/results.tgz" 2>/dev/null || echo 0)" -gt 15000000 ]; then
  (cd "$WORK" && find . -name '*.log' -o -name 'part*.json' -o -name 'fed.json' | tar czf "$OUT_DIR/results.tgz" -T -)
fi
rm -rf "$WORK"
echo; cat "$OUT_DIR/summary.md"
