//! A configuration mistake stops `orchestrator run` at start with one line that names the
//! problem and what to do, and a non-zero exit: an unknown key, a bad address, a missing
//! cookie or key file, an unreachable bitcoind or indexer.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use system_tests::live::Devnet;
use system_tests::observe::startup_error;

fn bin() -> std::path::PathBuf {
    system_tests::harness::workspace_binary("orchestrator")
}
const CHANGE: &str = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080";

/// A complete config in `dir` (token, key file, cookie written there), with `extra` lines
/// after it; TOML keeps the first of a repeated key as an error, so `extra` adds keys only.
fn config(dir: &Path, rpc_url: &str, cookie: &str, extra: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    system_tests::harness::write_secret(dir.join("token"), "0123456789abcdef0123");
    std::fs::write(dir.join(".cookie"), "__cookie__:secret").unwrap();
    let keys = dir.join("hot.keys");
    if !keys.exists() {
        hot_address(dir);
    }
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        "network = \"regtest\"\ndb = \"{d}/sagas\"\ntoken_file = \"{d}/token\"\n\
         key_file = \"{d}/hot.keys\"\nbitcoind_rpc_url = \"{rpc_url}\"\n\
         bitcoind_cookie_file = \"{cookie}\"\nstartup_wait_secs = 1\n{extra}",
        d = dir.display()
    )
}

/// The address of the key file `dir/hot.keys`, created on first use.
fn hot_address(dir: &Path) -> String {
    let saved = dir.join("hot.address");
    if let Ok(address) = std::fs::read_to_string(&saved) {
        return address;
    }
    let address =
        orchestrator::signer::generate_key_file(&dir.join("hot.keys"), bitcoin::Network::Regtest)
            .unwrap()
            .to_string();
    std::fs::write(&saved, &address).unwrap();
    address
}

/// Runs `orchestrator run --config` over `text`; returns its one error line.
fn error_line(dir: &Path, text: &str) -> String {
    let path = dir.join("orchestrator.toml");
    std::fs::write(&path, text).unwrap();
    startup_error(
        Command::new(bin())
            .args(["run", "--listen", "127.0.0.1:0", "--config"])
            .arg(&path)
            .env("ORCHESTRATOR_LOG", "error"),
    )
}

#[test]
fn unknown_keys_bad_addresses_and_missing_files_are_named_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cookie = d.join(".cookie");
    let cookie = cookie.to_str().unwrap();
    let rpc = "http://127.0.0.1:1/";

    let line = error_line(
        d,
        &config(
            d,
            rpc,
            cookie,
            &format!("change_address = \"{CHANGE}\"\ncolour = 1\n"),
        ),
    );
    assert!(line.contains("line 9"), "{line}");
    assert!(
        line.contains("unknown field `colour`, expected one of"),
        "{line}"
    );

    let mainnet = "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4";
    let line = error_line(
        d,
        &config(d, rpc, cookie, &format!("change_address = \"{mainnet}\"\n")),
    );
    assert!(line.contains("is not an address of regtest"), "{line}");
    assert!(
        line.contains("give an address of the paying wallet"),
        "{line}"
    );
    let line = error_line(
        d,
        &config(d, rpc, cookie, "change_address = \"nonsense\"\n"),
    );
    assert!(line.contains("change_address \"nonsense\""), "{line}");

    let line = error_line(d, &config(d, rpc, cookie, ""));
    assert!(line.contains("change_address is required"), "{line}");

    // An address of the network, but not of the keys: its change would be lost.
    let line = error_line(
        d,
        &config(d, rpc, cookie, &format!("change_address = \"{CHANGE}\"\n")),
    );
    assert!(line.contains("is not paid to a key of key_file"), "{line}");

    std::fs::remove_file(d.join("hot.keys")).unwrap();
    std::fs::write(d.join("hot.keys"), "").unwrap();
    let text = config(d, rpc, cookie, &format!("change_address = \"{CHANGE}\"\n"));
    std::fs::remove_file(d.join("hot.keys")).unwrap();
    let line = error_line(d, &text);
    assert!(line.contains("hot.keys"), "{line}");
    assert!(line.contains("`orchestrator keygen` creates one"), "{line}");
}

