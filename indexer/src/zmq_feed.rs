//! The ZMQ feed from bitcoind: SUB sockets for `rawblock`, `hashblock`, `sequence` and
//! `rawtx`, each message checked (three frames, known topic, sane body) and its per-topic
//! sequence number tracked. ZMQ is only a hint: a jump in a sequence number is reported as
//! a [`Notice::Gap`] so the follower reconciles over RPC; malformed messages are reported
//! and dropped, never trusted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bitcoin::{BlockHash, Txid};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use bitcoind::hash_from_display;

/// A topic bitcoind publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Serialized block, on every tip change.
    RawBlock,
    /// Block hash, on every tip change.
    HashBlock,
    /// Block connects/disconnects and mempool adds/removes.
    Sequence,
    /// Serialized transaction entering the mempool or a connected block.
    RawTx,
}

impl Topic {
    /// The topic frame.
    pub fn name(self) -> &'static str {
        match self {
            Topic::RawBlock => "rawblock",
            Topic::HashBlock => "hashblock",
            Topic::Sequence => "sequence",
            Topic::RawTx => "rawtx",
        }
    }

    fn from_name(name: &[u8]) -> Option<Topic> {
        [
            Topic::RawBlock,
            Topic::HashBlock,
            Topic::Sequence,
            Topic::RawTx,
        ]
        .into_iter()
        .find(|t| t.name().as_bytes() == name)
    }
}

/// One `sequence` message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceEvent {
    /// A block joined the active chain.
    Connected(BlockHash),
    /// A block left the active chain.
    Disconnected(BlockHash),
    /// A transaction entered the mempool (with the mempool sequence number).
    Added(Txid, u64),
    /// A transaction left the mempool other than by being mined.
    Removed(Txid, u64),
}

/// What the feed tells the follower.
#[derive(Clone, Debug)]
pub enum Notice {
    /// A new tip's serialized block.
    RawBlock(Vec<u8>),
    /// A new tip's hash.
    HashBlock(BlockHash),
    /// A chain or mempool change.
    Sequence(SequenceEvent),
    /// A transaction entered the mempool or a block.
    RawTx(Vec<u8>),
    /// Messages of `topic` were lost (or the publisher restarted): reconcile over RPC.
    Gap {
        /// The topic.
        topic: Topic,
        /// The sequence number expected.
        expected: u32,
        /// The one received.
        got: u32,
    },
    /// A malformed message was dropped.
    Garbage {
        /// The endpoint it came from.
        endpoint: String,
        /// What was wrong.
        reason: String,
    },
}

/// Where each topic is published (several topics may share an endpoint).
#[derive(Clone, Debug, Default)]
pub struct ZmqEndpoints {
    /// `topic -> tcp://host:port`.
    pub topics: Vec<(Topic, String)>,
}

impl ZmqEndpoints {
    /// Whether any topic is configured.
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// Whether `topic` is configured.
    pub fn has(&self, topic: Topic) -> bool {
        self.topics.iter().any(|(t, _)| *t == topic)
    }
}

/// The feed could not start.
#[derive(Debug, thiserror::Error)]
#[error("ZMQ {endpoint}: {source}")]
pub struct ZmqError {
    /// The endpoint.
    pub endpoint: String,
    /// Why.
    pub source: ::zmq::Error,
}

/// Whether `topic` is part of the chain's story (blocks, and the ordered `sequence` of
/// block and mempool changes) rather than a transaction body. These get their own
/// sockets, thread and channel: bitcoind announces every transaction of a new block (a
/// burst of thousands of `rawtx`) just before the block, and the chain messages must
/// neither wait behind that burst nor be dropped when it overflows a queue (a PUB socket
/// drops what exceeds its high-water mark per connection, so a connection of their own
/// keeps them out of that overflow).
fn is_chain_topic(topic: Topic) -> bool {
    !matches!(topic, Topic::RawTx)
}

