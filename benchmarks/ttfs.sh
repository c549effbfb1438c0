#!/usr/bin/env bash
# Time to first step of the main job with the persistent compilation cache: a first run (empty cache), then the
# same command twice more in new workdirs with the same cache folder. Prints each run's summary.json figures
# (time_to_first_step_s, setup_s, compile_s). Measured, not compile-only: it runs on whatever device JAX finds.
#
#   bash benchmarks/ttfs.sh [OUT_DIR] [DATA_DIR]        # defaults: /tmp/ttfs ../shared/tfds
set -euo pipefail
out=${1:-/tmp/ttfs}
data=${2:-../shared/tfds}
rm -rf "$out"
mkdir -p "$out"
for run in first repeated repeated_again; do
  start=$(date +%s.%N)
  python main.py --config=configs/fashion_mnist.py:epochs=1 --config.data_dir="$data" \
    --config.num_train_steps=20 --config.compilation_cache_dir="$out/cache" --workdir="$out/$run" \
    >"$out/$run.log" 2>&1
  end=$(date +%s.%N)
  python - "$out/$run/summary.json" "$run" "$start" "$end" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
wall = float(sys.argv[4]) - float(sys.argv[3])
compile_s = ", ".join(f"{k} {v:.1f}" for k, v in sorted(s["compile_s"].items()))
print(f"{sys.argv[2]:>15}: time to first step {s['time_to_first_step_s']:.1f} s, set-up {s['setup_s']:.1f} s, "
      f"compile ({compile_s}) s, process {wall:.1f} s")
EOF
done
