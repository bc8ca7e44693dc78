//! `orchestrator run` as a process, configured by a file with `metrics_listen` on an
//! ephemeral port and logging JSON: its metrics endpoint counts withdrawals by state as one
//! goes through, and times the gRPC calls.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use proto::orchestrator::v1 as pb;
use proto::orchestrator::v1::withdrawals_client::WithdrawalsClient;
use system_tests::live::{Devnet, Indexer, KeyedWallet};
use system_tests::observe::{self, Scrape};
use tonic::metadata::MetadataValue;

fn bin() -> std::path::PathBuf {
    system_tests::harness::workspace_binary("orchestrator")
}
const TOKEN: &str = "metrics-test-token";
const WAIT: Duration = Duration::from_secs(60);

/// The orchestrator process, killed on drop unless it already exited.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn sagas(s: &Scrape, state: &str) -> f64 {
    s.value(&format!("orchestrator_sagas{{state=\"{state}\"}}"))
}

/// 1. `orchestrator run --config FILE --log-format json` prints `metrics<TAB>ADDR` and
///    `listening<TAB>ADDR`; `/health` and `/ready` answer 200;
/// 2. before any withdrawal, every saga state is a series at 0, and no RBF bump;
/// 3. a submitted withdrawal is counted in one state and its call in the latency histogram
///    of `SubmitWithdrawal`;
/// 4. broadcast, then blocks mined: it is counted as completed and nowhere else;
/// 5. after SIGTERM, every stderr line is a JSON object with a level and a message, and
///    none holds the bearer token.
#[test]
fn run_counts_sagas_by_state_and_times_calls_on_its_metrics_endpoint() {
    let node = Devnet::start(|c| c.filler_txs = 0);
    let miner = node.new_address("bech32");
    node.mine_to(102, &miner);
    let dir = tempfile::tempdir().unwrap();
    let keyed = KeyedWallet::funded(&node, &miner, dir.path(), 31, 2, 0.02);
    let db = tempfile::tempdir().unwrap();
    let served = Indexer::caught_up(&node, db.path(), &keyed.wallets);
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    system_tests::harness::write_secret(path("token"), TOKEN);
    let config = format!(
        "network = \"regtest\"\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
         indexer = \"http://{}\"\nbitcoind_rpc_url = \"{}\"\nbitcoind_cookie_file = \"{}\"\n\
         db = \"{}\"\nkey_file = \"{}\"\ntoken_file = \"{}\"\nchange_address = \"{}\"\n\
         confirmations = 1\nsettle_confirmations = 2\n",
        served.addr,
        node.node.rpc_url(),
        node.node.cookie_file().unwrap().display(),
        path("sagas"),
        keyed.key_file.display(),
        path("token"),
        keyed.address,
    );
    std::fs::write(path("orchestrator.toml"), config).unwrap();
    let mut process = Process(
        Command::new(bin())
            .args(["run", "--config", &path("orchestrator.toml")])
            .args(["--log-format", "json"])
            .env("ORCHESTRATOR_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(path("stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    let observe::Announced { metrics, grpc } = observe::announced(process.0.stdout.take().unwrap());

    // 1.
    assert_eq!(observe::get(&metrics, "/health"), (200, "ok\n".to_owned()));
    assert_eq!(observe::get(&metrics, "/ready").0, 200);

    // 2.
    let empty = Scrape::from(&metrics);
    let states = [
        "received",
        "reserved",
        "signed",
        "broadcast",
        "confirming",
        "completed",
        "failed",
        "cancelled",
        "needs_review",
    ];
    for state in states {
        assert_eq!(sagas(&empty, state), 0.0, "{state}");
    }
    assert_eq!(empty.value("orchestrator_rbf_bumps_total"), 0.0);

    // 3.
    let channel = served
        .runtime
        .block_on(
            tonic::transport::Channel::from_shared(format!("http://{grpc}"))
                .unwrap()
                .connect(),
        )
        .unwrap();
    let mut client = WithdrawalsClient::new(channel);
    let mut req = tonic::Request::new(pb::SubmitWithdrawalRequest {
        request_id: "metrics-1".into(),
        wallet: "hot".into(),
        destination: node.new_address("bech32"),
        amount_sat: 250_000,
        fee_rate: Some(pb::submit_withdrawal_request::FeeRate::SatPerVb(2.0)),
        max_fee_sat: 20_000,
    });
    let bearer = MetadataValue::try_from(format!("Bearer {TOKEN}")).unwrap();
    req.metadata_mut().insert("authorization", bearer);
    served
        .runtime
        .block_on(client.submit_withdrawal(req))
        .unwrap();
    let submitted = Scrape::from(&metrics);
    let total: f64 = states.iter().map(|s| sagas(&submitted, s)).sum();
    assert_eq!(total, 1.0, "{}", submitted.text);
    let submit = "orchestrator_grpc_request_duration_seconds_count\
                  {method=\"/orchestrator.v1.Withdrawals/SubmitWithdrawal\"}";
    assert_eq!(submitted.value(submit), 1.0);

    // 4.
    observe::wait_for(&metrics, WAIT, |s| sagas(s, "broadcast") == 1.0);
    let done = observe::wait_for(&metrics, WAIT, |s| {
        if sagas(s, "completed") == 1.0 {
            return true;
        }
        node.mine_to(1, &miner);
        false
    });
    let total: f64 = states.iter().map(|s| sagas(&done, s)).sum();
    assert_eq!(total, 1.0, "{}", done.text);

    // 5.
    let pid = process.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = process.0.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < WAIT, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let logged = std::fs::read_to_string(path("stderr")).unwrap();
    let messages = observe::json_log_messages(&logged, TOKEN);
    assert!(
        messages
            .iter()
            .any(|m| m == "serving orchestrator.v1.Withdrawals"),
        "{logged}"
    );
}
