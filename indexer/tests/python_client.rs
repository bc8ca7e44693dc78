//! The Python example client (`examples/python/indexer_client.py`, grpcio) against a real
//! `indexer serve` process on 127.0.0.1.
//!
//! Scenario: index mainnet 0..599 (`../shared/fixtures`) for a wallet of early P2PK keys;
//! `watch list` gives the expected balance; `indexer serve --grpc 127.0.0.1:0` binds, prints
//! its address, and the Python client's tip, balance and paged UTXO totals equal it; without
//! the token the client gets UNAUTHENTICATED.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_indexer");
const KEYS: [&str; 2] = [
    "0496b538e853519c726a2c91e61ec11600ae1390813a627c66fb8be7947be63c52da7589379515d4e0a604f8141781e62294721166bf621e73a82cbf2342c858ee",
    "0411db93e1dcdb8a016b49840f8c53bc1eb68a382e97b1482ecad7b148a6909a5cb2e0eaddfb84ccf9744464f82e160bfa9b8b64f9d4c03f999b8643f656b412a3",
];

fn run(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("INDEXER_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "indexer {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn python(addr: &str, token: Option<&Path>, args: &[&str]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/indexer_client.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).arg("--addr").arg(addr);
    if let Some(t) = token {
        cmd.arg("--token-file").arg(t);
    }
    let out = cmd.args(args).output().expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'grpc"),
        "python3 needs grpcio and grpcio-tools (scripts/setup.sh installs them): {stderr}"
    );
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
    )
}

#[test]
fn python_client_reads_what_the_indexer_serves() {
    let blocks = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/mainnet-0-599");
    assert!(
        blocks.is_dir(),
        "the shared block fixtures are missing: expected {}",
        blocks.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    let db = db.to_str().unwrap();
    let descriptors: Vec<String> = KEYS.iter().map(|k| format!("pk({k})")).collect();
    let mut add = vec!["--db", db, "watch", "add", "--wallet", "satoshi"];
    add.extend(descriptors.iter().map(String::as_str));
    run(&add);
    run(&[
        "--db",
        db,
        "rescan",
        "--blocks-dir",
        blocks.to_str().unwrap(),
    ]);
    let listed = run(&["--db", db, "watch", "list"]);
    let field = |name: &str| -> u64 {
        let line = listed.lines().next().unwrap();
        let v = line
            .split('\t')
            .find_map(|f| f.strip_prefix(&format!("{name}=")))
            .unwrap();
        v.parse().unwrap()
    };
    let (confirmed, utxos) = (field("confirmed_sat"), field("utxos"));
    assert!(utxos > 0);

    let token = tmp.path().join("token");
    system_tests::harness::write_secret(&token, "python-example-token-42\n");
    let mut server = Command::new(BIN)
        .args([
            "--db",
            db,
            "serve",
            "--grpc",
            "127.0.0.1:0",
            "--grpc-token-file",
            token.to_str().unwrap(),
        ])
        .env("INDEXER_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The server prints its address once bound: no sleeping and hoping.
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening\t")
        .expect("the address line")
        .to_string();

    let (ok, tip) = python(&addr, Some(&token), &["tip"]);
    assert!(ok, "{tip}");
    assert!(tip.contains("\"height\": 599"), "{tip}");
    let (ok, balance) = python(&addr, Some(&token), &["balance", "--wallet", "satoshi"]);
    assert!(ok, "{balance}");
    assert!(
        balance.contains(&format!("\"confirmed_sat\": {confirmed}")),
        "{balance}"
    );
    let (ok, listed) = python(&addr, Some(&token), &["utxos", "--wallet", "satoshi"]);
    assert!(ok, "{listed}");
    assert_eq!(
        listed,
        format!("{{\"utxo_count\": {utxos}, \"value_sat\": {confirmed}}}")
    );
    let (ok, refused) = python(&addr, None, &["tip"]);
    assert!(!ok && refused.contains("UNAUTHENTICATED"), "{refused}");

    // End only the server this test started, by its pid.
    let _ = server.kill();
    server.wait().unwrap();
}
