//! Recovery polling: search sweeps from a persisted watermark with an overlap, status
//! checks of stale in-flight cash-outs, and the status fetches that thin notifications
//! and unverified webhooks ask for.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::{Mutex, Notify};

use crate::alert::AlertSignals;
use crate::config::Settings;
use crate::ingest::plan::PollKind;
use crate::ingestor::Ingestor;
use crate::metrics::Metrics;
use crate::providers::client::{build_client, ProviderClient, ProviderError, SearchWindow};
use crate::providers::registry::ProviderRegistry;
use crate::providers::ProviderKind;
use crate::store::{Applied, CompletedRecheck, Store, StoreError};
use crate::wakeups::{Wake, WakeRelay};

/// Most pages one sweep reads before it stops (a safety bound; the watermark then stays
/// put, so the next sweep reads the window again).
const MAX_PAGES_PER_SWEEP: u32 = 10_000;
/// Status requests of one provider in flight at once (the pacer still enforces `max_rps`).
const FETCHES_IN_FLIGHT: usize = 16;
/// A queued fetch is given up after this many failed attempts (status checks still run).
const MAX_FETCH_ATTEMPTS: i64 = 8;

/// What one poll cycle did (SPEC §2.3 `POST /api/v1/providers/{id}/poll`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PollSummary {
    /// Cash-outs read from the provider.
    pub fetched: u64,
    /// Cash-outs whose stored state changed.
    pub updated: u64,
    /// State changes that no webhook had reported (`missed_webhook`).
    pub recovered: u64,
    /// Failed provider calls or undecodable items.
    pub errors: u64,
}

impl PollSummary {
    fn add(&mut self, other: PollSummary) {
        self.fetched += other.fetched;
        self.updated += other.updated;
        self.recovered += other.recovered;
        self.errors += other.errors;
    }

    fn count(&mut self, applied: &Applied) {
        self.fetched += 1;
        if applied.changed_state() {
            self.updated += 1;
        }
        if applied.missed_webhook {
            self.recovered += 1;
        }
    }
}

/// Why a poll could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("unknown provider {0:?}")]
    UnknownProvider(String),
    #[error("the poller of provider {0} is off: {1} is not set")]
    Off(String, &'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct ProviderPoller {
    id: String,
    client: Option<Arc<dyn ProviderClient>>,
    /// Why the poller is off, when it is.
    off_reason: Option<&'static str>,
    /// Held while a cycle runs: cycles of one provider never overlap.
    cycle: Mutex<()>,
    /// Held while the fetch queue is drained.
    fetching: Mutex<()>,
    /// Wakes the fetch worker when a fetch is queued.
    waker: Arc<Notify>,
    /// Whether webhooks exist for this provider (otherwise nothing can be "missed").
    sends_webhooks: bool,
    /// The provider's kind (names its id fields in errors).
    kind: ProviderKind,
    /// Consecutive cycles that reached nothing but errors (0 while the provider answers):
    /// a down provider logs one WARN when the streak starts and one when it ends.
    failed_cycles: std::sync::atomic::AtomicU64,
    poll_every: Duration,
    status_after: Duration,
}

impl ProviderPoller {
    /// Whether the provider is in a failure streak (its last cycle reached only errors).
    fn is_failing(&self) -> bool {
        self.failed_cycles
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    }
}

/// The poller of every configured provider.
pub struct Poller {
    store: Store,
    /// Where polled observations go.
    ingestor: Ingestor,
    metrics: Metrics,
    settings: Arc<Settings>,
    providers: HashMap<String, Arc<ProviderPoller>>,
    order: Vec<String>,
    /// Where cycle outcomes go (`poll_failing`, `provider_silent` of poll-only providers).
    signals: Arc<AlertSignals>,
    /// Fetch wake-ups also announced to the other instances (see [`crate::wakeups`]).
    relay: WakeRelay,
}

