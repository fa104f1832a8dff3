#!/usr/bin/env bash
# Training steps per second of bnlab against the PyTorch peer (../shared/peers/torch_fig1.py),
# run alternately on the same machine in one session, for both Figure 1 nets at batch 60.
# Prints every run, then the medians and the ratios.
#
# Usage: scripts/bench_vs_torch.sh [ROUNDS]   (default 5)
# Needs a PyTorch virtual environment (not part of the project):
#   python3 -m venv /tmp/peer && /tmp/peer/bin/pip install -q torch numpy safetensors
# PEER_PYTHON (default /tmp/peer/bin/python), MNIST_DIR (default ../shared/datasets/mnist).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
py=${PEER_PYTHON:-/tmp/peer/bin/python}
data=${MNIST_DIR:-../shared/datasets/mnist}
peer=../shared/peers/torch_fig1.py
[ -x "$py" ] || { echo "no PyTorch python at $py (see the header of this script)" >&2; exit 1; }
[ -f "$peer" ] || { echo "no peer program at $peer" >&2; exit 1; }
cargo build --release --quiet
bin=target/release/bnlab
out=$(mktemp)
for r in $(seq "$rounds"); do
  for net in plain bn; do
    model=mlp-fig1; [ "$net" = bn ] && model=mlp-fig1-bn
    t=$("$py" "$peer" "$data" 3000 0.1 "$net" 2 | sed -n 's/.*steps_per_s=\([0-9.]*\).*/\1/p')
    echo "round $r $net torch-2t $t" | tee -a "$out"
    for th in 1 2; do
      s=$("$bin" bench --model "$model" --data "$data" --steps 5000 --threads "$th" --json | tail -1 |
          sed -n 's/.*"steps_per_s":\([0-9.]*\).*/\1/p')
      echo "round $r $net bnlab-${th}t $s" | tee -a "$out"
    done
  done
done
echo
python3 - "$out" <<'PY'
import sys, statistics as st
runs = {}
for line in open(sys.argv[1]):
    _, _, net, who, v = line.split()
    runs.setdefault((net, who), []).append(float(v))
print("| net | PyTorch 2 threads | bnlab 1 thread | bnlab 2 threads | ratio 1t | ratio 2t |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for net, name in (("plain", "mlp-fig1"), ("bn", "mlp-fig1-bn")):
    t = st.median(runs[(net, "torch-2t")])
    b1 = st.median(runs[(net, "bnlab-1t")])
    b2 = st.median(runs[(net, "bnlab-2t")])
    print(f"| {name} | {t:.0f} | {b1:.0f} | {b2:.0f} | {b1/t:.2f}x | {b2/t:.2f}x |")
PY
rm -f "$out"
