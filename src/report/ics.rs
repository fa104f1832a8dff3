//! The report of `reproduce ics`: results.json (no timings, so that a resumed study's is
//! byte-identical), timings.json, metrics.csv (long format: one value per row), summary.md with
//! Santurkar et al.'s claims checked against the measurements, and the figures.

use super::Claim;
use crate::experiments::ics::{
    input_shift, mean, mean_cosine, mean_relative_ics, relative_input_shift, variant_name,
    IcsSetup, Job, RunResult, VARIANTS,
};
use crate::fsutil::write_atomic;
use crate::Result;
use std::fmt::Write as _;
use std::path::Path;

/// Everything the report needs.
pub struct IcsReport<'a> {
    /// The settings.
    pub setup: &'a IcsSetup,
    /// The runs, in `setup.jobs()` order.
    pub jobs: &'a [Job],
    /// Their results (`None`: not run yet, for a partial report).
    pub results: &'a [Option<RunResult>],
}

impl IcsReport<'_> {
    fn find(&self, net: usize, norm: &str) -> Option<&RunResult> {
        self.jobs
            .iter()
            .zip(self.results)
            .find(|(j, _)| j.net == net && j.norm == norm)
            .and_then(|(_, r)| r.as_ref())
    }
}

/// Averages of one run that the summary and the claims use.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunSummary {
    /// The final test accuracy (`None` after a divergence).
    pub final_test_accuracy: Option<f64>,
    /// The mean of the last 3 evaluations ([`RunResult::end_accuracy`]).
    pub end_test_accuracy: Option<f64>,
    /// [`input_shift`]: the layer input's mean movement between records.
    pub input_shift: f64,
    /// [`relative_input_shift`]: the same in units of the distribution's width.
    pub relative_input_shift: f64,
    /// Per weight layer: the mean of `|G - G'| / |G|`.
    pub relative_ics: Vec<f64>,
    /// Per weight layer: the mean cosine of `G` and `G'`.
    pub cosine: Vec<f64>,
    /// Mean over the measurements of the loss's range over the step sizes.
    pub loss_range: f64,
    /// Mean over the measurements of the largest gradient change over the step sizes.
    pub grad_change: f64,
    /// Mean over the measurements of the effective beta-smoothness.
    pub beta_smoothness: f64,
}

/// The averages of a run.
pub fn summarize(r: &RunResult) -> RunSummary {
    RunSummary {
        final_test_accuracy: r.final_test_accuracy,
        end_test_accuracy: r.end_accuracy(),
        input_shift: input_shift(&r.inputs),
        relative_input_shift: relative_input_shift(&r.inputs),
        relative_ics: mean_relative_ics(r),
        cosine: mean_cosine(r),
        loss_range: mean(r.measurements.iter().map(|m| m.loss_range())),
        grad_change: mean(r.measurements.iter().map(|m| m.max_grad_change())),
        beta_smoothness: mean(
            r.measurements
                .iter()
                .map(|m| m.beta_smoothness.unwrap_or(f64::NAN)),
        ),
    }
}

/// Writes results.json, timings.json, metrics.csv, summary.md and (with `plots`) the figures.
pub fn write_ics_report(out_dir: &Path, report: &IcsReport<'_>) -> Result<()> {
    std::fs::create_dir_all(out_dir).map_err(|e| crate::Error::io(out_dir, e))?;
    let claims = ics_claims(report);
    let json = results_json(report, &claims);
    write_atomic(
        &out_dir.join("results.json"),
        (serde_json::to_string_pretty(&json).unwrap_or_default() + "\n").as_bytes(),
    )?;
    let timings: serde_json::Map<String, serde_json::Value> = report
        .jobs
        .iter()
        .zip(report.results)
        .filter_map(|(j, r)| Some((j.key.clone(), r.as_ref()?.seconds.into())))
        .collect();
    write_atomic(
        &out_dir.join("timings.json"),
        (serde_json::to_string_pretty(&timings).unwrap_or_default() + "\n").as_bytes(),
    )?;
    write_atomic(&out_dir.join("metrics.csv"), metrics_csv(report).as_bytes())?;
    #[cfg(feature = "plots")]
    figures(out_dir, report)?;
    write_atomic(
        &out_dir.join("summary.md"),
        summary_md(report, &claims).as_bytes(),
    )?;
    Ok(())
}