/// The notices of a running subscriber.
pub struct Feed {
    chain: Receiver<Notice>,
    txs: Receiver<Notice>,
}

impl Feed {
    /// The next notice, chain topics first; waits up to `timeout`. Disconnected once the
    /// subscriber threads ended (asked to stop).
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Notice, RecvTimeoutError> {
        if let Ok(notice) = self.chain.try_recv() {
            return Ok(notice);
        }
        crossbeam_channel::select! {
            recv(self.chain) -> n => n.map_err(|_| RecvTimeoutError::Disconnected),
            recv(self.txs) -> n => n.map_err(|_| RecvTimeoutError::Disconnected),
            default(timeout) => Err(RecvTimeoutError::Timeout),
        }
    }

    /// A `rawtx` notice already received, if any (without waiting).
    pub fn try_recv_tx(&self) -> Option<Notice> {
        self.txs.try_recv().ok()
    }
}

/// Starts the subscriber: one thread for the chain topics, one for `rawtx`,
/// each sending notices until `stop` is set or the [`Feed`] is dropped. The sockets
/// reconnect by themselves when bitcoind restarts.
pub fn spawn(endpoints: &ZmqEndpoints, stop: Arc<AtomicBool>) -> Result<Feed, ZmqError> {
    let ctx = ::zmq::Context::new();
    let mut feed = Feed {
        chain: crossbeam_channel::never(),
        txs: crossbeam_channel::never(),
    };
    for (chain, capacity) in [(true, 1_000), (false, 10_000)] {
        let mut by_endpoint: HashMap<&str, Vec<Topic>> = HashMap::new();
        for (topic, endpoint) in &endpoints.topics {
            if is_chain_topic(*topic) == chain {
                by_endpoint.entry(endpoint).or_default().push(*topic);
            }
        }
        if by_endpoint.is_empty() {
            continue; // `never()` stands in: that class stays silent
        }
        let mut sockets = Vec::new();
        for (endpoint, topics) in by_endpoint {
            sockets.push((endpoint.to_owned(), subscribe(&ctx, endpoint, &topics)?));
        }
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let (ctx, stop) = (ctx.clone(), stop.clone());
        std::thread::Builder::new()
            .name(if chain { "zmq-chain" } else { "zmq-rawtx" }.into())
            .spawn(move || receive_loop(ctx, sockets, tx, stop))
            .expect("spawn zmq thread");
        if chain {
            feed.chain = rx;
        } else {
            feed.txs = rx;
        }
    }
    Ok(feed)
}

/// A SUB socket on `endpoint` for `topics`.
fn subscribe(
    ctx: &::zmq::Context,
    endpoint: &str,
    topics: &[Topic],
) -> Result<::zmq::Socket, ZmqError> {
    let err = |source| ZmqError {
        endpoint: endpoint.to_owned(),
        source,
    };
    let socket = ctx.socket(::zmq::SUB).map_err(err)?;
    // Like bitcoind's PUB side: a bounded queue, and losses are seen as sequence gaps.
    socket.set_rcvhwm(10_000).map_err(err)?;
    socket.set_tcp_keepalive(1).map_err(err)?;
    socket.set_reconnect_ivl(100).map_err(err)?;
    socket.set_reconnect_ivl_max(5_000).map_err(err)?;
    for t in topics {
        socket.set_subscribe(t.name().as_bytes()).map_err(err)?;
    }
    socket.connect(endpoint).map_err(err)?;
    Ok(socket)
}

fn receive_loop(
    _ctx: ::zmq::Context,
    sockets: Vec<(String, ::zmq::Socket)>,
    out: Sender<Notice>,
    stop: Arc<AtomicBool>,
) {
    let mut tracker = SequenceTracker::default();
    while !stop.load(Ordering::Relaxed) {
        let mut items: Vec<_> = sockets
            .iter()
            .map(|(_, s)| s.as_poll_item(::zmq::POLLIN))
            .collect();
        if ::zmq::poll(&mut items, 200).is_err() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let ready: Vec<bool> = items.iter().map(|i| i.is_readable()).collect();
        for ((endpoint, socket), ready) in sockets.iter().zip(ready) {
            if !ready {
                continue;
            }
            // Drain what is queued on this socket without blocking.
            while let Ok(frames) = socket.recv_multipart(::zmq::DONTWAIT) {
                for notice in tracker.decode(endpoint, frames) {
                    if out.send(notice).is_err() {
                        return; // the follower is gone
                    }
                }
            }
        }
    }
}

