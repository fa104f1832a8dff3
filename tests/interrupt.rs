//! Stopping and resuming, as a user does it: Ctrl-C (SIGINT) and SIGTERM stop `train` and every
//! `reproduce` after the current step with status 130 / 143, saying how to resume; resuming
//! ends bit-identical to a run or study left alone; a study killed with SIGKILL at arbitrary
//! points and resumed each time gives the same results.json, byte for byte.
//!
//! Every wait is for something the run writes (a progress line, a checkpoint file) and is
//! bounded; no assertion depends on timing.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

const WAIT: Duration = Duration::from_secs(300);

fn bnlab() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bnlab"));
    c.env_remove("BNLAB_DATA")
        .env_remove("BNLAB_MNIST_MIRROR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn run_ok(args: &[&str]) -> String {
    let o = bnlab().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{args:?} failed: {err}");
    err
}

/// Send `signal` (INT, TERM) to the child with the system's `kill`.
fn signal(child: &Child, signal: &str) {
    let ok = Command::new("kill")
        .args(["-s", signal, &child.id().to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill -s {signal} failed");
}

/// A child whose stderr lines arrive on a channel (read by a thread, so the pipe never fills).
struct Watched {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Watched {
    fn spawn(args: &[&str]) -> Watched {
        let mut child = bnlab().args(args).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watched {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait (bounded) for a stderr line containing `needle`; panics if the process ends first.
    fn wait_for_line(&mut self, needle: &str) {
        let start = Instant::now();
        while start.elapsed() < WAIT {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!(
            "no line with {needle:?} on stderr; got:\n{}",
            self.seen.join("\n")
        );
    }

    /// Wait (bounded) for the process to end; its status code and all of stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < WAIT, "the process did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at the pipe's end.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.seen.push(line);
        }
        (status.code(), self.seen.join("\n"))
    }
}

fn train_args<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        "mlp-fig1-bn",
        "--data",
        data,
        "--steps",
        "12000",
        "--eval-every",
        "1000",
        "--momentum",
        "0.9",
        "--out",
        out,
    ]
}

#[test]
fn train_stops_on_sigint_and_sigterm_and_resumes_bit_identical() {
    let Some(data) = common::mnist_or_skip() else {
        return;
    };
    let data = data.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let alone = tmp.path().join("alone");
    run_ok(&train_args(data, alone.to_str().unwrap()));

    for (sig, code) in [("INT", 130), ("TERM", 143)] {
        let dir = tmp.path().join(format!("stopped-{sig}"));
        let d = dir.to_str().unwrap();
        let mut w = Watched::spawn(&train_args(data, d));
        // The first evaluation (step 1000 of 12000) has been printed: the run is training.
        w.wait_for_line("step 1000:");
        signal(&w.child, sig);
        let (status, err) = w.finish();
        assert_eq!(status, Some(code), "SIG{sig}: {err}");
        assert!(err.contains("stopped at step"), "{err}");
        let resume = format!("resume with: bnlab train --resume {d}");
        assert!(err.contains(&resume), "no {resume:?} in: {err}");
        assert!(!err.contains("panicked"), "{err}");
        // The state is at the step the run stopped at, not at an earlier checkpoint.
        assert!(!dir.join("final.safetensors").exists());
        let err = run_ok(&["train", "--resume", d]);
        assert!(err.contains("resuming"), "{err}");
        assert_eq!(
            std::fs::read(alone.join("final.safetensors")).unwrap(),
            std::fs::read(dir.join("final.safetensors")).unwrap(),
            "SIG{sig}: the resumed run's final weights differ from the run left alone"
        );
        assert_eq!(
            std::fs::read_to_string(alone.join("metrics.csv")).unwrap(),
            std::fs::read_to_string(dir.join("metrics.csv")).unwrap()
        );
    }
}

/// Names, sizes and modification times of the files under `dir/runs`: changes when a run
/// writes a checkpoint or a result.
fn progress_signature(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    let Ok(runs) = std::fs::read_dir(dir.join("runs")) else {
        return out;
    };
    for run in runs.flatten() {
        if let Ok(files) = std::fs::read_dir(run.path()) {
            for f in files.flatten() {
                if let Ok(m) = f.metadata() {
                    out.insert(
                        f.path(),
                        (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)),
                    );
                }
            }
        }
    }
    out
}

/// Runs a study with `start` args, killing it with SIGKILL each time after it has saved some
/// new progress (plus a pseudo-random extra delay, so kills land at different instants of a
/// step, an evaluation or a write) and resuming it with `resume`, until it finishes. Returns
/// the number of kills that landed.
fn kill_and_resume(start: &[&str], resume: &[&str], dir: &Path, max_kills: usize) -> usize {
    let mut kills = 0;
    let mut seed = 0x9e37_79b9u64;
    let mut child = bnlab().stderr(Stdio::null()).args(start).spawn().unwrap();
    loop {
        let before = progress_signature(dir);
        let start_wait = Instant::now();
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "the study failed: {status:?}");
                break true;
            }
            if progress_signature(dir) != before {
                break false;
            }
            assert!(start_wait.elapsed() < WAIT, "the study made no progress");
            std::thread::sleep(Duration::from_millis(10));
        };
        if finished {
            return kills;
        }
        if kills == max_kills {
            // Bounded: let it finish.
            let status = child.wait().unwrap();
            assert!(status.success(), "the study failed: {status:?}");
            return kills;
        }
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis((seed >> 33) % 400));
        if child.try_wait().unwrap().is_some() {
            continue; // finished meanwhile; the next turn of the loop checks the status
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        child = bnlab().stderr(Stdio::null()).args(resume).spawn().unwrap();
    }
}