fn results_json(report: &IcsReport<'_>, claims: &[Claim]) -> serde_json::Value {
    let mut nets = serde_json::Map::new();
    for (i, n) in report.setup.nets.iter().enumerate() {
        let mut variants = serde_json::Map::new();
        for v in VARIANTS {
            let value = match report.find(i, v) {
                Some(r) => {
                    let mut o = serde_json::to_value(r).unwrap_or_default();
                    if let Some(m) = o.as_object_mut() {
                        m.remove("seconds");
                        m.insert(
                            "summary".into(),
                            serde_json::to_value(summarize(r)).unwrap_or_default(),
                        );
                    }
                    o
                }
                None => serde_json::json!({"missing": true}),
            };
            variants.insert(variant_name(v).to_string(), value);
        }
        nets.insert(
            n.name.clone(),
            serde_json::json!({"model": n.model, "dataset": n.dataset, "variants": variants}),
        );
    }
    let missing: Vec<&str> = report
        .jobs
        .iter()
        .zip(report.results)
        .filter(|(_, r)| r.is_none())
        .map(|(j, _)| j.key.as_str())
        .collect();
    serde_json::json!({
        "study": "ics",
        "setup": report.setup,
        "nets": nets,
        "claims": claims,
        "missing": missing,
    })
}

fn metrics_csv(report: &IcsReport<'_>) -> String {
    let mut s = String::from("net,variant,step,metric,at,value\n");
    let mut row = |net: &str, v: &str, step: usize, metric: &str, at: &str, value: f64| {
        let _ = writeln!(s, "{net},{v},{step},{metric},{at},{value}");
    };
    for (job, r) in report.jobs.iter().zip(report.results) {
        let Some(r) = r else { continue };
        let net = &report.setup.nets[job.net].name;
        let v = variant_name(&job.norm);
        for p in &r.accuracy {
            row(net, v, p.step, "test_accuracy", "", p.test_accuracy);
            row(net, v, p.step, "train_loss", "", p.train_loss);
        }
        for p in &r.inputs {
            row(net, v, p.step, "input_p15", "", p.p15);
            row(net, v, p.step, "input_p50", "", p.p50);
            row(net, v, p.step, "input_p85", "", p.p85);
        }
        for m in &r.measurements {
            for (layer, ics) in r.layers.iter().zip(&m.ics) {
                row(net, v, m.step, "ics_l2_diff", layer, ics.l2_diff);
                row(
                    net,
                    v,
                    m.step,
                    "ics_cosine",
                    layer,
                    ics.cosine.unwrap_or(f64::NAN),
                );
                row(net, v, m.step, "ics_grad_norm", layer, ics.grad_norm);
            }
            row(net, v, m.step, "loss0", "", m.loss0);
            row(net, v, m.step, "grad_norm", "", m.grad_norm);
            for ((eta, loss), change) in r.etas.iter().zip(&m.losses).zip(&m.grad_changes) {
                row(net, v, m.step, "loss_at_eta", &eta.to_string(), *loss);
                row(
                    net,
                    v,
                    m.step,
                    "grad_change_at_eta",
                    &eta.to_string(),
                    *change,
                );
            }
            row(
                net,
                v,
                m.step,
                "beta_smoothness",
                "",
                m.beta_smoothness.unwrap_or(f64::NAN),
            );
        }
    }
    s
}

/// "About as well": final accuracies within this many points.
pub const ABOUT_AS_WELL_POINTS: f64 = 1.0;

fn pct(a: Option<f64>) -> String {
    a.map_or("n/a".into(), |a| format!("{:.2}%", 100.0 * a))
}

