#!/usr/bin/env bash
# The GPU benchmark in one command: ours (JAX/Flax) against the HuggingFace CvT (torch eager and torch.compile)
# on one GPU, bf16, for cvt_13@224, cvt_13_32@32, cvt_21@224 and cvt_w24@224. About 7-8 minutes on an H100.
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]          # from the repository root; OUT_DIR defaults to $OUT, else ./bench_out
#
# Needs jax (CUDA), flax, optax, torch and transformers; no TensorFlow, TFDS, ml_collections or data.
# Writes to OUT_DIR: summary.md (all tables), compare.json (every record: images/s, step times, compile times,
# memory, MFU), and the logs. Each part has a time budget so that the whole stays under TOTAL_S; parts that do not
# fit are skipped (and say so). Knobs (environment):
#   TOTAL_S=450     overall budget in seconds for the measured parts (process start and imports included)
#   STEPS=10 WARMUP=2   timed / untimed steps per measurement
#   EXTRA_ATTENTION=cudnn   extra JAX attention implementations for cvt_13@224 ('' to skip; e.g. 'xla,cudnn')
#   FIND_MAX=0      1: also search the largest training batch of cvt_13@224 (JAX and torch eager; ~2 min more)
#   FED=auto        device-fed ratio with the device pipeline when .device/ is staged (../shared/device/stage.sh)
#   PYTHON=python3
#   V1 / V2 / V3, COMPILE=1, DTYPE=bfloat16: the variants of parts 1-3, torch.compile on/off, compute dtype
#   (a CPU dry run: V1=cvt_tiny@32:4/4 V2=cvt_mini@32:4/4 V3=cvt_tiny@32:4/4 COMPILE=0 DTYPE=float32
#    EXTRA_ATTENTION=xla STEPS=2 WARMUP=1 bash benchmarks/run_gpu.sh /tmp/dry)
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-./bench_out}}
TOTAL_S=${TOTAL_S:-450}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
EXTRA_ATTENTION=${EXTRA_ATTENTION-cudnn}
FIND_MAX=${FIND_MAX:-0}
FED=${FED:-auto}
PY=${PYTHON:-python3}
V1=${V1:-cvt_13@224:128/256,cvt_13_32@32:256/512}
V2=${V2:-cvt_21@224:128/256,cvt_w24@224:32/64}
V3=${V3:-cvt_13@224:128/256}
COMPILE=${COMPILE:-1}
DTYPE=${DTYPE:-bfloat16}
TORCH_ALL=eager,compile
[ "$COMPILE" = 1 ] || TORCH_ALL=eager
mkdir -p "$OUT_DIR"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX and torch share the GPU (compare.py sets it too)
export TF_CPP_MIN_LOG_LEVEL=3
START=$SECONDS
left() { echo $((TOTAL_S - (SECONDS - START))); }

{
  echo "# environment"; date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv 2>&1 || true
  $PY - <<'EOF' 2>&1
import importlib
for m in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:  # noqa: BLE001
        print(m, "missing:", e)
import jax
print("jax devices:", jax.devices())
EOF
} > "$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt"

COMMON=(--dtype "$DTYPE" --steps "$STEPS" --warmup "$WARMUP" --jax-attention explicit --variant-timeout-s 240)

# 1. The two most-used variants first, all modes. A variant starts only while its part's --budget-s lasts, and
#    its child process is stopped a minute after the budget (rows it finished are kept).
echo "== part 1: $V1 ($(left) s left)"
$PY -m benchmarks.compare --variants "$V1" "${COMMON[@]}" \
  --torch-modes "$TORCH_ALL" --budget-s "$(( $(left) - 170 ))" \
  --json "$OUT_DIR/part1.json" --markdown "$OUT_DIR/part1.md" 2>&1 | tee "$OUT_DIR/part1.log"

# 2. The larger variants with what is left (cvt_w24 at a smaller batch); torch.compile only when time allows
#    (it compiles for a minute or two per variant).
if [ "$(left)" -gt 100 ]; then
  MODES=eager
  [ "$(left)" -gt 300 ] && MODES=$TORCH_ALL
  echo "== part 2: $V2, torch $MODES ($(left) s left)"
  $PY -m benchmarks.compare --variants "$V2" "${COMMON[@]}" \
    --torch-modes "$MODES" --budget-s "$(( $(left) - 100 ))" \
    --json "$OUT_DIR/part2.json" --markdown "$OUT_DIR/part2.md" 2>&1 | tee "$OUT_DIR/part2.log"
