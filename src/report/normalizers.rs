//! The report of `reproduce normalizers`: results.json (no timings, so that a resumed study's
//! is byte-identical), timings.json, metrics.csv, summary.md with the paper's numbers beside
//! ours and the claims checked against the measurements, and the batch-size figure.

use super::fmt_percent;
use crate::experiments::normalizers::{norm_key, Job, NormalizersSetup, RunResult, Study};
use crate::fsutil::write_atomic;
use crate::Result;
use std::fmt::Write as _;
use std::path::Path;

/// Wu & He (2018), Figure 1 / Table 2: ResNet-50 on ImageNet, validation error (%) at 32, 16,
/// 8, 4 and 2 images per device.
const PAPER_BN_ERROR: [f64; 5] = [23.6, 23.7, 24.8, 27.3, 34.7];
const PAPER_GN_ERROR: [f64; 5] = [24.1, 24.2, 24.0, 24.2, 24.1];
const PAPER_BATCHES: [usize; 5] = [32, 16, 8, 4, 2];

/// A claim of the papers, with whether our measurements bear it out.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Claim {
    /// The claim, as the papers make it.
    pub claim: String,
    /// Our numbers.
    pub measured: String,
    /// Whether they bear it out; `None` when a run it needs is missing or diverged.
    pub holds: Option<bool>,
}

/// Everything the report needs.
pub struct NormalizersReport<'a> {
    /// The settings.
    pub setup: &'a NormalizersSetup,
    /// The runs, in `setup.jobs()` order.
    pub jobs: &'a [Job],
    /// Their results (`None`: not run yet, for a partial report).
    pub results: &'a [Option<RunResult>],
}

impl NormalizersReport<'_> {
    fn find(&self, study: Study, norm: &str, batch: usize) -> Option<&RunResult> {
        self.jobs
            .iter()
            .zip(self.results)
            .find(|(j, _)| j.study == study && norm_key(&j.norm) == norm && j.batch_size == batch)
            .and_then(|(_, r)| r.as_ref())
    }

    fn acc(&self, study: Study, norm: &str, batch: usize) -> Option<f64> {
        self.find(study, norm, batch)?.test_accuracy
    }

    fn missing(&self) -> usize {
        self.results.iter().filter(|r| r.is_none()).count()
    }
}

/// Writes results.json, timings.json, metrics.csv, summary.md and (with `plots`) the figure.
pub fn write_normalizers_report(out_dir: &Path, report: &NormalizersReport<'_>) -> Result<()> {
    std::fs::create_dir_all(out_dir).map_err(|e| crate::Error::io(out_dir, e))?;
    let claims = claims(report);
    let json = results_json(report, &claims);
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
    write_atomic(
        &out_dir.join("timings.json"),
        (serde_json::to_string_pretty(&timings).unwrap_or_default() + "\n").as_bytes(),
    )?;
    write_atomic(&out_dir.join("metrics.csv"), metrics_csv(report).as_bytes())?;
    #[cfg(feature = "plots")]
    figure(out_dir, report)?;
    write_atomic(
        &out_dir.join("summary.md"),
        summary_md(report, &claims).as_bytes(),
    )?;
    Ok(())
}

fn results_json(report: &NormalizersReport<'_>, claims: &[Claim]) -> serde_json::Value {
    let mut batch = serde_json::Map::new();
    for n in &report.setup.norms {
        let rows: Vec<serde_json::Value> = report
            .setup
            .batch_sizes
            .iter()
            .map(|&b| {
                let r = report.find(Study::BatchSize, &norm_key(n), b);
                let mut o = serde_json::json!({
                    "batch_size": b,
                    "test_accuracy": r.and_then(|r| r.test_accuracy),
                    "diverged_at": r.and_then(|r| r.diverged_at),
                    "lr": r.map(|r| r.lr),
                    "steps": r.map(|r| r.steps),
                    "missing": r.is_none(),
                });
                if let Some(why) = r.and_then(|r| r.skipped.as_ref()) {
                    o["skipped"] = why.clone().into();
                }
                o
            })
            .collect();
        batch.insert(norm_key(n), rows.into());
    }
    let mut non_iid = serde_json::Map::new();
    for n in &report.setup.non_iid_norms {
        let r = report.find(Study::NonIid, &norm_key(n), report.setup.non_iid_batch);
        let mut o = serde_json::json!({
            "test_accuracy": r.and_then(|r| r.test_accuracy),
            "diverged_at": r.and_then(|r| r.diverged_at),
            "missing": r.is_none(),
        });
        if let Some(why) = r.and_then(|r| r.skipped.as_ref()) {
            o["skipped"] = why.clone().into();
        }
        if let Some(a) = r.and_then(|r| r.test_accuracy_batch_stats) {
            o["test_accuracy_batch_stats"] = a.into();
        }
        non_iid.insert(norm_key(n), o);
    }
    serde_json::json!({
        "setup": report.setup,
        "norm_flags": report.setup.norms.iter().map(|n| (norm_key(n), serde_json::Value::from(n.clone()))).collect::<serde_json::Map<_, _>>(),
        "batch_size": batch,
        "non_iid": non_iid,
        "claims": claims,
        "missing_runs": report.missing(),
    })
}