/// Decodes ZMQ messages into notices, keeping per-notifier sequence numbers to see lost
/// messages. Every frame is untrusted: anything malformed becomes [`Notice::Garbage`].
#[derive(Default)]
pub struct SequenceTracker {
    next: HashMap<String, HashMap<Topic, u32>>,
}

impl SequenceTracker {
    /// Checks one message and turns it into notices (a gap first, then the message).
    pub fn decode(&mut self, endpoint: &str, frames: Vec<Vec<u8>>) -> Vec<Notice> {
        let garbage = |reason: String| {
            vec![Notice::Garbage {
                endpoint: endpoint.to_owned(),
                reason,
            }]
        };
        let [topic, body, seq] = match <[Vec<u8>; 3]>::try_from(frames) {
            Ok(f) => f,
            Err(f) => return garbage(format!("{} frames, expected 3", f.len())),
        };
        let Some(topic) = Topic::from_name(&topic) else {
            return garbage(format!(
                "unknown topic {:?}",
                String::from_utf8_lossy(&topic[..topic.len().min(32)])
            ));
        };
        let Ok(seq) = <[u8; 4]>::try_from(seq.as_slice()) else {
            return garbage(format!(
                "{}: sequence frame of {} bytes, expected 4",
                topic.name(),
                seq.len()
            ));
        };
        let seq = u32::from_le_bytes(seq);
        let notice = match parse_body(topic, body) {
            Ok(n) => n,
            Err(reason) => return garbage(format!("{}: {reason}", topic.name())),
        };
        let mut notices = Vec::with_capacity(2);
        // Looked up by reference: this runs for every transaction bitcoind announces.
        let next = match self.next.get_mut(endpoint) {
            Some(topics) => topics,
            None => self.next.entry(endpoint.to_owned()).or_default(),
        };
        if let Some(&expected) = next.get(&topic) {
            if seq != expected {
                notices.push(Notice::Gap {
                    topic,
                    expected,
                    got: seq,
                });
            }
        }
        next.insert(topic, seq.wrapping_add(1));
        notices.push(notice);
        notices
    }
}

/// Parses a message body of `topic`.
fn parse_body(topic: Topic, body: Vec<u8>) -> Result<Notice, String> {
    match topic {
        Topic::RawBlock => {
            if body.len() < 81 {
                return Err(format!("{} bytes is too short for a block", body.len()));
            }
            Ok(Notice::RawBlock(body))
        }
        Topic::RawTx => {
            if body.len() < 10 {
                return Err(format!(
                    "{} bytes is too short for a transaction",
                    body.len()
                ));
            }
            Ok(Notice::RawTx(body))
        }
        Topic::HashBlock => hash_from_display(&body)
            .map(Notice::HashBlock)
            .ok_or_else(|| format!("{} bytes, expected a 32-byte hash", body.len())),
        Topic::Sequence => parse_sequence(&body).map(Notice::Sequence),
    }
}

