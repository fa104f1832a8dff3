//! `bnlab reproduce inception --quick` end to end, as CI runs it: the whole path (sweep,
//! variants, ensemble, report) on Fashion-MNIST in a few minutes, and every file it leaves
//! checked for structure and internal consistency. The paper's claims are not asserted: the
//! quick budget is far too small for them (the default run's summary.md evaluates them).
//!
//! Needs Fashion-MNIST (see `common::fashion_dir`: /usr/share/datasets/fashion-mnist,
//! `$BNLAB_DATA/fashion-mnist` or ./data/fashion-mnist); `.ci/run` installs it (`apt-get install
//! dataset-fashion-mnist`). Without it the test reports itself skipped.

mod common;

use std::process::Command;

const NAMES: [&str; 7] = [
    "Inception",
    "BN-Baseline",
    "BN-x5",
    "BN-x30",
    "BN-x5-Sigmoid",
    "Inception-x5",
    "Inception-Sigmoid",
];

fn num(v: &serde_json::Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

#[test]
fn quick_reproduction_writes_a_consistent_report() {
    let Some(data) = common::fashion_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("inception");
    let t = std::time::Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .args(["reproduce", "inception", "--quick", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("bnlab runs");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "reproduce inception failed: {stderr}");
    println!(
        "reproduce inception --quick: {:.1} s\n{stderr}",
        t.elapsed().as_secs_f64()
    );

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let setup = &json["setup"];
    let members = setup["ensemble_members"].as_u64().unwrap();
    assert_eq!(members, 2, "--quick has two ensemble members");
    let steps = setup["steps"].as_u64().unwrap() as usize;
    let lr0 = num(&setup["lr0"], "lr0");
    let sweep = json["lr_sweep"].as_array().unwrap();
    assert!(sweep.len() >= 5, "at least 5 sweep rates");
    assert_eq!(
        sweep.iter().filter(|r| r["chosen"] == true).count(),
        1,
        "one chosen rate"
    );
    assert!(sweep
        .iter()
        .any(|r| r["chosen"] == true && num(&r["lr"], "lr") == lr0));

    let variants = json["variants"].as_object().unwrap();
    assert_eq!(variants.len(), NAMES.len());
    let base_max = num(&variants["Inception"]["max_accuracy"], "Inception max");
    for name in NAMES {
        let v = &variants[name];
        assert!(v.is_object(), "variant {name} missing");
        let curve = v["curve"].as_array().unwrap();
        assert!(!curve.is_empty(), "{name}: empty curve");
        let mut prev: Option<u64> = None;
        let mut max = f64::NEG_INFINITY;
        let mut first_reach = None;
        for p in curve {
            let step = p["step"].as_u64().unwrap();
            let acc = num(&p["test_accuracy"], "test_accuracy");
            assert!((0.0..=1.0).contains(&acc), "{name}: accuracy {acc}");
            assert!(step as usize <= steps, "{name}: step {step} past {steps}");
            if let Some(prev) = prev {
                assert!(step > prev, "{name}: steps not increasing");
            }
            prev = Some(step);
            max = max.max(acc);
            if first_reach.is_none() && acc >= base_max {
                first_reach = Some(step);
            }
        }
        assert_eq!(num(&v["max_accuracy"], "max"), max, "{name}: max_accuracy");
        assert_eq!(
            v["steps_to_baseline_max"].as_u64(),
            first_reach,
            "{name}: steps_to_baseline_max"
        );
        let diverged = v["diverged"].as_bool().unwrap();
        if !diverged {
            assert_eq!(
                prev,
                Some(steps as u64),
                "{name}: curve ends at the last step"
            );
            let fin = num(&v["final_test_accuracy"], "final");
            assert!((0.0..=1.0).contains(&fin));
        }
    }
    assert!(
        !variants["Inception"]["steps_to_baseline_max"].is_null(),
        "Inception reaches its own maximum"
    );
    // Not the paper's claims, but training must work at all: 100 steps of the BN net at lr0
    // take it far above chance (74% on the subset when this was written; deterministic).
    let bn_max = num(&variants["BN-Baseline"]["max_accuracy"], "BN-Baseline max");
    assert!(
        bn_max > 0.5,
        "BN-Baseline reached only {bn_max} in the quick run"
    );

    let e = &json["ensemble"];
    assert_eq!(e["members"].as_u64(), Some(members));
    let acc = num(&e["accuracy"], "ensemble accuracy");
    let best = num(&e["best_member_accuracy"], "best member");
    assert!((0.0..=1.0).contains(&acc) && (0.0..=1.0).contains(&best));
    let accs: Vec<f64> = e["member_accuracies"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_f64())
        .collect();
    assert_eq!(accs.iter().copied().fold(f64::NEG_INFINITY, f64::max), best);
    // The first member is the BN-x30 variant itself.
    if let Some(f) = variants["BN-x30"]["final_test_accuracy"].as_f64() {
        assert_eq!(accs[0], f);
    }

    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    for needle in [
        "## Setup",
        "## Learning-rate sweep",
        "## Figures 2 and 3",
        "## Figure 4",
        "## Checks against the paper",
        "31.0M",
        "74.8%",
    ] {
        assert!(summary.contains(needle), "summary.md lacks {needle:?}");
    }
    for name in NAMES {
        assert!(
            summary.contains(&format!("| {name} |")),
            "summary.md lacks {name}"
        );
    }
    for fig in ["accuracy", "accuracy_zoom", "sweep"] {
        let png = std::fs::read(out.join(format!("{fig}.png"))).unwrap();
        assert!(png.len() > 5_000, "{fig}.png is {} bytes", png.len());
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{fig}.png magic");
        let svg = std::fs::read_to_string(out.join(format!("{fig}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.len() > 5_000, "{fig}.svg");
    }
    assert!(std::fs::read_to_string(out.join("metrics.csv"))
        .unwrap()
        .starts_with("run,lr,step,test_accuracy\n"));
}