impl Poller {
    /// Builds one client per provider whose outbound credentials are set.
    pub fn new(
        settings: Arc<Settings>,
        registry: &ProviderRegistry,
        store: Store,
        metrics: Metrics,
        signals: Arc<AlertSignals>,
    ) -> Poller {
        let mut providers = HashMap::new();
        let mut order = Vec::new();
        for provider in registry.iter() {
            let settings_of = &provider.settings;
            let off_reason = settings_of.missing_outbound_credentials();
            let client = match off_reason {
                None => build_client(settings_of, &settings.poll, &metrics, store.postgres()),
                Some(_) => None,
            };
            order.push(provider.id().to_string());
            providers.insert(
                provider.id().to_string(),
                Arc::new(ProviderPoller {
                    id: provider.id().to_string(),
                    off_reason: if client.is_none() {
                        Some(off_reason.unwrap_or("outbound client"))
                    } else {
                        None
                    },
                    client,
                    cycle: Mutex::new(()),
                    fetching: Mutex::new(()),
                    waker: Arc::new(Notify::new()),
                    sends_webhooks: provider.adapter.sends_webhooks(),
                    kind: provider.adapter.kind(),
                    failed_cycles: std::sync::atomic::AtomicU64::new(0),
                    poll_every: settings_of.poll_every,
                    status_after: settings_of.status_after,
                }),
            );
        }
        Poller {
            relay: WakeRelay::default(),
            ingestor: Ingestor::new(store.clone()),
            store,
            metrics,
            settings,
            providers,
            order,
            signals,
        }
    }

    /// Ids of providers whose poller is on, in config order.
    pub fn active_providers(&self) -> Vec<String> {
        self.order
            .iter()
            .filter(|id| self.providers.get(*id).is_some_and(|p| p.client.is_some()))
            .cloned()
            .collect()
    }

