//! The command line as operators' scripts use it (`../shared/docs/interface.md`).
//!
//! Scenarios:
//! 1. common flags work before or after the subcommand, from `INDEXER_*` variables and
//!    from the config file, with flags winning over the file.
//! 2. `watch add --file` reads one descriptor per line; `watch list` shows the wallet.
//! 3. bad input gets a clear error and a non-zero exit, and changes nothing.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_indexer");
const ADDR: &str = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080";

fn indexer(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("INDEXER_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run indexer")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn flags_work_anywhere_and_from_env_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");

    // Flags after the subcommand.
    let added = stdout(&indexer(
        &[
            "watch",
            "add",
            "--wallet",
            "hot",
            ADDR,
            "--db",
            p(&db),
            "--network",
            "regtest",
        ],
        &[],
    ));
    assert!(added.contains("1 new scripts"), "{added}");
    // Flags before it.
    let listed = stdout(&indexer(
        &["--db", p(&db), "--network", "regtest", "watch", "list"],
        &[],
    ));
    assert!(listed.starts_with("hot\tscripts=1"), "{listed}");
    // From the environment.
    let env = [("INDEXER_DB", p(&db)), ("INDEXER_NETWORK", "regtest")];
    let status = stdout(&indexer(&["status"], &env));
    assert!(
        status.contains("network\tregtest") && status.contains("scripts\t1"),
        "{status}"
    );
    // From the config file; a flag overrides it.
    let config = tmp.path().join("indexer.toml");
    std::fs::write(
        &config,
        format!("db = {:?}\nnetwork = \"regtest\"\n", p(&db)),
    )
    .unwrap();
    let status = stdout(&indexer(&["--config", p(&config), "status"], &[]));
    assert!(status.contains("tip\tnone"), "{status}");
    let other = indexer(
        &["--config", p(&config), "--network", "mainnet", "status"],
        &[],
    );
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr)
        .contains("database indexes regtest, but main was requested"));
}

#[test]
fn descriptor_files_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    let file = tmp.path().join("descriptors.txt");
    std::fs::write(&file, format!("# deposit addresses\n{ADDR}\n\nraw(51)\n")).unwrap();
    let common = ["--db", p(&db), "--network", "regtest"];
    let added = stdout(&indexer(
        &[
            &common[..],
            &["watch", "add", "--wallet", "deposits", "--file", p(&file)],
        ]
        .concat(),
        &[],
    ));
    assert!(added.contains("2 new scripts"), "{added}");

    let before = stdout(&indexer(&[&common[..], &["status"]].concat(), &[]));
    for (args, message) in [
        (
            vec!["watch", "add", "--wallet", "x", "wpkh(nonsense)"],
            "invalid descriptor",
        ),
        (
            vec![
                "watch",
                "add",
                "--wallet",
                "x",
                "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu",
            ],
            "is not for regtest",
        ),
        (
            vec!["watch", "add", "--wallet", "bad name!", ADDR],
            "invalid wallet name",
        ),
        (
            vec!["rescan", "--blocks-dir", p(&tmp.path().join("missing"))],
            "missing",
        ),
    ] {
        let out = indexer(&[&common[..], &args[..]].concat(), &[]);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{args:?}: {err}");
    }
    let after = stdout(&indexer(&[&common[..], &["status"]].concat(), &[]));
    assert_eq!(before, after, "failed commands changed nothing");

    let missing = indexer(&["--db", p(&tmp.path().join("nope")), "status"], &[]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no database at"));
}
