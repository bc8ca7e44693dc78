//! Fuzz target [`fuzz::zmq_frames`]: under `cargo fuzz` (`--cfg fuzzing`) libFuzzer drives it;
//! built otherwise, it replays the files and directories given as arguments (a crash
//! input, a corpus) and exits non-zero on the first input that panics.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::zmq_frames(data));

#[cfg(not(fuzzing))]
fn main() {
    fuzz::replay_args(fuzz::zmq_frames);
}
