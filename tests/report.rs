//! The MNIST report end to end: a synthetic run written to a temporary directory and every file
//! read back.
//!
//! The synthetic curves use integer "correct counts" out of 10,000 test images so that every
//! accuracy is an exactly representable quotient and the expected summary numbers can be worked
//! out by hand (see `bn_count` and `plain_count`).

use std::io::Read as _;
use std::path::Path;

use bnlab::report::{
    line_chart, write_atomic, write_mnist_report, CurvePoint, MnistReport, VariantRun,
};
use bnlab::Error;

/// Evaluation every 1,100 steps, 50 evaluations: steps 0, 1100, ..., 53900. The interval is
/// deliberately not a divisor of the 1k/5k/... checkpoints, so the table must fall back to the
/// last evaluation before each checkpoint.
const POINTS: usize = 50;
const EVERY: usize = 1_100;

/// With BN: 90.00% at step 0, +1 point per evaluation up to 98.00% (i = 8), then +0.01 point.
/// First evaluation >= 97%: i = 7, step 7,700.
fn bn_count(i: usize) -> usize {
    if i <= 8 {
        9_000 + 100 * i
    } else {
        9_800 + (i - 8)
    }
}

/// Without BN: 85.00% + 0.2 point per evaluation, at most 94.80% (i = 49): never 97%.
fn plain_count(i: usize) -> usize {
    8_500 + 20 * i
}

fn curve(count: fn(usize) -> usize, spread: f64, drift: f64) -> Vec<CurvePoint> {
    (0..POINTS)
        .map(|i| {
            let t = i as f64;
            let p50 = 0.3 * (t / 5.0).sin() + drift * t;
            CurvePoint {
                step: i * EVERY,
                test_accuracy: count(i) as f64 / 10_000.0,
                p15: p50 - spread - drift * t,
                p50,
                p85: p50 + spread + drift * t,
                train_loss: 2.3 * (-t / 10.0).exp() + 0.05,
            }
        })
        .collect()
}

fn synthetic() -> MnistReport {
    MnistReport {
        setup: serde_json::json!({
            "dataset": "MNIST",
            "steps": 53_900,
            "batch": 60,
            "lr": 0.1,
            "seed": 42,
        }),
        variants: vec![
            VariantRun {
                name: "mlp-fig1".into(),
                curve: curve(plain_count, 1.0, 0.03),
                final_running: 0.948,
                final_population: 0.948,
                train_seconds: 61.27,
            },
            VariantRun {
                name: "mlp-fig1-bn".into(),
                curve: curve(bn_count, 0.8, 0.0),
                final_running: 0.9841,
                final_population: 0.9838,
                train_seconds: 95.5,
            },
        ],
    }
}

const FILES: [&str; 5] = [
    "metrics.csv",
    "results.json",
    "fig1.svg",
    "fig1.png",
    "summary.md",
];

/// serde_json (without its `float_roundtrip` feature) may parse a float one ulp off.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Chunks of a PNG file, with their CRCs checked.
fn png_chunks(bytes: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    let mut chunks = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = bytes[at + 4..at + 8].try_into().unwrap();
        let data = bytes[at + 8..at + 8 + len].to_vec();
        let crc = u32::from_be_bytes(bytes[at + 8 + len..at + 12 + len].try_into().unwrap());
        let mut c = flate2::Crc::new();
        c.update(&kind);
        c.update(&data);
        assert_eq!(
            c.sum(),
            crc,
            "CRC of chunk {:?}",
            String::from_utf8_lossy(&kind)
        );
        chunks.push((kind, data));
        at += 12 + len;
    }
    chunks
}

/// Decodes an 8-bit RGB PNG as written by bnlab (filters None and Up only) into (w, h, rgb).
fn decode_png(bytes: &[u8]) -> (usize, usize, Vec<u8>) {
    let chunks = png_chunks(bytes);
    assert_eq!(&chunks[0].0, b"IHDR");
    assert_eq!(&chunks.last().unwrap().0, b"IEND");
    let ihdr = &chunks[0].1;
    let w = u32::from_be_bytes(ihdr[0..4].try_into().unwrap()) as usize;
    let h = u32::from_be_bytes(ihdr[4..8].try_into().unwrap()) as usize;
    assert_eq!(&ihdr[8..13], &[8, 2, 0, 0, 0], "8-bit RGB, not interlaced");
    let idat: Vec<u8> = chunks
        .iter()
        .filter(|(k, _)| k == b"IDAT")
        .flat_map(|(_, d)| d.iter().copied())
        .collect();
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..])
        .read_to_end(&mut raw)
        .expect("IDAT is a valid zlib stream");
    let row = 3 * w;
    assert_eq!(raw.len(), h * (row + 1), "decoded data size");
    let mut rgb = vec![0u8; row * h];
    for y in 0..h {
        let line = &raw[y * (row + 1)..(y + 1) * (row + 1)];
        for x in 0..row {
            let up = if y > 0 { rgb[(y - 1) * row + x] } else { 0 };
            rgb[y * row + x] = match line[0] {
                0 => line[1 + x],
                2 => line[1 + x].wrapping_add(up),
                f => panic!("unexpected PNG filter {f}"),
            };
        }
    }
    (w, h, rgb)
}