else
  echo "== part 2 skipped: $(left) s left"
fi

# 3. Other JAX attention kernels on cvt_13@224 (no torch rows; the ratios use part 1's torch rows when merged).
if [ -n "$EXTRA_ATTENTION" ] && [ "$(left)" -gt 75 ]; then
  echo "== part 3: JAX attention $EXTRA_ATTENTION on $V3 ($(left) s left)"
  timeout "$(( $(left) + 30 ))" $PY -m benchmarks.compare --variants "$V3" --dtype "$DTYPE" --steps "$STEPS" \
    --warmup "$WARMUP" --torch-modes "" --jax-attention "$EXTRA_ATTENTION" --json "$OUT_DIR/part3.json" --quiet \
    2>&1 | tee "$OUT_DIR/part3.log"
else
  echo "== part 3 skipped ($(left) s left or EXTRA_ATTENTION empty)"
fi

# 4. Optional: largest training batch (doubling until out of memory).
if [ "$FIND_MAX" = 1 ] && [ "$(left)" -gt 100 ]; then
  echo "== part 4: largest training batch of cvt_13@224 ($(left) s left)"
  timeout "$(left)" $PY -m benchmarks.throughput --model cvt_13 --image-size 224 --train-batch 256 --skip-infer \
    --steps 2 --warmup 1 --find-max-batch --max-batch-limit 4096 --json "$OUT_DIR/maxbatch_jax.json" \
    2>&1 | tee "$OUT_DIR/maxbatch_jax.log"
  timeout "$(left)" $PY -m benchmarks.torch_reference --model cvt_13 --image-size 224 --train-batch 256 --skip-infer \
    --modes eager --steps 2 --warmup 1 --find-max-batch --max-batch-limit 4096 --json "$OUT_DIR/maxbatch_torch.json" \
    2>&1 | tee "$OUT_DIR/maxbatch_torch.log"
fi

# 5. Device-fed ratio with the on-device input pipeline (needs the staged kit: tfds, array_record, ml_collections).
if [ "$FED" != 0 ] && [ -f .device/setup.sh ] && [ -d .device/tfds ] && [ "$(left)" -gt 60 ]; then
  echo "== part 5: device-fed ratio, device pipeline, Fashion-MNIST 32x32, cvt_13_32 ($(left) s left)"
  bash .device/setup.sh > "$OUT_DIR/fed.log" 2>&1 && \
  timeout "$(left)" $PY -m benchmarks.input_pipeline --recipes "" --fed --pipeline device --data-dir .device/tfds \
    --fed-model cvt_13_32 --fed-batch 256 --fed-steps 20 --fed-dtype bfloat16 --json "$OUT_DIR/fed.json" \
    2>&1 | tee -a "$OUT_DIR/fed.log"
else
  echo "== part 5 skipped (FED=$FED, .device staged: $([ -d .device/tfds ] && echo yes || echo no), $(left) s left)"
fi

$PY -m benchmarks.compare --merge "$OUT_DIR/part1.json" "$OUT_DIR/part2.json" "$OUT_DIR/part3.json" \
  --json "$OUT_DIR/compare.json" --markdown "$OUT_DIR/summary.md" --quiet
{
  for f in maxbatch_jax maxbatch_torch; do
    [ -f "$OUT_DIR/$f.json" ] && $PY -c "import json,sys; d=json.load(open(sys.argv[1])); d=d[0] if isinstance(d,list) else d; print(f\"\n{sys.argv[2]}: largest cvt_13@224 training batch that fits: {d.get('max_train_batch')} (tries: {[(t['batch'], t['fits']) for t in d.get('max_batch_search', {}).get('tries', [])]})\")" "$OUT_DIR/$f.json" "$f"
  done
  [ -f "$OUT_DIR/fed.json" ] && $PY -c "import json,sys; f=json.load(open(sys.argv[1])).get('fed', {}); print(f\"\ndevice-fed ratio ({f.get('pipeline')}, {f.get('model')}, batch {f.get('batch')}): {f.get('ratio')} (real {f.get('real_steps_per_s')} vs synthetic {f.get('synthetic_steps_per_s')} steps/s)\" if 'error' not in f else f\"\ndevice-fed: ERROR {f['error']}\")" "$OUT_DIR/fed.json"
  echo; echo "total wall time: $((SECONDS - START)) s"
} >> "$OUT_DIR/summary.md"
echo; cat "$OUT_DIR/summary.md"
