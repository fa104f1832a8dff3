//! Data sets chosen by the user: images of shape (C, H, W) as bytes or floats, per-channel
//! normalization, the crop-flip augmentation, CIFAR-10's binary files and their download from a
//! local HTTP server, NumPy `.npz` archives made here, the `--data` / `--dataset` rules, and
//! property tests that the CIFAR-10 and `.npz` parsers never panic, whatever the bytes.

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

mod common;

use bnlab::data::idx::{gzip_bytes, idx_bytes};
use bnlab::data::npz::parse_npy;
use bnlab::data::{
    channel_stats, cifar10_from, cifar10_url, crop_flip, crop_flip_one, detect_source,
    download_cifar10, draw_crop, load_cifar10_dir, load_mnist_dir, load_npz, mnist_from,
    parse_cifar10_batch, parse_normalize_flag, parse_npz, resolve_source_with, sha256_hex,
    CropDraw, CropFlip, DataSource, Dataset, Normalization, NormalizeFlag, Pixels, SourceSettings,
    CIFAR10_FILES, MNIST_FILES,
};
use common::{npy, npy_with, zip_of};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// an allocation counter for the current thread (other tests run on other threads)

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards to the system allocator, counting calls per thread.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count();
        std::alloc::System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        count();
        std::alloc::System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_in(f: impl FnOnce()) -> usize {
    let before = ALLOCS.with(|c| c.get());
    f();
    ALLOCS.with(|c| c.get()) - before
}

// ---------------------------------------------------------------------------------------------
// helpers

fn err_of<T: std::fmt::Debug>(r: bnlab::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error does not mention {p:?}: {msg}");
    }
}

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, seed: u32) -> Vec<u8> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as u8
        })
        .collect()
}

fn dir_listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn filled(d: &Dataset, idx: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let mut x = vec![f32::NAN; idx.len() * d.features()];
    let mut y = vec![usize::MAX; idx.len()];
    d.fill_batch(idx, &mut x, &mut y);
    (x, y)
}

/// A data set of `n` byte images of `shape` with labels < 10.
fn u8_set(n: usize, shape: [usize; 3], seed: u32) -> Dataset {
    let f: usize = shape.iter().product();
    let labels = bytes(n, seed + 1).iter().map(|b| b % 10).collect();
    Dataset::new(Pixels::U8(bytes(n * f, seed)), labels, shape, 10).unwrap()
}

