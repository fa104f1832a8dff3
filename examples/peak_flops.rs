//! This machine's peak f32 arithmetic rate, and what bnlab's `matmul` reaches at each SIMD level.
//! `cargo run --release --example peak_flops [-- REPS]` (REPS timed runs per figure, default 5;
//! each figure printed is their median, and for the peak and the clock also the best run, the
//! least disturbed on a shared machine).
//!
//! Peak: independent FMA chains (12 on ymm for AVX2, as many as fit the 16 registers with the
//! two operands; 16 on zmm for AVX-512, of 32 registers), enough to cover the FMA latency (4
//! cycles) on both of the CPU's FMA pipes, on one thread and on every core at once; an
//! FMA counts as 2 flops. The clock is inferred from a chain of dependent integer adds (one per
//! cycle), timed just before; `/proc/cpuinfo` is printed for comparison.
use bnlab::kernels::matmul::{matmul, Trans};
use bnlab::kernels::simd::{self, Level};
use std::time::Instant;

/// Independent accumulators of the AVX2 loop: 12 of the 16 ymm registers (more would spill).
const CHAINS_AVX2: usize = 12;
/// Independent accumulators of the AVX-512 loop: 16 of the 32 zmm registers.
const CHAINS_AVX512: usize = 16;
/// FMAs per chain per timed run.
const ITERS: u64 = 20_000_000;

fn median(v: Vec<f64>) -> f64 {
    median_best(v).0
}

/// The median and the largest of `v` (on a shared machine the largest rate is the one least
/// disturbed by other processes).
fn median_best(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CHAINS_AVX2, CHAINS_AVX512, ITERS};
    use std::arch::x86_64::*;

    /// `ITERS` rounds of `CHAINS_AVX2` independent 8-lane FMAs; returns a sum so nothing is dropped.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_avx2() -> f32 {
        let m = _mm256_set1_ps(0.999_999);
        let a = _mm256_set1_ps(1e-6);
        let mut acc = [_mm256_set1_ps(1.0); CHAINS_AVX2];
        for (i, v) in acc.iter_mut().enumerate() {
            *v = _mm256_set1_ps(1.0 + i as f32);
        }
        let m = std::hint::black_box(m);
        for _ in 0..ITERS {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, m, a);
            }
        }
        let mut s = _mm256_setzero_ps();
        for v in acc {
            s = _mm256_add_ps(s, v);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }

    /// As `fma_avx2`, 16 lanes wide.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_avx512() -> f32 {
        let m = _mm512_set1_ps(0.999_999);
        let a = _mm512_set1_ps(1e-6);
        let mut acc = [_mm512_set1_ps(1.0); CHAINS_AVX512];
        for (i, v) in acc.iter_mut().enumerate() {
            *v = _mm512_set1_ps(1.0 + i as f32);
        }
        let m = std::hint::black_box(m);
        for _ in 0..ITERS {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, m, a);
            }
        }
        let mut s = _mm512_setzero_ps();
        for v in acc {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    /// `n` x 8 dependent integer adds: about 8n cycles.
    pub fn add_chain(n: u64) -> u64 {
        let mut x = 0u64;
        let mut n = n;
        // SAFETY: plain register arithmetic.
        unsafe {
            std::arch::asm!(
                "2:",
                "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1",
                "add {x}, 1", "add {x}, 1", "add {x}, 1", "add {x}, 1",
                "dec {n}",
                "jnz 2b",
                x = inout(reg) x,
                n = inout(reg) n,
                options(nomem, nostack),
            );
        }
        let _ = n;
        x
    }
}

#[cfg(target_arch = "x86_64")]
/// Dependent adds timed just before each FMA run, on the same thread: 8 x this many cycles.
const CLOCK_ROUNDS: u64 = 10_000_000;

#[cfg(target_arch = "x86_64")]
/// `f` run on `threads` threads at once: the wall time of the slowest, and the mean over the
/// threads of the cycles `f` took, each thread's clock measured just before by a chain of
/// dependent adds (so time the thread lost to other processes counts in neither).
fn timed(threads: usize, f: fn() -> f32) -> (f64, f64) {
    let t = Instant::now();
    let cycles: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    let t0 = Instant::now();
                    std::hint::black_box(x86::add_chain(CLOCK_ROUNDS));
                    let hz = 8.0 * CLOCK_ROUNDS as f64 / t0.elapsed().as_secs_f64();
                    let t1 = Instant::now();
                    std::hint::black_box(f());
                    t1.elapsed().as_secs_f64() * hz
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = t.elapsed().as_secs_f64();
    (secs, cycles.iter().sum::<f64>() / cycles.len() as f64)
}

