#!/usr/bin/env bash
# The GPU accuracy run in one command: main.py trains a CvT on the real Fashion-MNIST with the GPU recipe and the
# on-device input pipeline (no TensorFlow), and the run's summary, curves and metrics come back.
#
#   ../shared/device/stage.sh                      # here, once: the kit and the ArrayRecord data in .device/
#   bash benchmarks/run_gpu_accuracy.sh [OUT_DIR]  # there, from the repository root, with .device carried
#
# OUT_DIR defaults to $OUT, else ./accuracy_out. Writes there: summary.json (final and best test top-1, wall
# time, images/s), curves.png, metrics.jsonl, config.json, train.log and result.md (a README-ready line). About
# 6 minutes on an H100 with the defaults (the run stops itself after MAX_TRAIN_S of training, with its summary).
# Knobs (environment):
#   CONFIG=configs/fashion_mnist.py:variant=cvt_6_32,pipeline=device,batch=256,size=32,epochs=30
#   DATA_DIR=.device/tfds (ArrayRecord fashion_mnist; ../shared/tfds_array_record on this project's CPU machines)
#   MAX_TRAIN_S=300   EXTRA_ARGS='--config.x=y ...'   PYTHON=python3
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-./accuracy_out}}
CONFIG=${CONFIG:-configs/fashion_mnist.py:variant=cvt_6_32,pipeline=device,batch=256,size=32,epochs=30}
DATA_DIR=${DATA_DIR:-.device/tfds}
MAX_TRAIN_S=${MAX_TRAIN_S:-300}
PY=${PYTHON:-python3}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cvt_acc.XXXXXX")
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
START=$SECONDS

if [ -f .device/setup.sh ]; then bash .device/setup.sh > "$WORK/setup.log" 2>&1 || cat "$WORK/setup.log"; fi
if [ ! -d "$DATA_DIR/fashion_mnist" ]; then
  echo "run_gpu_accuracy.sh: no fashion_mnist under DATA_DIR=$DATA_DIR. Run ../shared/device/stage.sh here and carry" \
       ".device, or set DATA_DIR to a TFDS ArrayRecord data_dir." >&2
  exit 2
fi
DATA_DIR=$(cd "$DATA_DIR" && pwd)

$PY main.py --config="$CONFIG" --workdir="$WORK/run" --config.data_dir="$DATA_DIR" --config.download=False \
  --config.max_train_seconds="$MAX_TRAIN_S" "${EXTRA[@]}" 2>&1 | tee "$OUT_DIR/train.log"
status=${PIPESTATUS[0]}
for f in summary.json curves.png metrics.jsonl config.json; do
  [ -f "$WORK/run/$f" ] && cp "$WORK/run/$f" "$OUT_DIR/"
done
if [ -f "$OUT_DIR/summary.json" ]; then
  $PY - "$OUT_DIR/summary.json" "$CONFIG" "$((SECONDS - START))" > "$OUT_DIR/result.md" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
final, best = s.get("final_eval") or {}, s.get("best_eval") or {}
ips = s.get("train_images_per_sec")
print(
    f"{s['model']} on {s['dataset']}, {s['device_kind']}: test top-1 {100 * final.get('accuracy', float('nan')):.2f}% "
    f"final, {100 * best.get('accuracy', float('nan')):.2f}% best, {s['epochs']:.1f} epochs ({s['status']}), "
    f"{s['train_time_s']:.0f} s training, {s['wall_time_s']:.0f} s wall in main.py, {sys.argv[3]} s with set-up, "
    f"{ips:,.0f} train images/s" if ips else "-"
)
print(f"Command: bash benchmarks/run_gpu_accuracy.sh (CONFIG={sys.argv[2]})")
EOF
  cat "$OUT_DIR/result.md"
fi
rm -rf "$WORK"
exit "$status"