fn f32_set(n: usize, shape: [usize; 3], seed: u32) -> Dataset {
    let f: usize = shape.iter().product();
    let v = bytes(n * f, seed)
        .iter()
        .map(|&b| b as f32 * 0.37 - 20.0)
        .collect();
    Dataset::new(Pixels::F32(v), vec![1; n], shape, 3).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Dataset: shapes, conversion, normalization

#[test]
fn byte_batches_are_pixels_over_255_and_none_changes_nothing() {
    let mut d = u8_set(5, [3, 4, 2], 7);
    assert_eq!((d.shape(), d.features(), d.len()), ([3, 4, 2], 24, 5));
    let idx = [4, 0, 2, 2];
    let (x, y) = filled(&d, &idx);
    let px = d.images.as_u8().unwrap().to_vec();
    for (r, &i) in idx.iter().enumerate() {
        assert_eq!(y[r], d.labels[i] as usize);
        for j in 0..24 {
            assert_eq!(
                x[r * 24 + j].to_bits(),
                (px[i * 24 + j] as f32 / 255.0).to_bits()
            );
        }
    }
    d.set_normalization(None).unwrap();
    assert_eq!(filled(&d, &idx).0, x);
    assert_eq!(d.normalization(), None);
}

#[test]
fn normalization_is_per_channel_and_fill_columns_agrees() {
    for mut d in [u8_set(6, [3, 3, 5], 3), f32_set(6, [3, 3, 5], 4)] {
        let n = Normalization::new(vec![0.5, -1.0, 2.0], vec![0.25, 3.0, 0.7]).unwrap();
        let (raw, _) = filled(&d, &[0, 1, 2, 3, 4, 5]);
        d.set_normalization(Some(n.clone())).unwrap();
        assert_eq!(d.normalization(), Some(&n));
        let idx = [5, 1, 3];
        let (x, _) = filled(&d, &idx);
        let f = d.features();
        for (r, &i) in idx.iter().enumerate() {
            for j in 0..f {
                let c = j / 15;
                let want = (raw[i * f + j] - n.mean[c]) / n.std[c];
                assert_eq!(
                    x[r * f + j].to_bits(),
                    want.to_bits(),
                    "{}",
                    d.images.dtype()
                );
            }
        }
        // Column ranges that cut channels anywhere give the same values.
        for cut in [0, 1, 7, 15, 16, 29, 30, 44, 45] {
            let mut xc = vec![f32::NAN; idx.len() * f];
            d.fill_columns(&idx, &mut xc, 0..cut);
            d.fill_columns(&idx, &mut xc, cut..f);
            assert_eq!(xc, x, "cut {cut}");
        }
        // Removing it restores the raw values.
        d.set_normalization(None).unwrap();
        assert_eq!(filled(&d, &[0, 1, 2, 3, 4, 5]).0, raw);
    }
}

#[test]
fn float_pixels_are_copied() {
    let d = f32_set(3, [1, 2, 2], 9);
    let (x, y) = filled(&d, &[2, 0]);
    let v = d.images.as_f32().unwrap();
    assert_eq!(&x[..4], &v[8..12]);
    assert_eq!(&x[4..], &v[..4]);
    assert_eq!(y, vec![1, 1]);
    // Debug stays short whatever the size.
    let shown = format!("{:?}", Pixels::U8(vec![7; 100_000]));
    assert!(
        shown.starts_with("U8(len 100000: [7, 7") && shown.len() < 80,
        "{shown}"
    );
}

#[test]
fn normalization_is_validated() {
    let mut d = u8_set(2, [3, 2, 2], 1);
    // One pair for all channels is expanded.
    d.set_normalization(Some(Normalization::uniform(0.5, 0.5).unwrap()))
        .unwrap();
    assert_eq!(d.normalization().unwrap().mean, vec![0.5; 3]);
    let before = d.clone();
    let two = Normalization {
        mean: vec![0.0, 0.0],
        std: vec![1.0, 1.0],
    };
    assert_has(
        &err_of(d.set_normalization(Some(two))),
        &["2 (mean, std) pairs", "3 channel"],
    );
    for (m, s) in [
        (0.0, 0.0),
        (0.0, -1.0),
        (0.0, f32::NAN),
        (f32::INFINITY, 1.0),
    ] {
        let bad = Normalization {
            mean: vec![m],
            std: vec![s],
        };
        assert!(d.set_normalization(Some(bad)).is_err(), "{m} {s}");
    }
    assert_eq!(d, before, "a refused normalization changes nothing");
}

#[test]
fn dataset_new_checks_its_parts() {
    assert_has(
        &err_of(Dataset::new(
            Pixels::U8(vec![0; 10]),
            vec![0, 1],
            [1, 2, 3],
            2,
        )),
        &["10 u8", "2 images", "[1, 2, 3]"],
    );
    assert_has(
        &err_of(Dataset::new(
            Pixels::U8(vec![0; 2]),
            vec![0, 5],
            [1, 1, 1],
            5,
        )),
        &["index 1", "is 5", "0..5"],
    );
}

#[test]
fn channel_stats_are_population_statistics_in_f64() {
    let d = u8_set(40, [3, 5, 4], 11);
    let f32d = f32_set(40, [3, 5, 4], 12);
    for d in [d, f32d] {
        let s = channel_stats(&d);
        let (x, _) = filled(&d, &(0..d.len()).collect::<Vec<_>>());
        let plane = 20;
        for c in 0..3 {
            let vals: Vec<f64> = x
                .chunks_exact(60)
                .flat_map(|img| img[c * plane..(c + 1) * plane].iter().map(|&v| v as f64))
                .collect();
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let sd = (vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / vals.len() as f64).sqrt();
            assert_eq!(
                s.mean[c],
                m as f32,
                "{} mean of channel {c}",
                d.images.dtype()
            );
            assert_eq!(
                s.std[c],
                sd as f32,
                "{} std of channel {c}",
                d.images.dtype()
            );
        }
        // Normalized by its own statistics: mean 0, std 1 per channel.
        let mut n = d.clone();
        n.set_normalization(Some(s.clone())).unwrap();
        let (x, _) = filled(&n, &(0..n.len()).collect::<Vec<_>>());
        for c in 0..3 {
            let vals: Vec<f64> = x
                .chunks_exact(60)
                .flat_map(|img| img[c * plane..(c + 1) * plane].iter().map(|&v| v as f64))
                .collect();
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let sd = (vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / vals.len() as f64).sqrt();
            assert!(m.abs() < 1e-5 && (sd - 1.0).abs() < 1e-5, "{m} {sd}");
        }
        // Statistics ignore a normalization already set.
        assert_eq!(channel_stats(&n), s);
    }
    // A constant channel has std 0, which cannot be set.
    let mut flat = Dataset::new(Pixels::U8(vec![7; 8]), vec![0, 0], [1, 2, 2], 1).unwrap();
    let s = channel_stats(&flat);
    assert_eq!(s.std, vec![0.0]);
    assert_has(
        &err_of(flat.set_normalization(Some(s))),
        &["channel 0", "above zero"],
    );
}

#[test]
fn normalize_flag_resolves_and_normalization_serializes() {
    let d = u8_set(10, [3, 2, 2], 5);
    assert_eq!(parse_normalize_flag("none").unwrap().resolve(&d), None);
    assert_eq!(
        parse_normalize_flag("auto").unwrap().resolve(&d),
        Some(channel_stats(&d))
    );
    let fixed = parse_normalize_flag("0.4914,0.247;0.4822,0.2435;0.4465,0.2616").unwrap();
    let NormalizeFlag::Fixed(n) = &fixed else {
        panic!("{fixed:?}")
    };
    assert_eq!(n.mean, vec![0.4914, 0.4822, 0.4465]);
    let json = serde_json::to_string(n).unwrap();
    assert_eq!(serde_json::from_str::<Normalization>(&json).unwrap(), *n);
    assert!(
        json.contains("\"mean\"") && json.contains("\"std\""),
        "{json}"
    );
    assert_has(
        &err_of(parse_normalize_flag("mean")),
        &["--normalize", "MEAN,STD"],
    );
    let mut split = bnlab::data::Split {
        train: d.clone(),
        test: u8_set(3, [3, 2, 2], 6),
    };
    split
        .set_normalization(fixed.resolve(&split.train))
        .unwrap();
    assert_eq!(split.test.normalization(), Some(n));
}

#[test]
fn filling_normalized_batches_and_cropping_allocate_nothing() {
    let mut d = u8_set(50, [3, 8, 8], 2);
    d.set_normalization(Some(channel_stats(&d))).unwrap();
    let idx: Vec<usize> = (0..16).collect();
    let mut x = vec![0f32; 16 * d.features()];
    let mut y = vec![0usize; 16];
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut aug = CropFlip::new(d.shape(), 2).unwrap();
    let mut scratch = Vec::new();
    crop_flip(&mut x, 16, d.shape(), 2, &mut rng, &mut scratch); // sizes the scratch
    let n = allocations_in(|| {
        for _ in 0..20 {
            d.fill_batch(&idx, &mut x, &mut y);
            d.fill_columns(&idx, &mut x, 50..150);
            aug.apply(&mut x, 16, &mut rng);
            crop_flip(&mut x, 16, d.shape(), 2, &mut rng, &mut scratch);
        }
    });
    assert_eq!(n, 0, "allocations");
}

// ---------------------------------------------------------------------------------------------
// crop-flip

fn ramp(n: usize, shape: [usize; 3]) -> Vec<f32> {
    (0..n * shape.iter().product::<usize>())
        .map(|i| i as f32 + 1.0)
        .collect()
}

fn mirrored(img: &[f32], [c, h, w]: [usize; 3]) -> Vec<f32> {
    let mut out = img.to_vec();
    for ch in 0..c {
        for i in 0..h {
            for j in 0..w {
                out[(ch * h + i) * w + j] = img[(ch * h + i) * w + (w - 1 - j)];
            }
        }
    }
    out
}

#[test]
fn crop_with_no_shift_and_no_flip_is_the_identity() {
    let shape = [3, 5, 7];
    let src = ramp(1, shape);
    let mut dst = vec![0f32; src.len()];
    for pad in [0, 1, 4] {
        let draw = CropDraw {
            dy: pad,
            dx: pad,
            flip: false,
        };
        crop_flip_one(&src, &mut dst, shape, pad, draw, &[9.0]);
        assert_eq!(dst, src, "pad {pad}");
    }
    // With pad 0, crop_flip leaves each image as it was or mirrored.
    let mut x = ramp(64, shape);
    let orig = x.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    crop_flip(&mut x, 64, shape, 0, &mut rng, &mut Vec::new());
    let f = 105;
    let mut flips = 0;
    for (a, b) in x.chunks(f).zip(orig.chunks(f)) {
        if a != b {
            assert_eq!(a, mirrored(b, shape));
            flips += 1;
        }
    }
    assert!((16..=48).contains(&flips), "{flips} of 64 flipped");
}

#[test]
fn flipping_twice_is_the_identity() {
    let shape = [2, 4, 5];
    let src = ramp(1, shape);
    let (mut a, mut b) = (vec![0f32; 40], vec![0f32; 40]);
    let flip = CropDraw {
        dy: 0,
        dx: 0,
        flip: true,
    };
    crop_flip_one(&src, &mut a, shape, 0, flip, &[0.0]);
    assert_eq!(a, mirrored(&src, shape));
    crop_flip_one(&a, &mut b, shape, 0, flip, &[0.0]);
    assert_eq!(b, src);
}

#[test]
fn crops_shift_and_pad_with_the_fill() {
    let shape = [2, 4, 5];
    let [_, h, w] = shape;
    let src = ramp(1, shape);
    let mut dst = vec![0f32; 40];
    let pad = 2;
    for dy in 0..=2 * pad {
        for dx in 0..=2 * pad {
            for flip in [false, true] {
                crop_flip_one(
                    &src,
                    &mut dst,
                    shape,
                    pad,
                    CropDraw { dy, dx, flip },
                    &[-1.0, -2.0],
                );
                for c in 0..2 {
                    for i in 0..h {
                        for j in 0..w {
                            let jj = if flip { w - 1 - j } else { j };
                            let (y, x) =
                                (i as isize + dy as isize - 2, jj as isize + dx as isize - 2);
                            let want = if y < 0 || y >= h as isize || x < 0 || x >= w as isize {
                                -1.0 - c as f32
                            } else {
                                src[(c * h + y as usize) * w + x as usize]
                            };
                            assert_eq!(dst[(c * h + i) * w + j], want, "{dy} {dx} {flip}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn crop_offsets_cover_the_padded_range() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for pad in [0usize, 1, 2, 4, 7] {
        let (mut ys, mut xs) = (BTreeSet::new(), BTreeSet::new());
        let mut flips = 0;
        for _ in 0..2000 {
            let d = draw_crop(&mut rng, pad);
            assert!(d.dy <= 2 * pad && d.dx <= 2 * pad, "{d:?}");
            ys.insert(d.dy);
            xs.insert(d.dx);
            flips += d.flip as usize;
        }
        let all: BTreeSet<usize> = (0..=2 * pad).collect();
        assert_eq!((ys, xs), (all.clone(), all), "pad {pad}");
        assert!((900..=1100).contains(&flips), "{flips} flips");
    }
}

#[test]
fn crop_flip_is_deterministic_for_a_seed() {
    let shape = [3, 6, 6];
    let run = |seed: u64| {
        let mut x = ramp(10, shape);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        crop_flip(&mut x, 10, shape, 2, &mut rng, &mut Vec::new());
        x
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
    // The struct form (zero fill) and the per-image primitive with the same draws agree.
    let mut x = ramp(10, shape);
    CropFlip::new(shape, 2)
        .unwrap()
        .apply(&mut x, 10, &mut ChaCha8Rng::seed_from_u64(5));
    assert_eq!(x, run(5));
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let src = ramp(10, shape);
    let mut manual = vec![0f32; src.len()];
    for (s, d) in src.chunks(108).zip(manual.chunks_mut(108)) {
        crop_flip_one(s, d, shape, 2, draw_crop(&mut rng, 2), &[0.0]);
    }
    assert_eq!(manual, run(5));
    // Only the first n images are touched.
    let mut x = ramp(10, shape);
    crop_flip(
        &mut x,
        4,
        shape,
        2,
        &mut ChaCha8Rng::seed_from_u64(5),
        &mut Vec::new(),
    );
    assert_eq!(&x[4 * 108..], &ramp(10, shape)[4 * 108..]);
    // The fill must fit the channels.
    assert!(CropFlip::new(shape, 2)
        .unwrap()
        .with_fill(&[0.0, 1.0])
        .is_err());
    assert!(CropFlip::new(shape, 2)
        .unwrap()
        .with_fill(&[0.0, 1.0, 2.0])
        .is_ok());
}

// ---------------------------------------------------------------------------------------------
// CIFAR-10

const REC: usize = 3073;

/// `n` records with labels from `labels` (cycled) and pseudo-random pixels.
fn cifar_records(n: usize, labels: &[u8], seed: u32) -> Vec<u8> {
    let px = bytes(n * 3072, seed);
    let mut out = Vec::with_capacity(n * REC);
    for k in 0..n {
        out.push(labels[k % labels.len()]);
        out.extend_from_slice(&px[k * 3072..(k + 1) * 3072]);
    }
    out
}

/// The six files of a small CIFAR-10 set: training files of 2, 1, 3, 1, 2 records, 2 test.
fn cifar_files() -> Vec<(&'static str, Vec<u8>)> {
    let counts = [2, 1, 3, 1, 2, 2];
    CIFAR10_FILES
        .iter()
        .zip(counts)
        .enumerate()
        .map(|(k, (name, n))| (*name, cifar_records(n, &[k as u8, 9, 0], k as u32 + 10)))
        .collect()
}

fn write_files(dir: &Path, files: &[(&str, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, b) in files {
        std::fs::write(dir.join(name), b).unwrap();
    }
}

fn check_small_cifar(s: &bnlab::data::Split, files: &[(&str, Vec<u8>)]) {
    assert_eq!((s.train.len(), s.test.len()), (9, 2));
    assert_eq!((s.train.shape(), s.train.classes), ([3, 32, 32], 10));
    assert_eq!(s.test.shape(), [3, 32, 32]);
    let train: Vec<u8> = files[..5].iter().flat_map(|(_, b)| b.clone()).collect();
    for (k, r) in train.chunks(REC).enumerate() {
        assert_eq!(s.train.labels[k], r[0]);
        assert_eq!(s.train.image(k), &r[1..]);
    }
    assert_eq!(s.test.image(1), &files[5].1[REC + 1..]);
    // Channel-major: the first 1024 values are the red plane.
    let (x, _) = filled(&s.test, &[0]);
    assert_eq!(x[1024], files[5].1[1 + 1024] as f32 / 255.0);
}

#[test]
fn cifar10_directory_loads_directly_or_through_the_parent() {
    let t = tempfile::tempdir().unwrap();
    let files = cifar_files();
    let flat = t.path().join("flat");
    write_files(&flat, &files);
    check_small_cifar(&load_cifar10_dir(&flat).unwrap(), &files);
    let parent = t.path().join("parent");
    write_files(&parent.join("cifar-10-batches-bin"), &files);
    check_small_cifar(&load_cifar10_dir(&parent).unwrap(), &files);
    check_small_cifar(
        &load_cifar10_dir(&parent.join("cifar-10-batches-bin")).unwrap(),
        &files,
    );
}

#[test]
fn bad_cifar10_files_are_refused_by_name() {
    let t = tempfile::tempdir().unwrap();
    let files = cifar_files();
    write_files(t.path(), &files);
    let p = t.path().join("data_batch_3.bin");

    let mut long = files[2].1.clone();
    long.extend_from_slice(&[1, 2, 3]);
    std::fs::write(&p, &long).unwrap();
    assert_has(
        &err_of(load_cifar10_dir(t.path())),
        &[
            "data_batch_3.bin",
            "not a whole number of 3073-byte records",
            "3 byte(s) left over",
        ],
    );

    let mut bad = files[2].1.clone();
    bad[2 * REC] = 10;
    std::fs::write(&p, &bad).unwrap();
    assert_has(
        &err_of(load_cifar10_dir(t.path())),
        &["data_batch_3.bin", "record 2", "label 10", "0..10"],
    );

    std::fs::write(&p, b"").unwrap();
    assert_has(
        &err_of(load_cifar10_dir(t.path())),
        &["data_batch_3.bin", "empty"],
    );

    std::fs::remove_file(&p).unwrap();
    std::fs::remove_file(t.path().join("test_batch.bin")).unwrap();
    let msg = err_of(load_cifar10_dir(t.path()));
    assert_has(
        &msg,
        &["data_batch_3.bin", "test_batch.bin", "missing", "--data"],
    );
    assert!(!msg.contains("data_batch_1.bin"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// a tiny HTTP server

struct Server {
    addr: String,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Server {
    fn start(files: HashMap<String, Vec<u8>>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let _ = serve_one(conn, &files);
                }
            }
        });
        Server {
            addr,
            stop,
            handle: Some(handle),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve_one(conn: TcpStream, files: &HashMap<String, Vec<u8>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let mut out = conn;
    match files.get(path) {
        Some(body) => {
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            out.write_all(body)?;
        }
        None => write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?,
    }
    out.flush()
}

fn closed_port_url(path: &str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}{path}")
}

/// A .tar.gz holding `entries` (path, bytes) as regular files, like the real archive.
fn tar_gz(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    b.append_data(&mut dir, "cifar-10-batches-bin/", std::io::empty())
        .unwrap();
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, &data[..]).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn cifar_archive(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut entries: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(n, b)| (format!("cifar-10-batches-bin/{n}"), b.clone()))
        .collect();
    entries.push((
        "cifar-10-batches-bin/batches.meta.txt".into(),
        b"airplane\nautomobile\n".to_vec(),
    ));
    tar_gz(&entries)
}

#[test]
fn cifar10_downloads_verifies_and_loads() {
    let files = cifar_files();
    let archive = cifar_archive(&files);
    let sha = sha256_hex(&archive);
    let mut map = HashMap::new();
    map.insert("/kriz/cifar-10-binary.tar.gz".to_string(), archive);
    let server = Server::start(map);
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("new").join("cifar10");
    let url = cifar10_url(Some(&server.url("/kriz")));
    assert!(url.ends_with("/kriz/cifar-10-binary.tar.gz"), "{url}");
    let s = cifar10_from(&dir, true, &url, &sha).unwrap();
    check_small_cifar(&s, &files);
    assert_eq!(
        dir_listing(&dir),
        vec!["cifar-10-batches-bin"],
        "no temporary files left"
    );
    // Present now: no download (a dead server is fine), and a plain load works.
    let again = cifar10_from(&dir, true, &closed_port_url("/x.tar.gz"), &sha).unwrap();
    assert_eq!(again, s);
    assert_eq!(load_cifar10_dir(&dir).unwrap(), s);
}

#[test]
fn cifar10_with_the_wrong_checksum_is_refused_and_leaves_nothing() {
    let archive = cifar_archive(&cifar_files());
    let mut map = HashMap::new();
    map.insert("/a/cifar-10-binary.tar.gz".to_string(), archive);
    let server = Server::start(map);
    let t = tempfile::tempdir().unwrap();
    let url = server.url("/a/cifar-10-binary.tar.gz");
    // A directory the call creates is removed again ...
    let dir = t.path().join("new").join("cifar10");
    let err = download_cifar10(&dir, &url, &"ab".repeat(32)).unwrap_err();
    assert!(matches!(err, bnlab::Error::Download { .. }));
    assert_has(
        &err.to_string(),
        &["checksum", &"ab".repeat(32), &url, "--data", "$BNLAB_DATA"],
    );
    assert!(
        !t.path().join("new").exists(),
        "{:?}",
        dir_listing(t.path())
    );
    // ... and one that existed is left as it was (empty).
    let existing = t.path().join("mine");
    std::fs::create_dir(&existing).unwrap();
    assert!(cifar10_from(&existing, true, &url, &"00".repeat(32)).is_err());
    assert_eq!(dir_listing(&existing), Vec::<String>::new());
}

#[test]
fn cifar10_server_down_or_missing_says_how_to_use_a_local_copy() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("c10");
    let url = closed_port_url("/cifar-10-binary.tar.gz");
    let msg = err_of(cifar10_from(&dir, true, &url, &"00".repeat(32)));
    assert_has(
        &msg,
        &[&url, "--data DIR", "$BNLAB_DATA", "cifar-10-batches-bin"],
    );
    assert!(!dir.exists());
    let server = Server::start(HashMap::new());
    let url = server.url("/nothing/cifar-10-binary.tar.gz");
    let msg = err_of(cifar10_from(&dir, true, &url, &"00".repeat(32)));
    assert_has(&msg, &["404", "--data DIR", "$BNLAB_DATA"]);
    assert!(!dir.exists());
    // Without downloads: the missing files are named.
    let msg = err_of(cifar10_from(&dir, false, &url, &"00".repeat(32)));
    assert_has(&msg, &["data_batch_1.bin", "missing"]);
}

#[test]
fn cifar10_archives_with_bad_contents_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let files = cifar_files();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "missing",
            cifar_archive(&files[..5]),
            "no cifar-10-batches-bin/test_batch.bin",
        ),
        (
            "escape",
            {
                // A member that tries to leave the extraction directory; the raw name bytes are
                // written by hand because the tar crate refuses to build such a path.
                let mut entries: Vec<(String, Vec<u8>)> = files
                    .iter()
                    .map(|(n, b)| (format!("cifar-10-batches-bin/{n}"), b.clone()))
                    .collect();
                entries.push(("cifar-10-batches-bin/xx/evil".into(), b"x".to_vec()));
                let tgz = tar_gz(&entries);
                let mut raw = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&tgz[..]), &mut raw)
                    .unwrap();
                let at = raw
                    .windows(26)
                    .position(|w| w == b"cifar-10-batches-bin/xx/ev")
                    .unwrap();
                raw[at + 21..at + 24].copy_from_slice(b"../");
                // Fix the header checksum of that 512-byte block.
                let block = at - at % 512;
                raw[block + 148..block + 156].copy_from_slice(b"        ");
                let sum: u32 = raw[block..block + 512].iter().map(|&b| b as u32).sum();
                let field = format!("{sum:06o}\0 ");
                raw[block + 148..block + 156].copy_from_slice(field.as_bytes());
                gzip_bytes(&raw)
            },
            "escapes",
        ),
        ("not-gzip", b"this is not an archive".to_vec(), "archive"),
    ];
    for (name, archive, want) in cases {
        let mut map = HashMap::new();
        map.insert("/c.tar.gz".to_string(), archive.clone());
        let server = Server::start(map);
        let dir = t.path().join(name);
        let msg = err_of(download_cifar10(
            &dir,
            &server.url("/c.tar.gz"),
            &sha256_hex(&archive),
        ));
        assert_has(&msg, &[want]);
        assert!(!dir.exists(), "{name}: {:?}", dir_listing(&dir));
        assert!(!t.path().join("evil").exists());
    }
}

// ---------------------------------------------------------------------------------------------
// .npz

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A valid grey-scale `.npz`: 5 training and 3 test images of 4x3 bytes, uint8 labels < 7.
fn grey_members() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("x_train.npy", npy("|u1", &[5, 4, 3], &bytes(60, 1))),
        ("y_train.npy", npy("|u1", &[5], &[0, 6, 2, 3, 1])),
        ("x_test.npy", npy("|u1", &[3, 4, 3], &bytes(36, 2))),
        ("y_test.npy", npy("|u1", &[3], &[1, 2, 3])),
    ]
}

fn write_npz(dir: &Path, name: &str, members: &[(&str, Vec<u8>)], deflate: bool) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, zip_of(members, deflate)).unwrap();
    p
}

