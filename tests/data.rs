//! Integration tests for `bnlab::data`: IDX parsing and its error messages, data set loading,
//! batch conversion, data directory resolution, and downloading from a local HTTP server.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bnlab::data::idx::{gzip_bytes, idx_bytes};
use bnlab::data::{
    download_files, load_mnist_dir, load_pair, mnist_from, parse_idx, read_idx, resolve_data_dir,
    resolve_data_dir_with, sha256_hex, write_idx, Pixels, MNIST_FILES, MNIST_SHA256,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// helpers

fn err_of<T: std::fmt::Debug>(r: bnlab::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

/// Asserts that `msg` names `path`'s file name and contains every one of `parts`.
fn assert_mentions(msg: &str, path: &Path, parts: &[&str]) {
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(msg.contains(&*name), "error does not name {name}: {msg}");
    for p in parts {
        assert!(msg.contains(p), "error does not mention {p:?}: {msg}");
    }
}

/// Deterministic pseudo-random bytes (no RNG dependency needed).
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

/// Synthetic data set files in the MNIST layout: `n_train` / `n_test` images of 4x3 pixels,
/// labels < 10. Returns name -> decompressed IDX bytes.
fn synthetic(n_train: usize, n_test: usize) -> Vec<(&'static str, Vec<u8>)> {
    let p = Path::new("synthetic");
    let labels = |n: usize, seed| bytes(n, seed).iter().map(|b| b % 10).collect::<Vec<u8>>();
    vec![
        (
            MNIST_FILES[0],
            idx_bytes(&[n_train, 4, 3], &bytes(n_train * 12, 1), p).unwrap(),
        ),
        (
            MNIST_FILES[1],
            idx_bytes(&[n_train], &labels(n_train, 2), p).unwrap(),
        ),
        (
            MNIST_FILES[2],
            idx_bytes(&[n_test, 4, 3], &bytes(n_test * 12, 3), p).unwrap(),
        ),
        (
            MNIST_FILES[3],
            idx_bytes(&[n_test], &labels(n_test, 4), p).unwrap(),
        ),
    ]
}

/// A tiny HTTP/1.1 server on 127.0.0.1 serving a fixed map of path -> body; 404 for anything
/// else. It stops (and its thread is joined) when dropped.
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
                    // A broken client must not bring the server (and the test) down.
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

    /// Base URL for `prefix` (e.g. "/good/").
    fn url(&self, prefix: &str) -> String {
        format!("http://{}{prefix}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() so the thread sees the flag.
        let _ = TcpStream::connect(&self.addr);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve_one(conn: TcpStream, files: &HashMap<String, Vec<u8>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut out = conn;
    match files.get(path).filter(|_| method == "GET") {
        Some(body) => {
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            out.write_all(body)?;
        }
        None => {
            let body = b"not found";
            write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            out.write_all(body)?;
        }
    }
    out.flush()
}

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
fn closed_port_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}/")
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

// ---------------------------------------------------------------------------------------------
// IDX error cases

#[test]
fn wrong_magic_is_rejected() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("bad-magic-idx1-ubyte");
    std::fs::write(&p, [0x12, 0x34, 0x08, 0x01, 0, 0, 0, 1, 7]).unwrap();
    assert_mentions(&err_of(read_idx(&p, 1)), &p, &["bad magic", "12 34 08 01"]);
    // Too short for even the magic.
    std::fs::write(&p, [0u8, 0]).unwrap();
    assert_mentions(&err_of(read_idx(&p, 1)), &p, &["too short"]);
}

#[test]
fn wrong_type_code_is_rejected() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("float-idx1-ubyte");
    std::fs::write(&p, [0, 0, 0x0d, 0x01, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap();
    assert_mentions(&err_of(read_idx(&p, 1)), &p, &["type code 0x0d"]);
}

#[test]
fn wrong_ndims_is_rejected() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("labels-as-images");
    write_idx(&p, &[3], &[1, 2, 3], false).unwrap();
    assert_mentions(
        &err_of(read_idx(&p, 3)),
        &p,
        &["dimensions", "expected 3, found 1"],
    );
}

#[test]
fn truncated_data_is_rejected() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("short-idx3-ubyte");
    let mut b = idx_bytes(&[2, 2, 2], &[9; 8], &p).unwrap();
    b.truncate(b.len() - 3);
    std::fs::write(&p, &b).unwrap();
    assert_mentions(
        &err_of(read_idx(&p, 3)),
        &p,
        &["truncated: expected 8 bytes of data, found 5"],
    );
    // Also when the header itself is cut off.
    std::fs::write(&p, &b[..9]).unwrap();
    assert_mentions(&err_of(read_idx(&p, 3)), &p, &["truncated header"]);
    // And the same inside a gzip wrapper.
    let gz = t.path().join("short-idx3-ubyte.gz");
    std::fs::write(&gz, gzip_bytes(&b)).unwrap();
    assert_mentions(
        &err_of(read_idx(&gz, 3)),
        &gz,
        &["truncated: expected 8 bytes of data, found 5"],
    );
}

#[test]
fn trailing_bytes_are_rejected() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("long-idx1-ubyte");
    let mut b = idx_bytes(&[4], &[1, 2, 3, 4], &p).unwrap();
    b.extend_from_slice(&[0, 0]);
    std::fs::write(&p, &b).unwrap();
    assert_mentions(
        &err_of(read_idx(&p, 1)),
        &p,
        &["trailing bytes", "expected 4", "found 6"],
    );
}

