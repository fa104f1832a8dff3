//! Regression corpus of bad input files (tests/corpus, listed in MANIFEST.tsv with the loader
//! each goes to and a piece of the error it must produce), and property tests that the IDX
//! reader and the checkpoint loader never panic, whatever the bytes (the CIFAR-10 and `.npz`
//! parsers' are in tests/data_formats.rs).

use bnlab::checkpoint;
use bnlab::data::idx::{parse_idx, read_idx};
use bnlab::data::{load_npz, parse_cifar10_batch};
use bnlab::network::Network;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn load_with(loader: &str, path: &Path) -> Result<(), String> {
    match loader {
        "idx3" => read_idx(path, 3).map(|_| ()).map_err(|e| e.to_string()),
        "idx1" => read_idx(path, 1).map(|_| ()).map_err(|e| e.to_string()),
        "cifar10" => parse_cifar10_batch(&std::fs::read(path).unwrap(), path)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        "npz" => load_npz(path).map(|_| ()).map_err(|e| e.to_string()),
        model => {
            let mut net = Network::preset(model, 0, 2, 1).unwrap();
            checkpoint::load(&mut net, path).map_err(|e| e.to_string())
        }
    }
}

#[test]
fn every_corpus_file_gets_its_clear_error() {
    let manifest = std::fs::read_to_string(corpus().join("MANIFEST.tsv")).unwrap();
    let mut checked = 0;
    for line in manifest
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let cols: Vec<&str> = line.split('\t').collect();
        let [file, loader, expected] = cols[..] else {
            panic!("bad manifest line: {line}")
        };
        let path = corpus().join(file);
        let err = load_with(loader, &path).expect_err(file);
        assert!(
            err.contains(file),
            "{file}: the error does not name the file: {err}"
        );
        assert!(
            err.contains(expected),
            "{file}: expected '{expected}' in: {err}"
        );
        checked += 1;
    }
    let files = std::fs::read_dir(corpus()).unwrap().count() - 1;
    assert_eq!(
        checked, files,
        "every corpus file is listed in MANIFEST.tsv"
    );
}

#[test]
fn a_checkpoint_holding_nan_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("nan.safetensors");
    let mut net = Network::preset("mlp-fig1-bn", 0, 2, 1).unwrap();
    net.for_each_batch_norm(&mut |bn| bn.running_var[3] = f32::NAN);
    checkpoint::save(&mut net, &p).unwrap();
    let mut fresh = Network::preset("mlp-fig1-bn", 0, 2, 1).unwrap();
    let e = checkpoint::load(&mut fresh, &p).unwrap_err().to_string();
    assert!(e.contains("non-finite") && e.contains("running_var"), "{e}");
}

fn valid_checkpoint() -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("ok.safetensors");
    checkpoint::save(&mut Network::preset("mlp-fig1", 0, 2, 1).unwrap(), &p).unwrap();
    std::fs::read(p).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn checkpoint_loader_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("fuzz.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        let mut net = Network::preset("mlp-fig1", 0, 2, 1).unwrap();
        prop_assert!(checkpoint::load(&mut net, &p).is_err());
    }

    #[test]
    fn checkpoint_loader_never_panics_on_mutated_checkpoints(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = valid_checkpoint();
        // Mutations in the header are the interesting ones; bias them there.
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for (at, v) in edits {
            let i = at.index(header.min(bytes.len()));
            bytes[i] = v;
        }
        if let Some(c) = cut {
            bytes.truncate(c.index(bytes.len()));
        }
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("mutated.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        let mut net = Network::preset("mlp-fig1", 0, 2, 1).unwrap();
        // Ok or a clear error: both fine, a panic is not.
        let _ = checkpoint::load(&mut net, &p);
    }

    #[test]
    fn idx_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), nd in 1usize..4) {
        let _ = parse_idx(&bytes, Path::new("fuzz.idx"), nd);
    }
}