#[test]
fn mnist_study_stopped_killed_and_resumed_gives_the_same_results() {
    let Some(data) = common::mnist_or_skip() else {
        return;
    };
    let data = data.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let study = |dir: &Path| {
        vec![
            "reproduce".to_string(),
            "mnist".into(),
            "--data".into(),
            data.into(),
            "--steps".into(),
            "6000".into(),
            "--eval-every".into(),
            "500".into(),
            "--out".into(),
            dir.display().to_string(),
        ]
    };
    let alone = tmp.path().join("alone");
    let a: Vec<String> = study(&alone);
    run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());

    // Ctrl-C: stops with 130 and says how to resume; resuming finishes the study.
    let stopped = tmp.path().join("stopped");
    let s = study(&stopped);
    let mut w = Watched::spawn(&s.iter().map(String::as_str).collect::<Vec<_>>());
    w.wait_for_line("step 500 of 6,000");
    signal(&w.child, "INT");
    let (status, err) = w.finish();
    assert_eq!(status, Some(130), "{err}");
    let d = stopped.to_str().unwrap();
    assert!(
        err.contains(&format!("resume with: bnlab reproduce mnist --resume {d}")),
        "{err}"
    );
    assert!(!stopped.join("results.json").exists());
    // The report of the study so far: every run missing, nothing to report yet, or a partial
    // report naming the missing runs.
    let o = bnlab()
        .args(["reproduce", "mnist", "--report-only", d])
        .output()
        .unwrap();
    let rerr = String::from_utf8_lossy(&o.stderr);
    assert!(!rerr.contains("panicked"), "{rerr}");
    if o.status.success() {
        let json = std::fs::read_to_string(stopped.join("results.json")).unwrap();
        assert!(json.contains("\"missing_runs\""), "{json}");
        std::fs::remove_file(stopped.join("results.json")).unwrap();
    } else {
        assert!(rerr.contains("nothing to report"), "{rerr}");
    }
    // Then SIGKILLs at arbitrary points, resumed each time.
    let kills = kill_and_resume(
        &["reproduce", "mnist", "--resume", d],
        &["reproduce", "mnist", "--resume", d],
        &stopped,
        6,
    );
    assert!(
        kills >= 1,
        "no kill landed: the study was too quick to interrupt"
    );
    assert_eq!(
        std::fs::read(alone.join("results.json")).unwrap(),
        std::fs::read(stopped.join("results.json")).unwrap(),
        "results.json of the study stopped and killed {kills} times differs"
    );
    assert_eq!(
        std::fs::read(alone.join("metrics.csv")).unwrap(),
        std::fs::read(stopped.join("metrics.csv")).unwrap()
    );
    println!("mnist study: SIGINT, then {kills} kills, results.json identical");
}