#[test]
fn zero_dimension_is_rejected() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("empty-idx3-ubyte");
    std::fs::write(&p, [0, 0, 8, 3, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 2]).unwrap();
    assert_mentions(&err_of(read_idx(&p, 3)), &p, &["dimension 1 is zero"]);
}

#[test]
fn corrupt_gzip_is_rejected() {
    let t = tempfile::tempdir().unwrap();
    // A valid gzip header (magic, deflate, no flags, mtime, xfl, os) followed by garbage.
    let p = t.path().join("garbage-idx1-ubyte.gz");
    let mut b = vec![0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0xff];
    b.extend_from_slice(&[0xff; 40]);
    std::fs::write(&p, &b).unwrap();
    assert_mentions(&err_of(read_idx(&p, 1)), &p, &["corrupt gzip stream"]);

    // A real gzip file cut short.
    let p = t.path().join("cut-idx3-ubyte.gz");
    let gz = gzip_bytes(&idx_bytes(&[10, 5, 5], &bytes(250, 9), &p).unwrap());
    std::fs::write(&p, &gz[..gz.len() / 2]).unwrap();
    assert_mentions(&err_of(read_idx(&p, 3)), &p, &["corrupt gzip stream"]);

    // A gzip file whose CRC does not match.
    let p = t.path().join("crc-idx3-ubyte.gz");
    let mut gz = gz.clone();
    let n = gz.len();
    gz[n - 8] ^= 0xff;
    std::fs::write(&p, &gz).unwrap();
    assert_mentions(&err_of(read_idx(&p, 3)), &p, &["corrupt gzip stream"]);
}

#[test]
fn gzip_is_detected_by_content_not_name() {
    let t = tempfile::tempdir().unwrap();
    let data = bytes(24, 5);
    // Gzipped content without .gz, raw content with .gz: both load.
    let a = t.path().join("a-idx3-ubyte");
    write_idx(&a, &[2, 3, 4], &data, true).unwrap();
    let b = t.path().join("b-idx3-ubyte.gz");
    write_idx(&b, &[2, 3, 4], &data, false).unwrap();
    for p in [&a, &b] {
        let idx = read_idx(p, 3).unwrap();
        assert_eq!(idx.dims, vec![2, 3, 4]);
        assert_eq!(idx.data, data);
    }
}

#[test]
fn missing_file_is_reported() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("nope-idx1-ubyte");
    assert_mentions(&err_of(read_idx(&p, 1)), &p, &[]);

    // A directory missing one of the four files names it (both spellings) and suggests a fix.
    let dir = t.path().join("mnist");
    std::fs::create_dir(&dir).unwrap();
    for (name, b) in synthetic(5, 3).into_iter().skip(1) {
        std::fs::write(dir.join(format!("{name}.gz")), gzip_bytes(&b)).unwrap();
    }
    let msg = err_of(load_mnist_dir(&dir));
    assert!(msg.contains("train-images-idx3-ubyte.gz"), "{msg}");
    assert!(
        msg.contains(&dir.join("train-images-idx3-ubyte").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("--data") && msg.contains("download"), "{msg}");
    assert!(!msg.contains("t10k-images"), "{msg}");
}

#[test]
fn image_label_count_mismatch_is_rejected() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("imgs-idx3-ubyte");
    let lab = t.path().join("labs-idx1-ubyte");
    write_idx(&img, &[3, 2, 2], &[0; 12], false).unwrap();
    write_idx(&lab, &[4], &[0, 1, 2, 3], true).unwrap();
    let msg = err_of(load_pair(&img, &lab, 10));
    assert_mentions(&msg, &img, &["3 images", "4 labels"]);
    assert_mentions(&msg, &lab, &[]);
}

