//! ZMQ PUB sockets on their own thread (sockets are not `Sync`), with fault injection.

use std::collections::HashMap;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::config::{Topic, ZmqBind};
use crate::error::{Error, Result};

/// Core's default send high-water mark.
const SEND_HWM: i32 = 1000;
/// A message held back for reordering is sent anyway after this long.
const REORDER_HOLD: Duration = Duration::from_millis(200);

/// Faults to inject into the next notifications (`devnet_zmqfaults`).
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct ZmqFaults {
    /// Skip sending the next n messages; their sequence numbers are still used up,
    /// as when the high-water mark drops them.
    pub drop_next: u32,
    /// Drop each message with this probability.
    pub drop_prob: f64,
    /// Hold each of the next n messages back and send it after the one that follows.
    pub reorder_next: u32,
    /// Replace the next n messages with malformed frames.
    pub garbage_next: u32,
    /// The next n `rawblock` bodies keep their header and claim 2^64-1 transactions (what
    /// a hostile publisher can send: proof of work covers only the header).
    pub huge_count_next: u32,
    /// The next n `rawblock` bodies of an odd number of transactions (3 or more) repeat
    /// their last transaction: the merkle root stays the same (CVE-2012-2459).
    pub duplicate_tail_next: u32,
}

/// `body` (a serialized block) as the faults for the next `rawblock` change it.
fn corrupt_block(faults: &mut ZmqFaults, body: Vec<u8>) -> Vec<u8> {
    if faults.huge_count_next > 0 && body.len() > 80 {
        faults.huge_count_next -= 1;
        let mut out = body[..80].to_vec();
        out.extend_from_slice(&[0xff; 9]);
        out.extend_from_slice(&body[81..]);
        return out;
    }
    if faults.duplicate_tail_next > 0 {
        if let Ok(mut block) = bitcoin::consensus::deserialize::<bitcoin::Block>(&body) {
            let n = block.txdata.len();
            if n >= 3 && n % 2 == 1 {
                faults.duplicate_tail_next -= 1;
                let last = block.txdata[n - 1].clone();
                block.txdata.push(last);
                return bitcoin::consensus::serialize(&block);
            }
        }
    }
    body
}

enum Msg {
    Publish(Topic, Vec<u8>),
    Faults(ZmqFaults),
    Stop,
}

/// Handle to the publishing thread.
pub(crate) struct Publisher {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
    endpoints: Vec<(Topic, String)>,
}

fn bind_address(address: &str) -> String {
    // libzmq spells "any free port" as '*', bitcoind users write port 0.
    match address.strip_suffix(":0") {
        Some(prefix) => format!("{prefix}:*"),
        None => address.to_string(),
    }
}

struct Worker {
    sockets: Vec<zmq::Socket>,
    socket_of: HashMap<Topic, usize>,
    counters: HashMap<Topic, u32>,
    faults: ZmqFaults,
    held: Option<(usize, Vec<Vec<u8>>, Instant)>,
}

impl Worker {
    fn send(&self, socket: usize, frames: &[Vec<u8>]) {
        // PUB sockets never block: past the high-water mark libzmq drops silently.
        if let Err(e) = self.sockets[socket].send_multipart(frames, zmq::DONTWAIT) {
            tracing::debug!(error = %e, "zmq send failed");
        }
    }

    fn publish(&mut self, topic: Topic, body: Vec<u8>) {
        let Some(&socket) = self.socket_of.get(&topic) else {
            return;
        };
        let counter = self.counters.entry(topic).or_insert(0);
        let seq = *counter;
        *counter = counter.wrapping_add(1);
        let body = if topic == Topic::RawBlock {
            corrupt_block(&mut self.faults, body)
        } else {
            body
        };
        let mut frames = vec![
            topic.name().as_bytes().to_vec(),
            body,
            seq.to_le_bytes().to_vec(),
        ];
        let f = &mut self.faults;
        if f.drop_next > 0 {
            f.drop_next -= 1;
            return;
        }
        if f.drop_prob > 0.0 && rand::thread_rng().gen_bool(f.drop_prob.min(1.0)) {
            return;
        }
        if f.garbage_next > 0 {
            f.garbage_next -= 1;
            let half = frames[1].len() / 2;
            frames[1].truncate(half);
            frames[1].extend_from_slice(b"\xffgarbage");
            frames[2].truncate(2);
        }
        if let Some((held_socket, held, _)) = self.held.take() {
            self.send(socket, &frames);
            self.send(held_socket, &held);
            return;
        }
        if self.faults.reorder_next > 0 {
            self.faults.reorder_next -= 1;
            self.held = Some((socket, frames, Instant::now()));
            return;
        }
        self.send(socket, &frames);
    }

