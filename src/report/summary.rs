//! summary.md: the MNIST run as a page a person reads, with the PyTorch reference alongside.
//!
//! Every sentence in "What it shows" is computed from the measurements, so the page cannot
//! claim more than the run delivered.

use std::fmt::Write as _;

use super::{display_name, fmt_percent, fmt_steps, MnistReport, VariantRun, BN_NAME, PLAIN_NAME};

/// Steps at which the accuracy table samples the curves (those of the paper's discussion).
const CHECKPOINTS: [usize; 5] = [1_000, 5_000, 10_000, 20_000, 50_000];

/// Test accuracy threshold for "steps to 97%".
const TARGET: f64 = 0.97;

/// Final test accuracy the BN net is expected to reach (the paper's Figure 1(a) ends near 98%).
const BN_FINAL_TARGET: f64 = 0.978;

/// Where the reference numbers come from.
const REFERENCE_SOURCE: &str =
    "../shared/peers/README.md: PyTorch 2.15, the same 784-100-100-100-10 sigmoid MLP, batch 60, plain SGD, lr 0.1";

/// PyTorch reference test accuracy in percent at (step, with BN, without BN).
const REFERENCE: [(usize, f64, f64); 4] = [
    (5_000, 95.5, 91.2),
    (10_000, 96.4, 94.9),
    (20_000, 97.5, 96.7),
    (50_000, 98.0, 97.3),
];

/// The evaluation at `step`, or else the last one before it; `None` when the run stopped
/// earlier (its numbers would describe a shorter run) or had not been evaluated yet.
fn accuracy_at(run: &VariantRun, step: usize) -> Option<f64> {
    if run.curve.last().is_none_or(|p| p.step < step) {
        return None;
    }
    run.curve
        .iter()
        .take_while(|p| p.step <= step)
        .last()
        .map(|p| p.test_accuracy)
}

/// Step of the first evaluation with test accuracy of at least `target`.
pub(super) fn steps_to(run: &VariantRun, target: f64) -> Option<usize> {
    run.curve
        .iter()
        .find(|p| p.test_accuracy >= target)
        .map(|p| p.step)
}

fn row_label(name: &str) -> String {
    let shown = display_name(name);
    if shown == name {
        format!("`{name}`")
    } else {
        format!("{shown} (`{name}`)")
    }
}

pub(super) fn summary_md(report: &MnistReport) -> String {
    let mut s = String::new();
    // Writing into a String cannot fail, hence the ignored results below.
    let _ = writeln!(
        s,
        "# Batch Normalization on MNIST: Figure 1 of Ioffe & Szegedy (2015)\n"
    );
    if let Some(note) = super::norm_note(&report.setup) {
        let _ = writeln!(s, "{note}\n");
    }
    let _ = writeln!(
        s,
        "A fully connected 784-100-100-100-10 net with sigmoid units, trained with and without \
         batch normalization; test accuracy over training and the distribution of the input to one \
         sigmoid of the last hidden layer.\n"
    );

    let _ = writeln!(s, "## Setup\n");
    match &report.setup {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (key, value) in map {
                let shown = match value {
                    serde_json::Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                let _ = writeln!(s, "- {key}: {shown}");
            }
        }
        serde_json::Value::Object(_) | serde_json::Value::Null => {
            let _ = writeln!(s, "- (no setup recorded)");
        }
        other => {
            let _ = writeln!(s, "- {other}");
        }
    }
    let _ = writeln!(s);

    if cfg!(feature = "plots") {
        let _ = writeln!(s, "![Figure 1](fig1.png)\n");
        let _ = writeln!(
            s,
            "(a) test accuracy against training steps; (b) without BN and (c) with BN: the 15th, \
             50th and 85th percentiles of the input to one sigmoid of the last hidden layer. \
             Also as [fig1.svg](fig1.svg); the numbers are in metrics.csv and results.json.\n"
        );
    } else {
        let _ = writeln!(s, "{}\n", super::NO_FIGURES);
    }

    accuracy_table(&mut s, report);
    steps_to_target_table(&mut s, report);
    final_table(&mut s, report);
    what_it_shows(&mut s, report);
    s
}

