//! Reports: the files a finished experiment leaves behind for people and for other programs.
//!
//! [`write_mnist_report`] turns the measurements of the paper's MNIST experiment (Figure 1 of
//! Ioffe & Szegedy 2015) into five files in one directory:
//!
//! | file | for |
//! | --- | --- |
//! | `metrics.csv` | every evaluation of every net, one row each, for spreadsheets and pandas |
//! | `results.json` | the same curves plus setup and final accuracies, for programs |
//! | `timings.json` | wall-clock training seconds (kept out of results.json: they differ between runs) |
//! | `fig1.svg`, `fig1.png` | the paper's Figure 1: (a) test accuracy, (b)/(c) sigmoid-input percentiles |
//! | `summary.md` | a readable report with our numbers beside the PyTorch reference |
//!
//! [`write_inception_report`] does the same for the section 4.2 study (Figures 2-4, see
//! `inception.rs`): results.json, metrics.csv, summary.md and accuracy figures.
//!
//! Figures need the `plots` feature (on by default). Without it the reports hold every other
//! file, and summary.md says that no figures were drawn.
//!
//! Every file is written atomically ([`write_atomic`]): a crash or a full disk never leaves a
//! half-written report that looks complete. `line_chart` (with `plots`) is the generic
//! accuracy-vs-steps chart for later studies.

#[cfg(feature = "plots")]
mod figure;
mod ics;
mod inception;
mod normalizers;
#[cfg(feature = "plots")]
mod png;
mod precise_bn;
mod summary;

use std::fmt::Write as _;
use std::path::Path;

use crate::{Error, Result};

#[cfg(feature = "plots")]
pub use figure::{line_chart, line_charts, panels_figure, Chart, PanelSpec};
pub use ics::{ics_claims, write_ics_report, IcsReport};
pub use inception::{
    write_inception_report, AccuracyPoint, EnsembleResult, InceptionReport, InceptionVariant,
    SetupRow, SweepRun,
};
pub use normalizers::{
    claims as normalizer_claims, write_normalizers_report, Claim, NormalizersReport,
};
pub use precise_bn::{write_precise_bn_report, PreciseBnReport};

/// One evaluation during training. (JSON writes NaN as `null`; reading takes `null` back as
/// NaN, so a curve survives a study's result file.)
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CurvePoint {
    /// Training steps (mini-batches) done before this evaluation.
    pub step: usize,
    /// Test accuracy as a fraction in 0..1.
    #[serde(deserialize_with = "nan_from_null")]
    pub test_accuracy: f64,
    /// 15th percentile of the input to the probed sigmoid of the last hidden layer.
    #[serde(deserialize_with = "nan_from_null")]
    pub p15: f64,
    /// 50th percentile (median) of the same input.
    #[serde(deserialize_with = "nan_from_null")]
    pub p50: f64,
    /// 85th percentile of the same input.
    #[serde(deserialize_with = "nan_from_null")]
    pub p85: f64,
    /// Training loss around this step (NaN at step 0).
    #[serde(deserialize_with = "nan_from_null")]
    pub train_loss: f64,
}

/// An f64 that serde_json wrote as `null` (NaN or infinite) read back as NaN.
pub fn nan_from_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    use serde::Deserialize;
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A list of f64 that serde_json wrote with `null`s (NaN or infinite) read back with NaNs.
pub fn nans_from_nulls<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<f64>, D::Error> {
    use serde::Deserialize;
    Ok(Vec::<Option<f64>>::deserialize(d)?
        .into_iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}

/// The measurements of one trained net.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VariantRun {
    /// "mlp-fig1" (no BN) or "mlp-fig1-bn".
    pub name: String,
    /// One point per evaluation, ascending step (the first point may be step 0).
    pub curve: Vec<CurvePoint>,
    /// Final test accuracy (fraction 0..1) with running-average BN statistics.
    #[serde(deserialize_with = "nan_from_null")]
    pub final_running: f64,
    /// Final test accuracy with the paper's Algorithm 2 population statistics (plain net: same as running).
    #[serde(deserialize_with = "nan_from_null")]
    pub final_population: f64,
    /// Wall-clock seconds spent training.
    #[serde(deserialize_with = "nan_from_null")]
    pub train_seconds: f64,
}