#[cfg(target_arch = "x86_64")]
/// GFLOP/s of `ITERS` x `chains` x `lanes` FMAs per thread, and flop per cycle per core: prints
/// the medians, and the best rate; returns the median flop/cycle.
fn peak(
    name: &str,
    lanes: usize,
    chains: usize,
    threads: usize,
    reps: usize,
    f: fn() -> f32,
) -> f64 {
    let per_thread = 2.0 * (ITERS as f64) * (chains * lanes) as f64;
    let runs: Vec<(f64, f64)> = (0..reps).map(|_| timed(threads, f)).collect();
    let (g, best) = median_best(
        runs.iter()
            .map(|r| per_thread * threads as f64 / r.0 / 1e9)
            .collect(),
    );
    let per_cycle = median(runs.iter().map(|r| per_thread / r.1).collect());
    println!(
        "peak {name:>7} {threads} thread{}: {g:8.1} GFLOP/s median, {best:.1} best; \
         {per_cycle:.1} flop/cycle/core ({:.2} {lanes}-lane FMA/cycle)",
        if threads == 1 { " " } else { "s" },
        per_cycle / (2.0 * lanes as f64)
    );
    per_cycle
}

fn matmul_rate(m: usize, k: usize, n: usize, trans: Trans, threads: usize, reps: usize) -> f64 {
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| ((i * 31 % 977) as f32 - 488.0) / 500.0)
        .collect();
    let mut c = vec![0f32; m * n];
    let flop = 2.0 * (m * k * n) as f64;
    // Enough calls per timed run to last about 50 ms.
    let calls = ((5e7 / flop) as usize).max(1);
    matmul(&mut c, &a, &b, m, k, n, trans, false, threads);
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..calls {
                    matmul(&mut c, &a, &b, m, k, n, trans, false, threads);
                }
                std::hint::black_box(&c);
                flop * calls as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .collect(),
    )
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("REPS: a whole number"))
        .unwrap_or(5)
        .max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mhz: Vec<String> = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("model name") || l.starts_with("cpu MHz"))
        .take(2)
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .collect();
    println!(
        "CPU: {} ({cores} cores available), /proc/cpuinfo MHz {}; SIMD detected: {}; {reps} runs per figure, medians",
        mhz.first().map_or("?", |s| s.as_str()),
        mhz.get(1).map_or("?", |s| s.as_str()),
        simd::detected()
    );

    #[cfg(target_arch = "x86_64")]
    {
        let n = 200_000_000u64;
        let (ghz_median, ghz) = median_best(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(x86::add_chain(n));
                    8.0 * n as f64 / t.elapsed().as_secs_f64() / 1e9
                })
                .collect(),
        );
        println!(
            "clock inferred from dependent integer adds: {ghz_median:.2} GHz median, {ghz:.2} best"
        );
        let mut widest = None;
        if Level::Avx2.supported() {
            // SAFETY: AVX2 and FMA were detected.
            let f: fn() -> f32 = || unsafe { x86::fma_avx2() };
            for t in [1, cores] {
                let c = peak("avx2", 8, CHAINS_AVX2, t, reps, f);
                widest = Some(("avx2", t, c));
            }
        }
        if Level::Avx512.supported() {
            // SAFETY: AVX-512 F was detected.
            let f: fn() -> f32 = || unsafe { x86::fma_avx512() };
            for t in [1, cores] {
                let c = peak("avx512", 16, CHAINS_AVX512, t, reps, f);
                widest = Some(("avx512", t, c));
            }
        }
        // The widest level's flop/cycle per core (median, every core busy) on every core at the
        // best clock seen.
        if let Some((name, t, c)) = widest {
            println!(
                "peak of this machine: {cores} cores x {c:.1} flop/cycle ({name}, {t} thread(s)) x {ghz:.2} GHz (best clock) = {:.0} GFLOP/s",
                cores as f64 * c * ghz
            );
        }
    }

    println!("\nbnlab matmul, GFLOP/s (2 flops per multiply-add), by SIMD level:");
    let shapes: [(usize, usize, usize, Trans, &str); 6] = [
        (512, 512, 512, Trans::No, "gemm crate"),
        (64, 576, 1024, Trans::No, "gemm crate"),
        (128, 128, 128, Trans::No, "small_gemm"),
        (64, 576, 64, Trans::No, "small_gemm"),
        (64, 1024, 64, Trans::B, "dot_gemm"),
        (512, 512, 512, Trans::B, "dot_gemm"),
    ];
    let levels: Vec<Level> = Level::ALL.into_iter().filter(|l| l.supported()).collect();
    let before = simd::level();
    for (m, k, n, trans, path) in shapes {
        for threads in [1, cores.min(bnlab::kernels::MAX_THREADS)] {
            let mut line = format!("{m:>4}x{k:<4}x{n:<4} {trans:<5?} ({path}), {threads} thr:");
            for &l in &levels {
                simd::force(l);
                line += &format!(" {}={:.1}", l, matmul_rate(m, k, n, trans, threads, reps));
            }
            println!("{line}");
        }
    }
    simd::force(before);
}