#[test]
fn npz_grey_bytes_load_stored_or_deflated() {
    let t = tempfile::tempdir().unwrap();
    for deflate in [false, true] {
        let p = write_npz(
            t.path(),
            &format!("g{deflate}.npz"),
            &grey_members(),
            deflate,
        );
        let s = load_npz(&p).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (5, 3));
        assert_eq!((s.train.shape(), s.train.classes), ([1, 4, 3], 7));
        assert_eq!(s.test.classes, 7);
        assert_eq!(s.train.images, Pixels::U8(bytes(60, 1)));
        assert_eq!(s.test.labels, vec![1, 2, 3]);
        assert_eq!(parse_npz(&std::fs::read(&p).unwrap(), &p).unwrap(), s);
    }
    // Member names without .npy are accepted too; at least 2 classes.
    let members: Vec<(&str, Vec<u8>)> = vec![
        ("x_train", npy("|u1", &[2, 1, 1], &[1, 2])),
        ("y_train", npy("|u1", &[2], &[0, 0])),
        ("x_test", npy("|u1", &[1, 1, 1], &[3])),
        ("y_test", npy("|u1", &[1], &[0])),
        ("notes.txt", b"ignored".to_vec()),
    ];
    let s = load_npz(&write_npz(t.path(), "bare.npz", &members, false)).unwrap();
    assert_eq!(s.train.classes, 2);
}