/// Everything [`write_mnist_report`] needs.
#[derive(Clone, Debug)]
pub struct MnistReport {
    /// Free-form description of the run (flags, seeds, data paths); copied into results.json and summary.md.
    pub setup: serde_json::Value,
    /// The nets, usually "mlp-fig1" and "mlp-fig1-bn".
    pub variants: Vec<VariantRun>,
}

/// Name of the net without batch normalization.
pub const PLAIN_NAME: &str = "mlp-fig1";
/// Name of the net with batch normalization.
pub const BN_NAME: &str = "mlp-fig1-bn";

/// What summary.md says in place of the figures in a build without the `plots` feature.
pub const NO_FIGURES: &str = "No figures were drawn: this build of bnlab lacks the `plots` \
     feature. The numbers are in metrics.csv and results.json.";

/// Writes metrics.csv, results.json, fig1.svg, fig1.png (with the `plots` feature) and
/// summary.md into `out_dir`, creating it if needed.
pub fn write_mnist_report(out_dir: &Path, report: &MnistReport) -> Result<()> {
    validate(out_dir, report)?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    write_atomic(&out_dir.join("metrics.csv"), metrics_csv(report).as_bytes())?;
    let json_path = out_dir.join("results.json");
    let json = serde_json::to_string_pretty(&results_json(report)).map_err(|e| Error::Report {
        path: json_path.clone(),
        msg: e.to_string(),
    })?;
    write_atomic(&json_path, format!("{json}\n").as_bytes())?;
    let train_seconds: serde_json::Map<String, serde_json::Value> = report
        .variants
        .iter()
        .map(|v| (v.name.clone(), v.train_seconds.into()))
        .collect();
    write_timings(
        out_dir,
        &serde_json::json!({ "train_seconds": train_seconds }),
    )?;
    #[cfg(feature = "plots")]
    figure::write_fig1(&out_dir.join("fig1"), report)?;
    write_atomic(
        &out_dir.join("summary.md"),
        summary::summary_md(report).as_bytes(),
    )?;
    Ok(())
}

/// Rejects reports that would produce misleading files: duplicate names (results.json is keyed
/// by name, so one net would silently vanish) and curves whose steps go backwards (the lines in
/// the figure would fold over and "steps to 97%" would be meaningless).
fn validate(out_dir: &Path, report: &MnistReport) -> Result<()> {
    let fail = |msg: String| Error::Report {
        path: out_dir.to_path_buf(),
        msg,
    };
    for (i, v) in report.variants.iter().enumerate() {
        if v.name.is_empty() {
            return Err(fail(format!("variant {i} has an empty name")));
        }
        if v.name.contains([',', '"', '\n', '\r']) {
            // The CSV is written without quoting, so a name must not need it.
            return Err(fail(format!(
                "variant name {:?} contains a comma, quote or newline",
                v.name
            )));
        }
        if report.variants[..i].iter().any(|w| w.name == v.name) {
            return Err(fail(format!("variant {:?} appears twice", v.name)));
        }
        if let Some(w) = v.curve.windows(2).find(|w| w[1].step < w[0].step) {
            return Err(fail(format!(
                "curve of {:?} goes back from step {} to step {}",
                v.name, w[0].step, w[1].step
            )));
        }
    }
    Ok(())
}

/// `variant,step,test_accuracy,...`; floats use Rust's shortest round-trip form so that reading
/// the file back gives exactly the measured values.
fn metrics_csv(report: &MnistReport) -> String {
    let mut s = String::from("variant,step,test_accuracy,p15,p50,p85,train_loss\n");
    for v in &report.variants {
        for p in &v.curve {
            // Writing into a String cannot fail.
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{}",
                v.name, p.step, p.test_accuracy, p.p15, p.p50, p.p85, p.train_loss
            );
        }
    }
    s
}

fn results_json(report: &MnistReport) -> serde_json::Value {
    let variants: serde_json::Map<String, serde_json::Value> = report
        .variants
        .iter()
        .map(|v| {
            (
                v.name.clone(),
                serde_json::json!({
                    "curve": v.curve,
                    "final": { "running": v.final_running, "population": v.final_population },
                }),
            )
        })
        .collect();
    serde_json::json!({ "setup": report.setup, "variants": variants })
}

pub use crate::fsutil::write_atomic;

/// The timings file of a report: wall-clock seconds, which differ between a study left alone
/// and one stopped and resumed, so they stay out of results.json.
pub const TIMINGS_FILE: &str = "timings.json";