#[test]
fn a_missing_cookie_or_an_unreachable_bitcoind_or_indexer_says_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let change = format!("change_address = \"{}\"\n", hot_address(d));
    // Nothing listens on port 1 of loopback.
    let missing = d.join("no-such/.cookie");
    let line = error_line(
        d,
        &config(d, "http://127.0.0.1:1/", missing.to_str().unwrap(), &change),
    );
    assert!(line.contains("no-such/.cookie"), "{line}");
    assert!(
        line.contains("check bitcoind_rpc_url and bitcoind_cookie_file"),
        "{line}"
    );

    let cookie = d.join(".cookie");
    let line = error_line(
        d,
        &config(d, "http://127.0.0.1:1/", cookie.to_str().unwrap(), &change),
    );
    assert!(
        line.contains("http://127.0.0.1:1/ is unreachable"),
        "{line}"
    );
    assert!(line.contains("server=1"), "{line}");

    // bitcoind answers; the indexer does not.
    let node = Devnet::start(|_| {});
    let cookie = node.node.cookie_file().unwrap();
    let text = config(
        d,
        &node.node.rpc_url(),
        cookie.to_str().unwrap(),
        &format!("{change}indexer = \"http://127.0.0.1:1\"\n"),
    );
    let line = error_line(d, &text);
    assert!(line.contains("indexer at http://127.0.0.1:1"), "{line}");
    assert!(line.contains("`indexer run` serves gRPC there"), "{line}");
}

#[test]
fn a_second_process_on_the_same_saga_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cookie = d.join(".cookie");
    let text = config(
        d,
        "http://127.0.0.1:1/",
        cookie.to_str().unwrap(),
        &format!("change_address = \"{}\"\n", hot_address(d)),
    );
    let _first = orchestrator::store::SagaStore::open(&d.join("sagas")).unwrap();
    let line = error_line(d, &text);
    assert!(
        line.contains("is open in another orchestrator process: one process at a time"),
        "{line}"
    );
}

#[test]
fn a_token_others_can_read_and_senseless_policies_are_refused_in_one_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cookie = d.join(".cookie");
    let cookie = cookie.to_str().unwrap();
    let change = format!("change_address = \"{}\"\n", hot_address(d));
    let rpc = "http://127.0.0.1:1/";
    for (extra, says) in [
        ("confirmations = 0\n", "confirmations 0"),
        (
            "confirmations = 6\nsettle_confirmations = 2\n",
            "settle_confirmations 2 is below confirmations 6",
        ),
        ("bump_after_blocks = 0\n", "bump_after_blocks 0"),
        ("fee_ceiling = inf\n", "must be finite"),
        ("fee_floor = nan\n", "must be finite"),
    ] {
        let line = error_line(d, &config(d, rpc, cookie, &format!("{change}{extra}")));
        assert!(line.contains(says), "{extra}: {line}");
    }
    let text = config(d, rpc, cookie, &change);
    std::fs::set_permissions(d.join("token"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let line = error_line(d, &text);
    assert!(
        line.contains("is readable by group or others (mode 644)"),
        "{line}"
    );
    assert!(line.contains("chmod 600"), "{line}");
}

#[test]
fn bitcoind_rpc_user_with_a_password_file_is_accepted_and_a_wrong_one_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let change = format!("change_address = \"{}\"\n", hot_address(d));
    let node_dir = tempfile::tempdir().unwrap();
    let mut node_config = devnet::Config::new(node_dir.path());
    node_config.rpc_auth = devnet::RpcAuth::UserPass {
        user: "payer".into(),
        password: "correct horse".into(),
    };
    let node = devnet::Node::start(node_config).unwrap();
    let password = d.join("bitcoind-password");
    let with = |secret: &str| {
        system_tests::harness::write_secret(&password, secret);
        config(
            d,
            &node.rpc_url(),
            "/no/cookie/needed",
            &format!(
                "{change}bitcoind_rpc_user = \"payer\"\nbitcoind_rpc_password_file = \"{}\"\n\
                 indexer = \"http://127.0.0.1:1\"\n",
                password.display()
            ),
        )
    };
    // bitcoind accepted the credentials: what stops the start is the absent indexer.
    let line = error_line(d, &with("correct horse\n"));
    assert!(line.contains("indexer at http://127.0.0.1:1"), "{line}");
    let line = error_line(d, &with("wrong"));
    assert!(line.contains("refused the credentials"), "{line}");
    assert!(!line.contains("wrong"), "the password is not shown: {line}");
}