fn metrics_csv(report: &NormalizersReport<'_>) -> String {
    let mut s = String::from(
        "study,norm,batch_size,lr,steps,test_accuracy,test_accuracy_batch_stats,diverged_at\n",
    );
    let opt = |v: Option<f64>| v.map(|a| format!("{a}")).unwrap_or_default();
    for (j, r) in report.jobs.iter().zip(report.results) {
        let Some(r) = r else { continue };
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{}",
            match j.study {
                Study::BatchSize => "batch_size",
                Study::NonIid => "non_iid",
            },
            norm_key(&j.norm),
            j.batch_size,
            r.lr,
            r.steps,
            opt(r.test_accuracy),
            opt(r.test_accuracy_batch_stats),
            r.diverged_at.map(|d| d.to_string()).unwrap_or_default()
        );
    }
    s
}

#[cfg(feature = "plots")]
fn figure(out_dir: &Path, report: &NormalizersReport<'_>) -> Result<()> {
    let series: Vec<(String, Vec<(f64, f64)>)> = report
        .setup
        .norms
        .iter()
        .map(|n| {
            let pts = report
                .setup
                .batch_sizes
                .iter()
                .filter_map(|&b| {
                    let a = report.acc(Study::BatchSize, &norm_key(n), b)?;
                    Some(((b as f64).log2(), 100.0 * (1.0 - a)))
                })
                .collect();
            (label(n), pts)
        })
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .collect();
    let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let range = (lo.is_finite() && hi.is_finite())
        .then(|| ((lo - 1.0).floor().max(0.0), (hi + 1.0).ceil().min(100.0)));
    super::line_chart(
        &out_dir.join("batch_size"),
        "Fashion-MNIST test error against batch size (Wu & He 2018, Figure 1)",
        "log2 of the batch size (1 = 2 ... 5 = 32)",
        "test error (%)",
        &series,
        range,
    )
}

