//! Every fuzz target in the test suite, built as the suite builds it (no libFuzzer, no
//! second build of the workspace's C++): its corpus is replayed (the committed seeds in
//! `fuzz/corpus/TARGET`, the crashes kept in `fuzz/regressions/TARGET`, and seeds made
//! from `../shared/fixtures`), then random mutations of it run for a few seconds. A panic
//! fails the suite with the input written to a file. Coverage-guided runs:
//! `scripts/fuzz.sh`.
//!
//! With `FUZZ_SEEDS_DIR=DIR` set, the fixture seeds are also written to `DIR/TARGET` (what
//! `scripts/fuzz.sh` starts from).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Random mutation after the corpus, per target.
const SHAKE: Duration = Duration::from_secs(3);

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_owned()
}

fn run(name: &str, target: fn(&[u8])) {
    let fixtures = system_tests::fixtures::shared_fixtures();
    let made = fuzz::fixture_seeds(name, &fixtures);
    if let Ok(out) = std::env::var("FUZZ_SEEDS_DIR") {
        let out = Path::new(&out).join(name);
        std::fs::create_dir_all(&out).unwrap();
        for (seed, bytes) in &made {
            std::fs::write(out.join(seed), bytes).unwrap();
        }
    }
    let corpus_dir = fuzz_dir().join("corpus").join(name);
    let regressions = fuzz_dir().join("regressions").join(name);
    let mut corpus: Vec<Vec<u8>> = fuzz::replay::inputs(&[&corpus_dir, &regressions])
        .unwrap()
        .into_iter()
        .map(|(_, bytes)| bytes)
        .collect();
    corpus.extend(made.into_iter().map(|(_, bytes)| bytes));
    assert!(corpus.len() >= 2, "{name}: a corpus of {}", corpus.len());
    match fuzz::shake(target, &corpus, SHAKE, 7) {
        Ok(runs) => eprintln!("{name}: {runs} inputs, none panicked"),
        Err(failure) => {
            let kept = std::env::temp_dir().join(format!("fuzz-{name}-failure"));
            std::fs::write(&kept, &failure.input).unwrap();
            panic!(
                "{name} panicked: {}\ninput ({} bytes) kept at {} (replay: the `{name}` binary with that file; once fixed, move it to fuzz/regressions/{name}/)",
                failure.message,
                failure.input.len(),
                kept.display()
            );
        }
    }
}

#[test]
fn blk_records() {
    run("blk_records", fuzz::blk_records);
}

#[test]
fn block_parse() {
    run("block_parse", fuzz::block_parse);
}

#[test]
fn zmq_frames() {
    run("zmq_frames", fuzz::zmq_frames);
}

#[test]
fn rpc_answers() {
    run("rpc_answers", fuzz::rpc_answers);
}

#[test]
fn descriptors() {
    run("descriptors", fuzz::descriptors);
}

#[test]
fn page_tokens() {
    run("page_tokens", fuzz::page_tokens);
}

#[test]
fn config_toml() {
    run("config_toml", fuzz::config_toml);
}

/// Every target has its libFuzzer entry, a corpus, a regressions directory and a test here;
/// and a replay binary that refuses nothing it should not (its own corpus).
#[test]
fn every_target_has_an_entry_a_corpus_and_a_test() {
    let source = std::fs::read_to_string(fuzz_dir().join("tests/smoke.rs")).unwrap();
    for target in fuzz::TARGETS {
        let entry = fuzz_dir().join(format!("fuzz_targets/{target}.rs"));
        let entry = std::fs::read_to_string(&entry).unwrap();
        assert!(entry.contains(&format!("fuzz::{target}(data)")), "{target}");
        assert!(fuzz_dir().join("corpus").join(target).is_dir(), "{target}");
        assert!(
            fuzz_dir().join("regressions").join(target).is_dir(),
            "{target}"
        );
        assert!(
            source.contains(&format!("fn {target}()")),
            "{target} has no test"
        );
    }
    let replayed = std::process::Command::new(env!("CARGO_BIN_EXE_block_parse"))
        .arg(fuzz_dir().join("corpus/block_parse"))
        .output()
        .unwrap();
    assert!(replayed.status.success(), "{replayed:?}");
}
