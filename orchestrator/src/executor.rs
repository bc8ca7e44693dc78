//! Runs the sagas' steps: each step reads the saga's durable record, performs one side
//! effect, and records its outcome (synced) before the next one. A step that fails for a
//! reason that may pass (indexer or bitcoind unavailable, a coin taken by a concurrent
//! saga) leaves the saga where it is, to be tried again on the next round; restarting the
//! process resumes every unfinished saga the same way.

use std::sync::Arc;
use std::time::Duration;

use crate::indexer_client::{self, Indexer};
use bitcoin::OutPoint;
use proto::indexer::v1 as ipb;

use crate::balancing::{Balancing, Kind, MayStart};
use crate::kafka_events::{KafkaEvents, KafkaMonitor};
use crate::monitor::Monitor;
pub use crate::payment::StepError;
use crate::payment::{Built, Payments};
use crate::saga::{now_ms, Outcome, Priority, State, Step, Withdrawal};
use crate::select::Candidate;
use crate::store::{SagaStore, SagaStoreError};

/// Longest pause between rounds when nothing wakes the executor.
const IDLE: Duration = Duration::from_millis(200);

/// How the executor pays and how deep it waits.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Confirmations a coin needs before it is spent.
    pub min_conf: u32,
    /// Confirmations that complete a withdrawal.
    pub confirmations: u32,
    /// Confirmations after which its coins are released (a deeper reorg cannot undo it).
    pub settle_at: u32,
    /// Lowest fee rate used, sat/vB.
    pub fee_floor: f64,
    /// Highest fee rate used, sat/vB.
    pub fee_ceiling: f64,
    /// Blocks a broadcast payment may stay unmined before it is replaced at a higher rate.
    pub bump_after_blocks: u32,
    /// The confirmation targets of the low, normal and high priorities, in blocks.
    pub priority_blocks: PriorityBlocks,
    /// Payout queues per hot wallet (`None`: each withdrawal is paid alone).
    pub batch: Option<Batching>,
    /// Wallet balancing: sweeps, top-ups, consolidations (`None`: none).
    pub balancing: Option<Balancing>,
}

/// How withdrawals are batched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Batching {
    /// How long the oldest withdrawal in a queue waits for others, ms.
    pub window_ms: u64,
    /// Most withdrawals one batch pays (2 or more).
    pub max_outputs: usize,
}

/// The confirmation target of each priority, in blocks (1 to 1008).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriorityBlocks {
    /// Of [`Priority::Low`].
    pub low: u16,
    /// Of [`Priority::Normal`].
    pub normal: u16,
    /// Of [`Priority::High`].
    pub high: u16,
}

impl Default for PriorityBlocks {
    fn default() -> Self {
        PriorityBlocks {
            low: 144,
            normal: 6,
            high: 2,
        }
    }
}

impl Policy {
    /// The confirmation target of `priority`.
    pub fn target_of(&self, priority: Priority) -> u16 {
        match priority {
            Priority::Low => self.priority_blocks.low,
            Priority::Normal => self.priority_blocks.normal,
            Priority::High => self.priority_blocks.high,
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_conf: 1,
            confirmations: 3,
            settle_at: 6,
            fee_floor: 1.0,
            fee_ceiling: 500.0,
            bump_after_blocks: 3,
            priority_blocks: PriorityBlocks::default(),
            batch: None,
            balancing: None,
        }
    }
}

