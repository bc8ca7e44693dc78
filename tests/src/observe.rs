//! What a running `indexer` or `orchestrator` shows from outside: the addresses it
//! announces on stdout, its metrics endpoint read the way Prometheus does (plain HTTP GETs,
//! the text format parsed into series and values), its JSON log lines, and the one line it
//! says when it refuses to start.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Runs `command` to its end and checks that it refused to start the way an operator
/// should see it: a non-zero exit and one line on stderr, `error: ...`; returns that line.
pub fn startup_error(command: &mut std::process::Command) -> String {
    let out = command.output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "exit 0 for {command:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, not {lines:?}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_owned()
}

/// `GET http://{addr}{path}`: the status and the body, whatever the status.
pub fn get(addr: &str, path: &str) -> (u16, String) {
    match ureq::get(&format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(30))
        .call()
    {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("GET {path} from {addr}: {e}"),
    }
}

/// Waits until `GET path` answers `status`; panics after `timeout`.
pub fn wait_for_status(addr: &str, path: &str, status: u16, timeout: Duration) {
    let started = Instant::now();
    loop {
        let (got, body) = get(addr, path);
        if got == status {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "{path} still answers {got}: {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One scrape of `/metrics`.
pub struct Scrape {
    /// The text as served.
    pub text: String,
    /// Each sample line's series (name and labels, as written) and value.
    values: HashMap<String, f64>,
}

impl Scrape {
    /// Scrapes `addr`, which must answer 200 in the Prometheus text format.
    pub fn from(addr: &str) -> Scrape {
        let (status, text) = get(addr, "/metrics");
        assert_eq!(status, 200, "{text}");
        let values = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (series, value) = l
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("not a sample line: {l}"));
                let value = value
                    .parse()
                    .unwrap_or_else(|_| panic!("not a number: {l}"));
                (series.to_owned(), value)
            })
            .collect();
        Scrape { text, values }
    }

    /// The value of `series` (e.g. `x_total` or `x{stage="parse"}`); panics when absent.
    pub fn value(&self, series: &str) -> f64 {
        *self
            .values
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in\n{}", self.text))
    }

    /// The value of `series`, 0 when it has no sample yet (a label set never seen).
    pub fn value_or_zero(&self, series: &str) -> f64 {
        self.values.get(series).copied().unwrap_or(0.0)
    }
}

/// Scrapes `addr` until `ready` holds for a scrape, and returns that one; panics after
/// `timeout` with the last scrape.
pub fn wait_for(addr: &str, timeout: Duration, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let started = Instant::now();
    loop {
        let scrape = Scrape::from(addr);
        if ready(&scrape) {
            return scrape;
        }
        assert!(
            started.elapsed() < timeout,
            "the metrics never got there:\n{}",
            scrape.text
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The addresses a process announced on stdout.
pub struct Announced {
    /// From `metrics<TAB>ADDR`.
    pub metrics: String,
    /// From `listening<TAB>ADDR` (gRPC).
    pub grpc: String,
}

/// Reads `stdout` until it announced both its metrics and its gRPC address.
pub fn announced(stdout: impl std::io::Read) -> Announced {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let (mut metrics, mut grpc) = (None, None);
    while metrics.is_none() || grpc.is_none() {
        let line = lines.next().expect("stdout ended").unwrap();
        if let Some(addr) = line.strip_prefix("metrics\t") {
            metrics = Some(addr.to_owned());
        } else if let Some(addr) = line.strip_prefix("listening\t") {
            grpc = Some(addr.to_owned());
        }
    }
    Announced {
        metrics: metrics.unwrap(),
        grpc: grpc.unwrap(),
    }
}

/// The messages of `logged`, asserting that each of its lines is a JSON object with a
/// level and a message, and that none holds `secret`.
pub fn json_log_messages(logged: &str, secret: &str) -> Vec<String> {
    logged
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(v["level"].is_string(), "{line}");
            assert!(!line.contains(secret), "a secret was logged: {line}");
            v["message"]
                .as_str()
                .unwrap_or_else(|| panic!("no message: {line}"))
                .to_owned()
        })
        .collect()
}