#[test]
fn inception_quick_study_killed_and_resumed_gives_the_same_results() {
    let Some(data) = common::fashion_or_skip() else {
        return;
    };
    let data = data.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // --quick with two sweep rates: 9 runs, both stages, and the ensemble.
    let args = |out: &Path| {
        vec![
            "reproduce".to_string(),
            "inception".into(),
            "--quick".into(),
            "--sweep".into(),
            "0.04,0.16".into(),
            "--data".into(),
            data.into(),
            "--out".into(),
            out.display().to_string(),
        ]
    };
    let alone = tmp.path().join("alone");
    let a = args(&alone);
    run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());

    let killed = tmp.path().join("killed");
    let k = args(&killed);
    let d = killed.to_str().unwrap();
    // SIGTERM first: status 143, the command to resume.
    let mut w = Watched::spawn(&k.iter().map(String::as_str).collect::<Vec<_>>());
    w.wait_for_line("step 20 of 100");
    signal(&w.child, "TERM");
    let (status, err) = w.finish();
    assert_eq!(status, Some(143), "{err}");
    assert!(
        err.contains(&format!(
            "resume with: bnlab reproduce inception --resume {d}"
        )),
        "{err}"
    );
    // The report so far marks the runs that are missing (or says there is nothing yet).
    let o = bnlab()
        .args(["reproduce", "inception", "--report-only", d, "--data", data])
        .output()
        .unwrap();
    let rerr = String::from_utf8_lossy(&o.stderr);
    assert!(!rerr.contains("panicked"), "{rerr}");
    if o.status.success() {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(killed.join("results.json")).unwrap()).unwrap();
        assert_eq!(json["partial"], true);
        let missing = json["missing_runs"].as_array().unwrap();
        assert!(!missing.is_empty() && missing.len() < 9, "{missing:?}");
        let md = std::fs::read_to_string(killed.join("summary.md")).unwrap();
        assert!(md.starts_with("> **Partial report**"), "{md}");
    } else {
        assert!(rerr.contains("nothing to report"), "{rerr}");
    }
    let resume = ["reproduce", "inception", "--resume", d];
    let kills = kill_and_resume(&resume, &resume, &killed, 12);
    assert!(kills >= 3, "only {kills} kills landed");
    assert_eq!(
        std::fs::read(alone.join("results.json")).unwrap(),
        std::fs::read(killed.join("results.json")).unwrap(),
        "results.json of the study killed {kills} times differs from the one left alone"
    );
    assert_eq!(
        std::fs::read(alone.join("metrics.csv")).unwrap(),
        std::fs::read(killed.join("metrics.csv")).unwrap()
    );
    println!("inception --quick study: SIGTERM, then {kills} kills, results.json identical");
}

#[test]
fn a_study_folder_is_not_started_twice_and_resume_needs_a_study() {
    let tmp = tempfile::tempdir().unwrap();
    let o = bnlab()
        .args(["reproduce", "mnist", "--resume"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no study"), "{err}");
    // A folder of one study is not resumed as another.
    let dir = tmp.path().join("s");
    bnlab::study::Study::create(&dir, "mnist", serde_json::json!({}), None).unwrap();
    let o = bnlab()
        .args(["reproduce", "inception", "--resume"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("holds a `mnist` study"), "{err}");
    // Starting a new study over one is refused, saying how to continue it.
    let Some(data) = common::mnist_or_skip() else {
        return;
    };
    let o = bnlab()
        .args(["reproduce", "mnist", "--steps", "10", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("already holds a study"), "{err}");
    assert!(err.contains("--resume"), "{err}");
}