/// Runs sagas against an indexer, a bitcoind and a signer.
pub struct Executor {
    store: Arc<SagaStore>,
    indexer: Indexer,
    /// bitcoind, the signer, change and the fee policy.
    payments: Payments,
    /// The indexer's tip as the monitor last recorded it, at the start of the round.
    last_tip: Option<u32>,
    /// Woken by the monitor when the chain moved something a withdrawal watches.
    wake: Arc<tokio::sync::Notify>,
    /// Each wallet's spendable coins as the indexer listed them this round (read once per
    /// round, not once per reservation; reservations are checked on every use).
    utxos: std::collections::HashMap<String, Vec<Candidate>>,
    /// Every coin some withdrawal holds, read once per round (see `candidates`).
    reserved: Option<std::collections::HashSet<OutPoint>>,
    /// Withdrawals whose bump failed (the fee cap reached), with the tip then: not tried
    /// again before the chain moves.
    bump_failed: std::collections::HashMap<u64, u32>,
    /// The tip at which the hot wallet's balance was last looked at for balancing.
    balanced_at: Option<u32>,
    /// Withdrawals awaiting signatures whose transaction was looked for in bitcoind's
    /// mempool, with the tip then: looked for again once a block came.
    mempool_looked: std::collections::HashMap<u64, u32>,
    /// Told of every step boundary (tests: a crash or a cancel at an exact moment).
    boundaries: Option<Arc<dyn Boundaries>>,
    /// Where the chain's events come from: the Kafka topic when set, else Subscribe.
    kafka_events: Option<KafkaEvents>,
}

/// A moment between two steps of a saga, where a crash or a concurrent call must leave
/// everything consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boundary {
    /// RESERVED was recorded.
    Reserved,
    /// SIGNED was recorded.
    Signed,
    /// The intent to send was recorded; the transaction has not left yet.
    Sending,
    /// bitcoind accepted the transaction; BROADCAST is not recorded yet.
    Sent,
    /// BROADCAST was recorded.
    Broadcast,
    /// CONFIRMING or COMPLETED was recorded.
    Confirmed,
}

impl Boundary {
    /// Its name (`reserved`, `signed`, `sending`, `sent`, `broadcast`, `confirmed`).
    pub fn name(self) -> &'static str {
        match self {
            Boundary::Reserved => "reserved",
            Boundary::Signed => "signed",
            Boundary::Sending => "sending",
            Boundary::Sent => "sent",
            Boundary::Broadcast => "broadcast",
            Boundary::Confirmed => "confirmed",
        }
    }
}

/// Observes step boundaries, synchronously, before the executor goes on: the hook tests
/// use to crash or race a cancel at an exact moment. Production runs without one.
pub trait Boundaries: Send + Sync {
    /// `w` (as recorded) reached `at`.
    fn reached(&self, at: Boundary, w: &Withdrawal);
}

impl Executor {
    fn boundary(&self, at: Boundary, w: &Withdrawal) {
        if let Some(b) = &self.boundaries {
            b.reached(at, w);
        }
    }
}

impl Executor {
    /// An executor paying with `payments`.
    pub fn new(store: Arc<SagaStore>, indexer: Indexer, payments: Payments) -> Executor {
        Executor {
            store,
            indexer,
            payments,
            last_tip: None,
            wake: Arc::new(tokio::sync::Notify::new()),
            utxos: std::collections::HashMap::new(),
            reserved: None,
            bump_failed: std::collections::HashMap::new(),
            mempool_looked: std::collections::HashMap::new(),
            balanced_at: None,
            boundaries: None,
            kafka_events: None,
        }
    }

    /// Takes the chain's events from a Kafka topic instead of the indexer's Subscribe.
    pub fn with_kafka_events(mut self, kafka: KafkaEvents) -> Executor {
        self.kafka_events = Some(kafka);
        self
    }

    /// Tells `boundaries` of every step boundary (tests).
    pub fn with_boundaries(mut self, boundaries: Arc<dyn Boundaries>) -> Self {
        self.boundaries = Some(boundaries);
        self
    }

