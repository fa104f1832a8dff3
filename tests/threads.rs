//! The thread count: every core by default (`--threads N`, else `$BNLAB_THREADS`, else the
//! cores available), and the same weights bit for bit whatever it is, through the command line.

mod common;

use std::process::Command;

fn bnlab(args: &[&str], threads_env: Option<&str>) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bnlab"));
    c.args(args)
        .env_remove("BNLAB_DATA")
        .env_remove("OMPI_COMM_WORLD_LOCAL_SIZE")
        .env_remove("MPI_LOCALNRANKS");
    match threads_env {
        Some(v) => c.env("BNLAB_THREADS", v),
        None => c.env_remove("BNLAB_THREADS"),
    };
    c.output().expect("bnlab runs")
}

/// Three BN nets, each trained 1, 2, 3 and 8 threads wide (the inception net also by
/// environment and by default): the same bits.
#[test]
fn any_thread_count_trains_the_same_bits() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    common::synthetic_mnist(&data, 256, 64);
    let d = data.to_str().unwrap();
    // The inception net (conv, pools, concat, BN), the MLP on dense pixels (its input product
    // is large enough for the `gemm` crate's path: 2 threads once gave other bits than 1
    // there), and ResNet-20 (strided and 1x1 convolutions, residual adds). Batches that do not
    // divide by the thread counts.
    // The convolutional nets on the default --conv (winograd) and on direct.
    for (model, batch, steps, conv) in [
        ("inception-mini-bn", "16", "6", "winograd"),
        ("inception-mini-bn", "16", "6", "direct"),
        ("mlp-fig1-bn", "60", "6", "winograd"),
        ("resnet20-bn", "10", "2", "winograd"),
        ("resnet20-bn", "10", "2", "direct"),
    ] {
        let train = |name: &str, extra: &[&str], env: Option<&str>| {
            let out = t.path().join(format!("{model}-{conv}-{name}"));
            let mut args = vec![
                "train",
                "--model",
                model,
                "--data",
                d,
                "--steps",
                steps,
                "--batch-size",
                batch,
                "--lr",
                "0.05",
                "--momentum",
                "0.9",
                "--eval-every",
                "3",
                "--out",
                out.to_str().unwrap(),
                "--progress",
                "plain",
            ];
            if conv != "winograd" {
                args.extend_from_slice(&["--conv", conv]);
            }
            args.extend_from_slice(extra);
            let o = bnlab(&args, env);
            assert!(
                o.status.success(),
                "{model} {name}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            common::checkpoint_bits(&out.join("final.safetensors"))
        };
        let one = train("one", &["--threads", "1"], None);
        assert!(!one.is_empty());
        let runs: &[(&str, &[&str], Option<&str>)] =
            if model == "inception-mini-bn" && conv == "winograd" {
                &[
                    ("default", &[], None),
                    ("two", &["--threads", "2"], None),
                    ("three", &["--threads", "3"], None),
                    ("eight", &["--threads", "8"], None),
                    ("env2", &[], Some("2")),
                    ("env1", &[], Some("1")),
                ]
            } else {
                &[
                    ("two", &["--threads", "2"], None),
                    ("three", &["--threads", "3"], None),
                    ("eight", &["--threads", "8"], None),
                ]
            };
        for &(name, extra, env) in runs {
            assert!(
                train(name, extra, env) == one,
                "{model} ({conv}) {name}: other bits than one thread"
            );
        }
    }
}