#[test]
fn npz_float_nhwc_is_transposed_and_copied() {
    let t = tempfile::tempdir().unwrap();
    // 2 training images of 2x2 pixels with 3 channels, value = 100 n + 10 c + pixel.
    let nhwc = |n: usize| -> Vec<f32> {
        (0..n)
            .flat_map(|i| {
                (0..4).flat_map(move |p| (0..3).map(move |c| (100 * i + 10 * c + p) as f32 / 7.0))
            })
            .collect()
    };
    let members = vec![
        (
            "x_train.npy",
            npy("<f4", &[2, 2, 2, 3], &f32_bytes(&nhwc(2))),
        ),
        ("y_train.npy", npy("<i8", &[2, 1], &i64_bytes(&[4, 9]))),
        (
            "x_test.npy",
            npy("<f4", &[1, 2, 2, 3], &f32_bytes(&nhwc(1))),
        ),
        ("y_test.npy", npy("<i4", &[1], &i32_bytes(&[2]))),
    ];
    let p = write_npz(t.path(), "f.npz", &members, true);
    let s = load_npz(&p).unwrap();
    assert_eq!((s.train.shape(), s.train.classes), ([3, 2, 2], 10));
    assert_eq!(s.train.labels, vec![4, 9]);
    let (x, y) = filled(&s.train, &[1, 0]);
    assert_eq!(y, vec![9, 4]);
    for c in 0..3 {
        for p in 0..4 {
            assert_eq!(x[c * 4 + p], (100 + 10 * c + p) as f32 / 7.0);
            assert_eq!(x[12 + c * 4 + p], (10 * c + p) as f32 / 7.0);
        }
    }
    // Auto normalization works on floats too.
    let n = channel_stats(&s.train);
    assert_eq!(n.mean.len(), 3);
}

