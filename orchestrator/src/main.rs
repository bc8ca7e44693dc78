//! `orchestrator`: the withdrawal orchestrator's command line (not built yet).

fn main() {
    eprintln!("orchestrator: not built yet; see the orchestrator issue");
    std::process::exit(2);
}
