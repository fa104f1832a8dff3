#!/usr/bin/env bash
# Training steps per second of bnlab against the PyTorch peer (../shared/peers/torch_inception.py),
# run alternately on the same machine in one session: inception-mini-bn (PyTorch variant `bn`)
# and inception-mini (variant `inception`), batch 32. Prints every run, then medians and ratios.
# With NETS=resnet: resnet20-bn and resnet20 against ../shared/peers/torch_resnet.py (variants
# `bn` and `plain`), batch 128.
#
# Usage: scripts/bench_inception_vs_torch.sh [ROUNDS] [STEPS]   (defaults 5 and 600)
# Needs a PyTorch virtual environment (not part of the project):
#   python3 -m venv /tmp/peer && /tmp/peer/bin/pip install -q torch numpy safetensors
# PEER_PYTHON (default /tmp/peer/bin/python), FASHION_DIR (default /usr/share/datasets/fashion-mnist).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
steps=${2:-600}
py=${PEER_PYTHON:-/tmp/peer/bin/python}
data=${FASHION_DIR:-/usr/share/datasets/fashion-mnist}
peer=../shared/peers/torch_inception.py
batch=32
pairs="bn:inception-mini-bn inception:inception-mini"
if [ "${NETS:-inception}" = resnet ]; then
  peer=../shared/peers/torch_resnet.py
  batch=128
  pairs="bn:resnet20-bn plain:resnet20"
fi
[ -x "$py" ] || { echo "no PyTorch python at $py (see the header of this script)" >&2; exit 1; }
[ -f "$peer" ] || { echo "no peer program at $peer" >&2; exit 1; }
cargo build --release --quiet
bin=target/release/bnlab
out=$(mktemp)
for r in $(seq "$rounds"); do
  for pair in $pairs; do
    variant=${pair%%:*}
    model=${pair#*:}
    t=$("$py" "$peer" "$data" "$steps" "$variant" 2 "$batch" | sed -n 's/.*steps_per_s=\([0-9.]*\).*/\1/p')
    echo "round $r $model torch-2t $t" | tee -a "$out"
    for th in 1 2; do
      s=$("$bin" bench --model "$model" --data "$data" --steps "$steps" --batch-size "$batch" \
            --threads "$th" --json | tail -1 | sed -n 's/.*"steps_per_s":\([0-9.]*\).*/\1/p')
      echo "round $r $model bnlab-${th}t $s" | tee -a "$out"
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
for name in dict.fromkeys(net for net, _ in runs):
    t = st.median(runs[(name, "torch-2t")])
    b1 = st.median(runs[(name, "bnlab-1t")])
    b2 = st.median(runs[(name, "bnlab-2t")])
    print(f"| {name} | {t:.1f} | {b1:.1f} | {b2:.1f} | {b1/t:.2f}x | {b2/t:.2f}x |")
PY
rm -f "$out"