#[test]
fn npz_nchw_bytes_keep_their_order() {
    let t = tempfile::tempdir().unwrap();
    let members = vec![
        ("x_train.npy", npy("|u1", &[2, 3, 4, 4], &bytes(96, 3))),
        ("y_train.npy", npy("<i4", &[2], &i32_bytes(&[0, 1]))),
        ("x_test.npy", npy("|u1", &[1, 3, 4, 4], &bytes(48, 4))),
        ("y_test.npy", npy("<i8", &[1], &i64_bytes(&[1]))),
    ];
    let s = load_npz(&write_npz(t.path(), "c.npz", &members, false)).unwrap();
    assert_eq!(s.train.shape(), [3, 4, 4]);
    assert_eq!(s.train.images, Pixels::U8(bytes(96, 3)));
}

/// The members of an `.npz`: name and bytes.
type Members = Vec<(&'static str, Vec<u8>)>;

/// Replaces member `name` of the grey set.
fn grey_with(name: &str, b: Vec<u8>) -> Vec<(&'static str, Vec<u8>)> {
    grey_members()
        .into_iter()
        .map(|(n, old)| if n == name { (n, b.clone()) } else { (n, old) })
        .collect()
}

#[test]
fn bad_npz_files_get_clear_errors_naming_file_and_member() {
    let t = tempfile::tempdir().unwrap();
    let mut nan_img = vec![0.5f32; 36];
    nan_img[14] = f32::NAN;
    let mut inf_img = vec![0.5f32; 60];
    inf_img[59] = f32::NEG_INFINITY;
    let mut truncated = npy("|u1", &[5, 4, 3], &bytes(60, 1));
    truncated.pop();
    let float_train = (
        "x_train.npy",
        npy("<f4", &[5, 4, 3], &f32_bytes(&[0.25; 60])),
    );
    let cases: Vec<(&str, Members, &[&str])> = vec![
        (
            "fortran",
            grey_with(
                "x_train.npy",
                npy_with("|u1", &[5, 4, 3], true, &bytes(60, 1)),
            ),
            &["x_train.npy", "Fortran-order"],
        ),
        (
            "magic",
            grey_with("y_test.npy", b"PK\x03\x04 not numpy at all".to_vec()),
            &["y_test.npy", "bad magic"],
        ),
        (
            "header",
            grey_with("y_train.npy", {
                let mut b = npy("|u1", &[5], &[0; 5]);
                let at = b.windows(5).position(|w| w == b"descr").unwrap();
                b[at..at + 5].copy_from_slice(b"dtype");
                b
            }),
            &["y_train.npy", "bad .npy header", "unexpected key 'dtype'"],
        ),
        (
            "length",
            grey_with("x_train.npy", truncated),
            &[
                "x_train.npy",
                "data length mismatch",
                "needs 60 bytes, found 59",
            ],
        ),
        (
            "counts",
            grey_with("y_train.npy", npy("|u1", &[4], &[0; 4])),
            &[
                "count mismatch",
                "x_train.npy holds 5 images",
                "y_train.npy holds 4 labels",
            ],
        ),
        (
            "shapes",
            grey_with("x_test.npy", npy("|u1", &[3, 3, 4], &bytes(36, 2))),
            &["x_test.npy", "[1, 3, 4]", "x_train.npy", "[1, 4, 3]"],
        ),
        (
            "nan",
            {
                let mut m = grey_with("x_test.npy", npy("<f4", &[3, 4, 3], &f32_bytes(&nan_img)));
                m[0] = float_train.clone();
                m
            },
            &["x_test.npy", "NaN", "index 14", "image 1"],
        ),
        (
            "inf",
            grey_with("x_train.npy", npy("<f4", &[5, 4, 3], &f32_bytes(&inf_img))),
            &["x_train.npy", "-inf", "index 59", "image 4"],
        ),
        (
            "f8",
            grey_with("x_train.npy", npy("<f8", &[5, 4, 3], &[0; 480])),
            &["x_train.npy", "unsupported dtype '<f8'"],
        ),
        (
            "big-endian",
            grey_with("x_train.npy", npy(">f4", &[5, 4, 3], &[0; 240])),
            &["x_train.npy", "big-endian"],
        ),
        (
            "dtype-mix",
            {
                let mut m = grey_members();
                m[0] = float_train.clone();
                m
            },
            &[
                "x_test.npy is uint8",
                "x_train.npy is float32",
                "same dtype",
            ],
        ),
        (
            "negative",
            grey_with("y_test.npy", npy("<i8", &[3], &i64_bytes(&[1, -1, 2]))),
            &["y_test.npy", "label at index 1 is -1", "0..=255"],
        ),
        (
            "large",
            grey_with(
                "y_train.npy",
                npy("<i4", &[5], &i32_bytes(&[0, 1, 300, 2, 3])),
            ),
            &["y_train.npy", "label at index 2 is 300"],
        ),
        (
            "label-shape",
            grey_with("y_train.npy", npy("|u1", &[5, 2], &[0; 10])),
            &["y_train.npy", "(N,) or (N, 1)", "[5, 2]"],
        ),
        (
            "float-labels",
            grey_with("y_train.npy", npy("<f4", &[5], &[0; 20])),
            &["y_train.npy", "float32"],
        ),
        (
            "no-channel",
            grey_with("x_train.npy", npy("|u1", &[1, 5, 6, 2], &[0; 60])),
            &["x_train.npy", "[1, 5, 6, 2]", "no channel dimension"],
        ),
        (
            "flat",
            grey_with("x_train.npy", npy("|u1", &[5, 12], &[0; 60])),
            &["x_train.npy", "[5, 12]", "not an image array"],
        ),
        (
            "empty",
            grey_with("x_train.npy", npy("|u1", &[0, 4, 3], &[])),
            &["x_train.npy", "no images"],
        ),
        (
            "missing",
            grey_members().into_iter().take(3).collect(),
            &[
                "missing member y_test.npy",
                "x_train.npy, y_train.npy, x_test.npy",
            ],
        ),
    ];
    for (name, members, parts) in cases {
        let p = write_npz(
            t.path(),
            &format!("{name}.npz"),
            &members,
            name.len() % 2 == 0,
        );
        let msg = err_of(load_npz(&p));
        assert_has(&msg, &[&format!("{name}.npz")]);
        assert_has(&msg, parts);
    }
    // Not a zip at all, and a missing file.
    let p = t.path().join("plain.npz");
    std::fs::write(&p, npy("|u1", &[1], &[0])).unwrap();
    assert_has(&err_of(load_npz(&p)), &["plain.npz", "not a zip archive"]);
    assert_has(&err_of(load_npz(&t.path().join("nope.npz"))), &["nope.npz"]);
    // A corrupted deflated member fails its CRC.
    let mut z = zip_of(&grey_members(), false);
    let at = z.windows(6).position(|w| w == b"\x93NUMPY").unwrap();
    z[at + 100] ^= 0xff;
    let p = t.path().join("crc.npz");
    std::fs::write(&p, &z).unwrap();
    assert_has(&err_of(load_npz(&p)), &["crc.npz", "x_train.npy"]);
}

#[test]
fn npy_versions_and_headers() {
    let p = Path::new("m.npz");
    let v1 = npy("|u1", &[2, 2], &[1, 2, 3, 4]);
    let a = parse_npy(&v1, p, "a.npy").unwrap();
    assert_eq!((a.shape, a.data), (vec![2, 2], vec![1, 2, 3, 4]));
    // Version 2.0: 4-byte header length.
    let header = &v1[10..10 + u16::from_le_bytes([v1[8], v1[9]]) as usize];
    let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
    v2.extend_from_slice(&(header.len() as u32).to_le_bytes());
    v2.extend_from_slice(header);
    v2.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(parse_npy(&v2, p, "a.npy").unwrap().data, vec![1, 2, 3, 4]);
    let mut v9 = v1.clone();
    v9[6] = 9;
    assert_has(
        &err_of(parse_npy(&v9, p, "a.npy")),
        &["m.npz", "a.npy", "version 9.0"],
    );
    let mut long = v1.clone();
    long[8] = 0xff;
    assert_has(
        &err_of(parse_npy(&long, p, "a.npy")),
        &["truncated .npy header"],
    );
}

#[test]
fn real_mnist_as_npz_equals_the_idx_files() {
    let Some(dir) = common::mnist_or_skip() else {
        return;
    };
    let idx = load_mnist_dir(&dir).unwrap();
    let t = tempfile::tempdir().unwrap();
    let members = vec![
        (
            "x_train.npy",
            npy("|u1", &[60000, 28, 28], idx.train.images.as_u8().unwrap()),
        ),
        ("y_train.npy", npy("|u1", &[60000], &idx.train.labels)),
        (
            "x_test.npy",
            npy("|u1", &[10000, 28, 28], idx.test.images.as_u8().unwrap()),
        ),
        ("y_test.npy", npy("|u1", &[10000], &idx.test.labels)),
    ];
    let p = write_npz(t.path(), "mnist.npz", &members, false);
    let start = std::time::Instant::now();
    let s = load_npz(&p).unwrap();
    eprintln!("load_npz (MNIST, stored): {:?}", start.elapsed());
    assert_eq!(s, idx);
    // MNIST's well-known statistics.
    let n = channel_stats(&s.train);
    assert!(
        (n.mean[0] - 0.1307).abs() < 1e-4 && (n.std[0] - 0.3081).abs() < 1e-4,
        "{n:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// choosing the source

fn settings(root: &Path) -> SourceSettings {
    SourceSettings {
        data_root: Some(root.to_path_buf()),
        mnist_mirrors: vec![closed_port_url("/")],
        cifar10_url: closed_port_url("/cifar-10-binary.tar.gz"),
        cifar10_sha256: "00".repeat(32),
        fashion_system_dir: root.join("system-fashion"),
    }
}

/// Writes a small IDX set (gzipped) into `dir`.
fn write_idx_set(dir: &Path, n_train: usize, n_test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let p = Path::new("x");
    let labels = |n: usize, seed| bytes(n, seed).iter().map(|b| b % 10).collect::<Vec<u8>>();
    let files = [
        idx_bytes(&[n_train, 4, 3], &bytes(n_train * 12, 1), p).unwrap(),
        idx_bytes(&[n_train], &labels(n_train, 2), p).unwrap(),
        idx_bytes(&[n_test, 4, 3], &bytes(n_test * 12, 3), p).unwrap(),
        idx_bytes(&[n_test], &labels(n_test, 4), p).unwrap(),
    ];
    for (name, b) in MNIST_FILES.iter().zip(files) {
        std::fs::write(dir.join(format!("{name}.gz")), gzip_bytes(&b)).unwrap();
    }
}

#[test]
fn data_flag_detects_the_format() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let idx = root.join("idx");
    write_idx_set(&idx, 6, 2);
    let cifar = root.join("c");
    write_files(&cifar.join("cifar-10-batches-bin"), &cifar_files());
    let npz = write_npz(root, "set.NPZ", &grey_members(), false);
    let other = root.join("notes.txt");
    std::fs::write(&other, "x").unwrap();
    let empty = root.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let both = root.join("both");
    write_idx_set(&both, 2, 2);
    write_files(&both, &cifar_files());

    assert_eq!(detect_source(&idx).unwrap(), DataSource::Idx(idx.clone()));
    assert_eq!(
        detect_source(&cifar).unwrap(),
        DataSource::Cifar10(cifar.clone())
    );
    assert_eq!(detect_source(&npz).unwrap(), DataSource::Npz(npz.clone()));
    let s = settings(root);
    let (src, split) = resolve_source_with(Some(&idx), None, true, &s).unwrap();
    assert_eq!(
        (src.format(), split.train.len(), split.train.classes),
        ("idx", 6, 10)
    );
    let (src, split) = resolve_source_with(Some(&cifar), None, true, &s).unwrap();
    assert_eq!(
        (src.format(), split.train.shape()),
        ("cifar10", [3, 32, 32])
    );
    let (src, split) = resolve_source_with(Some(&npz), None, false, &s).unwrap();
    assert_eq!((src.format(), split.train.classes), ("npz", 7));

    for (path, parts) in [
        (
            &other,
            &[
                "notes.txt",
                "not an .npz",
                "train-images-idx3-ubyte",
                "data_batch_1.bin",
            ][..],
        ),
        (
            &empty,
            &[
                "empty",
                "no data set files",
                "t10k-labels-idx1-ubyte",
                "test_batch.bin",
            ][..],
        ),
        (&both, &["both IDX and CIFAR-10", "--dataset"][..]),
        (&root.join("absent"), &["absent", "--data takes"][..]),
    ] {
        assert_has(
            &err_of(resolve_source_with(Some(path), None, true, &s)),
            parts,
        );
    }
    // --dataset decides between both, and refuses the other layout.
    let (src, _) = resolve_source_with(Some(&both), Some("cifar10"), false, &s).unwrap();
    assert_eq!(src.format(), "cifar10");
    assert_has(
        &err_of(resolve_source_with(Some(&idx), Some("cifar10"), false, &s)),
        &["--dataset cifar10", "IDX files"],
    );
    assert_has(
        &err_of(resolve_source_with(
            Some(&cifar),
            Some("fashion-mnist"),
            false,
            &s,
        )),
        &["--dataset fashion-mnist", "CIFAR-10 files"],
    );
    assert_has(
        &err_of(resolve_source_with(None, Some("imagenet"), false, &s)),
        &["--dataset", "'imagenet'", "mnist, fashion-mnist or cifar10"],
    );
}

#[test]
fn dataset_names_use_their_default_places() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let s = settings(root);
    // Nothing there, downloads off: clear errors.
    assert_has(
        &err_of(resolve_source_with(None, Some("cifar10"), false, &s)),
        &[
            "cifar10",
            "no such directory",
            "--no-download",
            "--data DIR",
        ],
    );
    assert_has(
        &err_of(resolve_source_with(None, Some("fashion-mnist"), true, &s)),
        &[
            "fashion-mnist",
            "system-fashion",
            "not downloaded",
            "--data DIR",
            "$BNLAB_DATA",
        ],
    );
    // Downloads on but the servers are down: the message says how to use a local copy, and no
    // empty directory is left behind.
    for name in ["mnist", "cifar10"] {
        let msg = err_of(resolve_source_with(None, Some(name), true, &s));
        assert_has(&msg, &["--data DIR", "$BNLAB_DATA"]);
        assert!(!root.join(name).exists(), "{name}: {:?}", dir_listing(root));
    }
    // Present in $BNLAB_DATA/<name>.
    write_idx_set(&root.join("mnist"), 3, 2);
    write_files(&root.join("cifar10"), &cifar_files());
    write_idx_set(&root.join("system-fashion"), 4, 1);
    let (src, split) = resolve_source_with(None, None, false, &s).unwrap();
    assert_eq!(
        (src, split.train.len()),
        (DataSource::Idx(root.join("mnist")), 3)
    );
    let (src, _) = resolve_source_with(None, Some("cifar10"), false, &s).unwrap();
    assert_eq!(src, DataSource::Cifar10(root.join("cifar10")));
    // Fashion-MNIST falls back to the system directory, and prefers $BNLAB_DATA's copy.
    let (src, _) = resolve_source_with(None, Some("fashion-mnist"), false, &s).unwrap();
    assert_eq!(src, DataSource::Idx(root.join("system-fashion")));
    write_idx_set(&root.join("fashion-mnist"), 5, 1);
    let (src, split) = resolve_source_with(None, Some("Fashion_MNIST"), false, &s).unwrap();
    assert_eq!(
        (src, split.train.len()),
        (DataSource::Idx(root.join("fashion-mnist")), 5)
    );
    // Without $BNLAB_DATA the default root is ./data.
    let no_env = SourceSettings {
        data_root: None,
        ..s.clone()
    };
    assert_eq!(
        no_env.default_dir(bnlab::data::DatasetName::Cifar10),
        Path::new("data").join("cifar10")
    );
}

#[test]
fn cifar10_is_downloaded_into_its_default_place() {
    let files = cifar_files();
    let archive = cifar_archive(&files);
    let mut map = HashMap::new();
    map.insert("/m/cifar-10-binary.tar.gz".to_string(), archive.clone());
    let server = Server::start(map);
    let t = tempfile::tempdir().unwrap();
    let s = SourceSettings {
        cifar10_url: server.url("/m/cifar-10-binary.tar.gz"),
        cifar10_sha256: sha256_hex(&archive),
        ..settings(&t.path().join("root"))
    };
    let (src, split) = resolve_source_with(None, Some("cifar10"), true, &s).unwrap();
    assert_eq!(src, DataSource::Cifar10(t.path().join("root/cifar10")));
    check_small_cifar(&split, &files);
    // `--data DIR --dataset cifar10` downloads into DIR.
    let dir = t.path().join("given");
    let (src, _) = resolve_source_with(Some(&dir), Some("cifar10"), true, &s).unwrap();
    assert_eq!(src, DataSource::Cifar10(dir.clone()));
    assert!(dir.join("cifar-10-batches-bin/test_batch.bin").is_file());
}

#[test]
fn failed_mnist_download_leaves_no_empty_directory() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("a").join("mnist");
    let msg = err_of(mnist_from(&dir, true, &[&closed_port_url("/")]));
    assert_has(
        &msg,
        &["--data DIR", "$BNLAB_DATA", "train-images-idx3-ubyte"],
    );
    assert!(!t.path().join("a").exists(), "{:?}", dir_listing(t.path()));
    // An existing directory stays.
    let mine = t.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    assert!(mnist_from(&mine, true, &[&closed_port_url("/")]).is_err());
    assert!(mine.is_dir());
}

