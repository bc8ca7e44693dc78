//! Fuzz target [`fuzz::page_tokens`]: under `cargo fuzz` (`--cfg fuzzing`) libFuzzer drives it;
//! built otherwise, it replays the files and directories given as arguments (a crash
//! input, a corpus) and exits non-zero on the first input that panics.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::page_tokens(data));

#[cfg(not(fuzzing))]
fn main() {
    fuzz::replay_args(fuzz::page_tokens);
}