/// `bench --json` says how many threads it used, its rate and its arithmetic rate; the default
/// is every core; bad values are refused with the setting named.
#[test]
fn bench_reports_threads_and_rates() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    common::synthetic_mnist(&data, 128, 16);
    let d = data.to_str().unwrap();
    let bench = |extra: &[&str], env: Option<&str>| -> serde_json::Value {
        let mut args = vec![
            "bench",
            "--model",
            "mlp-fig1-bn",
            "--data",
            d,
            "--steps",
            "20",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = bnlab(&args, env);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8_lossy(&o.stdout);
        serde_json::from_str(out.lines().last().unwrap()).unwrap()
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let j = bench(&[], None);
    assert_eq!(j["threads"], cores.min(bnlab::kernels::MAX_THREADS), "{j}");
    // 784*100 + 100*100 + 100*100 + 100*10 multiply-adds, 6 FLOP each (forward and the two
    // backward products), 60 examples.
    let flop = 6.0 * (78_400.0 + 10_000.0 + 10_000.0 + 1_000.0) * 60.0;
    assert_eq!(j["flop_per_step"], flop, "{j}");
    let (rate, gflops) = (
        j["steps_per_s"].as_f64().unwrap(),
        j["gflops"].as_f64().unwrap(),
    );
    assert!(rate > 0.0 && (gflops - flop * rate / 1e9).abs() < 1e-9 * gflops.max(1.0));
    // Left to bnlab, the count adapts (on more than one core), and every timed step is
    // counted on the count it ran on; fixed, it does not.
    assert_eq!(j["threads_adaptive"], cores > 1, "{j}");
    if cores > 1 {
        let counted: u64 = j["steps_by_threads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["steps"].as_u64().unwrap())
            .sum();
        assert_eq!(counted, 20, "{j}");
    }
    let one = bench(&["--threads", "1"], None);
    assert_eq!(one["threads"], 1);
    assert_eq!(one["threads_adaptive"], false, "{one}");
    let env = bench(&[], Some("2"));
    assert_eq!(env["threads_adaptive"], false, "{env}");
    assert_eq!(bench(&[], Some("1"))["threads"], 1);
    // The convolution algorithm: winograd unless told.
    assert_eq!(j["conv"], "winograd", "{j}");
    assert_eq!(bench(&["--conv", "direct"], None)["conv"], "direct");
    // The flag wins over the environment.
    assert_eq!(bench(&["--threads", "1"], Some("2"))["threads"], 1);
    for (extra, env, needle) in [
        (&["--threads", "0"][..], None, "--threads"),
        (&[][..], Some("0"), "$BNLAB_THREADS"),
        (&[][..], Some("many"), "$BNLAB_THREADS"),
        (&["--conv", "fast"][..], None, "--conv"),
    ] {
        let mut args = vec![
            "bench",
            "--model",
            "mlp-fig1-bn",
            "--data",
            d,
            "--steps",
            "5",
        ];
        args.extend_from_slice(extra);
        let o = bnlab(&args, env);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle),
            "{extra:?} {env:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `$BNLAB_PIN` (the thread-pinning diagnostic): 1 and 0 run, with the same bits; anything else
/// is refused with the variable named.
#[test]
fn pin_setting_is_checked_and_keeps_the_bits() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    common::synthetic_mnist(&data, 128, 16);
    let d = data.to_str().unwrap();
    let run = |pin: &str, name: &str| {
        let out = t.path().join(name);
        let o = Command::new(env!("CARGO_BIN_EXE_bnlab"))
            .args([
                "train",
                "--model",
                "mlp-fig1-bn",
                "--data",
                d,
                "--steps",
                "4",
                "--batch-size",
                "20",
                "--threads",
                "2",
                "--out",
                out.to_str().unwrap(),
                "--progress",
                "plain",
            ])
            .env("BNLAB_PIN", pin)
            .env_remove("BNLAB_DATA")
            .output()
            .unwrap();
        (o, out.join("final.safetensors"))
    };
    let (o1, f1) = run("1", "pinned");
    assert!(
        o1.status.success(),
        "{}",
        String::from_utf8_lossy(&o1.stderr)
    );
    let (o0, f0) = run("0", "free");
    assert!(
        o0.status.success(),
        "{}",
        String::from_utf8_lossy(&o0.stderr)
    );
    assert!(common::checkpoint_bits(&f1) == common::checkpoint_bits(&f0));
    let (bad, _) = run("yes", "bad");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("$BNLAB_PIN"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