#[test]
fn mnist_report_files() {
    let dir = tempfile::tempdir().unwrap();
    // A directory that does not exist yet: the writer must create it.
    let out = dir.path().join("runs").join("fig1");
    let report = synthetic();
    write_mnist_report(&out, &report).unwrap();

    for f in FILES {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // metrics.csv: header, one row per evaluation per variant, values read back exactly.
    let csv = read(&out.join("metrics.csv"));
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("variant,step,test_accuracy,p15,p50,p85,train_loss")
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2 * POINTS);
    let expected = report
        .variants
        .iter()
        .flat_map(|v| v.curve.iter().map(move |p| (v.name.as_str(), p)));
    for (row, (name, p)) in rows.iter().zip(expected) {
        let f: Vec<&str> = row.split(',').collect();
        assert_eq!(f.len(), 7, "{row}");
        assert_eq!(f[0], name);
        assert_eq!(f[1].parse::<usize>().unwrap(), p.step);
        let back: Vec<f64> = f[2..].iter().map(|x| x.parse().unwrap()).collect();
        assert_eq!(
            back,
            vec![p.test_accuracy, p.p15, p.p50, p.p85, p.train_loss],
            "{row}"
        );
    }

    // results.json
    let json: serde_json::Value = serde_json::from_str(&read(&out.join("results.json"))).unwrap();
    assert_eq!(json["setup"], report.setup);
    for v in &report.variants {
        let j = &json["variants"][v.name.as_str()];
        let curve = j["curve"].as_array().expect("curve array");
        assert_eq!(curve.len(), POINTS);
        let back: Vec<CurvePoint> = serde_json::from_value(j["curve"].clone()).unwrap();
        for (b, p) in back.iter().zip(&v.curve) {
            assert_eq!(b.step, p.step);
            for (x, y) in [
                (b.test_accuracy, p.test_accuracy),
                (b.p15, p.p15),
                (b.p50, p.p50),
                (b.p85, p.p85),
                (b.train_loss, p.train_loss),
            ] {
                assert!(close(x, y), "{x} != {y}");
            }
        }
        for key in ["step", "test_accuracy", "p15", "p50", "p85", "train_loss"] {
            assert!(curve[0].get(key).is_some(), "curve point lacks {key}");
        }
        assert!(close(
            j["final"]["running"].as_f64().unwrap(),
            v.final_running
        ));
        assert!(close(
            j["final"]["population"].as_f64().unwrap(),
            v.final_population
        ));
        // Timings live in timings.json, so that a resumed study's results.json is identical.
        assert!(j.get("train_seconds").is_none());
        let t: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("timings.json")).unwrap()).unwrap();
        assert!(close(
            t["train_seconds"][v.name.as_str()].as_f64().unwrap(),
            v.train_seconds
        ));
    }
    assert_eq!(json["variants"].as_object().unwrap().len(), 2);

    // fig1.png: a valid PNG of about 1500x450 with both net colours on it.
    let (w, h, rgb) = decode_png(&std::fs::read(out.join("fig1.png")).unwrap());
    assert_eq!((w, h), (1500, 450));
    let near = |c: [u8; 3]| {
        rgb.chunks(3)
            .filter(|p| (0..3).all(|k| (p[k] as i32 - c[k] as i32).abs() < 12))
            .count()
    };
    assert!(near([33, 102, 172]) > 500, "too few blue (with BN) pixels");
    assert!(
        near([230, 97, 1]) > 500,
        "too few orange (without BN) pixels"
    );
    assert!(
        near([255, 255, 255]) > w * h / 2,
        "background should be white"
    );

    // fig1.svg
    let svg = read(&out.join("fig1.svg"));
    assert!(svg.contains("<svg"));
    for title in [
        "(a) Test accuracy",
        "(b) Without BN",
        "(c) With BN",
        "Without BN",
        "With BN",
        "50th percentile",
        "steps",
        "10k",
    ] {
        assert!(svg.contains(title), "fig1.svg lacks {title:?}");
    }

    // summary.md
    let md = read(&out.join("summary.md"));
    for needle in [
        "![Figure 1](fig1.png)",
        "- dataset: MNIST",
        "- lr: 0.1",
        "| net | 1k | 5k | 10k | 20k | 50k |",
        // Hand-computed: checkpoints fall back to steps 0, 4400, 9900, 19800, 49500 (i = 0, 4, 9, 18, 45).
        "| With BN (`mlp-fig1-bn`) | 90.00% | 94.00% | 98.01% | 98.10% | 98.37% |",
        "| Without BN (`mlp-fig1`) | 85.00% | 85.80% | 86.80% | 88.60% | 94.00% |",
        "| With BN, PyTorch reference | — | 95.5% | 96.4% | 97.5% | 98.0% |",
        "| Without BN, PyTorch reference | — | 91.2% | 94.9% | 96.7% | 97.3% |",
        // First evaluation >= 97%: i = 7, step 7700; the plain net tops out at 94.80%.
        "| With BN (`mlp-fig1-bn`) | 7700 |",
        "| Without BN (`mlp-fig1`) | not reached |",
        "| With BN (`mlp-fig1-bn`) | 53900 | 98.41% | 98.38% | 95.5 s |",
        "| Without BN (`mlp-fig1`) | 53900 | 94.80% | 94.80% | 61.3 s |",
        "At 5k steps the net with BN is ahead: 94.00% against 85.80% without BN.",
        "At 10k steps the net with BN is ahead: 98.01% against 86.80% without BN.",
        "reaches 97.80% with both kinds of statistics",
    ] {
        assert!(md.contains(needle), "summary.md lacks {needle:?}:\n{md}");
    }
}