#[test]
fn label_out_of_range_is_rejected() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("imgs-idx3-ubyte");
    let lab = t.path().join("labs-idx1-ubyte");
    write_idx(&img, &[4, 1, 1], &[0; 4], false).unwrap();
    write_idx(&lab, &[4], &[0, 9, 10, 3], false).unwrap();
    assert_mentions(
        &err_of(load_pair(&img, &lab, 10)),
        &lab,
        &["index 2", "is 10", "0..10"],
    );
}

// ---------------------------------------------------------------------------------------------
// round trips

#[test]
fn round_trip_and_fill_batch() {
    let t = tempfile::tempdir().unwrap();
    let (n, rows, cols) = (7, 3, 5);
    let f = rows * cols;
    // Include 0 and 255 so both ends of the scale are checked.
    let mut pixels = bytes(n * f, 11);
    pixels[0] = 0;
    pixels[1] = 255;
    let labels: Vec<u8> = (0..n as u8).map(|i| i % 4).collect();
    for gzip in [false, true] {
        let img = t.path().join(format!("img-{gzip}"));
        let lab = t.path().join(format!("lab-{gzip}"));
        write_idx(&img, &[n, rows, cols], &pixels, gzip).unwrap();
        write_idx(&lab, &[n], &labels, gzip).unwrap();
        let d = load_pair(&img, &lab, 4).unwrap();
        assert_eq!((d.len(), d.rows, d.cols, d.classes), (n, rows, cols, 4));
        assert!(!d.is_empty());
        assert_eq!(d.features(), f);
        assert_eq!(d.images, Pixels::U8(pixels.clone()));
        assert_eq!((d.channels, d.shape()), (1, [1, rows, cols]));
        assert_eq!(d.image(2), &pixels[2 * f..3 * f]);

        let idx = [6, 0, 3, 3];
        let mut x = vec![f32::NAN; idx.len() * f];
        let mut y = vec![usize::MAX; idx.len()];
        d.fill_batch(&idx, &mut x, &mut y);
        for (r, &i) in idx.iter().enumerate() {
            assert_eq!(y[r], labels[i] as usize);
            for j in 0..f {
                assert_eq!(x[r * f + j], pixels[i * f + j] as f32 / 255.0);
            }
        }
        assert_eq!(x[f], 0.0); // example 0, pixel 0
        assert_eq!(x[f + 1], 1.0); // example 0, pixel 1
    }
}

#[test]
fn load_dir_prefers_gz_and_accepts_raw() {
    let t = tempfile::tempdir().unwrap();
    let files = synthetic(6, 4);
    // Training files raw; test files both raw (corrupt) and .gz (good): .gz must win.
    for (i, (name, b)) in files.iter().enumerate() {
        if i < 2 {
            std::fs::write(t.path().join(name), b).unwrap();
        } else {
            std::fs::write(t.path().join(name), b"junk").unwrap();
            std::fs::write(t.path().join(format!("{name}.gz")), gzip_bytes(b)).unwrap();
        }
    }
    let s = load_mnist_dir(t.path()).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (6, 4));
    assert_eq!((s.train.rows, s.train.cols, s.train.classes), (4, 3, 10));
    assert_eq!(s.test.images, Pixels::U8(bytes(4 * 12, 3)));
}

// ---------------------------------------------------------------------------------------------
// properties

proptest! {
    // No failure persistence: the regression file would land in the source tree.
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn parse_idx_never_panics(b in prop::collection::vec(any::<u8>(), 0..256), nd in 0usize..5) {
        let _ = parse_idx(&b, Path::new("fuzz"), nd);
    }

    #[test]
    fn parse_idx_never_panics_past_magic(
        nd in 0u8..5,
        rest in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        // Start from a plausible magic so the dimension and length checks get exercised.
        let mut b = vec![0, 0, 8, nd];
        b.extend_from_slice(&rest);
        if let Err(e) = parse_idx(&b, Path::new("fuzz"), nd as usize) {
            prop_assert!(e.to_string().starts_with("fuzz: "), "{}", e);
        }
    }

    #[test]
    fn valid_idx_round_trips(
        dims in prop::collection::vec(1usize..6, 0..4),
        seed in any::<u32>(),
    ) {
        let n: usize = dims.iter().product();
        let data = bytes(n, seed);
        let p = Path::new("rt");
        let encoded = idx_bytes(&dims, &data, p).unwrap();
        let idx = parse_idx(&encoded, p, dims.len()).unwrap();
        prop_assert_eq!(&idx.dims, &dims);
        prop_assert_eq!(&idx.data, &data);
        // Any other ndims is refused, any cut or extension too.
        prop_assert!(parse_idx(&encoded, p, dims.len() + 1).is_err());
        prop_assert!(parse_idx(&encoded[..encoded.len() - 1], p, dims.len()).is_err());
        let mut longer = encoded.clone();
        longer.push(0);
        prop_assert!(parse_idx(&longer, p, dims.len()).is_err());
    }
}

