//! The orchestrator's metrics: withdrawals by saga state and RBF replacements, counted from
//! the saga store at scrape time (the store is the truth, and the executor's path stays
//! untouched), and gRPC latency by method. Served by the indexer crate's endpoint.
//!
//! A scrape reads every stored withdrawal: fine for the hundreds of thousands a hot wallet
//! sees; counters kept by the executor would be the step beyond that.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use service::grpc_latency::GrpcLatency;
use service::metrics_http::Probe;

use crate::saga::{State, Withdrawal};
use crate::store::{SagaStore, SagaStoreError};

/// Every state, each with its label.
const STATES: [(State, &str); 10] = [
    (State::Received, "received"),
    (State::Reserved, "reserved"),
    (State::AwaitingSignatures, "awaiting_signatures"),
    (State::Signed, "signed"),
    (State::Broadcast, "broadcast"),
    (State::Confirming, "confirming"),
    (State::Completed, "completed"),
    (State::Failed, "failed"),
    (State::Cancelled, "cancelled"),
    (State::NeedsReview, "needs_review"),
];

/// Withdrawals read a page at a time.
const PAGE: usize = 1_000;

/// What a scrape counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Withdrawals in each state, in the order of `STATES`.
    pub by_state: [u64; STATES.len()],
    /// Replacement transactions: every attempt of a withdrawal after its first.
    pub rbf_bumps: u64,
}

impl Tally {
    /// Counts one withdrawal.
    pub fn add(&mut self, w: &Withdrawal) {
        if let Some(i) = STATES.iter().position(|(s, _)| *s == w.state) {
            self.by_state[i] += 1;
        }
        self.rbf_bumps += w.attempts.len().saturating_sub(1) as u64;
    }

    /// Counts every withdrawal in `store`.
    pub fn read(store: &SagaStore) -> Result<Tally, SagaStoreError> {
        let mut tally = Tally::default();
        let mut after = 0;
        loop {
            let page = store.list(after, PAGE)?;
            let Some(last) = page.last() else {
                return Ok(tally);
            };
            after = last.id;
            page.iter().for_each(|w| tally.add(w));
        }
    }

    /// Writes the series.
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        {
            let mut sagas = encoder.encode_descriptor(
                "sagas",
                "Withdrawals by saga state",
                None,
                MetricType::Gauge,
            )?;
            for ((_, label), n) in STATES.iter().zip(self.by_state) {
                let labels = [("state", *label)];
                ConstGauge::new(n as i64).encode(sagas.encode_family(&labels)?)?;
            }
        }
        let bumps = ConstCounter::new(self.rbf_bumps);
        bumps.encode(encoder.encode_descriptor(
            "rbf_bumps",
            "Replacement transactions broadcast to bump a withdrawal's fee",
            None,
            bumps.metric_type(),
        )?)
    }
}

/// Reads the store at each scrape.
struct SagaCollector(Arc<SagaStore>);

impl std::fmt::Debug for SagaCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SagaCollector")
    }
}

impl Collector for SagaCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let tally = Tally::read(&self.0).map_err(|e| {
            tracing::warn!(error = %e, "reading the sagas for a metrics scrape failed");
            std::fmt::Error
        })?;
        tally.encode(encoder)
    }
}

/// What the orchestrator's endpoint answers from.
#[derive(Debug)]
pub struct OrchestratorProbe {
    registry: Registry,
    executing: Arc<AtomicBool>,
}

impl OrchestratorProbe {
    /// The series of `store` and `grpc`; healthy while `executing` (the executor runs).
    pub fn new(store: Arc<SagaStore>, grpc: &GrpcLatency, executing: Arc<AtomicBool>) -> Self {
        let mut registry = Registry::with_prefix("orchestrator");
        registry.register_collector(Box::new(SagaCollector(store)));
        grpc.register(&mut registry);
        OrchestratorProbe {
            registry,
            executing,
        }
    }
}

impl Probe for OrchestratorProbe {
    fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    fn healthy(&self) -> bool {
        self.executing.load(Ordering::Relaxed)
    }

    fn ready(&self) -> bool {
        self.healthy()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::{Attempt, FeeRate, Request};
    use bitcoin::hashes::Hash;
    use bitcoin::{Amount, Txid};

    fn withdrawal(id: u64, state: State, attempts: usize) -> Withdrawal {
        let request = Request {
            request_id: format!("r{id}"),
            wallet: "hot".into(),
            destination: "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080".into(),
            amount: Amount::from_sat(10_000),
            fee_rate: FeeRate::SatPerVb(2.0),
            max_fee: Amount::from_sat(5_000),
        };
        let mut w = Withdrawal::new(id, request, 0);
        w.state = state;
        w.attempts = (0..attempts)
            .map(|i| Attempt {
                txid: Txid::from_byte_array([i as u8; 32]),
                raw: Vec::new(),
                fee: Amount::from_sat(200),
                fee_rate: 2.0,
                fee_choice: String::new(),
            })
            .collect();
        w
    }

    #[test]
    fn every_state_is_written_and_bumps_are_attempts_after_the_first() {
        let mut tally = Tally::default();
        for w in [
            withdrawal(1, State::Received, 0),
            withdrawal(2, State::Completed, 1),
            withdrawal(3, State::Completed, 3),
            withdrawal(4, State::NeedsReview, 2),
        ] {
            tally.add(&w);
        }
        assert_eq!(tally.rbf_bumps, 3);
        let mut registry = Registry::with_prefix("orchestrator");
        registry.register_collector(Box::new(Fixed(tally)));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(samples.len(), STATES.len() + 1, "{text}");
        for line in [
            "orchestrator_sagas{state=\"received\"} 1",
            "orchestrator_sagas{state=\"completed\"} 2",
            "orchestrator_sagas{state=\"needs_review\"} 1",
            "orchestrator_sagas{state=\"failed\"} 0",
            "orchestrator_rbf_bumps_total 3",
        ] {
            assert!(samples.contains(&line), "{line} missing from\n{text}");
        }
    }

    /// A collector of a given tally.
    #[derive(Debug)]
    struct Fixed(Tally);

    impl Collector for Fixed {
        fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            self.0.encode(encoder)
        }
    }
}