/// `<32-byte hash>C|D` or `<32-byte txid>A|R<8-byte LE mempool sequence>`.
fn parse_sequence(body: &[u8]) -> Result<SequenceEvent, String> {
    let bad = || format!("malformed body of {} bytes", body.len());
    if body.len() < 33 {
        return Err(bad());
    }
    let (hash, rest) = body.split_at(32);
    let mempool_seq = || -> Result<u64, String> {
        let b: [u8; 8] = rest[1..].try_into().map_err(|_| bad())?;
        Ok(u64::from_le_bytes(b))
    };
    match (rest[0], rest.len()) {
        (b'C', 1) => Ok(SequenceEvent::Connected(
            hash_from_display(hash).ok_or_else(bad)?,
        )),
        (b'D', 1) => Ok(SequenceEvent::Disconnected(
            hash_from_display(hash).ok_or_else(bad)?,
        )),
        (b'A', 9) => Ok(SequenceEvent::Added(
            hash_from_display(hash).ok_or_else(bad)?,
            mempool_seq()?,
        )),
        (b'R', 9) => Ok(SequenceEvent::Removed(
            hash_from_display(hash).ok_or_else(bad)?,
            mempool_seq()?,
        )),
        (label, _) => Err(format!("unknown label {label:#04x}, or wrong length")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::hashes::Hash;

    fn msg(topic: &str, body: &[u8], seq: u32) -> Vec<Vec<u8>> {
        vec![
            topic.as_bytes().to_vec(),
            body.to_vec(),
            seq.to_le_bytes().to_vec(),
        ]
    }

    #[test]
    fn hashes_are_read_in_display_order() {
        let hash = BlockHash::from_byte_array(
            [7; 31]
                .iter()
                .copied()
                .chain([9])
                .collect::<Vec<_>>()
                .try_into()
                .unwrap(),
        );
        // bitcoind writes byte 31 of the internal order first.
        let mut display = hash.to_byte_array();
        display.reverse();
        let mut body = display.to_vec();
        body.push(b'C');
        let mut t = SequenceTracker::default();
        let n = t.decode("e", msg("sequence", &body, 0));
        assert!(
            matches!(n.as_slice(), [Notice::Sequence(SequenceEvent::Connected(h))] if *h == hash)
        );
        // The internal order read as display order is another hash.
        let mut wrong = hash.to_byte_array().to_vec();
        wrong.push(b'C');
        let n = t.decode("e", msg("sequence", &wrong, 1));
        assert!(
            matches!(n.as_slice(), [Notice::Sequence(SequenceEvent::Connected(h))] if *h != hash)
        );
    }

    #[test]
    fn gaps_and_garbage_are_reported() {
        let mut t = SequenceTracker::default();
        let block = vec![0u8; 81];
        assert_eq!(t.decode("e", msg("rawblock", &block, 5)).len(), 1);
        let n = t.decode("e", msg("rawblock", &block, 7));
        assert!(matches!(
            n[0],
            Notice::Gap {
                topic: Topic::RawBlock,
                expected: 6,
                got: 7
            }
        ));
        // Per topic: another topic's numbers are independent.
        assert_eq!(t.decode("e", msg("hashblock", &[1; 32], 0)).len(), 1);
        // A restarted publisher starts again at 0: also a gap.
        let n = t.decode("e", msg("rawblock", &block, 0));
        assert!(matches!(
            n[0],
            Notice::Gap {
                expected: 8,
                got: 0,
                ..
            }
        ));
        for bad in [
            vec![b"rawblock".to_vec(), block.clone()],
            msg("rawblock", &[1, 2, 3], 1),
            msg("nonsense", &block, 1),
            vec![b"hashblock".to_vec(), vec![1; 32], vec![1, 2]],
            msg(
                "sequence",
                &[1; 33].iter().copied().chain([b'X']).collect::<Vec<_>>(),
                1,
            ),
            msg(
                "sequence",
                &[1; 32].iter().copied().chain([b'A']).collect::<Vec<_>>(),
                1,
            ),
        ] {
            assert!(matches!(
                t.decode("e", bad).as_slice(),
                [Notice::Garbage { .. }]
            ));
        }
        let mut added = vec![2u8; 32];
        added.push(b'A');
        added.extend(42u64.to_le_bytes());
        assert!(matches!(
            t.decode("e", msg("sequence", &added, 0)).as_slice(),
            [Notice::Sequence(SequenceEvent::Added(_, 42))]
        ));
    }
}