/// Santurkar et al.'s claims, per net, with whether our measurements bear them out.
pub fn ics_claims(report: &IcsReport<'_>) -> Vec<Claim> {
    let mut claims = Vec::new();
    for (i, n) in report.setup.nets.iter().enumerate() {
        let (std, bn, noisy) = (
            report.find(i, "none").map(summarize),
            report.find(i, "bn").map(summarize),
            report.find(i, "noisy-bn").map(summarize),
        );
        let net = &n.name;
        // 1. Noisy BN trains about as well as BN, and better than no BN.
        let accs = (
            std.as_ref().and_then(|s| s.end_test_accuracy),
            bn.as_ref().and_then(|s| s.end_test_accuracy),
            noisy.as_ref().and_then(|s| s.end_test_accuracy),
        );
        claims.push(Claim {
            claim: format!(
                "{net}: noisy BN trains about as well as BN (test accuracy at the end, the mean of the last 3 evaluations, within {ABOUT_AS_WELL_POINTS} point), and better than no BN"
            ),
            measured: format!(
                "noisy BN {}, BN {}, standard {}",
                pct(accs.2),
                pct(accs.1),
                pct(accs.0)
            ),
            holds: match accs {
                (Some(s), Some(b), Some(nz)) => {
                    Some((nz - b).abs() * 100.0 <= ABOUT_AS_WELL_POINTS && nz > s)
                }
                _ => None,
            },
        });
        // 2. Noisy BN's layer inputs are less stable than no BN's.
        let shifts = (
            std.as_ref().map(|s| s.relative_input_shift),
            bn.as_ref().map(|s| s.relative_input_shift),
            noisy.as_ref().map(|s| s.relative_input_shift),
        );
        claims.push(Claim {
            claim: format!(
                "{net}: noisy BN's layer inputs are less stable than no BN's (mean movement of the 15/50/85th percentiles between records, in units of the distribution's width)"
            ),
            measured: format!(
                "noisy BN {}, standard {}, BN {}",
                fmt(shifts.2),
                fmt(shifts.0),
                fmt(shifts.1)
            ),
            holds: match shifts {
                (Some(s), _, Some(nz)) if s.is_finite() && nz.is_finite() => Some(nz > s),
                _ => None,
            },
        });
        // 3. ICS is not smaller with BN.
        let (claim3, holds3) = match (&std, &bn) {
            (Some(s), Some(b)) => {
                // The first weight layer has nothing before it (G' = G): left out.
                let layers = s.relative_ics.len().min(b.relative_ics.len());
                let mut smaller = 0;
                let mut counted = 0;
                let mut parts = Vec::new();
                for l in 1..layers {
                    let bn_smaller =
                        b.relative_ics[l] < s.relative_ics[l] && b.cosine[l] > s.cosine[l];
                    counted += 1;
                    smaller += bn_smaller as usize;
                    parts.push(format!(
                        "layer {}: |G-G'|/|G| {:.3} vs {:.3}, cos {:.3} vs {:.3}",
                        l + 1,
                        b.relative_ics[l],
                        s.relative_ics[l],
                        b.cosine[l],
                        s.cosine[l]
                    ));
                }
                (
                    format!(
                        "BN vs standard, means over training — {}; smaller with BN (both lower |G-G'|/|G| and higher cosine) in {smaller} of {counted} layers",
                        parts.join("; ")
                    ),
                    (counted > 0).then_some(2 * smaller <= counted),
                )
            }
            _ => ("a run is missing".into(), None),
        };
        claims.push(Claim {
            claim: format!(
                "{net}: internal covariate shift is not smaller with BN (Definition 2.1; it counts as smaller in a layer only if BN's gradient both moves less relative to its norm and keeps a higher cosine; the claim holds if that is so in at most half the layers after the first)"
            ),
            measured: claim3,
            holds: holds3,
        });
        // 4. The landscape is smoother with BN.
        let (m4, h4) = match (&std, &bn) {
            (Some(s), Some(b)) => (
                format!(
                    "loss range over the steps {:.4} (BN) vs {:.4} (standard); largest gradient change {:.4} vs {:.4}; beta-smoothness {:.3} vs {:.3}",
                    b.loss_range, s.loss_range, b.grad_change, s.grad_change, b.beta_smoothness, s.beta_smoothness
                ),
                Some(
                    b.loss_range < s.loss_range
                        && b.grad_change < s.grad_change
                        && b.beta_smoothness < s.beta_smoothness,
                ),
            ),
            _ => ("a run is missing".into(), None),
        };
        claims.push(Claim {
            claim: format!(
                "{net}: with BN the loss varies less along the gradient, the gradient changes less, and the effective beta-smoothness is lower (means over training)"
            ),
            measured: m4,
            holds: h4,
        });
    }
    claims
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.4}"))
}

