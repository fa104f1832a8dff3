//! The report of `reproduce precise-bn` (Wu & Johnson 2021, section 3): results.json (no
//! timings, so that a resumed study's is byte-identical), timings.json, metrics.csv (the
//! curves), samples.csv (every draw of the sample-count measurement), summary.md with the
//! paper's claims checked against the measurements, and the figure `precise_bn` (test accuracy
//! over training with each kind of statistics, one panel per learning rate; accuracy against
//! the number of examples of the population statistics).

use super::{fmt_percent, Claim};
use crate::experiments::precise_bn::{EvalPoint, Job, PreciseBnSetup, RunResult};
use crate::fsutil::write_atomic;
use crate::Result;
use std::fmt::Write as _;
use std::path::Path;

/// The sample-count claim's tolerance: within this many accuracy points (fraction 0.005) of
/// the whole training set's population statistics.
pub const NEAR_FULL: f64 = 0.005;

/// Everything the report needs.
pub struct PreciseBnReport<'a> {
    /// The settings.
    pub setup: &'a PreciseBnSetup,
    /// The runs, in `setup.jobs()` order.
    pub jobs: &'a [Job],
    /// Their results (`None`: not finished, for a partial report).
    pub results: &'a [Option<RunResult>],
}

/// Statistics of one run's curve: the gap population - EMA at each evaluation, early (first
/// quarter of the evaluations) and late (last quarter), and how much each curve moves between
/// evaluations.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CurveStats {
    /// Mean of population - EMA (momentum 0.1) over all evaluations (fraction).
    pub gap_mean: f64,
    /// Its standard deviation over the evaluations.
    pub gap_std: f64,
    /// The largest gap.
    pub gap_max: f64,
    /// Mean gap over the first quarter of the evaluations.
    pub gap_early: f64,
    /// Mean gap over the last quarter.
    pub gap_late: f64,
    /// The same for the slow EMA (momentum 0.01).
    pub slow_gap_mean: f64,
    /// Its standard deviation.
    pub slow_gap_std: f64,
    /// Its mean over the first quarter.
    pub slow_gap_early: f64,
    /// Its mean over the last quarter.
    pub slow_gap_late: f64,
    /// Mean |change| of the EMA's accuracy between consecutive evaluations.
    pub ema_jitter: f64,
    /// The same for the slow EMA.
    pub slow_jitter: f64,
    /// The same for population statistics.
    pub population_jitter: f64,
    /// Evaluations in the first (and in the last) quarter.
    pub quarter: usize,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn std_dev(v: &[f64]) -> f64 {
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

fn jitter(v: &[f64]) -> f64 {
    let d: Vec<f64> = v.windows(2).map(|w| (w[1] - w[0]).abs()).collect();
    mean(&d)
}

/// The statistics of a curve; `None` for an empty one.
pub fn curve_stats(curve: &[EvalPoint]) -> Option<CurveStats> {
    if curve.is_empty() {
        return None;
    }
    let gap: Vec<f64> = curve.iter().map(|p| p.population - p.ema).collect();
    let slow: Vec<f64> = curve.iter().map(|p| p.population - p.ema_slow).collect();
    let q = curve.len().div_ceil(4);
    let series = |f: fn(&EvalPoint) -> f64| curve.iter().map(f).collect::<Vec<f64>>();
    Some(CurveStats {
        gap_mean: mean(&gap),
        gap_std: std_dev(&gap),
        gap_max: gap.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        gap_early: mean(&gap[..q]),
        gap_late: mean(&gap[gap.len() - q..]),
        slow_gap_mean: mean(&slow),
        slow_gap_std: std_dev(&slow),
        slow_gap_early: mean(&slow[..q]),
        slow_gap_late: mean(&slow[slow.len() - q..]),
        ema_jitter: jitter(&series(|p| p.ema)),
        slow_jitter: jitter(&series(|p| p.ema_slow)),
        population_jitter: jitter(&series(|p| p.population)),
        quarter: q,
    })
}

/// The smallest sample count from which on every count's mean accuracy over the draws is
/// within [`NEAR_FULL`] of the whole training set's, if any.
pub fn samples_needed(r: &RunResult) -> Option<usize> {
    let full = r.population_full?;
    let near =
        |s: &crate::experiments::precise_bn::SamplePoint| mean(&s.accuracies) >= full - NEAR_FULL;
    let first_far = r.samples.iter().rposition(|s| !near(s));
    match first_far {
        None => r.samples.first().map(|s| s.examples),
        Some(i) => r.samples.get(i + 1).map(|s| s.examples),
    }
}

fn pts(x: f64) -> String {
    format!("{:+.2} points", 100.0 * x)
}

impl PreciseBnReport<'_> {
    fn missing(&self) -> Vec<String> {
        self.jobs
            .iter()
            .zip(self.results)
            .filter(|(_, r)| r.is_none())
            .map(|(j, _)| j.key())
            .collect()
    }

    fn run(&self, name: &str) -> Option<(&Job, &RunResult)> {
        self.jobs
            .iter()
            .zip(self.results)
            .find(|(j, _)| j.name == name)
            .and_then(|(j, r)| Some((j, r.as_ref()?)))
    }

    fn stats(&self, name: &str) -> Option<CurveStats> {
        self.run(name).and_then(|(_, r)| curve_stats(&r.curve))
    }
}