    /// Steps every unfinished saga once; returns how many moved.
    pub async fn round(&mut self) -> Result<usize, StepError> {
        // Until the monitor first recorded the chain, nothing can be watched.
        let observed = self.store.cursor()?.is_some();
        self.last_tip = if observed {
            self.store.chain_tip()?
        } else {
            None
        };
        self.utxos.clear();
        self.reserved = None;
        let mut moved = 0;
        let mut unfinished = self.store.unfinished()?;
        // Balanced once a block (listing the hot wallet's coins every round would load
        // the indexer for nothing: the balance moves with blocks and our own sagas).
        if let (Some(balancing), Some(tip)) =
            (self.payments.policy().balancing.clone(), self.last_tip)
        {
            if self.balanced_at != Some(tip) {
                match self.rebalance(&balancing, &unfinished, tip).await {
                    Ok(()) => self.balanced_at = Some(tip),
                    Err(e) => tracing::warn!(error = %e, "balancing must wait"),
                }
            }
        }
        if let Some(batching) = self.payments.policy().batch {
            moved += self.form_batches(&mut unfinished, batching, now_ms())?;
        }
        unfinished.extend(self.store.unfinished_batches()?);
        for w in unfinished {
            if w.next_step() == Step::Watch && !observed {
                continue;
            }
            let (id, batch) = (w.id, w.is_batch());
            match self.step(w).await {
                Ok(true) => moved += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(id, batch, error = %e, "withdrawal step must wait"),
            }
        }
        Ok(moved)
    }

    /// Decides the balancing runs at tip `tip` (each runs from the next round on): a
    /// sweep of the hot wallet's excess above the high-water mark, a top-up from the cold
    /// wallet below the low-water mark, a consolidation of small coins while fees are low.
    /// None of a kind while one of that kind is unfinished; sweeps and consolidations not
    /// beside each other (they would count the same coins), top-ups not beside either
    /// (their change is on its way back). A kind that cannot be decided now (the indexer
    /// does not list the cold wallet, bitcoind away) does not hold up the others.
    async fn rebalance(
        &mut self,
        balancing: &Balancing,
        unfinished: &[Withdrawal],
        tip: u32,
    ) -> Result<(), StepError> {
        let runs: Vec<(Kind, bool)> = unfinished
            .iter()
            .filter_map(|w| Some((crate::balancing::kind(w)?, w.holds_coins())))
            .collect();
        let may = MayStart::given(&runs, false);
        let hot = self.candidates(&balancing.hot_wallet).await?;
        let spendable: bitcoin::Amount = hot.iter().map(|c| c.value).sum();
        // Withdrawals waiting for coins will need some of these.
        let owed: bitcoin::Amount = unfinished
            .iter()
            .filter(|w| w.request.wallet == balancing.hot_wallet && w.state == State::Received)
            .map(|w| w.request.amount + w.request.max_fee)
            .sum();
        let spendable = spendable.checked_sub(owed).unwrap_or_default();
        if balancing.sweep.is_some() && may.sweep {
            if let Err(e) = self.sweep(balancing, spendable, tip) {
                tracing::warn!(error = %e, "no sweep decided at this block");
            }
        }
        if balancing.top_up.is_some() && may.top_up {
            if let Err(e) = self.top_up(balancing, unfinished, spendable, tip).await {
                tracing::warn!(error = %e, "no top-up decided at this block");
            }
        }
        let swept = self
            .store
            .by_request(&Kind::Sweep.request_id(tip))?
            .is_some();
        if balancing.consolidate.is_some() && MayStart::given(&runs, swept).consolidation {
            if let Err(e) = self.consolidate(balancing, &hot, tip).await {
                tracing::warn!(error = %e, "no consolidation decided at this block");
            }
        }
        Ok(())
    }