fn summary_md(report: &IcsReport<'_>, claims: &[Claim]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Why batch normalization works: internal covariate shift and the loss landscape\n\n\
         Santurkar, Tsipras, Ilyas and Madry, \"How Does Batch Normalization Help Optimization?\" \
         (NeurIPS 2018), at the scale of one CPU: each network trained without BN (standard), with \
         BN, and with BN followed by their time-varying noise (noisy BN), from the same weights and \
         batch order. `bnlab reproduce ics`; the numbers below are computed from results.json.\n"
    );
    let missing = report.results.iter().filter(|r| r.is_none()).count();
    if missing > 0 {
        let _ = writeln!(
            s,
            "**Partial report: {missing} of {} runs are missing.**\n",
            report.results.len()
        );
    }
    let _ = writeln!(s, "## Their claims and our measurements\n");
    let _ = writeln!(s, "| claim | measured | holds |\n| --- | --- | --- |");
    for c in claims {
        let holds = match c.holds {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        let _ = writeln!(s, "| {} | {} | {holds} |", c.claim, c.measured);
    }
    for (i, n) in report.setup.nets.iter().enumerate() {
        let _ = writeln!(
            s,
            "\n## {} ({} on {}, {} steps of {}, lr {}, momentum {})\n",
            n.name, n.model, n.dataset, n.steps, n.batch_size, n.lr, n.momentum
        );
        let _ = writeln!(
            s,
            "| variant | final test accuracy | mean of the last 3 evaluations | input shift | relative input shift | loss range | largest gradient change | beta-smoothness |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        let mut layers: Vec<String> = Vec::new();
        let mut ics_rows = Vec::new();
        for v in VARIANTS {
            let name = variant_name(v);
            let Some(r) = report.find(i, v) else {
                let _ = writeln!(s, "| {name} | missing | | | | | | |");
                continue;
            };
            let m = summarize(r);
            let acc = match r.diverged_at {
                Some(step) => format!("diverged at step {step}"),
                None => pct(m.final_test_accuracy),
            };
            let last3 = r.end_accuracy();
            let _ = writeln!(
                s,
                "| {name} | {acc} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.3} |",
                pct(last3),
                m.input_shift,
                m.relative_input_shift,
                m.loss_range,
                m.grad_change,
                m.beta_smoothness
            );
            if layers.is_empty() {
                layers = r.layers.clone();
            }
            ics_rows.push((name, m));
        }
        if !layers.is_empty() {
            let _ = writeln!(
                s,
                "\nInternal covariate shift per weight layer, means over training: |G - G'| / |G| (cosine).\n"
            );
            let _ = write!(s, "| variant |");
            for l in &layers {
                let _ = write!(s, " {l} |");
            }
            let _ = write!(s, "\n| --- |");
            for _ in &layers {
                let _ = write!(s, " ---: |");
            }
            let _ = writeln!(s);
            for (name, m) in &ics_rows {
                let _ = write!(s, "| {name} |");
                for (r, c) in m.relative_ics.iter().zip(&m.cosine) {
                    let _ = write!(s, " {r:.3} ({c:.3}) |");
                }
                let _ = writeln!(s);
            }
        }
    }
    let _ = writeln!(
        s,
        "\n## How it is measured\n\n\
         - The layer input followed is one channel (unit) of the input to the last activation, \
         over the whole training batch of the step (for BN: BN's output, after the noise in noisy \
         BN). Input shift: the mean over consecutive records of the mean absolute change of its \
         15th, 50th and 85th percentiles; relative: divided by the mean width p85 - p15.\n\
         - ICS (their Definition 2.1, `bnlab ics`): on training examples 0..B in file order, with \
         the run's learning rate as the step. The first weight layer has G' = G.\n\
         - Landscape (`bnlab landscape`): on the same batch, step sizes {:?} x the learning rate; \
         loss range = max - min of the loss over those steps; largest gradient change = max of \
         |grad L(theta - eta g) - g|; beta-smoothness = max of that over |eta g|.\n\
         - The measurements leave the network, its buffers and its generators as they were: every \
         run trains as it would without them.",
        report.setup.eta_factors
    );
    #[cfg(feature = "plots")]
    let _ = writeln!(
        s,
        "\nFigures: accuracy.svg (test accuracy), inputs-NET.svg (the followed input's \
         percentiles), ics-NET.svg (ICS over training), landscape-NET.svg (the landscape over \
         training)."
    );
    #[cfg(not(feature = "plots"))]
    let _ = writeln!(s, "\nNo figures: built without the `plots` feature.");
    s
}

/// Palette index per variant: standard orange, BN blue, noisy BN green (Figure 1's colours).
#[cfg(feature = "plots")]
fn color(norm: &str) -> usize {
    match norm {
        "none" => 1,
        "bn" => 0,
        _ => 2,
    }
}

#[cfg(feature = "plots")]
fn figures(out_dir: &Path, report: &IcsReport<'_>) -> Result<()> {
    use super::{panels_figure, PanelSpec};
    let panel =
        |title: String, y: &str, series: Vec<(String, Vec<(f64, f64)>)>, colors| PanelSpec {
            title,
            x_label: "steps".into(),
            y_label: y.into(),
            series,
            colors: Some(colors),
            band: false,
            y_range: None,
        };
    // Per variant of net i: (name, colour, result).
    let runs = |i: usize| -> Vec<(&str, usize, &RunResult)> {
        VARIANTS
            .iter()
            .filter_map(|v| Some((variant_name(v), color(v), report.find(i, v)?)))
            .collect()
    };
    let mut acc_panels = Vec::new();
    for (i, n) in report.setup.nets.iter().enumerate() {
        let rs = runs(i);
        if rs.is_empty() {
            continue;
        }
        let series = rs
            .iter()
            .map(|(name, _, r)| {
                (
                    name.to_string(),
                    r.accuracy
                        .iter()
                        .map(|p| (p.step as f64, p.test_accuracy))
                        .collect(),
                )
            })
            .collect();
        let colors = rs.iter().map(|r| r.1).collect();
        acc_panels.push(panel(
            format!("{} ({}): test accuracy", n.name, n.dataset),
            "test accuracy",
            series,
            colors,
        ));
        // The followed input's percentiles, one panel per variant.
        let inputs: Vec<PanelSpec> = rs
            .iter()
            .map(|(name, c, r)| {
                let pick = |f: fn(&crate::experiments::ics::InputPoint) -> f64| -> Vec<(f64, f64)> {
                    r.inputs.iter().map(|p| (p.step as f64, f(p))).collect()
                };
                PanelSpec {
                    title: format!("{}: {name}", n.name),
                    x_label: "steps".into(),
                    y_label: "layer input".into(),
                    series: vec![
                        ("85th percentile".into(), pick(|p| p.p85)),
                        ("median".into(), pick(|p| p.p50)),
                        ("15th percentile".into(), pick(|p| p.p15)),
                    ],
                    colors: Some(vec![*c; 3]),
                    band: true,
                    y_range: None,
                }
            })
            .collect();
        panels_figure(&out_dir.join(format!("inputs-{}", n.name)), &inputs, 500)?;
        // ICS: the mean over the layers after the first.
        let over_layers =
            |r: &RunResult, f: &dyn Fn(&crate::experiments::ics::IcsValue) -> Option<f64>| {
                r.measurements
                    .iter()
                    .map(|m| (m.step as f64, mean(m.ics.iter().skip(1).filter_map(f))))
                    .collect::<Vec<_>>()
            };
        let colors: Vec<usize> = rs.iter().map(|r| r.1).collect();
        let rel: Vec<_> = rs
            .iter()
            .map(|(name, _, r)| {
                (
                    name.to_string(),
                    over_layers(r, &|v| (v.grad_norm > 0.0).then(|| v.l2_diff / v.grad_norm)),
                )
            })
            .collect();
        let cos: Vec<_> = rs
            .iter()
            .map(|(name, _, r)| (name.to_string(), over_layers(r, &|v| v.cosine)))
            .collect();
        panels_figure(
            &out_dir.join(format!("ics-{}", n.name)),
            &[
                panel(
                    format!("{}: ICS, |G - G'| / |G|", n.name),
                    "mean over layers 2..",
                    rel,
                    colors.clone(),
                ),
                panel(
                    format!("{}: ICS, cosine(G, G')", n.name),
                    "mean over layers 2..",
                    cos,
                    colors.clone(),
                ),
            ],
            600,
        )?;
        let land = |f: &dyn Fn(&crate::experiments::ics::Measurement) -> f64| {
            rs.iter()
                .map(|(name, _, r)| {
                    (
                        name.to_string(),
                        r.measurements
                            .iter()
                            .map(|m| (m.step as f64, f(m)))
                            .collect::<Vec<_>>(),
                    )
                })
                .collect::<Vec<_>>()
        };
        panels_figure(
            &out_dir.join(format!("landscape-{}", n.name)),
            &[
                panel(
                    format!("{}: loss range along the gradient", n.name),
                    "max - min of the loss",
                    land(&|m| m.loss_range()),
                    colors.clone(),
                ),
                panel(
                    format!("{}: gradient predictiveness", n.name),
                    "largest |grad change|",
                    land(&|m| m.max_grad_change()),
                    colors.clone(),
                ),
                panel(
                    format!("{}: effective beta-smoothness", n.name),
                    "beta",
                    land(&|m| m.beta_smoothness.unwrap_or(f64::NAN)),
                    colors,
                ),
            ],
            500,
        )?;
    }
    if !acc_panels.is_empty() {
        panels_figure(&out_dir.join("accuracy"), &acc_panels, 600)?;
    }
    Ok(())
}
