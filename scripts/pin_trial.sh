#!/usr/bin/env bash
# The two-thread collapse (BENCHMARKS.md): alternate `bnlab bench` without and with
# BNLAB_PIN=1 (each thread of the team held on its own CPU), ROUNDS pairs, and print steps/s.
# Usage: scripts/pin_trial.sh ROUNDS [MODEL] [STEPS] [DATA]
set -euo pipefail
rounds=${1:-10}
model=${2:-mlp-fig1-bn}
steps=${3:-3000}
data=${4:-../shared/datasets/mnist}
bin=${BNLAB_BIN:-target/release/bnlab}
rate() {
  "$@" bench --model "$model" --data "$data" --steps "$steps" --json 2>/dev/null |
    tail -1 | sed -E 's/.*"steps_per_s":([0-9.]+).*/\1/'
}
echo "round free pinned (steps/s, $model, $(date -u +%H:%M) UTC)"
for r in $(seq 1 "$rounds"); do
  a=$(rate env -u BNLAB_PIN "$bin")
  b=$(rate env BNLAB_PIN=1 "$bin")
  printf '%s %.0f %.0f\n' "$r" "$a" "$b"
done