    fn flush_held(&mut self, force: bool) {
        if let Some((socket, frames, since)) = self.held.take() {
            if force || since.elapsed() >= REORDER_HOLD {
                self.send(socket, &frames);
            } else {
                self.held = Some((socket, frames, since));
            }
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Msg::Publish(topic, body)) => self.publish(topic, body),
                Ok(Msg::Faults(f)) => self.faults = f,
                Ok(Msg::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.flush_held(true);
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => self.flush_held(false),
            }
        }
    }
}

fn open_sockets(bind: &ZmqBind) -> Result<(Worker, Vec<(Topic, String)>)> {
    let wanted: Vec<(Topic, String)> = match bind {
        ZmqBind::All(addr) => Topic::ALL.iter().map(|t| (*t, addr.clone())).collect(),
        ZmqBind::PerTopic(list) => list.clone(),
    };
    let ctx = zmq::Context::new();
    let mut sockets = Vec::new();
    let mut by_address: HashMap<String, (usize, String)> = HashMap::new();
    let mut socket_of = HashMap::new();
    let mut endpoints = Vec::new();
    for (topic, address) in wanted {
        let (index, endpoint) = match by_address.get(&address) {
            Some(found) => found.clone(),
            None => {
                let zerr = |source| Error::Zmq {
                    endpoint: address.clone(),
                    source,
                };
                let socket = ctx.socket(zmq::PUB).map_err(zerr)?;
                socket.set_sndhwm(SEND_HWM).map_err(zerr)?;
                socket.set_linger(100).map_err(zerr)?;
                socket.bind(&bind_address(&address)).map_err(zerr)?;
                let endpoint = socket
                    .get_last_endpoint()
                    .map_err(zerr)?
                    .unwrap_or_else(|_| address.clone());
                sockets.push(socket);
                let found = (sockets.len() - 1, endpoint);
                by_address.insert(address.clone(), found.clone());
                found
            }
        };
        socket_of.insert(topic, index);
        endpoints.push((topic, endpoint));
    }
    let worker = Worker {
        sockets,
        socket_of,
        counters: HashMap::new(),
        faults: ZmqFaults::default(),
        held: None,
    };
    Ok((worker, endpoints))
}

impl Publisher {
    /// Binds the sockets on a new thread and returns once they listen.
    pub(crate) fn start(bind: Option<&ZmqBind>) -> Result<Publisher> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let bind = bind.cloned();
        let thread = std::thread::Builder::new()
            .name("devnet-zmq".into())
            .spawn(move || {
                let opened = match &bind {
                    Some(b) => open_sockets(b),
                    None => Ok((
                        Worker {
                            sockets: Vec::new(),
                            socket_of: HashMap::new(),
                            counters: HashMap::new(),
                            faults: ZmqFaults::default(),
                            held: None,
                        },
                        Vec::new(),
                    )),
                };
                match opened {
                    Ok((worker, endpoints)) => {
                        let _ = ready_tx.send(Ok(endpoints));
                        worker.run(rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| Error::Thread(e.to_string()))?;
        let endpoints = ready_rx
            .recv()
            .map_err(|_| Error::Thread("zmq thread died".into()))??;
        Ok(Publisher {
            tx,
            thread: Some(thread),
            endpoints,
        })
    }

    /// Queues one notification.
    pub(crate) fn publish(&self, topic: Topic, body: Vec<u8>) {
        let _ = self.tx.send(Msg::Publish(topic, body));
    }

    /// Replaces the fault settings.
    pub(crate) fn set_faults(&self, faults: ZmqFaults) {
        let _ = self.tx.send(Msg::Faults(faults));
    }

    /// Every (topic, endpoint).
    pub(crate) fn endpoints(&self) -> &[(Topic, String)] {
        &self.endpoints
    }

    /// Sends what is queued and closes the sockets.
    pub(crate) fn stop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop();
    }
}