#[test]
fn gzip_round_trip_on_disk() {
    let t = tempfile::tempdir().unwrap();
    for (k, dims) in [vec![1], vec![3, 1], vec![2, 5, 7], vec![300, 28, 28]]
        .into_iter()
        .enumerate()
    {
        let n: usize = dims.iter().product();
        let data = bytes(n, k as u32);
        let p = t.path().join(format!("f{k}"));
        write_idx(&p, &dims, &data, true).unwrap();
        let idx = read_idx(&p, dims.len()).unwrap();
        assert_eq!((idx.dims, idx.data), (dims, data));
    }
}

// ---------------------------------------------------------------------------------------------
// data directory resolution

#[test]
fn data_dir_precedence() {
    let flag = Path::new("/some/where");
    let env = Some(std::ffi::OsString::from("/env/root"));
    assert_eq!(
        resolve_data_dir_with(Some(flag), env.clone(), "mnist"),
        PathBuf::from("/some/where")
    );
    assert_eq!(
        resolve_data_dir_with(None, env, "mnist"),
        PathBuf::from("/env/root/mnist")
    );
    assert_eq!(
        resolve_data_dir_with(None, None, "fashion"),
        PathBuf::from("data/fashion")
    );
    assert_eq!(
        resolve_data_dir_with(None, Some("".into()), "mnist"),
        PathBuf::from("data/mnist")
    );
    // The public entry point: a flag wins whatever the environment says.
    assert_eq!(resolve_data_dir(Some(flag), "mnist"), flag);
}

// ---------------------------------------------------------------------------------------------
// downloads from a local server

/// Serves `files` (name -> IDX bytes) gzipped under `prefix`; returns the checksum table.
fn serve_map(prefix: &str, files: &[(&'static str, Vec<u8>)]) -> HashMap<String, Vec<u8>> {
    files
        .iter()
        .map(|(n, b)| (format!("{prefix}{n}.gz"), gzip_bytes(b)))
        .collect()
}

fn checksums(files: &[(&'static str, Vec<u8>)]) -> Vec<(&'static str, String)> {
    files.iter().map(|(n, b)| (*n, sha256_hex(b))).collect()
}

fn as_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(n, s)| (*n, s.as_str())).collect()
}

#[test]
fn download_then_load() {
    let files = synthetic(20, 8);
    let server = Server::start(serve_map("/good/", &files));
    let sums = checksums(&files);
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("new").join("mnist"); // created on demand
    download_files(&dir, &[&server.url("/good/")], &as_refs(&sums)).unwrap();
    let want: Vec<String> = {
        let mut v: Vec<String> = MNIST_FILES.iter().map(|n| format!("{n}.gz")).collect();
        v.sort();
        v
    };
    assert_eq!(dir_listing(&dir), want);
    for (name, b) in &files {
        let on_disk = std::fs::read(dir.join(format!("{name}.gz"))).unwrap();
        assert_eq!(on_disk, gzip_bytes(b), "{name}.gz is the served bytes");
    }
    let s = load_mnist_dir(&dir).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (20, 8));
    assert_eq!(s.train.images, Pixels::U8(bytes(20 * 12, 1)));

    // Present files are not fetched again: a dead mirror is fine now.
    download_files(&dir, &[&closed_port_url()], &as_refs(&sums)).unwrap();
    // And the high-level entry point loads without downloading.
    let s2 = mnist_from(&dir, true, &[&closed_port_url()]).unwrap();
    assert_eq!(s2, s);
}

#[test]
fn download_falls_back_to_next_mirror() {
    let files = synthetic(5, 5);
    let server = Server::start(serve_map("/good/", &files));
    let t = tempfile::tempdir().unwrap();
    // Mirror 1 answers 404 for everything, mirror 2 refuses connections, mirror 3 is good
    // (given without its trailing slash, which must be tolerated).
    let bad404 = server.url("/missing/");
    let refused = closed_port_url();
    let good = server.url("/good");
    let sums = checksums(&files);
    download_files(t.path(), &[&bad404, &refused, &good], &as_refs(&sums)).unwrap();
    let s = load_mnist_dir(t.path()).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (5, 5));
    assert!(dir_listing(t.path()).iter().all(|n| n.ends_with(".gz")));
}