/// The legend name of a `--norm` value.
fn label(norm: &str) -> String {
    match norm_key(norm).as_str() {
        "bn" => "BN".into(),
        "brn" => "batch renorm".into(),
        "gn" => format!("GN ({} groups)", norm.trim_start_matches("gn:")),
        "ln" => "LN".into(),
        "none" => "no normalization".into(),
        _ => norm.into(),
    }
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn pct(a: Option<f64>) -> String {
    a.map(fmt_percent).unwrap_or_else(|| "—".into())
}

fn err_pct(a: Option<f64>) -> String {
    a.map(|a| format!("{:.2}", 100.0 * (1.0 - a)))
        .unwrap_or_else(|| "—".into())
}

/// The papers' claims checked against the results.
pub fn claims(report: &NormalizersReport<'_>) -> Vec<Claim> {
    let s = report.setup;
    let (big, small) = (
        s.batch_sizes.iter().copied().max().unwrap_or(32),
        s.batch_sizes.iter().copied().min().unwrap_or(2),
    );
    let a = |n: &str, b: usize| report.acc(Study::BatchSize, n, b);
    let spread = |n: &str| -> Option<f64> {
        let v: Option<Vec<f64>> = s.batch_sizes.iter().map(|&b| a(n, b)).collect();
        let v = v?;
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        Some(hi - lo)
    };
    let pp = |x: f64| format!("{:.2} points", 100.0 * x);
    let mut out = Vec::new();
    let both = |x: Option<f64>, y: Option<f64>| x.zip(y);
    out.push(match both(a("bn", big), a("bn", small)) {
        Some((l, sm)) => Claim {
            claim: format!("BN's accuracy falls as the batch shrinks (Wu & He: error 23.6% at 32, 34.7% at 2): lower at {small} than at {big}"),
            measured: format!("BN {} at {big}, {} at {small}", fmt_percent(l), fmt_percent(sm)),
            holds: Some(sm < l),
        },
        None => missing_claim("BN's accuracy falls as the batch shrinks"),
    });
    out.push(match both(spread("gn"), spread("bn")) {
        Some((g, b)) => Claim {
            claim: "GN is insensitive to the batch size (Wu & He: 24.0-24.2% error from 32 to 2): its accuracy varies less across batch sizes than BN's".into(),
            measured: format!("spread across batch sizes: GN {}, BN {}", pp(g), pp(b)),
            holds: Some(g < b),
        },
        None => missing_claim("GN is insensitive to the batch size"),
    });
    out.push(match both(a("gn", small), a("bn", small)) {
        Some((g, b)) => Claim {
            claim: format!(
                "At the smallest batch ({small}) GN beats BN (Wu & He at 2: 24.1% vs 34.7% error)"
            ),
            measured: format!("GN {}, BN {}", fmt_percent(g), fmt_percent(b)),
            holds: Some(g > b),
        },
        None => missing_claim("At the smallest batch GN beats BN"),
    });
    out.push(match both(a("bn", big), a("gn", big)) {
        Some((b, g)) => Claim {
            claim: format!("At a normal batch ({big}) BN is at least as good as GN (Wu & He at 32: 23.6% vs 24.1% error)"),
            measured: format!("BN {}, GN {}", fmt_percent(b), fmt_percent(g)),
            holds: Some(b >= g),
        },
        None => missing_claim("At a normal batch BN is at least as good as GN"),
    });
    out.push(match both(a("bn", big), a("ln", big)) {
        Some((b, l)) => Claim {
            claim: format!(
                "At {big}, layer norm is worse than BN (Wu & He at 32: LN 25.3% vs BN 23.6% error)"
            ),
            measured: format!("LN {}, BN {}", fmt_percent(l), fmt_percent(b)),
            holds: Some(l < b),
        },
        None => missing_claim("At a normal batch, LN is worse than BN"),
    });
    let micro = if s.batch_sizes.contains(&4) { 4 } else { small };
    out.push(match both(a("brn", micro), a("bn", micro)) {
        Some((r, b)) => Claim {
            claim: format!("Batch renorm beats BN on microbatches of {micro} (Ioffe 2017, Inception-v3 at 4: 76.5% vs 74.2% top-1)"),
            measured: format!("batch renorm {}, BN {}", fmt_percent(r), fmt_percent(b)),
            holds: Some(r > b),
        },
        None => missing_claim("Batch renorm beats BN on microbatches"),
    });
    let ni = |n: &str| {
        report
            .find(Study::NonIid, n, s.non_iid_batch)
            .and_then(|r| r.test_accuracy)
    };
    let iid = |n: &str| a(n, s.non_iid_batch);
    let drop = |n: &str| both(iid(n), ni(n)).map(|(i, x)| i - x);
    out.push(match both(drop("bn"), drop("brn")).zip(drop("gn")) {
        Some(((b, r), g)) => Claim {
            claim: format!(
                "Non-i.i.d. batches ({} classes per batch) hurt BN's inference accuracy more than batch renorm's and GN's (Ioffe 2017, section 4.3)",
                s.non_iid_classes
            ),
            measured: format!(
                "drop from i.i.d. batches of {}: BN {}, batch renorm {}, GN {}",
                s.non_iid_batch,
                pp(b),
                pp(r),
                pp(g)
            ),
            holds: Some(b > r && b > g),
        },
        None => missing_claim("Non-i.i.d. batches hurt BN more than batch renorm and GN"),
    });
    let bstats = report
        .find(Study::NonIid, "bn", s.non_iid_batch)
        .and_then(|r| r.test_accuracy_batch_stats);
    out.push(match both(ni("bn"), bstats) {
        Some((run, bat)) => Claim {
            claim: "BN trained on non-i.i.d. batches does better with each test batch's own statistics than with its running statistics (it learned batch-specific statistics)".into(),
            measured: format!("running statistics {}, test-batch statistics {}", fmt_percent(run), fmt_percent(bat)),
            holds: Some(bat > run),
        },
        None => missing_claim("BN does better with test-batch statistics after non-i.i.d. training"),
    });
    out
}

fn missing_claim(claim: &str) -> Claim {
    Claim {
        claim: claim.into(),
        measured: "a run it needs is missing or diverged".into(),
        holds: None,
    }
}

fn summary_md(report: &NormalizersReport<'_>, claims: &[Claim]) -> String {
    let s = report.setup;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Where batch normalization breaks: small and non-i.i.d. batches\n\n\
         `{}` on Fashion-MNIST with its BatchNorms replaced by each normalizer (`--norm`): \
         batch normalization (BN), batch renormalization (Ioffe 2017), group normalization \
         (Wu & He 2018), layer normalization, and none. Every run sees {} training examples; \
         the learning rate is {} at batch {} and scales linearly with the batch size (Goyal et \
         al. 2017), decaying {}x over the run; SGD with momentum {}; seed {}. Test accuracy is \
         on all 10,000 test images with the running statistics (PyTorch's convention, momentum \
         0.1). The papers trained ResNet-50 and Inception-v3 on ImageNet for days: compare the \
         direction of the effects, not their size.\n",
        s.model,
        thousands(s.examples),
        s.base_lr,
        s.base_batch,
        (1.0 / s.lr_decay_over_run).round(),
        s.momentum,
        s.seed
    );
    if report.missing() > 0 {
        let _ = writeln!(
            md,
            "**Partial report: {} of {} runs are missing** (marked —); run the same command \
             again to finish the study.\n",
            report.missing(),
            report.results.len()
        );
    }
    let _ = writeln!(md, "## Batch size (Wu & He 2018, Figure 1)\n");
    if cfg!(feature = "plots") {
        let _ = writeln!(md, "![test error against batch size](batch_size.png)\n");
    } else {
        let _ = writeln!(md, "{}\n", super::NO_FIGURES);
    }
    let _ = write!(md, "| test error (%) |");
    for b in &s.batch_sizes {
        let _ = write!(md, " batch {b} |");
    }
    let _ = write!(md, "\n| --- |");
    for _ in &s.batch_sizes {
        let _ = write!(md, " ---: |");
    }
    let _ = writeln!(md);
    for n in &s.norms {
        let _ = write!(md, "| {} (`--norm {n}`) |", label(n));
        for &b in &s.batch_sizes {
            let r = report.find(Study::BatchSize, &norm_key(n), b);
            let cell = match r {
                Some(RunResult {
                    diverged_at: Some(step),
                    ..
                }) => format!("diverged at step {step}"),
                Some(RunResult {
                    skipped: Some(_), ..
                }) => "skipped¹".to_string(),
                other => err_pct(other.and_then(|r| r.test_accuracy)),
            };
            let _ = write!(md, " {cell} |");
        }
        let _ = writeln!(md);
    }
    // A data-parallel study's runs whose batch could not be split: said, with the reason.
    let skipped: Vec<String> = report
        .jobs
        .iter()
        .zip(report.results)
        .filter_map(|(j, r)| {
            let why = r.as_ref()?.skipped.as_ref()?;
            Some(format!("`{}` ({why})", j.key()))
        })
        .collect();
    if !skipped.is_empty() {
        let _ = writeln!(
            md,
            "\n¹ Not trained in this data-parallel study: {}.",
            skipped.join("; ")
        );
    }
    let paper = |name: &str, v: &[f64]| {
        let mut row = format!("| paper: {name}, ResNet-50 on ImageNet |");
        for &b in &s.batch_sizes {
            match PAPER_BATCHES.iter().position(|&p| p == b) {
                Some(i) => row += &format!(" {} |", v[i]),
                None => row += " — |",
            }
        }
        row
    };
    let _ = writeln!(md, "{}", paper("BN", &PAPER_BN_ERROR));
    let _ = writeln!(md, "{}", paper("GN (32 groups)", &PAPER_GN_ERROR));
    let _ = writeln!(
        md,
        "\nThe paper's other numbers: at 32 images per device, LN 25.3% and IN 28.4% error \
         (Wu & He 2018); batch renorm on microbatches of 4 (Inception-v3, ImageNet): \
         76.5% top-1 against BN's 74.2% (Ioffe 2017).\n"
    );
    let _ = writeln!(
        md,
        "## Non-i.i.d. batches (Ioffe 2017, section 4.3)\n\n\
         Batches of {} that each hold {} classes x {} examples (`--order grouped:{}`); test \
         accuracy with the running statistics, beside the same normalizer's i.i.d. run at batch \
         {} from the table above.\n",
        s.non_iid_batch,
        s.non_iid_classes,
        s.non_iid_batch / s.non_iid_classes,
        s.non_iid_classes,
        s.non_iid_batch
    );
    let _ = writeln!(
        md,
        "| normalizer | non-i.i.d. batches | i.i.d. batches | BN with each test batch's statistics |\n| --- | ---: | ---: | ---: |"
    );
    for n in &s.non_iid_norms {
        let r = report.find(Study::NonIid, &norm_key(n), s.non_iid_batch);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            label(n),
            pct(r.and_then(|r| r.test_accuracy)),
            pct(report.acc(Study::BatchSize, &norm_key(n), s.non_iid_batch)),
            if norm_key(n) == "bn" {
                pct(r.and_then(|r| r.test_accuracy_batch_stats))
            } else {
                "".into()
            }
        );
    }
    let _ = writeln!(
        md,
        "\nIoffe (2017) made batches in which every example shares its class with another \
         (16 pairs in a batch of 32) and found BN's accuracy well below batch renorm's; ours \
         is the harder case of {} classes per batch.\n",
        s.non_iid_classes
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
        "\nEach check is computed from the table values above when the report is written; a \
         \"no\" is what this network, data set and budget show, reported as measured.\n\n\
         Settings: results.json; wall-clock times per run: timings.json."
    );
    md
}
