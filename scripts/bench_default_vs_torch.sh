#!/usr/bin/env bash
# The speed issue's measurement: bnlab with its default flags (what a user gets: every core, the
# widest SIMD level) against the PyTorch peers on 2 threads, alternated in one sitting, for
# mlp-fig1-bn and mlp-fig1 (batch 60, MNIST), inception-mini-bn (batch 32) and resnet20-bn
# (batch 128, Fashion-MNIST). For every run it also records the host's steal time (the
# `steal` column of /proc/stat: time this machine's virtual CPUs were ready but not running),
# to tell a slow run caused by the host from one caused by bnlab. Prints every run, then
# medians, ratios, GFLOP/s and the share of the machine's peak.
#
# Usage: scripts/bench_default_vs_torch.sh [ROUNDS] [NETS]   (defaults 5 and "mlp-bn mlp inc res")
# Needs a PyTorch virtual environment (not part of the project):
#   python3 -m venv /tmp/peer && /tmp/peer/bin/pip install -q torch numpy safetensors
# PEER_PYTHON (default /tmp/peer/bin/python), MNIST_DIR (default ../shared/datasets/mnist),
# FASHION_DIR (default /usr/share/datasets/fashion-mnist), PEAK_GFLOPS (the machine's peak, from
# `cargo run --release --example peak_flops`; default 231).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
nets=${2:-"mlp-bn mlp inc res"}
py=${PEER_PYTHON:-/tmp/peer/bin/python}
mnist=${MNIST_DIR:-../shared/datasets/mnist}
fashion=${FASHION_DIR:-/usr/share/datasets/fashion-mnist}
peak=${PEAK_GFLOPS:-231}
peers=../shared/peers
[ -x "$py" ] || { echo "no PyTorch python at $py (see the header of this script)" >&2; exit 1; }
cargo build --release --quiet
bin=target/release/bnlab
out=$(mktemp)
steal() { awk '/^cpu /{print $9}' /proc/stat; }
hz=$(getconf CLK_TCK)
run() { # label command... ; prints "label steps_per_s steal_s [gflops]"
  local label=$1; shift
  local s0 t0 line rate gf
  s0=$(steal); t0=$(date +%s.%N)
  line=$("$@" 2>/dev/null | tail -1)
  rate=$(sed -n 's/.*steps_per_s[=":]*\([0-9.]*\).*/\1/p' <<<"$line")
  gf=$(sed -n 's/.*"gflops":\([0-9.]*\).*/\1/p' <<<"$line")
  local ds; ds=$(awk -v a="$s0" -v b="$(steal)" -v hz="$hz" 'BEGIN{printf "%.2f", (b-a)/hz}')
  local wall; wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  echo "$label $rate $ds $wall ${gf:-0}" | tee -a "$out"
}
for r in $(seq "$rounds"); do
  for net in $nets; do
    case $net in
      mlp-bn) run "$r mlp-fig1-bn torch" "$py" $peers/torch_fig1.py "$mnist" 5000 0.1 bn 2
              run "$r mlp-fig1-bn bnlab" "$bin" bench --model mlp-fig1-bn --data "$mnist" --steps 5000 --json ;;
      mlp)    run "$r mlp-fig1 torch" "$py" $peers/torch_fig1.py "$mnist" 5000 0.1 plain 2
              run "$r mlp-fig1 bnlab" "$bin" bench --model mlp-fig1 --data "$mnist" --steps 5000 --json ;;
      inc)    run "$r inception-mini-bn torch" "$py" $peers/torch_inception.py "$fashion" 400 bn 2 32
              run "$r inception-mini-bn bnlab" "$bin" bench --model inception-mini-bn --data "$fashion" --steps 400 --batch-size 32 --json ;;
      res)    run "$r resnet20-bn torch" "$py" $peers/torch_resnet.py "$fashion" 30 bn 2 128
              run "$r resnet20-bn bnlab" "$bin" bench --model resnet20-bn --data "$fashion" --steps 30 --batch-size 128 --json ;;
    esac
  done
done
echo
python3 - "$out" "$peak" <<'PY'
import sys, statistics as st
runs, gf = {}, {}
for line in open(sys.argv[1]):
    r, net, who, v, steal, wall, g = line.split()
    runs.setdefault((net, who), []).append(float(v))
    if who == "bnlab":
        gf.setdefault(net, []).append(float(g))
peak = float(sys.argv[2])
print("| net | PyTorch 2 threads | bnlab default | ratio | bnlab GFLOP/s | share of peak |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for net in dict.fromkeys(n for n, _ in runs):
    t, b = st.median(runs[(net, "torch")]), st.median(runs[(net, "bnlab")])
    g = st.median(gf[net])
    print(f"| {net} | {t:.1f} | {b:.1f} | {b/t:.2f}x | {g:.1f} | {100*g/peak:.0f}% |")
PY
rm -f "$out"
