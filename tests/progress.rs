//! What `train` tells a user whose stderr is not a terminal (a log file, CI): a plain line per
//! evaluation with the rate and an ETA, a final summary (accuracy, time, where the model went),
//! a warning when the run will save nothing; and `--progress json` for tools.

mod common;

fn train(dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let data = dir.join("data");
    common::synthetic_mnist(&data, 120, 40);
    let mut args = vec![
        "train",
        "--model",
        "mlp-fig1-bn",
        "--data",
        data.to_str().unwrap(),
        "--steps",
        "40",
        "--eval-every",
        "20",
        "--batch-size",
        "20",
    ];
    args.extend_from_slice(extra);
    let o = common::bnlab(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

#[test]
fn plain_lines_summary_and_a_warning_when_nothing_is_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let o = train(tmp.path(), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("warning: neither --out nor --save"), "{err}");
    for step in ["step 20: train loss", "step 40: train loss"] {
        let line = err
            .lines()
            .find(|l| l.starts_with(step))
            .unwrap_or_else(|| panic!("no {step:?} line in: {err}"));
        assert!(line.contains("test accuracy"), "{line}");
        assert!(line.contains(" steps/s, ETA "), "{line}");
    }
    let summary = err.lines().last().unwrap();
    assert!(
        summary.starts_with("mlp-fig1-bn: 40 steps in "),
        "{summary}"
    );
    assert!(summary.contains("final test accuracy"), "{summary}");
    assert!(summary.contains("not saved"), "{summary}");
    // Rates are in human units: no long fractions.
    assert!(!err.contains(".0848"), "{err}");

    let save = tmp.path().join("net.safetensors");
    let o = train(tmp.path(), &["--save", save.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("warning"), "{err}");
    let summary = err.lines().last().unwrap();
    assert!(
        summary.contains(&format!("written to {}", save.display())),
        "{summary}"
    );
    assert!(save.is_file());
}

#[test]
fn progress_json_is_one_object_per_evaluation_on_stdout() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = train(
        tmp.path(),
        &["--progress", "json", "--out", out.to_str().unwrap()],
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (j, step) in lines.iter().zip([20, 40]) {
        assert_eq!(j["step"], step);
        assert_eq!(j["steps"], 40);
        assert_eq!(j["run"], "mlp-fig1-bn");
        let acc = j["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert!(j["loss"].as_f64().unwrap().is_finite());
        for k in ["rate", "eta"] {
            assert!(j.get(k).is_some(), "{k} missing: {j}");
        }
    }
    assert_eq!(lines[1]["eta"].as_f64(), Some(0.0));
    // A bad mode is a usage error naming the flag.
    common::fails_with(
        &["train", "--model", "mlp-fig1", "--progress", "fancy"],
        &["--progress"],
    );
}
