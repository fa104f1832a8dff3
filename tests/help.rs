//! The help and README.md agree: every command of README.md's "Commands" section parses (its
//! words with `--help` appended), each flag on its line is in that command's `--help`, and every
//! bnlab flag README.md names anywhere exists in some command's `--help`. Every command's help
//! carries an example.

mod common;

use std::collections::{BTreeMap, BTreeSet};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The commands of the first ```sh block after "## Commands", continuation lines joined.
fn readme_commands(text: &str) -> Vec<String> {
    let section = &text[text
        .find("## Commands")
        .expect("README has a Commands section")..];
    let block = &section[section.find("```sh").expect("a sh block") + 5..];
    let block = &block[..block.find("```").unwrap()];
    let mut commands: Vec<String> = Vec::new();
    for line in block.lines() {
        if line.starts_with("bnlab ") {
            commands.push(line.trim().to_string());
        } else if line.starts_with(char::is_whitespace) && !line.trim().is_empty() {
            let last = commands.last_mut().expect("a continuation after a command");
            last.push(' ');
            last.push_str(line.trim());
        }
    }
    commands
}

/// `--flags` in a text.
fn flags(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i + 2 < b.len() {
        let starts = b[i] == b'-'
            && b[i + 1] == b'-'
            && b[i + 2].is_ascii_lowercase()
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'-'));
        if starts {
            let mut j = i + 2;
            while j < b.len()
                && (b[j].is_ascii_lowercase() || b[j].is_ascii_digit() || b[j] == b'-')
            {
                j += 1;
            }
            out.insert(text[i..j].trim_end_matches('-').to_string());
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// The subcommand words of a README command line (`reproduce mnist`, `models`).
fn words(command: &str) -> Vec<String> {
    command
        .split_whitespace()
        .skip(1)
        .take_while(|w| {
            !w.starts_with('-') && w.chars().all(|c| c.is_ascii_lowercase() || c == '-')
        })
        .map(str::to_string)
        .collect()
}

fn help(words: &[String]) -> String {
    let mut args: Vec<&str> = words.iter().map(String::as_str).collect();
    args.push("--help");
    let o = common::bnlab(&args);
    assert!(
        o.status.success(),
        "`bnlab {}` does not parse: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn readme_commands_parse_and_their_flags_are_in_the_help() {
    let text = readme();
    let commands = readme_commands(&text);
    assert!(
        commands.len() >= 15,
        "only {} commands found",
        commands.len()
    );
    let mut helps: BTreeMap<Vec<String>, String> = BTreeMap::new();
    for c in &commands {
        let w = words(c);
        assert!(!w.is_empty(), "no command in {c:?}");
        let h = helps.entry(w.clone()).or_insert_with(|| help(&w)).clone();
        for f in flags(c) {
            assert!(
                h.contains(&format!("{f} "))
                    || h.contains(&format!("{f}\n"))
                    || h.contains(&format!("{f}=")),
                "README documents `bnlab {} {f}`, which `bnlab {} --help` lacks",
                w.join(" "),
                w.join(" ")
            );
        }
    }
    // Every bnlab flag named anywhere in README.md is some command's flag. The others are
    // cargo's, named in the build and test instructions, and mpirun's.
    let cargo = [
        "--release",
        "--no-default-features",
        "--lib",
        "--example",
        "--open",
        "--check",
        "--all-targets",
        "--features",
        "--test",
        "--allow-run-as-root",
        "--hostfile",
        "--oversubscribe",
        "--bind-to",
        "--mca",
    ];
    let all_help: String = [
        "train",
        "eval",
        "bench",
        "grad",
        "ics",
        "landscape",
        "fold",
        "export",
        "models",
        "summary",
        "reproduce mnist",
        "reproduce inception",
        "reproduce normalizers",
        "reproduce ics",
        "reproduce precise-bn",
    ]
    .iter()
    .map(|c| help(&c.split(' ').map(str::to_string).collect::<Vec<_>>()))
    .collect();
    let known = flags(&all_help);
    for f in flags(&text) {
        assert!(
            known.contains(&f) || cargo.contains(&f.as_str()),
            "README.md names {f}, which no bnlab command has"
        );
    }
}

#[test]
fn every_command_describes_itself_with_an_example() {
    let top = help(&[]);
    assert!(top.contains("MNIST") && top.contains("Example:"), "{top}");
    for c in [
        "train",
        "eval",
        "bench",
        "grad",
        "fold",
        "export",
        "models",
        "summary",
        "reproduce",
        "reproduce mnist",
        "reproduce inception",
        "reproduce precise-bn",
    ] {
        let w: Vec<String> = c.split(' ').map(str::to_string).collect();
        let h = help(&w);
        assert!(
            h.contains("Example: bnlab"),
            "`bnlab {c} --help` has no example:\n{h}"
        );
    }
    // What the commands do now: the data sets and models are named.
    let train = help(&["train".to_string()]);
    for needle in [
        "Fashion-MNIST",
        "CIFAR-10",
        ".npz",
        "--progress",
        "--resume",
        "130",
    ] {
        assert!(train.contains(needle), "train --help lacks {needle:?}");
    }
    let inception = help(&["reproduce".to_string(), "inception".to_string()]);
    for needle in ["Fashion-MNIST", "--resume", "--report-only"] {
        assert!(
            inception.contains(needle),
            "reproduce inception --help lacks {needle:?}"
        );
    }
}

#[test]
fn the_flag_reader_reads_flags() {
    let f = flags("bnlab train --model X [--steps 5] (`--progress json`) a--b --x- ---y");
    let want: BTreeSet<String> = ["--model", "--steps", "--progress", "--x"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(f, want);
    assert_eq!(
        words("bnlab reproduce mnist --resume DIR"),
        ["reproduce", "mnist"]
    );
    assert_eq!(words("bnlab models [show NAME]"), ["models"]);
    assert_eq!(
        words("bnlab reproduce precise-bn --quick"),
        ["reproduce", "precise-bn"]
    );
}