// ---------------------------------------------------------------------------------------------
// the parsers never panic

fn valid_npz() -> Vec<u8> {
    zip_of(&grey_members(), true)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 400,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn cifar10_parser_never_panics(b in prop::collection::vec(any::<u8>(), 0..8000)) {
        if let Err(e) = parse_cifar10_batch(&b, Path::new("fuzz.bin")) {
            prop_assert!(e.to_string().starts_with("fuzz.bin: "), "{}", e);
        }
    }

    #[test]
    fn cifar10_parser_checks_every_label(
        labels in prop::collection::vec(any::<u8>(), 1..4),
        extra in 0usize..3,
    ) {
        let mut b = cifar_records(labels.len(), &labels, 1);
        b.extend(std::iter::repeat_n(0u8, extra));
        let r = parse_cifar10_batch(&b, Path::new("f.bin"));
        let ok = extra == 0 && labels.iter().all(|&l| l < 10);
        prop_assert_eq!(r.is_ok(), ok);
        if let Ok(d) = r {
            prop_assert_eq!(d.labels, labels);
        }
    }

    #[test]
    fn npz_parser_never_panics_on_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..600)) {
        prop_assert!(parse_npz(&b, Path::new("fuzz.npz")).is_err());
    }

    #[test]
    fn npz_parser_never_panics_on_mutated_archives(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        deflate in any::<bool>(),
    ) {
        let mut b = if deflate { valid_npz() } else { zip_of(&grey_members(), false) };
        for (at, v) in edits {
            let i = at.index(b.len());
            b[i] = v;
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len()));
        }
        let _ = parse_npz(&b, Path::new("mutated.npz"));
    }

    #[test]
    fn npy_parser_never_panics(
        version in 0u8..4,
        rest in prop::collection::vec(any::<u8>(), 0..200),
        header in "\\{[ 'a-z_:,()0-9TrueFalse<|>\"]{0,60}\\}",
    ) {
        let mut b = b"\x93NUMPY".to_vec();
        b.push(version);
        b.push(0);
        b.extend_from_slice(&(header.len() as u16).to_le_bytes());
        if version >= 2 {
            b.extend_from_slice(&[0, 0]);
        }
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(&rest);
        let _ = parse_npy(&b, Path::new("p.npz"), "x.npy");
        let _ = parse_npy(&rest, Path::new("p.npz"), "x.npy");
    }
}