    /// Why `provider`'s poller is off, if it is.
    pub fn off_reason(&self, provider: &str) -> Option<&'static str> {
        self.providers.get(provider).and_then(|p| p.off_reason)
    }

    /// How often `provider` is polled.
    pub fn poll_every(&self, provider: &str) -> Option<Duration> {
        self.providers.get(provider).map(|p| p.poll_every)
    }

    /// Wakes `provider`'s fetch worker (a fetch was queued), here and on the other
    /// instances.
    pub fn wake_fetcher(&self, provider: &str) {
        if let Some(p) = self.providers.get(provider) {
            p.waker.notify_one();
        }
        self.relay.relay(Wake::StatusFetch {
            provider: provider.to_string(),
        });
    }

    /// Where fetch wake-ups go to the other instances.
    pub fn wake_relay(&self) -> &WakeRelay {
        &self.relay
    }

    /// The notify handle `provider`'s fetch worker waits on.
    pub fn fetch_waker(&self, provider: &str) -> Option<Arc<Notify>> {
        self.providers.get(provider).map(|p| p.waker.clone())
    }

    fn provider(
        &self,
        id: &str,
    ) -> Result<(&Arc<ProviderPoller>, Arc<dyn ProviderClient>), PollError> {
        let provider = self
            .providers
            .get(id)
            .ok_or_else(|| PollError::UnknownProvider(id.to_string()))?;
        let client = provider.client.clone().ok_or_else(|| {
            PollError::Off(
                id.to_string(),
                provider.off_reason.unwrap_or("outbound client"),
            )
        })?;
        Ok((provider, client))
    }

    /// One full cycle now: search sweep, status checks, queued fetches. Waits for a
    /// cycle already running for this provider instead of overlapping it.
    pub async fn poll_once(&self, id: &str) -> Result<PollSummary, PollError> {
        let (provider, client) = self.provider(id)?;
        let _cycle = provider.cycle.lock().await;
        let result = self.cycle(provider, client).await;
        self.report_cycle(id, &result);
        result
    }

    /// Counts the cycle and tells the alert signals how it went: failed when it could not
    /// run or when every provider call failed.
    fn report_cycle(&self, id: &str, result: &Result<PollSummary, PollError>) {
        self.metrics.poll_cycles.with_label_values(&[id]).inc();
        let outcome = match result {
            Ok(summary) if summary.errors > 0 && summary.fetched == 0 => Err(format!(
                "{} provider call(s) failed, nothing fetched",
                summary.errors
            )),
            Ok(_) => Ok(()),
            Err(err) => Err(err.to_string()),
        };
        self.signals
            .poll_cycle(id, outcome, crate::store::to_millis(Utc::now()));
    }

    /// Waits until no cycle of `provider` is running.
    pub async fn wait_idle(&self, id: &str) {
        if let Some(provider) = self.providers.get(id) {
            let _cycle = provider.cycle.lock().await;
        }
    }

    /// A scheduled cycle: skipped (returns `None`) when one is still running.
    pub async fn scheduled_cycle(&self, id: &str) -> Result<Option<PollSummary>, PollError> {
        let (provider, client) = self.provider(id)?;
        let Ok(_cycle) = provider.cycle.try_lock() else {
            tracing::debug!(
                provider = id,
                "previous poll cycle still running; skipping this one"
            );
            return Ok(None);
        };
        let result = self.cycle(provider, client).await;
        self.report_cycle(id, &result);
        result.map(Some)
    }

    async fn cycle(
        &self,
        provider: &ProviderPoller,
        client: Arc<dyn ProviderClient>,
    ) -> Result<PollSummary, PollError> {
        let mut summary = PollSummary::default();
        if client.can_search() {
            summary.add(self.sweep(provider, client.as_ref()).await?);
        }
        if client.can_fetch_status() {
            summary.add(self.drain_fetch_queue(provider, client.as_ref()).await?);
            summary.add(self.status_checks(provider, client.as_ref()).await?);
        }
        let id = provider.id.as_str();
        for (result, value) in [
            ("fetched", summary.fetched),
            ("updated", summary.updated),
            ("recovered", summary.recovered),
            ("errors", summary.errors),
        ] {
            self.metrics
                .poll_results
                .with_label_values(&[id, result])
                .inc_by(value);
        }
        self.metrics
            .missed_webhooks
            .with_label_values(&[id])
            .inc_by(summary.recovered);
        self.log_cycle(provider, summary);
        Ok(summary)
    }

    /// Logs a finished cycle with its counts as fields. A cycle that reached nothing but
    /// errors extends the provider's failure streak: WARN when the streak starts, DEBUG
    /// while it lasts, WARN with its length when the provider answers again.
    fn log_cycle(&self, provider: &ProviderPoller, summary: PollSummary) {
        use std::sync::atomic::Ordering;
        let id = provider.id.as_str();
        let PollSummary {
            fetched,
            updated,
            recovered,
            errors,
        } = summary;
        if errors > 0 && fetched == 0 {
            let streak = provider.failed_cycles.fetch_add(1, Ordering::Relaxed) + 1;
            if streak == 1 {
                tracing::warn!(provider = id, errors, "provider failing: a poll cycle reached nothing but errors (logged again when it recovers)");
            } else {
                tracing::debug!(provider = id, errors, streak, "provider still failing");
            }
            return;
        }
        let streak = provider.failed_cycles.swap(0, Ordering::Relaxed);
        if streak > 0 {
            tracing::warn!(provider = id, failed_cycles = streak, "provider recovered");
        }
        if errors > 0 {
            tracing::warn!(
                provider = id,
                fetched,
                updated,
                recovered,
                errors,
                "poll cycle finished with errors"
            );
        } else {
            tracing::info!(
                provider = id,
                fetched,
                updated,
                recovered,
                errors,
                "poll cycle finished"
            );
        }
    }

    /// Reads every page of `[watermark - overlap, now)` and applies each item; the
    /// watermark moves to `now` only when the whole window was read.
    async fn sweep(
        &self,
        provider: &ProviderPoller,
        client: &dyn ProviderClient,
    ) -> Result<PollSummary, PollError> {
        let mut summary = PollSummary::default();
        let now = Utc::now();
        let overlap = chrono::Duration::from_std(self.settings.poll.overlap)
            .unwrap_or(chrono::Duration::zero());
        let lookback = chrono::Duration::from_std(self.settings.poll.initial_lookback)
            .unwrap_or(chrono::Duration::days(1));
        let from = match self.store.watermark(provider.id.clone()).await? {
            Some(watermark) => watermark - overlap,
            None => now - lookback,
        };
        let window = SearchWindow { from, to: now };
        let mut page = client.first_page();
        let mut pages_read = 0u32;
        loop {
            let result = client.search_page(window, page).await;
            let found = match result {
                Ok(found) => found,
                Err(err) => {
                    summary.errors += 1;
                    if provider.is_failing() {
                        tracing::debug!(provider = provider.id, page, error = %err, "search page failed; watermark kept");
                    } else {
                        tracing::warn!(provider = provider.id, page, error = %err, "search page failed; watermark kept");
                    }
                    return Ok(summary);
                }
            };
            for item in found.items {
                let item = item.and_then(|observation| {
                    observation.check_ids(provider.kind)?;
                    Ok(observation)
                });
                match item {
                    Ok(observation) => {
                        let applied = self
                            .ingestor
                            .record_poll(
                                &provider.id,
                                observation,
                                PollKind::Sweep,
                                provider.sends_webhooks,
                                now,
                            )
                            .await?;
                        summary.count(&applied);
                    }
                    Err(err) => {
                        summary.errors += 1;
                        tracing::warn!(provider = provider.id, error = %err, "search item not decodable");
                    }
                }
            }
            pages_read += 1;
            match found.next_page {
                Some(next) if pages_read < MAX_PAGES_PER_SWEEP => page = next,
                Some(_) => {
                    summary.errors += 1;
                    tracing::warn!(
                        provider = provider.id,
                        pages_read,
                        "search stopped at the page bound; watermark kept"
                    );
                    return Ok(summary);
                }
                None => break,
            }
        }
        self.store.set_watermark(provider.id.clone(), now).await?;
        Ok(summary)
    }

    /// Fetches the status of in-flight cash-outs unchanged for `status_after`, oldest first.
    async fn status_checks(
        &self,
        provider: &ProviderPoller,
        client: &dyn ProviderClient,
    ) -> Result<PollSummary, PollError> {
        let cutoff = Utc::now()
            - chrono::Duration::from_std(provider.status_after).unwrap_or(chrono::Duration::zero());
        // Without a search endpoint a lost reversal webhook (SimPay REFUND) is only found by
        // asking again about recently completed cash-outs, at a slower cadence.
        let recheck = (!client.can_search()).then(|| {
            let now = Utc::now();
            let window = chrono::Duration::from_std(self.settings.poll.recheck_completed_for)
                .unwrap_or(chrono::Duration::zero());
            let every = chrono::Duration::from_std(self.settings.poll.recheck_completed_every)
                .unwrap_or(chrono::Duration::zero());
            CompletedRecheck {
                completed_since: now - window,
                checked_before: now - every,
            }
        });
        let due = self
            .store
            .due_status_checks(
                provider.id.clone(),
                cutoff,
                recheck,
                self.settings.poll.status_batch,
            )
            .await?;
        // `poll.status_batch` bounds the cycle's status checks, both kinds together.
        let remaining = self.settings.poll.status_batch.saturating_sub(due.len());
        let mut summary = self.fetch_many(provider, client, due, false).await?;
        if remaining == 0 {
            return Ok(summary);
        }
        // Cash-outs the platform registered whose every webhook was lost: without a search
        // endpoint, the ledger is the only way to learn they exist.
        let unseen = self
            .store
            .ledger_refs_unseen(provider.id.clone(), cutoff, remaining)
            .await?;
        summary.add(self.fetch_many(provider, client, unseen, false).await?);
        Ok(summary)
    }

    /// Performs queued fetches that are due (thin notifications, unverified webhooks).
    pub async fn drain_fetch_queue_of(&self, id: &str) -> Result<PollSummary, PollError> {
        let (provider, client) = self.provider(id)?;
        if !client.can_fetch_status() {
            return Ok(PollSummary::default());
        }
        self.drain_fetch_queue(provider, client.as_ref()).await
    }

    async fn drain_fetch_queue(
        &self,
        provider: &ProviderPoller,
        client: &dyn ProviderClient,
    ) -> Result<PollSummary, PollError> {
        let _draining = provider.fetching.lock().await;
        let mut summary = PollSummary::default();
        loop {
            let due = self.store.due_fetches(provider.id.clone(), 100).await?;
            if due.is_empty() {
                break;
            }
            // Failed fetches are deferred (no longer due), so each pass shrinks the due set;
            // a pass where everything failed ends the drain (the provider is struggling).
            let attempted = due.len() as u64;
            let refs = due
                .into_iter()
                .map(|(provider_ref, _)| provider_ref)
                .collect();
            let pass = self.fetch_many(provider, client, refs, true).await?;
            summary.add(pass);
            if pass.errors >= attempted {
                break;
            }
        }
        if let Ok(count) = self.store.queued_fetch_count(provider.id.clone()).await {
            self.metrics
                .status_fetch_queue
                .with_label_values(&[&provider.id])
                .set(count);
        }
        Ok(summary)
    }

    /// Fetches several statuses with a few requests in flight: the client's pacer keeps
    /// them under `max_rps`, and their writes share group commits.
    async fn fetch_many(
        &self,
        provider: &ProviderPoller,
        client: &dyn ProviderClient,
        refs: Vec<String>,
        queued: bool,
    ) -> Result<PollSummary, PollError> {
        let mut results = futures_util::stream::iter(refs)
            .map(|provider_ref| async move {
                self.fetch_one(provider, client, &provider_ref, queued)
                    .await
            })
            .buffer_unordered(FETCHES_IN_FLIGHT);
        let mut summary = PollSummary::default();
        while let Some(result) = results.next().await {
            summary.add(result?);
        }
        Ok(summary)
    }

    async fn fetch_one(
        &self,
        provider: &ProviderPoller,
        client: &dyn ProviderClient,
        provider_ref: &str,
        queued: bool,
    ) -> Result<PollSummary, PollError> {
        let mut summary = PollSummary::default();
        let fetched = client
            .fetch_status(provider_ref)
            .await
            .and_then(|observation| {
                observation.check_ids(provider.kind)?;
                Ok(observation)
            });
        match fetched {
            Ok(observation) => {
                let applied = self
                    .ingestor
                    .record_poll(
                        &provider.id,
                        observation,
                        PollKind::StatusFetch,
                        provider.sends_webhooks,
                        Utc::now(),
                    )
                    .await?;
                summary.count(&applied);
            }
            Err(ProviderError::NotFound(_)) => {
                tracing::info!(
                    provider = provider.id,
                    provider_ref,
                    "cash-out unknown to the provider"
                );
                self.store
                    .mark_status_checked(provider.id.clone(), provider_ref.to_string())
                    .await?;
                self.store
                    .complete_fetch(provider.id.clone(), provider_ref.to_string())
                    .await?;
            }
            Err(err) => {
                summary.errors += 1;
                if provider.is_failing() {
                    tracing::debug!(provider = provider.id, provider_ref, error = %err, "status fetch failed");
                } else {
                    tracing::warn!(provider = provider.id, provider_ref, error = %err, "status fetch failed");
                }
                if queued {
                    self.store
                        .defer_fetch(
                            provider.id.clone(),
                            provider_ref.to_string(),
                            MAX_FETCH_ATTEMPTS,
                        )
                        .await?;
                }
            }
        }
        Ok(summary)
    }
}
