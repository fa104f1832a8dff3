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

    // The same command again is refused (the folder holds a study); --resume reuses every
    // run, and results.json is the same bytes.
    let o2 = bnlab(&args);
    assert!(!o2.status.success());
    assert!(String::from_utf8_lossy(&o2.stderr).contains("--resume"));
    let again = run(&["reproduce", "normalizers", "--resume", o]);
    assert_eq!(again.matches("(finished earlier)").count(), 28, "{again}");
    assert_eq!(std::fs::read(out.join("results.json")).unwrap(), first);

    // Two runs lost (as if stopped before they finished): report-only marks them ...
    for key in ["batch_size-gn4-8", "non_iid-bn"] {
        std::fs::remove_file(out.join("runs").join(key).join("result.json")).unwrap();
    }
    let partial = run(&["reproduce", "normalizers", "--report-only", o]);
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
    // ... and --resume trains only those two, ending where it ended before.
    let resumed = run(&["reproduce", "normalizers", "--resume", o]);
    assert_eq!(
        resumed.matches("(finished earlier)").count(),
        26,
        "{resumed}"
    );
    assert_eq!(std::fs::read(out.join("results.json")).unwrap(), first);
}

/// Ctrl-C stops the study after the current steps (checkpointed) with status 130 and the
/// command that resumes it; after a SIGKILL too, `--resume` finishes the study with the
/// results.json of an uninterrupted one, byte for byte.
#[test]
fn normalizers_study_stopped_killed_and_continued_gives_the_same_results() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let Some(fashion) = fashion_or_skip() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let f = fashion.to_str().unwrap().to_string();
    let args = |out: &std::path::Path| -> Vec<String> {
        [
            "reproduce",
            "normalizers",
            "--data",
            &f,
            "--out",
            out.to_str().unwrap(),
            "--examples",
            "320",
        ]
        .map(String::from)
        .to_vec()
    };
    let whole = t.path().join("whole");
    let a = args(&whole);
    run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let want = std::fs::read(whole.join("results.json")).unwrap();

    let cut = t.path().join("cut");
    let b = args(&cut);
    // Start, wait for the `n`-th finished run, send `signal`; the exit code and stderr.
    let resume: Vec<String> = [
        "reproduce",
        "normalizers",
        "--resume",
        cut.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let interrupt = |args: &[String], n: usize, signal: &str| -> (Option<i32>, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bnlab"))
            .args(args)
            .env_remove("BNLAB_DATA")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        let start = Instant::now();
        let needle = format!("[{n}/28]");
        while !seen
            .iter()
            .any(|l: &String| l.contains(&needle) && !l.contains("earlier"))
        {
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "no {needle}: {seen:?}"
            );
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                seen.push(l);
            }
        }
        let ok = Command::new("kill")
            .args(["-s", signal, &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let status = child.wait().unwrap();
        while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
            seen.push(l);
        }
        (status.code(), seen.join("\n"))
    };
    let (code, log) = interrupt(&b, 3, "INT");
    assert_eq!(code, Some(130), "{log}");
    assert!(
        log.contains("bnlab reproduce normalizers --resume"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    let (code, log) = interrupt(&resume, 9, "KILL");
    assert_eq!(code, None, "killed: {log}");
    assert!(log.contains("(finished earlier)"), "{log}");
    let done = run(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(done.contains("(finished earlier)"), "{done}");
    assert_eq!(std::fs::read(cut.join("results.json")).unwrap(), want);
}