#[test]
fn download_only_fetches_missing_files() {
    let files = synthetic(5, 5);
    // The server only has the test files; the training files are already on disk.
    let server = Server::start(serve_map("/m/", &files[2..]));
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join(files[0].0), &files[0].1).unwrap();
    write_idx(
        &t.path().join(format!("{}.gz", files[1].0)),
        &[5],
        &files[1].1[8..],
        true,
    )
    .unwrap();
    let sums = checksums(&files);
    download_files(t.path(), &[&server.url("/m/")], &as_refs(&sums)).unwrap();
    assert!(t.path().join("t10k-images-idx3-ubyte.gz").is_file());
    assert!(!t.path().join("train-images-idx3-ubyte.gz").exists());
    load_mnist_dir(t.path()).unwrap();
}

#[test]
fn download_with_wrong_checksum_fails_and_leaves_nothing() {
    let files = synthetic(5, 5);
    let server = Server::start(serve_map("/good/", &files));
    let mut sums = checksums(&files);
    sums[0].1 = "00".repeat(32);
    let t = tempfile::tempdir().unwrap();
    let refused = closed_port_url();
    let err = download_files(
        t.path(),
        &[&server.url("/good/"), &refused],
        &as_refs(&sums[..1]),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("train-images-idx3-ubyte.gz"), "{msg}");
    assert!(msg.contains("checksum"), "{msg}");
    assert!(msg.contains(&server.url("/good/")), "{msg}");
    assert!(msg.contains(&refused), "{msg}");
    assert!(matches!(err, bnlab::Error::Download { .. }));
    assert_eq!(
        dir_listing(t.path()),
        Vec::<String>::new(),
        "nothing written"
    );

    // Content that is not gzip at all is refused the same way.
    let mut map = HashMap::new();
    map.insert(
        "/plain/train-labels-idx1-ubyte.gz".to_string(),
        files[1].1.clone(),
    );
    let plain = Server::start(map);
    let msg = err_of(download_files(
        t.path(),
        &[&plain.url("/plain/")],
        &as_refs(&sums[1..2]),
    ));
    assert!(msg.contains("not a gzip"), "{msg}");
    assert_eq!(
        dir_listing(t.path()),
        Vec::<String>::new(),
        "nothing written"
    );
}

/// MNIST (see `common::mnist_dir`) as the four gzipped files its mirrors serve.
fn gzipped_mnist_dir() -> Option<PathBuf> {
    let dir = common::mnist_dir().filter(|d| {
        MNIST_FILES
            .iter()
            .all(|n| d.join(format!("{n}.gz")).is_file())
    });
    if dir.is_none() {
        common::skip("MNIST's four .gz files not present; the real-MNIST test");
    }
    dir
}

#[test]
fn real_mnist_via_local_mirror() {
    let Some(src) = gzipped_mnist_dir() else {
        return;
    };
    let map: HashMap<String, Vec<u8>> = MNIST_FILES
        .iter()
        .map(|n| {
            let gz = format!("{n}.gz");
            (
                format!("/mnist/{gz}"),
                std::fs::read(src.join(&gz)).unwrap(),
            )
        })
        .collect();
    let server = Server::start(map);
    let t = tempfile::tempdir().unwrap();
    download_files(t.path(), &[&server.url("/mnist/")], &MNIST_SHA256).unwrap();

    let start = std::time::Instant::now();
    let s = load_mnist_dir(t.path()).unwrap();
    eprintln!("load_mnist_dir: {:?}", start.elapsed());
    assert_eq!((s.train.len(), s.test.len()), (60000, 10000));
    assert_eq!((s.train.rows, s.train.cols), (28, 28));
    let mut counts = [0usize; 10];
    for &l in &s.train.labels {
        counts[l as usize] += 1;
    }
    assert_eq!(
        counts,
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    let mut test_counts = [0usize; 10];
    for &l in &s.test.labels {
        test_counts[l as usize] += 1;
    }
    assert_eq!(
        test_counts,
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    let images = s.train.images.as_u8().unwrap();
    let sum: u64 = images.iter().map(|&b| b as u64).sum();
    let mean = sum as f64 / 255.0 / images.len() as f64;
    assert!((mean - 0.1306605).abs() < 1e-6, "mean {mean}");

    // The batch path agrees with the byte statistics.
    let idx: Vec<usize> = (0..s.train.len()).step_by(100).collect();
    let mut x = vec![0f32; idx.len() * 784];
    let mut y = vec![0usize; idx.len()];
    s.train.fill_batch(&idx, &mut x, &mut y);
    assert!(x.iter().all(|&v| (0.0..=1.0).contains(&v)));
    assert_eq!(y[0], s.train.labels[0] as usize);
}
