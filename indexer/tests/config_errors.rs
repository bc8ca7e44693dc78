//! A configuration mistake stops `indexer` at start with one line that names the problem
//! and what to do, and a non-zero exit: an unknown key, a bad address, a missing cookie
//! file, an unreachable bitcoind.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use system_tests::observe::startup_error;

const BIN: &str = env!("CARGO_BIN_EXE_indexer");

/// Runs `indexer` with `config` as its config file and `args`; returns its one error line.
fn error_line(config: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("indexer.toml");
    let config = config.replace("{dir}", dir.path().to_str().unwrap());
    std::fs::write(&path, &config).unwrap();
    std::fs::write(dir.path().join(".cookie"), "__cookie__:secret").unwrap();
    startup_error(
        Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .args(args)
            .env("INDEXER_LOG", "error"),
    )
}

#[test]
fn an_unknown_key_is_named_with_its_line_and_the_keys_there_are() {
    let line = error_line(
        "db = \"{dir}/db\"\nnetwork = \"regtest\"\ncolour = 1\n",
        &["status"],
    );
    assert!(line.contains("line 3"), "{line}");
    assert!(line.contains("unknown field `colour`"), "{line}");
    assert!(line.contains("expected one of `db`"), "{line}");
}

#[test]
fn bad_addresses_say_what_form_they_must_take() {
    let base = "db = \"{dir}/db\"\nnetwork = \"regtest\"\n[bitcoind]\n";
    let line = error_line(&format!("{base}rpc_url = \"localhost:8332\"\n"), &["run"]);
    assert!(
        line.contains("bitcoind.rpc_url \"localhost:8332\" must start with http://"),
        "{line}"
    );
    let line = error_line(&format!("{base}zmq_rawblock = \"28332\"\n"), &["run"]);
    assert!(line.contains("like tcp://127.0.0.1:28332"), "{line}");
    let line = error_line("db = \"{dir}/db\"\nnetwork = \"moon\"\n", &["status"]);
    assert!(line.contains("moon"), "{line}");
}

#[test]
fn a_missing_cookie_file_or_an_unreachable_bitcoind_says_what_to_check() {
    let line = error_line(
        "db = \"{dir}/db\"\nnetwork = \"regtest\"\n[bitcoind]\n\
         cookie_file = \"{dir}/no-such/.cookie\"\nstartup_wait_secs = 1\n",
        &["run", "--grpc", "127.0.0.1:0"],
    );
    assert!(line.contains("no-such/.cookie"), "{line}");
    assert!(
        line.contains("check bitcoind.rpc_url, cookie_file"),
        "{line}"
    );
    // Nothing listens on port 1 of loopback.
    let line = error_line(
        "db = \"{dir}/db\"\nnetwork = \"regtest\"\n[bitcoind]\n\
         rpc_url = \"http://127.0.0.1:1/\"\ncookie_file = \"{dir}/.cookie\"\n\
         startup_wait_secs = 1\n",
        &["run", "--grpc", "127.0.0.1:0"],
    );
    assert!(
        line.contains("http://127.0.0.1:1/ is unreachable"),
        "{line}"
    );
    assert!(line.contains("server=1"), "{line}");
}