/// Writes results.json, timings.json, metrics.csv, samples.csv, summary.md and (with
/// `plots`) the figures.
pub fn write_precise_bn_report(out_dir: &Path, report: &PreciseBnReport<'_>) -> Result<()> {
    std::fs::create_dir_all(out_dir).map_err(|e| crate::Error::io(out_dir, e))?;
    let claims = claims(report);
    let mut runs = serde_json::Map::new();
    for (j, r) in report.jobs.iter().zip(report.results) {
        let v = match r {
            None => serde_json::json!({ "lr": j.lr, "missing": true }),
            Some(r) => serde_json::json!({
                "lr": r.lr,
                "missing": false,
                "diverged_at": r.diverged_at,
                "curve": r.curve,
                "curve_stats": curve_stats(&r.curve),
                "population_full": r.population_full,
                "samples": r.samples.iter().map(|s| serde_json::json!({
                    "examples": s.examples,
                    "accuracies": s.accuracies,
                    "mean": mean(&s.accuracies),
                    "min": s.accuracies.iter().copied().fold(f64::INFINITY, f64::min),
                    "max": s.accuracies.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                })).collect::<Vec<_>>(),
                "samples_within_half_point": samples_needed(r),
            }),
        };
        runs.insert(j.name.clone(), v);
    }
    let missing = report.missing();
    let json = serde_json::json!({
        "setup": report.setup,
        "runs": runs,
        "claims": claims,
        "partial": !missing.is_empty(),
        "missing_runs": missing,
    });
    write_atomic(
        &out_dir.join("results.json"),
        (serde_json::to_string_pretty(&json).unwrap_or_default() + "\n").as_bytes(),
    )?;
    let timings: serde_json::Map<String, serde_json::Value> = report
        .jobs
        .iter()
        .zip(report.results)
        .filter_map(|(j, r)| Some((j.key(), r.as_ref()?.seconds.into())))
        .collect();
    super::write_timings(out_dir, &timings.into())?;
    let mut csv = String::from("run,lr,step,train_loss,ema,ema_slow,population\n");
    let mut samples = String::from("run,lr,examples,draw,test_accuracy\n");
    for (j, r) in report.jobs.iter().zip(report.results) {
        let Some(r) = r else { continue };
        for p in &r.curve {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{}",
                j.name, r.lr, p.step, p.train_loss, p.ema, p.ema_slow, p.population
            );
        }
        for s in &r.samples {
            for (d, a) in s.accuracies.iter().enumerate() {
                let _ = writeln!(samples, "{},{},{},{d},{a}", j.name, r.lr, s.examples);
            }
        }
    }
    write_atomic(&out_dir.join("metrics.csv"), csv.as_bytes())?;
    write_atomic(&out_dir.join("samples.csv"), samples.as_bytes())?;
    #[cfg(feature = "plots")]
    figures(out_dir, report)?;
    write_atomic(
        &out_dir.join("summary.md"),
        summary_md(report, &claims, &missing).as_bytes(),
    )
}

