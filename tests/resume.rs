//! A run killed with SIGKILL any number of times and resumed each time ends bit-identical to
//! the same run left alone, and a run directory always holds a loadable checkpoint.

mod common;

use bnlab::checkpoint::TensorFile;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bnlab() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bnlab"));
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn train_args<'a>(data: &'a str, out: &'a str, threads: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        "mlp-fig1-bn",
        "--data",
        data,
        "--steps",
        "4000",
        "--eval-every",
        "1000",
        "--checkpoint-every",
        "250",
        "--momentum",
        "0.9",
        "--weight-decay",
        "0.0001",
        "--schedule",
        "exp:1000:0.8",
        "--threads",
        threads,
        "--out",
        out,
    ]
}

#[test]
fn killed_and_resumed_runs_end_bit_identical() {
    let Some(data) = common::mnist_or_skip() else {
        return;
    };
    let data = data.to_str().unwrap();
    for threads in ["1", "2"] {
        let tmp = tempfile::tempdir().unwrap();
        let alone = tmp.path().join("alone");
        let o = bnlab()
            .args(train_args(data, alone.to_str().unwrap(), threads))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

        let killed = tmp.path().join("killed");
        let k = killed.to_str().unwrap();
        let mut kills = 0;
        let mut child = bnlab().args(train_args(data, k, threads)).spawn().unwrap();
        // Each attempt loads the data (~0.2 s) before training: kills 0.45-0.8 s after a start
        // leave it time to pass at least one checkpoint, so the run always progresses.
        let mut delay = 450u64;
        loop {
            let start = Instant::now();
            let mut finished = false;
            while start.elapsed() < Duration::from_millis(delay) {
                if child.try_wait().unwrap().is_some() {
                    finished = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            // Bounded: on a very slow machine, stop interrupting and let the run finish.
            if finished || kills == 25 {
                break;
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            kills += 1;
            // Whatever instant the kill hit, the directory holds a loadable checkpoint.
            let latest = killed.join("latest.safetensors");
            if latest.exists() {
                TensorFile::read(&latest).expect("latest checkpoint is whole");
            }
            delay = 450 + (delay * 7) % 350;
            child = bnlab()
                .args(["train", "--resume", k, "--data", data])
                .spawn()
                .unwrap();
        }
        assert!(child.wait().unwrap().success());
        assert!(
            kills >= 3,
            "only {kills} kills landed; the run was too quick to interrupt"
        );
        assert_eq!(
            common::checkpoint_bits(&alone.join("final.safetensors")),
            common::checkpoint_bits(&killed.join("final.safetensors")),
            "threads {threads}: resumed run differs after {kills} kills"
        );
        assert_eq!(
            std::fs::read_to_string(alone.join("metrics.csv")).unwrap(),
            std::fs::read_to_string(killed.join("metrics.csv")).unwrap()
        );
        println!("threads {threads}: {kills} kills, final weights bit-identical");
    }
}

#[test]
fn resume_refuses_what_it_cannot_continue() {
    let tmp = tempfile::tempdir().unwrap();
    let o = bnlab()
        .args(["train", "--resume", tmp.path().to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("no run to resume"), "{err}");
    let Some(data) = common::mnist_or_skip() else {
        return;
    };
    let data = data.to_str().unwrap();
    let out = tmp.path().join("run");
    let args = [
        "train",
        "--model",
        "mlp-fig1",
        "--data",
        data,
        "--steps",
        "50",
        "--out",
        out.to_str().unwrap(),
    ];
    assert!(bnlab().args(args).output().unwrap().status.success());
    // Starting a new run over an existing one is refused, not silently mixed.
    let o = bnlab().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("already holds a run"), "{err}");
    // A corrupt state file is named.
    std::fs::write(out.join("state.safetensors"), b"garbage").unwrap();
    let o = bnlab()
        .args(["train", "--resume", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("state.safetensors"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
