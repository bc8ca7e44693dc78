//! Running a target without libFuzzer: replaying inputs (a crash file, a corpus), and a
//! short run of random mutations over a corpus for the test suite. Coverage guidance is
//! libFuzzer's job (`cargo fuzz run`); this catches a regression on known inputs and their
//! near neighbours in a few seconds, with the suite's ordinary build.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// An input that made a target panic, and the panic's message.
#[derive(Debug)]
pub struct Failure {
    /// The input.
    pub input: Vec<u8>,
    /// What the panic said.
    pub message: String,
}

/// Runs `target` on `input`; the panic's message if it panicked.
fn run(target: fn(&[u8]), input: &[u8]) -> Result<(), Failure> {
    catch_unwind(AssertUnwindSafe(|| target(input))).map_err(|panic| Failure {
        input: input.to_vec(),
        message: panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into()),
    })
}

/// Every file of `paths` (files, or directories read one level deep), in name order.
pub fn inputs(paths: &[&Path]) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(path)?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()?;
            entries.sort();
            for file in entries.into_iter().filter(|p| p.is_file()) {
                out.push((file.display().to_string(), std::fs::read(&file)?));
            }
        } else {
            out.push((path.display().to_string(), std::fs::read(path)?));
        }
    }
    Ok(out)
}

/// The corpus inputs first, then random mutations of them (bit flips, byte changes,
/// inserted, repeated and removed runs, splices of two inputs, truncation) until `time`
/// has passed. Returns how many inputs ran, or the first that panicked.
pub fn shake(
    target: fn(&[u8]),
    corpus: &[Vec<u8>],
    time: Duration,
    seed: u64,
) -> Result<u64, Failure> {
    let mut runs = 0;
    for input in corpus {
        run(target, input)?;
        runs += 1;
    }
    // Quiet: every panic is caught and reported with its input.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let outcome = loop {
        if started.elapsed() >= time {
            break Ok(runs);
        }
        let base = if corpus.is_empty() {
            Vec::new()
        } else {
            corpus[rng.gen_range(0..corpus.len())].clone()
        };
        let mut input = base;
        for _ in 0..rng.gen_range(1..=4) {
            mutate(&mut input, corpus, &mut rng);
        }
        if let Err(f) = run(target, &input) {
            break Err(f);
        }
        runs += 1;
    };
    std::panic::set_hook(hook);
    outcome
}

/// One random change to `input`.
fn mutate(input: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut StdRng) {
    const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xfd, 0xfe, 0xff, 0x20];
    let len = input.len();
    let at = |rng: &mut StdRng| if len == 0 { 0 } else { rng.gen_range(0..len) };
    match rng.gen_range(0..8) {
        0 if len > 0 => {
            let i = at(rng);
            input[i] ^= 1 << rng.gen_range(0..8);
        }
        1 if len > 0 => {
            let i = at(rng);
            input[i] = INTERESTING[rng.gen_range(0..INTERESTING.len())];
        }
        2 => {
            let i = at(rng);
            let n = rng.gen_range(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            input.splice(i..i, bytes);
        }
        3 if len > 1 => {
            let i = at(rng);
            let n = rng.gen_range(1..=(len - i).min(64));
            input.drain(i..i + n);
        }
        4 if len > 1 => {
            let i = at(rng);
            let n = rng.gen_range(1..=(len - i).min(64));
            let run: Vec<u8> = input[i..i + n].to_vec();
            input.splice(i..i, run);
        }
        5 if !corpus.is_empty() => {
            let other = &corpus[rng.gen_range(0..corpus.len())];
            let cut = at(rng);
            let from = if other.is_empty() {
                0
            } else {
                rng.gen_range(0..other.len())
            };
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
        6 if len > 0 => {
            input.truncate(at(rng));
        }
        _ => {
            // A little-endian length or count set to an extreme.
            if len >= 4 {
                let i = rng.gen_range(0..=len - 4);
                let v: u32 = [0, 1, 0xfd, 0xffff, 0x0100_0000, u32::MAX][rng.gen_range(0..6)];
                input[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// The `main` of a target built without libFuzzer: replays every file and directory
/// given as an argument, and exits non-zero at the first input that panics.
pub fn replay_args(target: fn(&[u8])) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: TARGET FILE_OR_DIR... (replays the inputs; `cargo fuzz run` fuzzes)");
        std::process::exit(2);
    }
    let paths: Vec<&Path> = args.iter().map(Path::new).collect();
    let inputs = match inputs(&paths) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("reading the inputs: {e}");
            std::process::exit(2);
        }
    };
    for (name, bytes) in &inputs {
        if let Err(f) = run(target, bytes) {
            eprintln!("{name}: {}", f.message);
            std::process::exit(1);
        }
    }
    eprintln!("{} inputs replayed, none panicked", inputs.len());
}