/// Write `timings` as [`TIMINGS_FILE`] in `out_dir`.
pub fn write_timings(out_dir: &Path, timings: &serde_json::Value) -> Result<()> {
    let path = out_dir.join(TIMINGS_FILE);
    let text = serde_json::to_string_pretty(timings).map_err(|e| Error::Report {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    write_atomic(&path, format!("{text}\n").as_bytes())
}

/// Mark the report in `out_dir` as partial: results.json gets `"missing_runs"` (the runs that
/// have no result yet) and summary.md a first paragraph naming them. For any study's
/// `--report-only` on a study stopped halfway; nothing changes when `missing` is empty.
pub fn mark_partial(out_dir: &Path, missing: &[String]) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    let json_path = out_dir.join("results.json");
    let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
    let mut json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Report {
        path: json_path.clone(),
        msg: e.to_string(),
    })?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("partial".into(), true.into());
        obj.insert("missing_runs".into(), missing.into());
    }
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::Report {
        path: json_path.clone(),
        msg: e.to_string(),
    })?;
    write_atomic(&json_path, format!("{text}\n").as_bytes())?;
    let md_path = out_dir.join("summary.md");
    let md = std::fs::read_to_string(&md_path).map_err(|e| Error::io(&md_path, e))?;
    let note = format!(
        "> **Partial report**: the study was stopped before these runs finished, so they are \
         missing from every table, figure and check below: {}. Resume the study to complete it.\n\n",
        missing.join(", ")
    );
    write_atomic(&md_path, format!("{note}{md}").as_bytes())
}

/// Percentage with two decimals, as used in summary.md: 0.98123 -> "98.12%".
pub fn fmt_percent(acc: f64) -> String {
    format!("{:.2}%", acc * 100.0)
}

/// Step counts as on the figure axes: 0, 500, 1k, 2.5k, 10k.
pub fn fmt_steps(step: f64) -> String {
    if step.abs() >= 1000.0 {
        let k = step / 1000.0;
        if (k - k.round()).abs() < 1e-9 {
            format!("{}k", k.round() as i64)
        } else {
            format!("{k:.1}k")
        }
    } else {
        format!("{}", step.round() as i64)
    }
}

/// The note at the top of a study's summary run with `--norm` (the setup's `norm`): its "BN"
/// networks use another normalizer.
pub(crate) fn norm_note(setup: &serde_json::Value) -> Option<String> {
    let n = setup.get("norm")?.as_str()?;
    Some(format!(
        "**Run with `--norm {n}`: every BatchNorm of the networks called BN below is replaced by \
         that normalizer** (see docs/models.md); the paper's numbers are for batch normalization."
    ))
}

/// The readable name of a variant, as used in the figure legend and summary.md.
pub fn display_name(name: &str) -> &str {
    match name {
        PLAIN_NAME => "Without BN",
        BN_NAME => "With BN",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The report's files, with the figure exactly when the `plots` feature is on, and a
    /// summary that says so when it is off.
    #[test]
    fn mnist_report_files_with_and_without_plots() {
        let run = |name: &str, acc: f64| VariantRun {
            name: name.into(),
            curve: (0..4)
                .map(|i| CurvePoint {
                    step: i * 500,
                    test_accuracy: acc + 0.01 * i as f64,
                    p15: -1.0,
                    p50: 0.0,
                    p85: 1.0,
                    train_loss: 1.0 / (1 + i) as f64,
                })
                .collect(),
            final_running: acc + 0.03,
            final_population: acc + 0.03,
            train_seconds: 1.0,
        };
        let report = MnistReport {
            setup: serde_json::json!({"steps": 1500}),
            variants: vec![run(PLAIN_NAME, 0.9), run(BN_NAME, 0.95)],
        };
        let t = tempfile::tempdir().unwrap();
        write_mnist_report(t.path(), &report).unwrap();
        for f in ["metrics.csv", "results.json", "summary.md"] {
            assert!(t.path().join(f).is_file(), "{f} missing");
        }
        let plots = cfg!(feature = "plots");
        assert_eq!(t.path().join("fig1.png").is_file(), plots);
        assert_eq!(t.path().join("fig1.svg").is_file(), plots);
        let summary = std::fs::read_to_string(t.path().join("summary.md")).unwrap();
        assert_eq!(summary.contains(NO_FIGURES), !plots);
        assert_eq!(summary.contains("fig1.png"), plots);
    }
}
