//! The event -> signal adapter: follows the indexer's `Subscribe` stream, or the Kafka
//! topic it exports to (`events = "kafka"`), and, after each burst of block events
//! (connected or disconnected), signals `chain` to every running withdrawal whose
//! transaction may be on the chain, so it looks at the chain at once. (Order across the
//! topic's partitions does not matter here: a signal says only "look".)
//! A signal only prompts a look (the workflow asks the indexer itself), so a repeated or
//! missed one is harmless: after a gap (the stream broke, the process restarted) every
//! such withdrawal is signalled once, and each workflow also looks on its own timer.

use std::time::Duration;

use std::sync::Arc;

use futures::StreamExt;
use proto::indexer::v1 as ipb;
use rdkafka::Message as _;
use temporalio_client::{Client, WorkflowListOptions, WorkflowSignalOptions};

use super::balancing::BalancingWorkflow;
use super::withdrawal::WithdrawalWorkflow;
use crate::indexer_client::Indexer;
use crate::kafka_events::{assign, positions_at, KafkaEvents};

/// Running withdrawals that watch the chain (a version waiting for its signers too: they
/// may send it themselves).
const WATCHING: &str = "WorkflowType = 'withdrawal' AND ExecutionStatus = 'Running' \
     AND WithdrawalState IN ('BROADCAST', 'CONFIRMING', 'COMPLETED', 'SIGNED', \
     'AWAITING_SIGNATURES')";
/// Events arriving within this of each other are one burst (one round of signals).
const BURST: Duration = Duration::from_millis(20);
/// Longest wait before following again after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Follows the indexer and signals the workflows.
pub struct Adapter {
    indexer: Indexer,
    client: Client,
    /// The topic to read block events from, instead of Subscribe.
    kafka: Option<KafkaEvents>,
    /// The hot wallet's balancing workflow, signalled on every tip too.
    balancing: Option<String>,
}

impl Adapter {
    /// An adapter from `indexer`'s events (or the topic `kafka` names) to `client`'s
    /// workflows.
    pub fn new(indexer: Indexer, client: Client, kafka: Option<KafkaEvents>) -> Adapter {
        Adapter {
            indexer,
            client,
            kafka,
            balancing: None,
        }
    }

    /// Signals balancing workflow `id` too on every tip.
    pub fn with_balancing(mut self, id: Option<String>) -> Adapter {
        self.balancing = id;
        self
    }

    /// Follows until the task is dropped, resuming after any failure.
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let followed = match self.kafka.clone() {
                Some(kafka) => self.follow_kafka(&kafka).await,
                None => self.follow().await,
            };
            match followed {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, "chain events -> workflows: following again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One session: from the present tip (everyone is signalled once, for what may have
    /// been missed), then every burst of block events.
    async fn follow(&mut self) -> Result<(), String> {
        let tip = self.tip().await?;
        let mut stream = self
            .indexer
            .subscribe(ipb::SubscribeRequest {
                from_offset: tip.next_offset,
                log_id: tip.log_id,
            })
            .await
            .map_err(|s| format!("indexer: {s}"))?
            .into_inner();
        self.signal_all(tip.height).await?;
        loop {
            let Some(event) = stream
                .message()
                .await
                .map_err(|s| format!("indexer: {s}"))?
            else {
                return Ok(());
            };
            let mut moved = block_height(&event);
            // The rest of the burst, so a reorg of ten blocks is one round of signals.
            while let Ok(next) = tokio::time::timeout(BURST, stream.message()).await {
                match next.map_err(|s| format!("indexer: {s}"))? {
                    Some(e) => moved = block_height(&e).or(moved),
                    None => break,
                }
            }
            if let Some(tip) = moved {
                self.signal_all(tip).await?;
            }
        }
    }

    /// One session on the topic: from its end now (everyone is signalled once), then
    /// every burst of block events.
    async fn follow_kafka(&mut self, kafka: &KafkaEvents) -> Result<(), String> {
        let consumer = Arc::new(kafka.consumer().map_err(|e| e.to_string())?);
        let (c, topic) = (consumer.clone(), kafka.topic.clone());
        tokio::task::spawn_blocking(move || {
            let now = positions_at(&c, &topic, std::time::SystemTime::now())?;
            assign(&c, &topic, now)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let tip = self.tip().await?;
        self.signal_all(tip.height).await?;
        let kafka_err = |e: rdkafka::error::KafkaError| format!("kafka: {e}");
        loop {
            let first = consumer.recv().await.map_err(kafka_err)?;
            let mut moved = record_height(first.payload());
            while let Ok(next) = tokio::time::timeout(BURST, consumer.recv()).await {
                moved = record_height(next.map_err(kafka_err)?.payload()).or(moved);
            }
            if let Some(tip) = moved {
                self.signal_all(tip).await?;
            }
        }
    }

    /// The indexer's tip (and the log offset it was read at).
    async fn tip(&mut self) -> Result<ipb::GetTipResponse, String> {
        self.indexer
            .get_tip(ipb::GetTipRequest {})
            .await
            .map(|t| t.into_inner())
            .map_err(|s| format!("indexer: {s}"))
    }

    /// Signals `chain(tip)` to every withdrawal watching the chain.
    async fn signal_all(&self, tip: u32) -> Result<(), String> {
        let mut running = self
            .client
            .list_workflows(WATCHING, WorkflowListOptions::default());
        let mut signalled = 0usize;
        while let Some(found) = running.next().await {
            let found = found.map_err(|e| format!("temporal: listing withdrawals: {e}"))?;
            let handle = self
                .client
                .get_workflow_handle::<WithdrawalWorkflow>(found.id().to_owned());
            // One that ended meanwhile cannot be signalled: nothing to tell it.
            if let Err(e) = handle
                .signal(
                    WithdrawalWorkflow::chain,
                    tip,
                    WorkflowSignalOptions::default(),
                )
                .await
            {
                tracing::debug!(workflow = found.id(), error = %e, "not signalled");
            }
            signalled += 1;
        }
        tracing::debug!(tip, signalled, "chain moved: withdrawals signalled");
        if let Some(id) = &self.balancing {
            let handle = self
                .client
                .get_workflow_handle::<BalancingWorkflow>(id.clone());
            // Not running (terminated by an operator): balancing waits for a restart.
            if let Err(e) = handle
                .signal(
                    BalancingWorkflow::chain,
                    tip,
                    WorkflowSignalOptions::default(),
                )
                .await
            {
                tracing::warn!(workflow = %id, error = %e, "balancing not signalled");
            }
        }
        Ok(())
    }
}

/// The tip after the block event a topic record carries; `None` for other events and
/// the exporter's markers.
fn record_height(payload: Option<&[u8]>) -> Option<u32> {
    use prost::Message;
    block_height(&ipb::Event::decode(payload?).ok()?)
}

/// The tip after a block event; `None` for transfer and mempool events.
fn block_height(event: &ipb::Event) -> Option<u32> {
    match ipb::EventKind::try_from(event.kind) {
        Ok(ipb::EventKind::BlockConnected) => Some(event.height),
        Ok(ipb::EventKind::BlockDisconnected) => Some(event.height.saturating_sub(1)),
        _ => None,
    }
}