#[cfg(feature = "plots")]
fn figures(out_dir: &Path, report: &PreciseBnReport<'_>) -> Result<()> {
    let s = report.setup;
    let mut titles = Vec::new();
    let mut curves = Vec::new();
    let mut samples = Vec::new();
    for (j, r) in report.jobs.iter().zip(report.results) {
        let Some(r) = r else { continue };
        let curve = |f: fn(&EvalPoint) -> f64| -> Vec<(f64, f64)> {
            r.curve
                .iter()
                .map(|p| (p.step as f64, 100.0 * f(p)))
                .collect()
        };
        titles.push(format!("{} learning rate ({})", j.name, r.lr));
        curves.push(vec![
            (
                format!("EMA, momentum {}", s.ema_momentum),
                curve(|p| p.ema),
            ),
            (
                format!("EMA, momentum {}", s.slow_ema_momentum),
                curve(|p| p.ema_slow),
            ),
            (
                "population (PreciseBN)".to_string(),
                curve(|p| p.population),
            ),
        ]);
        samples.push((
            format!("lr {}: N samples, mean of {} draws", r.lr, s.draws),
            r.samples
                .iter()
                .map(|p| ((p.examples as f64).log10(), 100.0 * mean(&p.accuracies)))
                .collect::<Vec<_>>(),
        ));
        if let (Some(full), Some(first), Some(last)) =
            (r.population_full, r.samples.first(), r.samples.last())
        {
            samples.push((
                format!("lr {}: the whole training set", r.lr),
                vec![
                    ((first.examples as f64).log10(), 100.0 * full),
                    ((last.examples as f64).log10(), 100.0 * full),
                ],
            ));
        }
    }
    // The earliest EMA points can be near chance; the axis keeps the upper 40 points.
    let hi = curves
        .iter()
        .flatten()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(f64::NEG_INFINITY, f64::max);
    let range = hi.is_finite().then(|| {
        (
            ((hi - 40.0) / 10.0).floor().max(0.0) * 10.0,
            (hi + 1.0).min(100.0).ceil(),
        )
    });
    let mut charts: Vec<super::Chart<'_>> = titles
        .iter()
        .zip(&curves)
        .map(|(t, c)| super::Chart {
            title: t,
            x_label: "training step",
            y_label: "test accuracy (%)",
            series: c,
            y_range: range,
        })
        .collect();
    charts.push(super::Chart {
        title: "final weights: population statistics from N examples",
        x_label: "log10 N",
        y_label: "test accuracy (%)",
        series: &samples,
        y_range: None,
    });
    super::line_charts(&out_dir.join("precise_bn"), &charts)
}

