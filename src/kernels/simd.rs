//! The vector instruction set the kernels run on, chosen once at run time.
//!
//! Every kernel defined with `simd_kernel!` is compiled three times (AVX-512, AVX2 + FMA, and
//! the baseline target) and dispatches on [`level`]: one relaxed atomic load and a branch per
//! call. The three copies compute bit-identical results: Rust never contracts `a * b + c` into
//! an FMA by itself, and the kernels write `mul_add` where they want one (a correctly rounded
//! library call on the baseline target: slower, same value). Only the speed differs.
//!
//! The level is the best the CPU has, capped at [`DEFAULT_MAX`], unless the environment variable
//! `BNLAB_SIMD` (`baseline`, `avx2` or `avx512`) asks for another. A level the CPU lacks is
//! never run (that would be undefined behaviour): it is lowered to the best one the CPU has,
//! with a warning on stderr. Large products handed to the `gemm` crate follow that crate's own
//! detection, not this level.

use std::sync::atomic::{AtomicU8, Ordering};

/// The AVX-512 mask of the first `k` of 16 lanes (all of them from 16 up): for the masked loads
/// and stores of a last, partial register.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn lanes(k: usize) -> std::arch::x86_64::__mmask16 {
    if k >= 16 {
        !0
    } else {
        (1u16 << k) - 1
    }
}
use std::sync::Once;

/// A vector instruction set the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// The compilation target's baseline (SSE2 on x86-64): no FMA instructions.
    Baseline,
    /// AVX2 and FMA: 8 lanes of f32.
    Avx2,
    /// AVX-512 (F, VL, BW, DQ) with AVX2 and FMA: 16 lanes of f32.
    Avx512,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 3] = [Level::Baseline, Level::Avx2, Level::Avx512];

    /// The name `BNLAB_SIMD` takes: `baseline`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    /// The level of a name `BNLAB_SIMD` takes (case and surrounding spaces ignored).
    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run the level's instructions.
    pub fn supported(self) -> bool {
        self <= detected()
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The highest level chosen without `BNLAB_SIMD`. AVX-512 measured faster than AVX2 on this
/// project's benchmark machine (see BENCHMARKS.md, "Peak arithmetic rate of this machine").
pub const DEFAULT_MAX: Level = Level::Avx512;

/// The environment variable that overrides the level.
pub const ENV: &str = "BNLAB_SIMD";

/// The best level this CPU supports (detected once; the standard library caches it).
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        if avx2
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
        {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// What `BNLAB_SIMD` asks for: `Ok(None)` when unset or empty, an error naming the accepted
/// values when it holds something else. Whether the CPU has the level is not checked here.
pub fn requested() -> Result<Option<Level>, String> {
    match std::env::var(ENV) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Level::parse(&v)
            .map(Some)
            .ok_or_else(|| format!("'{v}' is not one of baseline, avx2, avx512")),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err("not one of baseline, avx2, avx512".to_string())
        }
    }
}

/// `want` lowered to what the CPU supports, with a warning on stderr when lowered.
fn clamp(want: Level, why: &str) -> Level {
    let best = detected();
    if want > best {
        eprintln!("warning: {why} asks for {want}, which this CPU lacks; the kernels use {best}");
        best
    } else {
        want
    }
}

const UNSET: u8 = u8::MAX;
static LEVEL: AtomicU8 = AtomicU8::new(UNSET);
static INIT: Once = Once::new();

fn encode(l: Level) -> u8 {
    l as u8
}

#[inline(always)]
fn decode(v: u8) -> Level {
    match v {
        2 => Level::Avx512,
        1 => Level::Avx2,
        _ => Level::Baseline,
    }
}

#[cold]
#[inline(never)]
fn init() -> Level {
    INIT.call_once(|| {
        let l = match requested() {
            Ok(Some(want)) => clamp(want, &format!("${ENV}={}", want.name())),
            Ok(None) => detected().min(DEFAULT_MAX),
            Err(e) => {
                let l = detected().min(DEFAULT_MAX);
                eprintln!("warning: ${ENV}: {e}; the kernels use {l}");
                l
            }
        };
        LEVEL.store(encode(l), Ordering::Relaxed);
    });
    decode(LEVEL.load(Ordering::Relaxed))
}

/// The level the kernels run on now. The first call reads `BNLAB_SIMD` and detects the CPU;
/// later calls are one relaxed atomic load.
#[inline(always)]
pub fn level() -> Level {
    let v = LEVEL.load(Ordering::Relaxed);
    if v == UNSET {
        return init();
    }
    decode(v)
}

/// Sets the level for the whole process and returns the previous one: for tests and
/// benchmarks that compare levels (results are identical at every level, so a run never needs
/// it). A level the CPU lacks is lowered to the best it has, with a warning on stderr. Kernels
/// already running on other threads finish on the level they started with.
pub fn force(want: Level) -> Level {
    let prev = level();
    let l = clamp(want, "simd::force");
    LEVEL.store(encode(l), Ordering::Relaxed);
    prev
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        for l in Level::ALL {
            assert_eq!(Level::parse(l.name()), Some(l));
            assert_eq!(
                Level::parse(&format!(" {} ", l.name().to_uppercase())),
                Some(l)
            );
        }
        assert_eq!(Level::parse("avx"), None);
        assert_eq!(Level::parse("sse9"), None);
        assert_eq!(Level::parse(""), None);
    }

    #[test]
    fn baseline_is_always_supported_and_detection_is_consistent() {
        assert!(Level::Baseline.supported());
        assert!(detected().supported());
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512dq")
                && std::is_x86_feature_detected!("fma");
            assert_eq!(Level::Avx512.supported(), avx512);
        }
    }
}