    /// A sweep of the excess above the mark (`spendable`: less what waiting withdrawals
    /// need), to the cold index one past the sweeps that got as far as signing (a sweep
    /// that failed before uses no address).
    fn sweep(
        &self,
        balancing: &Balancing,
        spendable: bitcoin::Amount,
        tip: u32,
    ) -> Result<(), StepError> {
        let signed = self
            .store
            .by_request_prefix(Kind::Sweep.prefix())?
            .iter()
            .filter(|w| !w.attempts.is_empty() || w.pending.is_some())
            .count();
        let index = signed as u32 + 1;
        match balancing.sweep(spendable, tip, index, self.payments.network()) {
            Some(request) => self.start_run(
                request,
                "sweeping the hot wallet's excess to the cold wallet",
            ),
            None if balancing.sweep.is_some_and(|m| spendable > m.above) => {
                tracing::warn!(index, "above the high-water mark, but the cold wallet's next address is past its range: not swept (widen the cold descriptor's range)");
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// A top-up when the hot wallet (`spendable`: less what waiting withdrawals need),
    /// counting the change its unfinished payments will bring back, is below the
    /// low-water mark and the cold wallet can cover it.
    async fn top_up(
        &mut self,
        balancing: &Balancing,
        unfinished: &[Withdrawal],
        spendable: bitcoin::Amount,
        tip: u32,
    ) -> Result<(), StepError> {
        // Batches too (`unfinished` holds withdrawals only).
        let batches = self.store.unfinished_batches()?;
        let coming_back: bitcoin::Amount = unfinished
            .iter()
            .chain(&batches)
            .filter(|w| w.request.wallet == balancing.hot_wallet)
            .map(|w| self.payments.coming_back(w))
            .sum();
        let hot_address = self.payments.change_address().unwrap_or_default();
        let Some(request) = balancing.top_up(spendable + coming_back, tip, &hot_address) else {
            return Ok(());
        };
        let cold: bitcoin::Amount = self
            .candidates(&balancing.cold_wallet)
            .await?
            .iter()
            .map(|c| c.value)
            .sum();
        if cold <= request.amount {
            tracing::warn!(%spendable, %coming_back, %cold, wanted = %request.amount, "the hot wallet is below its low-water mark and the cold wallet cannot top it up");
            return Ok(());
        }
        self.start_run(
            request,
            "topping the hot wallet up from the cold wallet: its PSBT waits for the cold signers",
        )
    }

    /// A consolidation of the hot wallet's small coins among `hot` while bitcoind's
    /// low-priority estimate is at most the threshold.
    async fn consolidate(
        &mut self,
        balancing: &Balancing,
        hot: &[crate::select::Candidate],
        tip: u32,
    ) -> Result<(), StepError> {
        let Some(policy) = balancing.consolidate else {
            return Ok(());
        };
        let weight = self.payments.input_weight();
        // Asked of bitcoind only when enough small coins wait.
        if policy.small(hot, 0.0, weight).len() < policy.min_coins {
            return Ok(());
        }
        let target = self.payments.policy().target_of(Priority::Low);
        let estimate = self.payments.estimate(target).await?;
        let hot_address = self.payments.change_address().unwrap_or_default();
        match balancing.consolidation(hot, estimate, weight, tip, &hot_address) {
            Some(request) => self.start_run(
                request,
                "consolidating the hot wallet's small coins while fees are low",
            ),
            None => Ok(()),
        }
    }

    /// Submits balancing run `request` (idempotent: a decision made again at the same
    /// height is the same run).
    fn start_run(&self, request: crate::saga::Request, why: &str) -> Result<(), StepError> {
        let amount = request.amount;
        match self.store.submit(request, now_ms()) {
            Ok(s) if s.created => {
                let w = &s.withdrawal;
                tracing::info!(id = w.id, run = %w.request.request_id, %amount, to = %w.request.destination, "{why}");
                Ok(())
            }
            // Decided at this height already (for another amount): the next block decides.
            Ok(_) | Err(SagaStoreError::Conflict(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The payout queues: withdrawals in RECEIVED, not in a batch, grouped by wallet and
    /// fee policy, oldest first. A queue as long as `max_outputs`, or whose oldest waited
    /// the window out, is paid: two or more become a batch (taken out of `unfinished`,
    /// the batch's saga pays them); a lone one goes on alone. The rest of the queue keeps
    /// waiting (also taken out). Returns the batches formed.
    fn form_batches(
        &mut self,
        unfinished: &mut Vec<Withdrawal>,
        batching: Batching,
        now: u64,
    ) -> Result<usize, StepError> {
        let mut queues: Vec<Vec<Withdrawal>> = Vec::new();
        let mut rest = Vec::with_capacity(unfinished.len());
        for w in std::mem::take(unfinished) {
            // One sent back by a batch whose earlier version settled without it has
            // waited enough: it is paid at once, alone, its versions kept in its history.
            // Balancing runs are paid alone too (one of a kind at a time, seen among the
            // unfinished).
            let alone = !w.attempts.is_empty() || crate::balancing::kind(&w).is_some();
            if w.state != State::Received || w.batch.is_some() || alone {
                rest.push(w);
                continue;
            }
            match queues.iter_mut().find(|q| {
                q[0].request.wallet == w.request.wallet
                    && q[0].request.fee_rate == w.request.fee_rate
            }) {
                Some(q) => q.push(w),
                None => queues.push(vec![w]),
            }
        }
        let mut formed = 0;
        for queue in queues {
            // Ids grow with submission: the store lists them in order.
            for chunk in queue.chunks(batching.max_outputs) {
                let due = chunk.len() == batching.max_outputs
                    || chunk[0].created_ms.saturating_add(batching.window_ms) <= now;
                if !due {
                    continue;
                }
                if chunk.len() == 1 {
                    rest.push(chunk[0].clone());
                    continue;
                }
                match self.store.form_batch(chunk, now) {
                    Ok(b) => {
                        let ids: Vec<u64> = chunk.iter().map(|w| w.id).collect();
                        tracing::info!(batch = b.id, members = ?ids, "withdrawals batched");
                        formed += 1;
                    }
                    // One was cancelled meanwhile: the queue is looked at again next round.
                    Err(SagaStoreError::Stale(id)) => {
                        tracing::info!(id, "a queued withdrawal changed; batching next round");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        *unfinished = rest;
        Ok(formed)
    }

    /// Runs rounds, and the monitor following the indexer's events, until `stop`
    /// resolves. A round follows at once when one moved a saga or the monitor saw
    /// something; otherwise within `IDLE` (new submissions, retries).
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        let (store, indexer, wake) = (self.store.clone(), self.indexer.clone(), self.wake.clone());
        let monitoring = match self.kafka_events.clone() {
            Some(kafka) => tokio::spawn(KafkaMonitor::new(store, indexer, wake, kafka).run()),
            None => tokio::spawn(Monitor::new(store, indexer, wake).run()),
        };
        tokio::pin!(stop);
        loop {
            let idle = match self.round().await {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "withdrawal round must wait");
                    true
                }
            };
            let pause = if idle { IDLE } else { Duration::ZERO };
            tokio::select! {
                _ = &mut stop => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        monitoring.abort();
        // Gone before this returns, so a restarted executor never has two monitors.
        let _ = monitoring.await;
    }

    fn record(&self, w: &Withdrawal, outcome: Outcome) -> Result<Withdrawal, StepError> {
        let after = self.store.record(w, outcome, now_ms())?;
        tracing::info!(id = after.id, state = ?after.state, "withdrawal moved");
        let at = match after.state {
            State::Reserved => Some(Boundary::Reserved),
            State::Signed if after.sends > w.sends => Some(Boundary::Sending),
            State::Signed => Some(Boundary::Signed),
            State::Broadcast if w.state == State::Signed => Some(Boundary::Broadcast),
            State::Confirming | State::Completed => Some(Boundary::Confirmed),
            _ => None,
        };
        if let Some(at) = at {
            self.boundary(at, &after);
        }
        Ok(after)
    }

    /// Runs `w`'s next step; true when it moved.
    pub async fn step(&mut self, w: Withdrawal) -> Result<bool, StepError> {
        match w.next_step() {
            Step::Reserve => self.reserve(&w).await.map(|_| true),
            Step::Sign => self.sign(&w).await.map(|_| true),
            Step::Broadcast => self.broadcast(&w).await,
            Step::Watch => self.watch(&w).await,
            Step::AwaitSignatures => self.await_signatures(&w).await,
            Step::Rest => Ok(false),
        }
    }

    async fn candidates(&mut self, wallet: &str) -> Result<Vec<Candidate>, StepError> {
        if !self.utxos.contains_key(wallet) {
            let listed = self
                .payments
                .for_wallet(wallet)
                .spendable(&mut self.indexer, wallet)
                .await?;
            self.utxos.insert(wallet.to_owned(), listed);
        }
        // Read once per round, then kept up to date by this executor's own reservations
        // (the store still refuses a coin another writer took meanwhile).
        if self.reserved.is_none() {
            self.reserved = Some(self.store.reserved()?);
        }
        let reserved = self.reserved.as_ref().expect("just read");
        Ok(self.utxos[wallet]
            .iter()
            .filter(|c| !reserved.contains(&c.outpoint))
            .cloned()
            .collect())
    }

    async fn reserve(&mut self, w: &Withdrawal) -> Result<Withdrawal, StepError> {
        let payments = self.payments.of(w).clone();
        if payments.outputs(w).is_none() {
            return self.record(w, Outcome::Failed("invalid destination".into()));
        }
        if self.payments.is_cold(&w.request.wallet)
            && crate::balancing::kind(w) != Some(Kind::TopUp)
        {
            return self.record(
                w,
                Outcome::Failed(format!(
                    "wallet {} is the cold wallet: only top-ups signed offline spend it",
                    w.request.wallet
                )),
            );
        }
        let rate = payments.fee_rate(w.request.fee_rate).await?.rate;
        let candidates = match self.candidates(&w.request.wallet).await {
            // The indexer watches no such wallet: waiting will not make one.
            Err(StepError::Indexer(status)) if status.code() == tonic::Code::NotFound => {
                return self.record(
                    w,
                    Outcome::Failed(format!(
                        "wallet {} is not one the indexer watches",
                        w.request.wallet
                    )),
                );
            }
            other => other?,
        };
        match payments.choose(w, &candidates, rate) {
            Ok(coins) => {
                let taken: Vec<OutPoint> = coins.iter().map(|c| c.outpoint).collect();
                let after = self.record(w, Outcome::Reserved(coins))?;
                if let Some(reserved) = &mut self.reserved {
                    reserved.extend(taken);
                }
                Ok(after)
            }
            Err(why) => self.record(w, Outcome::Failed(why)),
        }
    }

    async fn sign(&mut self, w: &Withdrawal) -> Result<Withdrawal, StepError> {
        match self.payments.of(w).first_version(w).await? {
            Ok(Built::Signed(attempt)) => self.record(w, Outcome::Signed(attempt)),
            Ok(Built::Unsigned(pending)) => {
                tracing::info!(id = w.id, txid = %pending.txid, "waiting for external signatures");
                self.record(w, Outcome::AwaitingSignatures(pending))
            }
            Err(why) => self.record(w, Outcome::Failed(why)),
        }
    }

    /// Replaces a payment stuck unconfirmed (see [`Payments::replacement`]). False when
    /// the cap leaves no room.
    async fn bump(&mut self, w: &Withdrawal) -> Result<bool, StepError> {
        let joiners = self.joiners(w)?;
        if !joiners.is_empty() {
            // Paid from the batch's change when it covers them; else a plain replacement.
            // (With external signers the joiners wait for a batch of their own.)
            if let Ok(Built::Signed(attempt)) =
                self.payments.of(w).replacement(&w.with_joiners(&joiners))?
            {
                let ids: Vec<u64> = joiners.iter().map(|j| j.id).collect();
                tracing::info!(batch = w.id, joiners = ?ids, new = %attempt.txid, rate = attempt.fee_rate, "bumping a stuck batch; waiting withdrawals join it");
                match self.record(w, Outcome::Grown(attempt, joiners)) {
                    // One was cancelled meanwhile: next round.
                    Err(StepError::Store(SagaStoreError::Stale(_))) => return Ok(false),
                    other => return other.map(|_| true),
                }
            }
        }
        match self.payments.of(w).replacement(w)? {
            Ok(Built::Signed(attempt)) => {
                let old = w.current().map(|a| a.txid);
                tracing::info!(id = w.id, ?old, new = %attempt.txid, rate = attempt.fee_rate, "bumping a stuck withdrawal");
                self.record(w, Outcome::Replaced(attempt))?;
                Ok(true)
            }
            Ok(Built::Unsigned(pending)) => {
                tracing::info!(id = w.id, txid = %pending.txid, "a replacement waits for external signatures");
                self.record(w, Outcome::AwaitingSignatures(pending))?;
                Ok(true)
            }
            Err(why) => {
                tracing::warn!(id = w.id, %why, "a stuck withdrawal cannot be bumped further");
                Ok(false)
            }
        }
    }

    async fn broadcast(&mut self, w: &Withdrawal) -> Result<bool, StepError> {
        if w.current().is_none() {
            return Ok(false);
        }
        // A first send is recorded before the transaction leaves, under the lock a cancel
        // takes: either the cancel came first (this write is stale, nothing is sent) or
        // the cancel is refused from now on.
        let intended;
        let w = if w.state == State::Signed {
            intended = match self.record(w, Outcome::Sending) {
                Err(StepError::Store(SagaStoreError::Stale(_))) => return Ok(false),
                other => other?,
            };
            &intended
        } else {
            w
        };
        let attempt = w.current().expect("checked above");
        match self.payments.send(attempt).await? {
            Ok(_) => {
                // Sent, not yet recorded: the boundary a crash must survive without paying
                // twice (the restart sends the same bytes again).
                self.boundary(Boundary::Sent, w);
                // The indexer's tip now, not the recorded one, which lags after a restart
                // (a stale height would make the payment look stuck at once).
                let height = self.tip().await?.max(self.last_tip.unwrap_or(0));
                self.record(w, Outcome::Broadcast { height })?;
                Ok(true)
            }
            Err(e) if e.is_transient() => Err(e.into()),
            // Refused, but a version is in a block (sent before a crash, its outputs since
            // spent, so bitcoind says its inputs are missing): it was sent.
            Err(e) if self.confirmed_in_index(w).await?.is_some() => {
                tracing::info!(id = w.id, refusal = %e, "a version is already in a block");
                let height = self.tip().await?;
                self.record(w, Outcome::Broadcast { height })?;
                Ok(true)
            }
            // Inputs spent, and the index does not show what spent them yet: only these
            // keys can spend them, so wait for the index rather than give up on a payment
            // that may be made.
            Err(e) if e.to_string().contains("missingorspent") => {
                tracing::warn!(id = w.id, refusal = %e, "inputs already spent; waiting for the index to show the spending transaction");
                Ok(false)
            }
            // Refused for good at its first send: nothing is on the network.
            Err(e) if w.state == State::Signed && w.sends == 1 => {
                self.record(w, Outcome::Failed(format!("bitcoind refused it: {e}")))?;
                Ok(true)
            }
            // Refused at a later send (after a restart): an earlier one may have gone
            // through, so an operator decides; the coins stay reserved.
            Err(e) if w.state == State::Signed => {
                self.record(
                    w,
                    Outcome::Unclear(format!("send refused after an earlier send: {e}")),
                )?;
                Ok(true)
            }
            // Refused after it was sent once (a conflict may have confirmed): an operator
            // decides; the coins stay reserved.
            Err(e) => {
                self.record(w, Outcome::Unclear(format!("rebroadcast refused: {e}")))?;
                Ok(true)
            }
        }
    }

    async fn tip(&mut self) -> Result<u32, StepError> {
        Ok(self
            .indexer
            .get_tip(ipb::GetTipRequest {})
            .await?
            .into_inner()
            .height)
    }

    /// Moves `w` on what the monitor recorded from the indexer's events: a version
    /// confirmed (and how deep), reorged out, or stuck long enough to be replaced.
    async fn watch(&mut self, w: &Withdrawal) -> Result<bool, StepError> {
        let Some(tip) = self.last_tip else {
            return Ok(false);
        };
        for attempt in w.attempts.iter().rev() {
            let Some(height) = self.store.confirmed_height(&attempt.txid)? else {
                continue;
            };
            // At least 1: the block that confirmed it was indexed.
            let confirmations = tip.saturating_sub(height).saturating_add(1);
            if w.confirmed == Some(attempt.txid) && w.confirmations == confirmations {
                return Ok(false);
            }
            self.record(
                w,
                Outcome::Confirmed {
                    txid: attempt.txid,
                    confirmations,
                    required: self.payments.policy().confirmations,
                    settle_at: self.payments.policy().settle_at,
                },
            )?;
            return Ok(true);
        }
        // None of its versions is confirmed as recorded: one that was is reorged out, or
        // one is stuck. Both are acted on only once the indexer itself agrees (the record
        // may stop mid-block: a block's event comes first, its transfers' next).
        if w.confirmed.is_some() {
            if self.confirmed_in_index(w).await?.is_some() {
                return Ok(false);
            }
            self.record(w, Outcome::ReorgedOut)?;
            return Ok(true);
        }
        let after = self.payments.policy().bump_after_blocks;
        let stuck = |tip: u32| {
            w.state == State::Broadcast
                && w.broadcast_height
                    .is_some_and(|h| tip >= h.saturating_add(after))
        };
        // A replacement waiting for signatures is not replaced again meanwhile; the
        // signers may have sent it themselves.
        if w.pending.is_some() {
            return self.await_signatures(w).await;
        }
        if self.bump_failed.get(&w.id) == Some(&tip) {
            return Ok(false);
        }
        if stuck(tip) && stuck(self.tip().await?) && self.confirmed_in_index(w).await?.is_none() {
            let bumped = self.bump(w).await?;
            if bumped {
                self.bump_failed.remove(&w.id);
            } else {
                self.bump_failed.insert(w.id, tip);
            }
            return Ok(bumped);
        }
        Ok(false)
    }

    /// Signatures arrive through the Signatures API; but the external signers may also
    /// complete the transaction and send it themselves: once bitcoind has it (in a block
    /// the index recorded, or in its mempool, looked at once a block), it is `w`'s version.
    async fn await_signatures(&mut self, w: &Withdrawal) -> Result<bool, StepError> {
        let Some(pending) = &w.pending else {
            return Ok(false);
        };
        let height = self.store.confirmed_height(&pending.txid)?;
        let tip = self.last_tip.unwrap_or(0);
        if height.is_none() && self.mempool_looked.get(&w.id) == Some(&tip) {
            return Ok(false);
        }
        self.mempool_looked.insert(w.id, tip);
        let Some(attempt) = self.payments.completed_elsewhere(pending, height).await? else {
            return Ok(false);
        };
        tracing::warn!(id = w.id, txid = %attempt.txid, "the external signers completed and sent the transaction themselves: following it");
        self.mempool_looked.remove(&w.id);
        let outcome = if pending.replacing {
            Outcome::Replaced(attempt)
        } else {
            Outcome::Signed(attempt)
        };
        self.record(w, outcome)?;
        Ok(true)
    }

    /// Withdrawals waiting in the queue of batch `w` (its wallet and fee policy), oldest
    /// first, as many as its replacement may add; none for a withdrawal paid alone.
    fn joiners(&self, w: &Withdrawal) -> Result<Vec<Withdrawal>, StepError> {
        let (Some(batching), Some(members)) = (self.payments.policy().batch, &w.members) else {
            return Ok(Vec::new());
        };
        let room = batching.max_outputs.saturating_sub(members.len());
        Ok(self
            .store
            .unfinished()?
            .into_iter()
            .filter(|q| {
                q.state == State::Received
                    && q.batch.is_none()
                    && q.attempts.is_empty()
                    && crate::balancing::kind(q).is_none()
                    && q.request.wallet == w.request.wallet
                    && q.request.fee_rate == w.request.fee_rate
            })
            .take(room)
            .collect())
    }

    /// The height of the block holding one of `w`'s versions, asked of the indexer: the
    /// authority for the decisions the monitor's record only prompts.
    async fn confirmed_in_index(&mut self, w: &Withdrawal) -> Result<Option<u32>, StepError> {
        for attempt in w.attempts.iter().rev() {
            if let Some(height) =
                indexer_client::confirmed_height(&mut self.indexer, &attempt.txid).await?
            {
                return Ok(Some(height));
            }
        }
        Ok(None)
    }
}