fn accuracy_table(s: &mut String, report: &MnistReport) {
    let last_step = report
        .variants
        .iter()
        .filter_map(|v| v.curve.last())
        .map(|p| p.step)
        .max()
        .unwrap_or(0);
    let columns: Vec<usize> = CHECKPOINTS
        .iter()
        .copied()
        .filter(|&c| c <= last_step)
        .collect();
    let _ = writeln!(s, "## Test accuracy during training\n");
    if columns.is_empty() {
        let _ = writeln!(
            s,
            "The run ended at step {last_step}, before the first checkpoint (1k steps).\n"
        );
        return;
    }
    let _ = write!(s, "| net |");
    for &c in &columns {
        let _ = write!(s, " {} |", fmt_steps(c as f64));
    }
    let _ = write!(s, "\n| --- |");
    for _ in &columns {
        let _ = write!(s, " ---: |");
    }
    let _ = writeln!(s);
    for v in &report.variants {
        let _ = write!(s, "| {} |", row_label(&v.name));
        for &c in &columns {
            let cell = accuracy_at(v, c).map_or_else(|| "—".to_string(), fmt_percent);
            let _ = write!(s, " {cell} |");
        }
        let _ = writeln!(s);
    }
    for (label, with_bn) in [
        ("Without BN, PyTorch reference", false),
        ("With BN, PyTorch reference", true),
    ] {
        let _ = write!(s, "| {label} |");
        for &c in &columns {
            let cell = REFERENCE.iter().find(|r| r.0 == c).map_or_else(
                || "—".to_string(),
                |r| format!("{:.1}%", if with_bn { r.1 } else { r.2 }),
            );
            let _ = write!(s, " {cell} |");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "\nOur cells show the evaluation at that step, or the last one before it. \
         Reference: {REFERENCE_SOURCE}.\n"
    );
}

fn steps_to_target_table(s: &mut String, report: &MnistReport) {
    let _ = writeln!(s, "## Steps to 97% test accuracy\n");
    let _ = writeln!(
        s,
        "| net | steps to 97% | PyTorch reference (evaluated every 5k steps) |\n| --- | ---: | ---: |"
    );
    for v in &report.variants {
        let ours = steps_to(v, TARGET).map_or_else(|| "not reached".to_string(), |n| n.to_string());
        let reference = match v.name.as_str() {
            PLAIN_NAME => reference_steps_to(TARGET, false),
            BN_NAME => reference_steps_to(TARGET, true),
            _ => "—".to_string(),
        };
        let _ = writeln!(s, "| {} | {ours} | {reference} |", row_label(&v.name));
    }
    let _ = writeln!(
        s,
        "\nThe first evaluation at or above 97%; the resolution is the evaluation interval.\n"
    );
}

fn reference_steps_to(target: f64, with_bn: bool) -> String {
    REFERENCE
        .iter()
        .find(|r| (if with_bn { r.1 } else { r.2 }) >= target * 100.0)
        .map_or_else(
            || "not reached".to_string(),
            |r| format!("≤ {}", fmt_steps(r.0 as f64)),
        )
}

fn final_table(s: &mut String, report: &MnistReport) {
    let _ = writeln!(s, "## Final test accuracy\n");
    let _ = writeln!(
        s,
        "| net | steps | running-average statistics | population statistics (Algorithm 2) | training time |\n\
         | --- | ---: | ---: | ---: | ---: |"
    );
    for v in &report.variants {
        let steps = v
            .curve
            .last()
            .map_or_else(|| "—".to_string(), |p| p.step.to_string());
        let _ = writeln!(
            s,
            "| {} | {steps} | {} | {} | {:.1} s |",
            row_label(&v.name),
            fmt_percent(v.final_running),
            fmt_percent(v.final_population),
            v.train_seconds
        );
    }
    let _ = writeln!(
        s,
        "\nThe net without BN has no statistics to choose, so both columns show the same number. \
         PyTorch reference after 50k steps: with BN 98.0%, without BN 97.3%.\n"
    );
}

fn what_it_shows(s: &mut String, report: &MnistReport) {
    let _ = writeln!(s, "## What it shows\n");
    let plain = report.variants.iter().find(|v| v.name == PLAIN_NAME);
    let bn = report.variants.iter().find(|v| v.name == BN_NAME);
    let (Some(plain), Some(bn)) = (plain, bn) else {
        let _ = writeln!(
            s,
            "- The comparison needs both `{PLAIN_NAME}` and `{BN_NAME}`; this report lacks one of them."
        );
        return;
    };
    for step in [5_000, 10_000] {
        let at = fmt_steps(step as f64);
        match (accuracy_at(bn, step), accuracy_at(plain, step)) {
            (Some(b), Some(p)) => {
                let verdict = if b > p { "ahead" } else { "not ahead" };
                let _ = writeln!(
                    s,
                    "- At {at} steps the net with BN is {verdict}: {} against {} without BN.",
                    fmt_percent(b),
                    fmt_percent(p)
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "- At {at} steps the nets cannot be compared: one of the runs has no evaluation there."
                );
            }
        }
    }
    let end = bn
        .curve
        .last()
        .map_or_else(String::new, |p| format!(" (step {})", p.step));
    let target = fmt_percent(BN_FINAL_TARGET);
    let running_ok = bn.final_running >= BN_FINAL_TARGET;
    let population_ok = bn.final_population >= BN_FINAL_TARGET;
    let numbers = format!(
        "running-average statistics {}, population statistics {}",
        fmt_percent(bn.final_running),
        fmt_percent(bn.final_population)
    );
    let verdict = match (running_ok, population_ok) {
        (true, true) => format!("reaches {target} with both kinds of statistics"),
        (true, false) => {
            format!("reaches {target} with running-average statistics but not with population statistics")
        }
        (false, true) => {
            format!("reaches {target} with population statistics but not with running-average statistics")
        }
        (false, false) => format!("does not reach {target} with either kind of statistics"),
    };
    let _ = writeln!(
        s,
        "- At the end{end} the net with BN {verdict} ({numbers}); the net without BN ends at {}.",
        fmt_percent(plain.final_running)
    );
    let spread = |v: &VariantRun| {
        v.curve
            .last()
            .map(|p| p.p85 - p.p15)
            .filter(|d| d.is_finite())
    };
    if let (Some(b), Some(p)) = (spread(bn), spread(plain)) {
        let _ = writeln!(
            s,
            "- At the end the 15th-85th percentile range of the probed sigmoid input spans {b:.2} with BN and {p:.2} without."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::CurvePoint;

    fn run(points: &[(usize, f64)]) -> VariantRun {
        VariantRun {
            name: BN_NAME.into(),
            curve: points
                .iter()
                .map(|&(step, acc)| CurvePoint {
                    step,
                    test_accuracy: acc,
                    p15: 0.0,
                    p50: 0.0,
                    p85: 0.0,
                    train_loss: 0.0,
                })
                .collect(),
            final_running: 0.0,
            final_population: 0.0,
            train_seconds: 0.0,
        }
    }

    #[test]
    fn accuracy_at_takes_exact_or_previous_and_not_past_the_end() {
        let r = run(&[(0, 0.1), (800, 0.8), (1500, 0.9), (3000, 0.95)]);
        assert_eq!(accuracy_at(&r, 1000), Some(0.8));
        assert_eq!(accuracy_at(&r, 1500), Some(0.9));
        assert_eq!(accuracy_at(&r, 3000), Some(0.95));
        assert_eq!(accuracy_at(&r, 5000), None);
    }

    #[test]
    fn steps_to_finds_first_crossing() {
        let r = run(&[(0, 0.1), (1000, 0.969), (2000, 0.97), (3000, 0.96)]);
        assert_eq!(steps_to(&r, 0.97), Some(2000));
        assert_eq!(steps_to(&r, 0.99), None);
    }

    #[test]
    fn reference_steps() {
        assert_eq!(reference_steps_to(0.97, true), "≤ 20k");
        assert_eq!(reference_steps_to(0.97, false), "≤ 50k");
    }
}
