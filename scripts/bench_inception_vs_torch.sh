#!/usr/bin/env bash
# Training steps per second of bnlab against the PyTorch peer (../shared/peers/torch_inception.py),
# run alternately on the same machine in one session: inception-mini-bn (PyTorch variant `bn`)
# and inception-mini (variant `inception`), batch 32. Prints every run, then medians and ratios.
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
[ -x "$py" ] || { echo "no PyTorch python at $py (see the header of this script)" >&2; exit 1; }
[ -f "$peer" ] || { echo "no peer program at $peer" >&2; exit 1; }
cargo build --release --quiet
bin=target/release/bnlab
out=$(mktemp)
for r in $(seq "$rounds"); do
  for variant in bn inception; do
    model=inception-mini-bn; [ "$variant" = inception ] && model=inception-mini
    t=$("$py" "$peer" "$data" "$steps" "$variant" 2 32 | sed -n 's/.*steps_per_s=\([0-9.]*\).*/\1/p')
    echo "round $r $variant torch-2t $t" | tee -a "$out"
    for th in 1 2; do
      s=$("$bin" bench --model "$model" --data "$data" --steps "$steps" --batch-size 32 \
            --threads "$th" --json | tail -1 | sed -n 's/.*"steps_per_s":\([0-9.]*\).*/\1/p')
      echo "round $r $variant bnlab-${th}t $s" | tee -a "$out"
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
for net, name in (("bn", "inception-mini-bn"), ("inception", "inception-mini")):
    t = st.median(runs[(net, "torch-2t")])
    b1 = st.median(runs[(net, "bnlab-1t")])
    b2 = st.median(runs[(net, "bnlab-2t")])
    print(f"| {name} | {t:.1f} | {b1:.1f} | {b2:.1f} | {b1/t:.2f}x | {b2/t:.2f}x |")
PY
rm -f "$out"