/// The paper's claims checked against the results.
pub fn claims(report: &PreciseBnReport<'_>) -> Vec<Claim> {
    let s = report.setup;
    let (normal, high) = (report.stats("normal"), report.stats("high"));
    let lr = |name: &str| report.run(name).map(|(j, _)| j.lr).unwrap_or(f64::NAN);
    let mut out = Vec::new();
    let missing = |claim: &str| Claim {
        claim: claim.into(),
        measured: "a run it needs is missing or diverged".into(),
        holds: None,
    };
    out.push(match &high {
        Some(h) => Claim {
            claim: format!(
                "At a high learning rate ({}), EMA statistics (momentum {}) evaluate worse than population statistics over training",
                lr("high"),
                s.ema_momentum
            ),
            measured: format!(
                "population - EMA: mean {}, std {} over {} evaluations (largest {})",
                pts(h.gap_mean),
                pts(h.gap_std).trim_start_matches('+'),
                report.run("high").map_or(0, |(_, r)| r.curve.len()),
                pts(h.gap_max)
            ),
            holds: Some(h.gap_mean > 0.0),
        },
        None => missing("At a high learning rate, EMA evaluates worse than population statistics"),
    });
    out.push(match (&normal, &high) {
        (Some(n), Some(h)) => Claim {
            claim: "The EMA's deficit is larger (and varies more) at the high learning rate than at the normal one".into(),
            measured: format!(
                "mean gap {} at lr {} against {} at lr {}; std {} against {}",
                pts(h.gap_mean),
                lr("high"),
                pts(n.gap_mean),
                lr("normal"),
                pts(h.gap_std).trim_start_matches('+'),
                pts(n.gap_std).trim_start_matches('+'),
            ),
            holds: Some(h.gap_mean > n.gap_mean && h.gap_std > n.gap_std),
        },
        _ => missing("The EMA's deficit is larger at the high learning rate"),
    });
    out.push(match (&normal, &high) {
        (Some(n), Some(h)) => Claim {
            claim: format!(
                "EMA evaluation is unstable early in training: its deficit (momentum {}) is larger in the first quarter of the evaluations than in the last",
                s.ema_momentum
            ),
            measured: format!(
                "lr {}: {} early, {} late; lr {}: {} early, {} late",
                lr("normal"),
                pts(n.gap_early),
                pts(n.gap_late),
                lr("high"),
                pts(h.gap_early),
                pts(h.gap_late)
            ),
            holds: Some(n.gap_early > n.gap_late && h.gap_early > h.gap_late),
        },
        _ => missing("EMA evaluation is unstable early in training"),
    });
    out.push(match (&normal, &high) {
        (Some(n), Some(h)) => Claim {
            claim: "Population statistics are stable: their accuracy moves less from one evaluation to the next than the EMA's".into(),
            measured: format!(
                "mean |change| between evaluations, population / EMA {} / EMA {}: lr {}: {:.2} / {:.2} / {:.2} points; lr {}: {:.2} / {:.2} / {:.2} points",
                s.ema_momentum,
                s.slow_ema_momentum,
                lr("normal"),
                100.0 * n.population_jitter,
                100.0 * n.ema_jitter,
                100.0 * n.slow_jitter,
                lr("high"),
                100.0 * h.population_jitter,
                100.0 * h.ema_jitter,
                100.0 * h.slow_jitter
            ),
            holds: Some(
                n.population_jitter < n.ema_jitter.min(n.slow_jitter)
                    && h.population_jitter < h.ema_jitter.min(h.slow_jitter),
            ),
        },
        _ => missing("Population statistics are stable"),
    });
    out.push(match (&normal, &high) {
        (Some(n), Some(h)) => Claim {
            claim: format!(
                "A slower EMA (momentum {}) lags the weights: early in training its deficit exceeds that of momentum {}",
                s.slow_ema_momentum, s.ema_momentum
            ),
            measured: format!(
                "first-quarter deficit, EMA {} / EMA {}: lr {}: {} / {}; lr {}: {} / {}",
                s.slow_ema_momentum,
                s.ema_momentum,
                lr("normal"),
                pts(n.slow_gap_early),
                pts(n.gap_early),
                lr("high"),
                pts(h.slow_gap_early),
                pts(h.gap_early)
            ),
            holds: Some(n.slow_gap_early > n.gap_early && h.slow_gap_early > h.gap_early),
        },
        _ => missing("A slower EMA lags the weights early in training"),
    });
    let needed: Vec<(f64, Option<usize>, Option<usize>)> = ["normal", "high"]
        .iter()
        .filter_map(|n| report.run(n))
        .filter(|(_, r)| r.population_full.is_some())
        .map(|(j, r)| {
            (
                j.lr,
                samples_needed(r),
                r.samples.first().map(|p| p.examples),
            )
        })
        .collect();
    if needed.len() == 2 {
        out.push(Claim {
            claim: format!(
                "About 10^3 to 10^4 training examples give population statistics within {:.1} points of the whole training set's: the smallest N from which every N (mean of the draws) is that close is at most 16,384",
                100.0 * NEAR_FULL
            ),
            measured: needed
                .iter()
                .map(|(lr, n, _)| {
                    format!(
                        "lr {lr}: {}",
                        n.map_or_else(|| "never within".to_string(), |n| format!("{n} examples"))
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            holds: Some(needed.iter().all(|(_, n, _)| n.is_some_and(|n| n <= 16_384))),
        });
        let few: Vec<(f64, usize, f64, f64)> = ["normal", "high"]
            .iter()
            .filter_map(|n| report.run(n))
            .filter_map(|(j, r)| {
                let p = r.samples.first()?;
                Some((j.lr, p.examples, mean(&p.accuracies), r.population_full?))
            })
            .collect();
        out.push(Claim {
            claim: format!(
                "Too few samples are not enough: with the fewest ({}) the accuracy is more than {:.1} points below",
                few.first().map_or(0, |f| f.1),
                100.0 * NEAR_FULL
            ),
            measured: few
                .iter()
                .map(|(lr, _, a, full)| {
                    format!("lr {lr}: {} against {}", fmt_percent(*a), fmt_percent(*full))
                })
                .collect::<Vec<_>>()
                .join("; "),
            holds: Some(few.iter().all(|(_, _, a, full)| *a < full - NEAR_FULL)),
        });
    } else {
        out.push(missing("About 10^3 to 10^4 samples suffice"));
        out.push(missing("Too few samples are not enough"));
    }
    out
}

fn summary_md(report: &PreciseBnReport<'_>, claims: &[Claim], missing: &[String]) -> String {
    let s = report.setup;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# The statistics BN uses at inference: EMA against population statistics\n\n\
         Wu & Johnson 2021, \"Rethinking 'Batch' in BatchNorm\", section 3. `{}` on \
         Fashion-MNIST, SGD with momentum {} and weight decay {}, batches of {}, {} steps, \
         the learning rate decaying {}x over the run, at a normal and a high learning rate ({}); seed {}. Every \
         {} steps the first {} test images are evaluated with (1) the network's running \
         statistics, an EMA of momentum {} (PyTorch's default), (2) a second EMA of momentum \
         {} kept from the same mini-batch statistics, and (3) population statistics of the \
         current weights (Algorithm 2, which the paper calls PreciseBN) over the first {} \
         training examples in batches of {}. After training, population statistics from N \
         random training examples ({} draws per N) and from all of them. The paper trained \
         ResNet-50 on ImageNet: compare the direction of the effects, not their size.\n",
        s.model,
        s.momentum,
        s.weight_decay,
        s.batch_size,
        s.steps,
        (1.0 / s.lr_decay_over_run).round(),
        s.lrs
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(" and "),
        s.seed,
        s.eval_every,
        s.test_examples,
        s.ema_momentum,
        s.slow_ema_momentum,
        s.population_examples,
        s.batch_size,
        s.draws
    );
    if !missing.is_empty() {
        let _ = writeln!(
            md,
            "**Partial report: {} of {} runs are missing** ({}); resume the study to finish it.\n",
            missing.len(),
            report.results.len(),
            missing.join(", ")
        );
    }
    let _ = writeln!(md, "## Over training\n");
    if cfg!(feature = "plots") {
        let _ = writeln!(
            md,
            "![test accuracy over training, and against N](precise_bn.png)\n"
        );
    } else {
        let _ = writeln!(md, "{}\n", super::NO_FIGURES);
    }
    let _ = writeln!(
        md,
        "| learning rate | final: EMA {} | EMA {} | population | mean gap population - EMA {} (std) | early / late | mean gap - EMA {} (std) | early / late |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        s.ema_momentum, s.slow_ema_momentum, s.ema_momentum, s.slow_ema_momentum
    );
    for (j, r) in report.jobs.iter().zip(report.results) {
        let row = match r {
            None => format!("| {} | missing | | | | | | |", j.lr),
            Some(r) if r.diverged_at.is_some() => format!(
                "| {} | diverged at step {} | | | | | | |",
                j.lr,
                r.diverged_at.unwrap_or_default()
            ),
            Some(r) => match (r.curve.last(), curve_stats(&r.curve)) {
                (Some(p), Some(c)) => format!(
                    "| {} ({}) | {} | {} | {} | {} ({:.2}) | {} / {} | {} ({:.2}) | {} / {} |",
                    j.lr,
                    j.name,
                    fmt_percent(p.ema),
                    fmt_percent(p.ema_slow),
                    fmt_percent(p.population),
                    pts(c.gap_mean),
                    100.0 * c.gap_std,
                    pts(c.gap_early),
                    pts(c.gap_late),
                    pts(c.slow_gap_mean),
                    100.0 * c.slow_gap_std,
                    pts(c.slow_gap_early),
                    pts(c.slow_gap_late),
                ),
                _ => format!("| {} | no evaluation | | | | | | |", j.lr),
            },
        };
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(
        md,
        "\nEarly / late: the mean over the first / last quarter of the evaluations. Every \
         evaluation is in metrics.csv.\n\n## How many samples the population statistics need\n"
    );
    if cfg!(feature = "plots") {
        let _ = writeln!(md, "Right panel of the figure above.\n");
    }
    let counts: Vec<usize> = s.sample_counts.clone();
    let _ = write!(md, "| learning rate |");
    for n in &counts {
        let _ = write!(md, " N = {n} |");
    }
    let _ = write!(md, " all |\n| --- |");
    for _ in &counts {
        let _ = write!(md, " ---: |");
    }
    let _ = writeln!(md, " ---: |");
    for (j, r) in report.jobs.iter().zip(report.results) {
        let _ = write!(md, "| {} ({}) |", j.lr, j.name);
        for n in &counts {
            let cell = r
                .as_ref()
                .and_then(|r| r.samples.iter().find(|p| p.examples == *n))
                .map(|p| {
                    let lo = p.accuracies.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = p
                        .accuracies
                        .iter()
                        .copied()
                        .fold(f64::NEG_INFINITY, f64::max);
                    format!(
                        "{} ({:.1}-{:.1})",
                        fmt_percent(mean(&p.accuracies)),
                        100.0 * lo,
                        100.0 * hi
                    )
                })
                .unwrap_or_else(|| "—".into());
            let _ = write!(md, " {cell} |");
        }
        let full = r
            .as_ref()
            .and_then(|r| r.population_full)
            .map(fmt_percent)
            .unwrap_or_else(|| "—".into());
        let _ = writeln!(md, " {full} |");
    }
    let _ = writeln!(
        md,
        "\nMean test accuracy over the {} draws (lowest-highest); every draw is in samples.csv. \
         N smaller than a batch of {} is one batch of N.\n",
        s.draws, s.batch_size
    );
    let _ = writeln!(md, "## The claims, checked against these runs\n");
    let _ = writeln!(md, "| claim | measured | holds here |\n| --- | --- | --- |");
    for c in claims {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            c.claim,
            c.measured,
            match c.holds {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            }
        );
    }
    let _ = writeln!(
        md,
        "\nEach check is computed from the results when the report is written; a \"no\" is \
         what this network, data set and budget show, reported as measured.\n\n\
         Settings: results.json; wall-clock times per run: timings.json."
    );
    md
}
