#!/usr/bin/env bash
# Data-parallel speed on one machine: 1 process x 2 threads against 2 processes x 1 thread
# (mpirun, --bn-sync global and local; Open MPI's defaults, and yielding unpinned ranks), and
# 1 process x 1 thread, for the MLP and two conv presets, alternating the configurations
# within each round. Needs a binary built with `--features mpi`.
# Usage: scripts/bench_mpi.sh [ROUNDS]   (prints one TSV line per run, then the medians)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-5}"
bin=target/release/bnlab
mnist="${MNIST:-../shared/datasets/mnist}"
fashion="${FASHION:-/usr/share/datasets/fashion-mnist}"
mpi=(mpirun -n 2 --allow-run-as-root --oversubscribe)
# On a shared, loaded machine: waiting ranks yield the core instead of spinning, unpinned.
yield=(--bind-to none --mca mpi_yield_when_idle 1)
out=$(mktemp)
rate() { python3 -c 'import json,sys; print([json.loads(l) for l in sys.stdin if l.startswith("{")][-1]["steps_per_s"])'; }
for r in $(seq "$rounds"); do
  for spec in "mlp-fig1-bn $mnist 3000" "vgg-mini-bn $fashion 40" "inception-mini-bn $fashion 16"; do
    set -- $spec
    args=(bench --model "$1" --data "$2" --steps "$3" --batch-size 60 --json)
    printf '%s\t%s\t%s\t%s\n' "$r" "$1" "1x2" "$("$bin" "${args[@]}" --threads 2 | rate)" | tee -a "$out"
    printf '%s\t%s\t%s\t%s\n' "$r" "$1" "2x1-global" "$("${mpi[@]}" "$bin" "${args[@]}" --threads 1 --bn-sync global | rate)" | tee -a "$out"
    printf '%s\t%s\t%s\t%s\n' "$r" "$1" "2x1-local" "$("${mpi[@]}" "$bin" "${args[@]}" --threads 1 --bn-sync local | rate)" | tee -a "$out"
    printf '%s\t%s\t%s\t%s\n' "$r" "$1" "2x1-global-yield" "$("${mpi[@]}" "${yield[@]}" "$bin" "${args[@]}" --threads 1 --bn-sync global | rate)" | tee -a "$out"
    printf '%s\t%s\t%s\t%s\n' "$r" "$1" "2x1-local-yield" "$("${mpi[@]}" "${yield[@]}" "$bin" "${args[@]}" --threads 1 --bn-sync local | rate)" | tee -a "$out"
    printf '%s\t%s\t%s\t%s\n' "$r" "$1" "1x1" "$("$bin" "${args[@]}" --threads 1 | rate)" | tee -a "$out"
  done
done
echo "medians (steps/s):"
python3 - "$out" <<'PY'
import sys, statistics, collections
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r, model, conf, v = line.split("\t")
    d[(model, conf)].append(float(v))
for (model, conf), v in sorted(d.items()):
    print(f"{model}\t{conf}\tmedian {statistics.median(v):.2f}\truns {' '.join(f'{x:.2f}' for x in v)}")
PY
rm -f "$out"