#[test]
fn summary_follows_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut report = synthetic();
    // Shorter run: 12 evaluations, last at step 12,100, so the 20k and 50k columns go away.
    for v in &mut report.variants {
        v.curve.truncate(12);
    }
    // The plain net now leads at 5k; population statistics fall short of 97.8%.
    report.variants[0].curve[4].test_accuracy = 0.99;
    report.variants[1].final_population = 0.9779;
    write_mnist_report(dir.path(), &report).unwrap();
    let md = read(&dir.path().join("summary.md"));
    assert!(md.contains("| net | 1k | 5k | 10k |\n"), "{md}");
    assert!(!md.contains("| 20k"), "{md}");
    assert!(md.contains("At 5k steps the net with BN is not ahead: 94.00% against 99.00%"));
    assert!(md.contains(
        "reaches 97.80% with running-average statistics but not with population statistics"
    ));
    // The plain net's 99% at step 4400 is its first evaluation >= 97%.
    assert!(md.contains("| Without BN (`mlp-fig1`) | 4400 |"), "{md}");
}

#[test]
fn bad_reports_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut twice = synthetic();
    twice.variants[1].name = "mlp-fig1".into();
    assert!(matches!(
        write_mnist_report(dir.path(), &twice),
        Err(Error::Report { .. })
    ));
    let mut backwards = synthetic();
    backwards.variants[0].curve.swap(3, 4);
    assert!(matches!(
        write_mnist_report(dir.path(), &backwards),
        Err(Error::Report { .. })
    ));
    // Nothing is written for a rejected report.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn write_atomic_replaces_and_leaves_no_tmp() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.txt");
    write_atomic(&path, b"first").unwrap();
    write_atomic(&path, b"second").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second");
    assert!(!dir.path().join("data.txt.tmp").exists());
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
    // A directory that does not exist is an I/O error, not a panic, and leaves nothing behind.
    let missing = dir.path().join("no").join("such.txt");
    assert!(matches!(
        write_atomic(&missing, b"x"),
        Err(Error::Io { .. })
    ));
}

#[test]
fn line_chart_writes_svg_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("lr-study");
    let series: Vec<(String, Vec<(f64, f64)>)> = [0.05, 0.1, 0.5]
        .iter()
        .map(|&lr| {
            let pts = (0..=40)
                .map(|i| {
                    let step = i as f64 * 500.0;
                    (step, 0.98 - 0.1 * (-step * lr / 1_000.0).exp())
                })
                .collect();
            (format!("lr {lr}"), pts)
        })
        .collect();
    line_chart(
        &base,
        "Learning rate study",
        "steps",
        "test accuracy",
        &series,
        Some((0.85, 1.0)),
    )
    .unwrap();
    let svg = read(&dir.path().join("lr-study.svg"));
    assert!(svg.contains("<svg") && svg.contains("Learning rate study") && svg.contains("lr 0.5"));
    let (w, h, _) = decode_png(&std::fs::read(dir.path().join("lr-study.png")).unwrap());
    assert_eq!((w, h), (900, 560));
    // Automatic range and an empty series are fine too; an empty range is an error.
    line_chart(&base, "auto", "x", "y", &[("none".into(), vec![])], None).unwrap();
    assert!(matches!(
        line_chart(&base, "bad", "x", "y", &series, Some((1.0, 1.0))),
        Err(Error::Report { .. })
    ));
}

/// Writes the synthetic report to `$BNLAB_REPORT_PREVIEW` (default: a `report-preview` directory
/// in the system temp dir) to look at the figure: `cargo test --test report -- --ignored`.
#[test]
#[ignore]
fn preview() {
    let out = std::env::var_os("BNLAB_REPORT_PREVIEW")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("report-preview"));
    let report = synthetic();
    write_mnist_report(&out, &report).unwrap();
    let series: Vec<(String, Vec<(f64, f64)>)> = report
        .variants
        .iter()
        .map(|v| {
            let pts = v.curve.iter().map(|p| (p.step as f64, p.test_accuracy));
            (v.name.clone(), pts.collect())
        })
        .collect();
    line_chart(
        &out.join("line-chart"),
        "Test accuracy",
        "steps",
        "test accuracy",
        &series,
        None,
    )
    .unwrap();
    println!("wrote {}", out.display());
}
