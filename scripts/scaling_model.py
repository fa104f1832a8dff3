#!/usr/bin/env python3
"""The cost model of docs/scaling.md: bytes all-reduced per data-parallel step, compute per
step, and projected step time and efficiency at 8, 64 and 512 processes on 25 and 100 Gb/s
networks. Inputs are the presets' shapes (`bnlab summary`) and the per-example compute time
measured on one core of the 2-core development machine (`scripts/bench_mpi.sh`, 1x1 column).
Prints the Markdown tables of docs/scaling.md.
"""
import math

# name: (parameters, BN channels per layer, multiply-adds per example, s per example on 1 core)
PRESETS = {
    "mlp-fig1-bn": (100_010, [100, 100, 100], 99_400, None),
    "vgg-mini-bn": (24_058, [16, 32, 64], 1_919_872, None),
    "inception-mini-bn": (
        70_058,
        [32, 32, 24, 32, 16, 24, 24, 16, 48, 32, 64, 24, 32, 32, 32],
        6_214_176,
        None,
    ),
    # On Fashion-MNIST (28 x 28 x 1; CIFAR-10 is not reachable here).
    "resnet20-bn": (272_186, [16] * 7 + [32] * 7 + [64] * 7, 31_021_952, None),
}
# Networks: latency alpha (s) per message, inverse bandwidth beta (s per byte).
NETS = {
    "25 Gb/s (Ethernet, TCP)": (10e-6, 8 / 25e9),
    "100 Gb/s (InfiniBand/RoCE)": (2e-6, 8 / 100e9),
}
RANKS = [8, 64, 512]
SLICE = 60  # examples per process (weak scaling: global batch 60 P)


def ring(n, p, alpha, beta):
    """Ring all-reduce of n bytes: reduce-scatter + all-gather."""
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta


def doubling(n, p, alpha, beta):
    """Recursive doubling (what MPI libraries pick for small messages)."""
    return math.ceil(math.log2(p)) * (alpha + n * beta)


def comm(preset, p, alpha, beta, small):
    """Seconds per step: gradients (ring), BN global, BN local, loss + stop flag."""
    params, bn, _, _ = preset
    grads = ring(4 * params, p, alpha, beta)
    bn_global = sum(small(24 * c, p, alpha, beta) + small(16 * c, p, alpha, beta) for c in bn)
    bn_local = sum(small(8 * (2 * c + 1), p, alpha, beta) for c in bn)
    scalars = 2 * doubling(8, p, alpha, beta)
    return grads, bn_global, bn_local, scalars


def main(per_example):
    print("| preset | parameters | BN layers (channels) | gradient bytes / step | BN bytes / step, global | BN all-reduces / step, global (local) | FLOP / example | FLOP / step, 60 examples |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (params, bn, macs, _) in PRESETS.items():
        print(
            f"| {name} | {params:,} | {len(bn)} ({sum(bn)}) | {4 * params:,} | {40 * sum(bn):,} | {2 * len(bn)} ({len(bn)}) | {6 * macs / 1e6:.2f} M | {6 * macs * SLICE / 1e9:.3f} G |"
        )
    for net, (alpha, beta) in NETS.items():
        print(f"\n**{net}** (alpha {alpha * 1e6:g} us, {8 / beta / 1e9:g} Gb/s), 60 examples per process (global batch 60 P); times in ms:\n")
        print("| preset | P | compute | gradients | BN global, doubling | BN global, ring | BN local | step, global | efficiency, global | efficiency, local | B*, doubling | B*, ring |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, preset in PRESETS.items():
            t_ex = per_example[name]
            for p in RANKS:
                g, bn_g, bn_l, sc = comm(preset, p, alpha, beta, doubling)
                _, bn_gr, _, _ = comm(preset, p, alpha, beta, ring)
                compute = t_ex * SLICE
                step_g = compute + g + bn_g + sc
                step_l = compute + g + bn_l + sc
                # The global batch below which BN's reductions take longer than the compute.
                b_d = p * bn_g / t_ex
                b_r = p * bn_gr / t_ex
                print(
                    f"| {name} | {p} | {compute * 1e3:.2f} | {g * 1e3:.3f} | {bn_g * 1e3:.3f} | {bn_gr * 1e3:.2f} | {bn_l * 1e3:.3f} | {step_g * 1e3:.2f} | {compute / step_g:.0%} | {compute / step_l:.0%} | {b_d:,.0f} | {b_r:,.0f} |"
                )


if __name__ == "__main__":
    import sys

    # Seconds per example on one core: from steps/s at batch 60, 1 process x 1 thread.
    rates = dict(a.split("=") for a in sys.argv[1:])
    main({k: 1 / (float(v) * SLICE) for k, v in rates.items()})
