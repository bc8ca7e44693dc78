//! The README's first command, `scripts/demo.sh`, end to end with this build's binaries:
//! devnet, `indexer run`, `orchestrator run` and the Python example clients, a deposit and a
//! withdrawal through a reorg. The script checks the amounts itself and exits non-zero when
//! they are off; this test checks it ran to the end and said what happened.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

/// Runs the demo with `DEMO_EVENTS=events`; checks it ran to the end; its output.
fn run_demo(events: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = Path::new(env!("CARGO_BIN_EXE_orchestrator"))
        .parent()
        .unwrap();
    for needed in ["devnet", "devnet-cli", "indexer"] {
        assert!(
            bin.join(needed).is_file(),
            "{needed} is not built beside the orchestrator in {}: build with \
             `cargo build --workspace --all-targets`",
            bin.display()
        );
    }
    let out = Command::new("bash")
        .arg(root.join("scripts/demo.sh"))
        .env("DEMO_BIN", bin)
        .env("DEMO_EVENTS", events)
        .current_dir(&root)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !stderr.contains("No module named 'grpc"),
        "python3 needs grpcio and grpcio-tools (scripts/setup.sh installs them): {stderr}"
    );
    assert!(out.status.success(), "the demo failed:\n{stdout}\n{stderr}");
    for said in [
        "after one block:            {\"confirmed_sat\": 125000000",
        "hot wallet funded:          {\"confirmed_sat\": 1000000000",
        "withdrawal 1: coins reserved",
        "withdrawal 1: in a block: 1 confirmation(s)",
        "withdrawal 1: sent to the network again",
        "withdrawal 1: its block left the chain (reorg)",
        "withdrawal 1: COMPLETED with 3 confirmations",
        "the customer received 150000000 sat",
        "demo complete: withdrawal paid exactly once, through a reorg",
    ] {
        assert!(
            stdout.contains(said),
            "the demo did not say {said:?}:\n{stdout}"
        );
    }
    stdout.into_owned()
}

#[test]
fn the_readme_main_command_pays_a_withdrawal_through_a_reorg() {
    let said = run_demo("subscribe");
    assert!(said.contains("(confirmations from subscribe)"), "{said}");
}

/// The same on the scale-out path: the indexer exports to a Kafka broker and the
/// orchestrator takes its confirmations from the topic.
#[test]
fn the_demo_on_kafka_events_pays_the_same_withdrawal() {
    let said = run_demo("kafka");
    assert!(said.contains("(confirmations from kafka)"), "{said}");
    let summary = said
        .lines()
        .find_map(|l| l.strip_prefix("the example consumer read the topic: "))
        .unwrap_or_else(|| panic!("no consumer summary:\n{said}"));
    let summary: serde_json::Value = serde_json::from_str(summary).unwrap();
    assert!(summary["applied"].as_u64().unwrap() > 100, "{summary}");
}
