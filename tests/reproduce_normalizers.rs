//! `reproduce normalizers` end to end on Fashion-MNIST with a tiny budget: the outputs and
//! results.json's layout, a second invocation that reuses every finished run and writes the
//! same results.json byte for byte, a partial study continued after runs were removed, and
//! `--report-only` marking missing runs.

mod common;

use common::{bnlab, fashion_or_skip};

fn run(args: &[&str]) -> String {
    let o = bnlab(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{args:?}: {err}");
    err
}

#[test]
fn normalizers_study_outputs_resumes_and_reports_partially() {
    let Some(fashion) = fashion_or_skip() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("study");
    let (f, o) = (fashion.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "reproduce",
        "normalizers",
        "--data",
        f,
        "--out",
        o,
        "--examples",
        "96",
    ];
    let log = run(&args);
    assert!(log.contains("[28/28]"), "{log}");
    for file in ["results.json", "timings.json", "metrics.csv", "summary.md"] {
        assert!(out.join(file).exists(), "{file}");
    }
    let first = std::fs::read(out.join("results.json")).unwrap();
    let r: serde_json::Value = serde_json::from_slice(&first).unwrap();
    for norm in ["bn", "brn", "gn", "ln", "none"] {
        let rows = r["batch_size"][norm].as_array().unwrap();
        let sizes: Vec<u64> = rows
            .iter()
            .map(|x| x["batch_size"].as_u64().unwrap())
            .collect();
        assert_eq!(sizes, [32, 16, 8, 4, 2], "{norm}");
        for row in rows {
            let a = row["test_accuracy"].as_f64();
            assert!(
                a.is_some_and(|a| (0.0..=1.0).contains(&a)) || row["diverged_at"].is_u64(),
                "{norm}: {row}"
            );
        }
    }
    for norm in ["bn", "brn", "gn"] {
        assert!(r["non_iid"][norm]["test_accuracy"].is_number(), "{norm}");
    }
    assert!(r["non_iid"]["bn"]["test_accuracy_batch_stats"].is_number());
    assert_eq!(r["claims"].as_array().unwrap().len(), 8);
    assert_eq!(r["missing_runs"], 0);
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        summary.contains("| paper: BN, ResNet-50 on ImageNet | 23.6 | 23.7 | 24.8 | 27.3 | 34.7 |")
    );
    assert!(!summary.contains("Partial report"));

    // The same command again: every run is reused, results.json is the same bytes.
    let again = run(&args);
    assert_eq!(again.matches("(finished earlier)").count(), 28, "{again}");
    assert_eq!(std::fs::read(out.join("results.json")).unwrap(), first);

    // Two runs lost (as if stopped before they finished): report-only marks them ...
    for key in ["batch_size-gn4-8", "non_iid-bn"] {
        std::fs::remove_file(out.join("runs").join(format!("{key}.json"))).unwrap();
    }
    let partial = run(&[
        "reproduce",
        "normalizers",
        "--out",
        o,
        "--examples",
        "96",
        "--report-only",
    ]);
    assert!(partial.contains("2 missing"), "{partial}");
    let p: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(p["missing_runs"], 2);
    assert_eq!(p["batch_size"]["gn"][2]["missing"], true);
    assert!(p["batch_size"]["gn"][2]["test_accuracy"].is_null());
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        summary.contains("Partial report: 2 of 28 runs are missing"),
        "{summary}"
    );
    // ... and the command continues with only those two, ending where it ended before.
    let resumed = run(&args);
    assert_eq!(
        resumed.matches("(finished earlier)").count(),
        26,
        "{resumed}"
    );
    assert_eq!(std::fs::read(out.join("results.json")).unwrap(), first);

    // Other settings do not reuse these runs.
    let other = run(&[
        "reproduce",
        "normalizers",
        "--data",
        f,
        "--out",
        o,
        "--examples",
        "64",
    ]);
    assert_eq!(other.matches("(finished earlier)").count(), 0, "{other}");
}
