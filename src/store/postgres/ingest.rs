//! Ingestion on PostgreSQL: the entry points of the SQLite store's ingestion
//! (src/store/ingest.rs) with the same signatures and outcomes, for several instances
//! writing at once. Each is one transaction that loads what [`crate::ingest::plan`] needs
//! with the claims of [`super::claims`] (the dedup key and the nonce claimed by
//! `INSERT … ON CONFLICT`, the cash-out locked `FOR UPDATE`), asks the same pure plan
//! function, and applies the answer. No rule lives here. Webhooks go through the group
//! commit of [`super::group_commit`] (many in one transaction, the same plans); the
//! single-webhook transaction here is its fallback.
//!
//! - A duplicate or a replay rolls its transaction back (its claims are freed).
//! - A new cash-out is inserted `ON CONFLICT DO NOTHING`: when another instance inserted
//!   it first, the transaction is retried and judges the observation against that row.
//! - [`PgStore::link_to_ledger`] is the ledger registration's step of ingestion.
//! - A serialization failure or a deadlock retries the transaction (at most
//!   [`TX_ATTEMPTS`] times, then `Unavailable`); a lost server is `Unavailable` (503).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;

use super::claims::{self, cashout_for_update};
use super::{cached, from_postgres, PgStore, PgTransaction};
use crate::ingest::plan::{
    self, CashoutChange, ConflictMark, FindingToOpen, Loaded, NewEvent, ObservationPlan,
    PollIntake, PollKind, PolledSnapshot, ReprocessPlan, WebhookLoaded, WebhookPlan,
};
use crate::ingest::{Applied, EventOutcome, FetchReason, IngestOutcome, WebhookRecord};
use crate::providers::Observation;
use crate::state::CashoutStatus;
use crate::store::{to_millis, StoreError};

/// How many times one ingestion transaction runs before a conflict with other writers
/// (a serialization failure, a deadlock, a cash-out inserted by another instance first)
/// is answered `Unavailable`.
pub const TX_ATTEMPTS: usize = 8;

/// Why one attempt of a transaction ended without its result.
#[derive(Debug)]
pub(super) enum TxError {
    /// A conflict with a concurrent writer: run the transaction again.
    Retry(String),
    Store(StoreError),
}

/// Whether an error is a conflict that a new attempt of the transaction resolves: a
/// serialization failure or a deadlock, which [`from_postgres`] makes `Unavailable` with
/// the SQLSTATE first.
pub(super) fn is_retried(err: &StoreError) -> bool {
    matches!(err, StoreError::Unavailable(message)
        if message.starts_with("40001:") || message.starts_with("40P01:"))
}

impl From<StoreError> for TxError {
    fn from(err: StoreError) -> Self {
        if is_retried(&err) {
            TxError::Retry(err.to_string())
        } else {
            TxError::Store(err)
        }
    }
}

impl From<tokio_postgres::Error> for TxError {
    fn from(err: tokio_postgres::Error) -> Self {
        TxError::from(from_postgres(&err))
    }
}

pub(super) type TxResult<T> = Result<T, TxError>;

/// Commits or rolls back (a duplicate or a replay writes nothing).
pub(super) async fn finish(tx: PgTransaction<'_>, commit: bool) -> TxResult<()> {
    if commit {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(())
}

impl PgStore {
    /// Runs `job` in a transaction of its own, again while it ends in a conflict with a
    /// concurrent writer (at most [`TX_ATTEMPTS`] times). `job` commits or rolls back.
    pub(super) async fn transact<T, F>(
        &self,
        what: &'static str,
        mut job: F,
    ) -> Result<T, StoreError>
    where
        F: for<'c> FnMut(PgTransaction<'c>) -> BoxFuture<'c, TxResult<T>>,
    {
        let mut last = String::new();
        for attempt in 1..=TX_ATTEMPTS {
            let mut client = self.client().await?;
            let tx = client.transaction().await.map_err(|e| from_postgres(&e))?;
            match job(tx).await {
                Ok(value) => return Ok(value),
                Err(TxError::Store(err)) => return Err(err),
                Err(TxError::Retry(reason)) => {
                    tracing::debug!(what, attempt, %reason, "postgres: transaction retried");
                    last = reason;
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "{what}: still conflicting with concurrent writers after {TX_ATTEMPTS} attempts ({last})"
        )))
    }

    /// One webhook in a transaction of its own: dedup, replay check, then quarantine or
    /// the state rule, event log, committed when this returns. [`PgStore::ingest_webhook`]
    /// batches webhooks (see [`super::group_commit`]) and falls back on this.
    pub(super) async fn ingest_webhook_alone(
        &self,
        record: WebhookRecord,
    ) -> Result<IngestOutcome, StoreError> {
        let record = Arc::new(record);
        self.transact("ingest a webhook", move |tx| {
            let record = Arc::clone(&record);
            Box::pin(async move {
                let (outcome, commit) = ingest_webhook(&tx, &record).await?;
                finish(tx, commit).await?;
                Ok(outcome)
            })
        })
        .await
    }

    /// Applies an observation found by a search sweep (`Store::apply_polled`).
    pub async fn apply_polled(
        &self,
        provider: String,
        observation: Observation,
        counts_as_missed: bool,
        at: DateTime<Utc>,
    ) -> Result<Applied, StoreError> {
        self.poll(provider, observation, PollKind::Sweep, counts_as_missed, at)
            .await
    }

    /// Applies a fetched status and completes its queued fetch
    /// (`Store::record_fetched_status`).
    pub async fn record_fetched_status(
        &self,
        provider: String,
        observation: Observation,
        counts_as_missed: bool,
        at: DateTime<Utc>,
    ) -> Result<Applied, StoreError> {
        self.poll(
            provider,
            observation,
            PollKind::StatusFetch,
            counts_as_missed,
            at,
        )
        .await
    }

    async fn poll(
        &self,
        provider: String,
        observation: Observation,
        kind: PollKind,
        counts_as_missed: bool,
        at: DateTime<Utc>,
    ) -> Result<Applied, StoreError> {
        let input = Arc::new((provider, observation));
        self.transact("apply a polled observation", move |tx| {
            let input = Arc::clone(&input);
            Box::pin(async move {
                let (provider, observation) = &*input;
                let applied =
                    record_poll(&tx, provider, observation, kind, counts_as_missed, at).await?;
                finish(tx, true).await?;
                Ok(applied)
            })
        })
        .await
    }

    /// Re-runs a quarantined event with a new parse result; `None` when no quarantined
    /// event has this id (`Store::reprocess_event`).
    pub async fn reprocess_event(
        &self,
        event_id: String,
        parsed: Result<Observation, String>,
        at: DateTime<Utc>,
    ) -> Result<Option<IngestOutcome>, StoreError> {
        let input = Arc::new((event_id, parsed));
        self.transact("reprocess an event", move |tx| {
            let input = Arc::clone(&input);
            Box::pin(async move {
                let (event_id, parsed) = &*input;
                let outcome = reprocess(&tx, event_id, parsed, at).await?;
                finish(tx, outcome.is_some()).await?;
                Ok(outcome)
            })
        })
        .await
    }

    /// Queues a status fetch of a cash-out unless one is queued or the provider's queue
    /// holds `max_pending` (the id rule is the facade's, `Store::request_status_fetch`).
    pub async fn request_status_fetch(
        &self,
        provider: String,
        provider_ref: String,
        reason: FetchReason,
        max_pending: usize,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let input = Arc::new((provider, provider_ref));
        self.transact("queue a status fetch", move |tx| {
            let input = Arc::clone(&input);
            Box::pin(async move {
                let (provider, provider_ref) = &*input;
                let queued = queue_status_fetch(
                    &tx,
                    provider,
                    provider_ref,
                    reason,
                    max_pending,
                    to_millis(at),
                )
                .await?;
                finish(tx, true).await?;
                Ok(queued)
            })
        })
        .await
    }
}

impl PgStore {
    /// Gives a cash-out without a platform id the `external_id` of the ledger entry that
    /// names it, recording it on its timeline (source `ledger`); whether it changed
    /// anything (the SQLite store's ledger registration does this in its transaction).
    pub async fn link_to_ledger(
        &self,
        provider: String,
        provider_ref: String,
        external_id: String,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let input = Arc::new((provider, provider_ref, external_id));
        self.transact("link a cash-out to the ledger", move |tx| {
            let input = Arc::clone(&input);
            Box::pin(async move {
                let (provider, provider_ref, external_id) = &*input;
                let linked = link_to_ledger(&tx, provider, provider_ref, external_id, at).await?;
                finish(tx, linked).await?;
                Ok(linked)
            })
        })
        .await
    }
}

/// Sets the external id of a cash-out that has none (the row lock of the `UPDATE` makes a
/// concurrent link wait, then find it set) and logs the plan's `ledger_linked` event.
pub(super) async fn link_to_ledger(
    tx: &PgTransaction<'_>,
    provider: &str,
    provider_ref: &str,
    external_id: &str,
    at: DateTime<Utc>,
) -> TxResult<bool> {
    let now = to_millis(at);
    let Some(row) = tx
        .query_opt(
            &cached(
                tx,
                "UPDATE cashouts SET external_id = $3, book_changed_at = $4
                 WHERE provider = $1 AND provider_ref = $2 AND external_id IS NULL RETURNING id",
            )
            .await?,
            &[&provider, &provider_ref, &external_id, &now],
        )
        .await?
    else {
        return Ok(false);
    };
    let cashout_id: i64 = row.try_get(0)?;
    let event_id = uuid::Uuid::now_v7().to_string();
    let mut observation = Observation::new(provider_ref);
    observation.external_id = Some(external_id.to_string());
    let event = plan::plan_ledger_link(&event_id, &observation, now);
    insert_event(tx, provider, Some(cashout_id), &event).await?;
    Ok(true)
}

/// One webhook: the outcome and whether to commit.
async fn ingest_webhook(
    tx: &PgTransaction<'_>,
    record: &WebhookRecord,
) -> TxResult<(IngestOutcome, bool)> {
    // Claiming the dedup key inserts this delivery's event row (rewritten below).
    let mut loaded = WebhookLoaded {
        prior: claims::claim_dedup_key(tx, record).await?,
        ..WebhookLoaded::default()
    };
    if loaded.prior.is_none() {
        if let Some(nonce) = &record.nonce {
            loaded.nonce = Some(claims::claim_nonce(tx, record, nonce).await?);
        }
    }
    if loaded.admission(&record.body_sha256) == plan::Admission::Admit {
        if let Ok(observation) = &record.parsed {
            loaded.observation = load_for(tx, &record.provider, observation).await?;
        }
    }
    match plan::plan_webhook(record, loaded) {
        WebhookPlan::Duplicate { event_id } => Ok((IngestOutcome::Duplicate { event_id }, false)),
        WebhookPlan::Replayed => Ok((IngestOutcome::Replayed, false)),
        WebhookPlan::Quarantine { event, reason } => {
            write_claimed_event(tx, None, &event).await?;
            Ok((
                IngestOutcome::Quarantined {
                    event_id: record.event_id.clone(),
                    reason: reason.to_string(),
                },
                true,
            ))
        }
        WebhookPlan::Apply(plan) => {
            let applied = apply_effects(tx, &record.provider, &plan).await?;
            write_claimed_event(tx, applied.cashout_id, &plan.event).await?;
            Ok((
                IngestOutcome::Accepted {
                    event_id: record.event_id.clone(),
                    applied,
                },
                true,
            ))
        }
    }
}

/// A polled observation, logged as a `poll` event, then the fetch-queue bookkeeping.
async fn record_poll(
    tx: &PgTransaction<'_>,
    provider: &str,
    observation: &Observation,
    kind: PollKind,
    counts_as_missed: bool,
    at: DateTime<Utc>,
) -> TxResult<Applied> {
    // The cash-out is locked first: a webhook for it waits for this commit, and so does
    // the thin notification's fetch row read next.
    let loaded = load_for(tx, provider, observation).await?;
    let thin_fetch_pending = thin_fetch_pending(tx, provider, &observation.provider_ref).await?;
    let event_id = uuid::Uuid::now_v7().to_string();
    let plan = plan::plan_poll(
        PollIntake {
            provider,
            event_id: &event_id,
            kind,
            counts_as_missed,
            thin_fetch_pending,
            at: to_millis(at),
        },
        observation,
        loaded,
    );
    let applied = apply_effects(tx, provider, &plan.apply).await?;
    insert_event(tx, provider, applied.cashout_id, &plan.apply.event).await?;
    if let (PolledSnapshot::DropIfUnchanged, Some(cashout_id)) = (plan.snapshot, applied.cashout_id)
    {
        drop_snapshot_if_unchanged(tx, &event_id, cashout_id).await?;
    }
    if plan.mark_checked {
        tx.execute(
            &cached(
                tx,
                "UPDATE cashouts SET last_status_check_at = $3 WHERE provider = $1 AND provider_ref = $2",
            )
            .await?,
            &[&provider, &observation.provider_ref, &to_millis(at)],
        )
        .await?;
    }
    if plan.complete_fetch {
        tx.execute(
            &cached(
                tx,
                "DELETE FROM status_fetch_queue WHERE provider = $1 AND provider_ref = $2",
            )
            .await?,
            &[&provider, &observation.provider_ref],
        )
        .await?;
    }
    Ok(applied)
}

/// A quarantined event again, with a new parse result.
async fn reprocess(
    tx: &PgTransaction<'_>,
    event_id: &str,
    parsed: &Result<Observation, String>,
    at: DateTime<Utc>,
) -> TxResult<Option<IngestOutcome>> {
    // Locked: a second reprocess of the same event waits, then finds it no longer
    // quarantined.
    let provider: Option<String> = tx
        .query_opt(
            &cached(
                tx,
                "SELECT provider FROM events WHERE event_id = $1 AND outcome = $2 FOR UPDATE",
            )
            .await?,
            &[&event_id, &EventOutcome::Quarantined.as_str()],
        )
        .await?
        .map(|row| row.try_get(0))
        .transpose()?;
    let loaded = match (&provider, parsed) {
        (Some(provider), Ok(observation)) => load_for(tx, provider, observation).await?,
        _ => Loaded::default(),
    };
    let now = to_millis(at);
    match plan::plan_reprocess(provider.as_deref(), event_id, parsed, now, loaded) {
        ReprocessPlan::NotQuarantined => Ok(None),
        ReprocessPlan::StillQuarantined { reason } => {
            tx.execute(
                &cached(tx, "UPDATE events SET error = $2 WHERE event_id = $1").await?,
                &[&event_id, &reason],
            )
            .await?;
            Ok(Some(IngestOutcome::Quarantined {
                event_id: event_id.to_string(),
                reason: reason.to_string(),
            }))
        }
        ReprocessPlan::Apply(plan) => {
            let provider = provider.as_deref().unwrap_or_default();
            let applied = apply_effects(tx, provider, &plan).await?;
            rewrite_event(tx, &plan.event, applied.cashout_id).await?;
            if let Some(cashout_id) = applied.cashout_id {
                tx.execute(
                    &cached(
                        tx,
                        "INSERT INTO reconcile_queue (cashout_id) VALUES ($1) ON CONFLICT DO NOTHING",
                    )
                    .await?,
                    &[&cashout_id],
                )
                .await?;
            }
            Ok(Some(IngestOutcome::Accepted {
                event_id: event_id.to_string(),
                applied,
            }))
        }
    }
}

/// What [`plan::plan_observation`] needs about `observation`'s cash-out, which stays
/// locked until the commit.
async fn load_for(
    tx: &PgTransaction<'_>,
    provider: &str,
    observation: &Observation,
) -> TxResult<Loaded> {
    let cashout = cashout_for_update(tx, provider, &observation.provider_ref).await?;
    let ledger_external_id = if plan::needs_ledger_external_id(cashout, observation) {
        ledger_external_id(tx, provider, &observation.provider_ref).await?
    } else {
        None
    };
    Ok(Loaded {
        cashout,
        ledger_external_id,
    })
}

/// The external id of the one ledger entry naming `provider_ref`, if exactly one does.
async fn ledger_external_id(
    tx: &PgTransaction<'_>,
    provider: &str,
    provider_ref: &str,
) -> TxResult<Option<String>> {
    let rows = tx
        .query(
            &cached(
                tx,
                "SELECT external_id FROM ledger WHERE provider = $1 AND provider_ref = $2 LIMIT 2",
            )
            .await?,
            &[&provider, &provider_ref],
        )
        .await?;
    Ok(match rows.as_slice() {
        [row] => Some(row.try_get(0)?),
        _ => None,
    })
}

/// Whether a thin notification asked for this cash-out's status and is still waiting.
async fn thin_fetch_pending(
    tx: &PgTransaction<'_>,
    provider: &str,
    provider_ref: &str,
) -> TxResult<bool> {
    Ok(tx
        .query_opt(
            &cached(
                tx,
                "SELECT 1 FROM status_fetch_queue WHERE provider = $1 AND provider_ref = $2 AND reason = $3",
            )
            .await?,
            &[
                &provider,
                &provider_ref,
                &FetchReason::ThinNotification.as_str(),
            ],
        )
        .await?
        .is_some())
}

/// Applies a plan's cash-out change, findings and fetches (not its event).
async fn apply_effects(
    tx: &PgTransaction<'_>,
    provider: &str,
    plan: &ObservationPlan<'_>,
) -> TxResult<Applied> {
    let observation = plan.observation;
    let now = plan.event.received_at;
    let amount_minor = observation.amount.map(|m| m.minor);
    let currency = observation.amount.map(|m| m.currency.code());
    let created_at = observation.created_at.map(to_millis);
    let cashout_id = match &plan.change {
        CashoutChange::Nothing { id } => *id,
        CashoutChange::Insert {
            external_id,
            state,
            completed_at,
            webhook,
            recovered,
            link_earlier_events,
        } => {
            let inserted = tx
                .query_opt(
                    &cached(
                        tx,
                        "INSERT INTO cashouts (provider, provider_ref, external_id, status, held, provider_status, reason_code,
                                           amount_minor, currency, fee_minor, created_at, provider_created_at,
                                           provider_updated_at, first_seen_at, updated_at, completed_at, webhook_count,
                                           recovered_by_poll, method, net_minor, book_changed_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, COALESCE($11::BIGINT, $12::BIGINT), $11, $13, $12, $12, $14, $15,
                             $16, $17, $18, $12)
                     ON CONFLICT (provider, provider_ref) DO NOTHING
                     RETURNING id",
                    )
                    .await?,
                    &[
                        &provider,
                        &observation.provider_ref,
                        external_id,
                        &state.status.as_str(),
                        &state.held,
                        &observation.raw_status,
                        &observation.reason_code,
                        &amount_minor,
                        &currency,
                        &observation.fee_minor,
                        &created_at,
                        &now,
                        &observation.updated_at.map(to_millis),
                        completed_at,
                        &i64::from(*webhook),
                        &i64::from(*recovered),
                        &observation.method,
                        &observation.net_minor,
                    ],
                )
                .await?;
            // Another instance inserted it since this one looked: judge again against it.
            let Some(row) = inserted else {
                return Err(TxError::Retry(format!(
                    "cash-out {provider}/{} inserted concurrently",
                    observation.provider_ref
                )));
            };
            let id: i64 = row.try_get(0)?;
            if *link_earlier_events {
                tx.execute(
                    &cached(
                        tx,
                        "UPDATE events SET cashout_id = $1
                     WHERE provider = $2 AND provider_ref = $3 AND cashout_id IS NULL",
                    )
                    .await?,
                    &[&id, &provider, &observation.provider_ref],
                )
                .await?;
            }
            Some(id)
        }
        CashoutChange::Advance {
            id,
            state,
            completed_at,
            webhook,
            recovered,
        } => {
            tx.execute(
                &cached(
                    tx,
                    "UPDATE cashouts SET status = $2, held = $3, provider_status = $4, reason_code = $5,
                    amount_minor = COALESCE($6, amount_minor), currency = COALESCE($7, currency),
                    fee_minor = COALESCE($8, fee_minor), external_id = COALESCE(external_id, $9),
                    provider_created_at = COALESCE(provider_created_at, $10),
                    created_at = COALESCE(provider_created_at, $10, created_at),
                    provider_updated_at = COALESCE($11, provider_updated_at),
                    completed_at = COALESCE($12, completed_at),
                    updated_at = $13, webhook_count = webhook_count + $14,
                    recovered_by_poll = recovered_by_poll + $15,
                    method = COALESCE($16, method), net_minor = COALESCE($17, net_minor),
                    conflict_status = NULL, book_changed_at = $13
                 WHERE id = $1",
                )
                .await?,
                &[
                    id,
                    &state.status.as_str(),
                    &state.held,
                    &observation.raw_status,
                    &observation.reason_code,
                    &amount_minor,
                    &currency,
                    &observation.fee_minor,
                    &observation.external_id,
                    &created_at,
                    &observation.updated_at.map(to_millis),
                    completed_at,
                    &now,
                    &i64::from(*webhook),
                    &i64::from(*recovered),
                    &observation.method,
                    &observation.net_minor,
                ],
            )
            .await?;
            Some(*id)
        }
        CashoutChange::FillIn {
            id,
            webhook,
            conflict,
        } => {
            let (set_conflict, conflict_status) = match conflict {
                ConflictMark::Set(reported) => (true, Some(reported.as_str())),
                ConflictMark::Clear => (true, None),
                ConflictMark::Keep => (false, None),
            };
            tx.execute(
                &cached(
                    tx,
                    "UPDATE cashouts SET
                    amount_minor = COALESCE(amount_minor, $2), currency = COALESCE(currency, $3),
                    fee_minor = COALESCE(fee_minor, $4), external_id = COALESCE(external_id, $5),
                    provider_created_at = COALESCE(provider_created_at, $6),
                    created_at = COALESCE(provider_created_at, $6, created_at),
                    webhook_count = webhook_count + $7,
                    method = COALESCE(method, $8), net_minor = COALESCE(net_minor, $9),
                    conflict_status = CASE WHEN $10 THEN $11 ELSE conflict_status END,
                    book_changed_at = $12
                 WHERE id = $1",
                )
                .await?,
                &[
                    id,
                    &amount_minor,
                    &currency,
                    &observation.fee_minor,
                    &observation.external_id,
                    &created_at,
                    &i64::from(*webhook),
                    &observation.method,
                    &observation.net_minor,
                    &set_conflict,
                    &conflict_status,
                    &now,
                ],
            )
            .await?;
            Some(*id)
        }
    };
    for finding in &plan.findings {
        open_finding(tx, provider, observation, finding, now).await?;
    }
    let mut status_fetch_queued = false;
    for fetch in &plan.fetches {
        status_fetch_queued |= queue_status_fetch(
            tx,
            provider,
            &observation.provider_ref,
            fetch.reason,
            fetch.max_pending.unwrap_or(usize::MAX),
            now,
        )
        .await?;
    }
    Ok(Applied {
        transition: plan.transition,
        status: plan.status,
        status_fetch_queued,
        event_id: plan.event.event_id.to_string(),
        missed_webhook: plan.missed_webhook,
        cashout_id,
    })
}

/// Opens a finding about the observation's cash-out: an open one unless one of its kind
/// is open (the partial unique index decides, whoever commits first), or one already
/// resolved (always recorded).
async fn open_finding(
    tx: &PgTransaction<'_>,
    provider: &str,
    observation: &Observation,
    finding: &FindingToOpen,
    at: i64,
) -> TxResult<()> {
    let resolved_at = finding.resolved.then_some(at);
    let sql = if finding.resolved {
        "INSERT INTO mismatches (kind, provider, subject, provider_ref, external_id, detail, opened_at, resolved_at)
         VALUES ($1, $2, $3, $3, $4, $5, $6, $7)"
    } else {
        "INSERT INTO mismatches (kind, provider, subject, provider_ref, external_id, detail, opened_at, resolved_at)
         VALUES ($1, $2, $3, $3, $4, $5, $6, $7)
         ON CONFLICT (kind, provider, subject) WHERE resolved_at IS NULL DO NOTHING"
    };
    tx.execute(
        &cached(tx, sql).await?,
        &[
            &finding.kind.as_str(),
            &provider,
            &observation.provider_ref,
            &observation.external_id,
            &finding.detail,
            &at,
            &resolved_at,
        ],
    )
    .await?;
    Ok(())
}

/// Queues a status fetch unless one is queued or the provider's queue is full. The bound
/// is a cap against floods, counted before the insert: instances queuing at the same
/// moment may pass it by a few rows.
pub(super) async fn queue_status_fetch(
    tx: &PgTransaction<'_>,
    provider: &str,
    provider_ref: &str,
    reason: FetchReason,
    max_pending: usize,
    at: i64,
) -> TxResult<bool> {
    if max_pending != usize::MAX {
        let pending: i64 = tx
            .query_one(
                &cached(
                    tx,
                    "SELECT COUNT(*) FROM status_fetch_queue WHERE provider = $1",
                )
                .await?,
                &[&provider],
            )
            .await?
            .try_get(0)?;
        if usize::try_from(pending).unwrap_or(usize::MAX) >= max_pending {
            return Ok(false);
        }
    }
    let inserted = tx
        .execute(
            &cached(
                tx,
                "INSERT INTO status_fetch_queue (provider, provider_ref, reason, requested_at, next_attempt_at)
             VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (provider, provider_ref) DO NOTHING",
            )
            .await?,
            &[&provider, &provider_ref, &reason.as_str(), &at],
        )
        .await?;
    Ok(inserted > 0)
}

/// The `SET` of an event's after-snapshot: the cash-out `cashout_id` (an SQL expression)
/// as it stands now (SPEC §6, point in time); all `NULL` without a cash-out.
fn snapshot(cashout_id: &str) -> String {
    format!(
        "(after_status, after_provider_status, after_external_id, after_amount_minor, after_currency,
          after_fee_minor, after_net_minor, after_created_at, after_updated_at, after_completed_at,
          after_webhooks, after_recovered) =
         (SELECT c.status, c.provider_status, c.external_id, c.amount_minor, c.currency, c.fee_minor,
                 c.net_minor, c.created_at, c.updated_at, c.completed_at, c.webhook_count, c.recovered_by_poll
          FROM cashouts c WHERE c.id = {cashout_id})"
    )
}

/// Writes the plan's event over the row [`claims::claim_dedup_key`] inserted for this
/// delivery (its delivery columns are already there), with the cash-out's after-snapshot
/// and its book time, as the SQLite store's `insert_event` writes a new row.
async fn write_claimed_event(
    tx: &PgTransaction<'_>,
    cashout_id: Option<i64>,
    event: &NewEvent<'_>,
) -> TxResult<()> {
    let observation = event.observation;
    let sql = format!(
        "UPDATE events SET source = $2, outcome = $3, error = $4, provider_ref = $5, raw_status = $6,
                reason_code = $7, status = $8, applied = $9, received_at = $10, cashout_id = $11,
                book_at = $10, {}
         WHERE event_id = $1",
        // The new cash-out id: the row's own is the claim's (none) until this update.
        snapshot("$11")
    );
    let updated = tx
        .execute(
            &cached(tx, sql.as_str()).await?,
            &[
                &event.event_id,
                &event.source.as_str(),
                &event.outcome.as_str(),
                &event.error,
                &observation.map(|o| o.provider_ref.as_str()),
                &observation.and_then(|o| o.raw_status.as_deref()),
                &observation.and_then(|o| o.reason_code.as_deref()),
                &event.status.map(CashoutStatus::as_str),
                &event.applied,
                &event.received_at,
                &cashout_id,
            ],
        )
        .await?;
    if updated == 1 {
        Ok(())
    } else {
        Err(TxError::Store(StoreError::Database(format!(
            "the event {} claimed by this delivery is missing",
            event.event_id
        ))))
    }
}

/// Inserts an event row (a poll's) with the cash-out's after-snapshot.
async fn insert_event(
    tx: &PgTransaction<'_>,
    provider: &str,
    cashout_id: Option<i64>,
    event: &NewEvent<'_>,
) -> TxResult<()> {
    let observation = event.observation;
    let delivery = event.delivery;
    let secret_index = delivery.map(|d| i64::try_from(d.secret_index).unwrap_or(i64::MAX));
    tx.execute(
        &cached(
            tx,
            "INSERT INTO events (event_id, provider, source, dedup_key, body_sha256, raw_body, headers, secret_index,
                             outcome, error, provider_ref, raw_status, reason_code, status, applied, received_at,
                             cashout_id, book_at, after_status, after_provider_status, after_external_id,
                             after_amount_minor, after_currency, after_fee_minor, after_net_minor, after_created_at,
                             after_updated_at, after_completed_at, after_webhooks, after_recovered)
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $16,
                c.status, c.provider_status, c.external_id, c.amount_minor, c.currency, c.fee_minor, c.net_minor,
                c.created_at, c.updated_at, c.completed_at, c.webhook_count, c.recovered_by_poll
         FROM (SELECT 1) AS one LEFT JOIN cashouts c ON c.id = $17",
        )
        .await?,
        &[
            &event.event_id,
            &provider,
            &event.source.as_str(),
            &delivery.map(|d| d.dedup_key.as_str()),
            &delivery.map(|d| d.body_sha256.as_str()),
            &delivery.map(|d| d.raw_body.as_slice()),
            &delivery.map(|d| d.headers_json.as_str()),
            &secret_index,
            &event.outcome.as_str(),
            &event.error,
            &observation.map(|o| o.provider_ref.as_str()),
            &observation.and_then(|o| o.raw_status.as_deref()),
            &observation.and_then(|o| o.reason_code.as_deref()),
            &event.status.map(CashoutStatus::as_str),
            &event.applied,
            &event.received_at,
            &cashout_id,
        ],
    )
    .await?;
    Ok(())
}

/// Drops a polled event's snapshot when it equals the cash-out's latest earlier one
/// ([`PolledSnapshot::DropIfUnchanged`]), as the SQLite store does: the poll stays on the
/// timeline, the report's point-in-time read finds the earlier, identical snapshot.
async fn drop_snapshot_if_unchanged(
    tx: &PgTransaction<'_>,
    event_id: &str,
    cashout_id: i64,
) -> TxResult<()> {
    tx.execute(
        &cached(
            tx,
            "UPDATE events SET after_status = NULL, after_provider_status = NULL, after_external_id = NULL,
                    after_amount_minor = NULL, after_currency = NULL, after_fee_minor = NULL,
                    after_net_minor = NULL, after_created_at = NULL, after_updated_at = NULL,
                    after_completed_at = NULL, after_webhooks = NULL, after_recovered = NULL
             WHERE event_id = $1 AND EXISTS (
                 SELECT 1 FROM events p
                 WHERE p.seq = (SELECT e.seq FROM events e
                                WHERE e.cashout_id = $2 AND e.after_status IS NOT NULL AND e.event_id <> $1
                                ORDER BY e.book_at DESC, e.seq DESC LIMIT 1)
                   AND p.after_status IS NOT DISTINCT FROM events.after_status
                   AND p.after_provider_status IS NOT DISTINCT FROM events.after_provider_status
                   AND p.after_external_id IS NOT DISTINCT FROM events.after_external_id
                   AND p.after_amount_minor IS NOT DISTINCT FROM events.after_amount_minor
                   AND p.after_currency IS NOT DISTINCT FROM events.after_currency
                   AND p.after_fee_minor IS NOT DISTINCT FROM events.after_fee_minor
                   AND p.after_net_minor IS NOT DISTINCT FROM events.after_net_minor
                   AND p.after_created_at IS NOT DISTINCT FROM events.after_created_at
                   AND p.after_updated_at IS NOT DISTINCT FROM events.after_updated_at
                   AND p.after_completed_at IS NOT DISTINCT FROM events.after_completed_at
                   AND p.after_webhooks IS NOT DISTINCT FROM events.after_webhooks
                   AND p.after_recovered IS NOT DISTINCT FROM events.after_recovered)",
        )
        .await?,
        &[&event_id, &cashout_id],
    )
    .await?;
    Ok(())
}

/// Rewrites a reprocessed event in place: its outcome and observation, the cash-out's
/// current state as its snapshot, and its book time (it enters the book now).
async fn rewrite_event(
    tx: &PgTransaction<'_>,
    event: &NewEvent<'_>,
    cashout_id: Option<i64>,
) -> TxResult<()> {
    let observation = event.observation;
    tx.execute(
        &cached(
            tx,
            "UPDATE events SET outcome = $2, error = NULL, provider_ref = $3, raw_status = $4, reason_code = $5,
                status = $6, applied = $7, cashout_id = $8
         WHERE event_id = $1",
        )
        .await?,
        &[
            &event.event_id,
            &event.outcome.as_str(),
            &observation.map(|o| o.provider_ref.as_str()),
            &observation.and_then(|o| o.raw_status.as_deref()),
            &observation.and_then(|o| o.reason_code.as_deref()),
            &event.status.map(CashoutStatus::as_str),
            &event.applied,
            &cashout_id,
        ],
    )
    .await?;
    let sql = format!(
        "UPDATE events SET book_at = $2, {} WHERE event_id = $1",
        snapshot("events.cashout_id")
    );
    tx.execute(
        &cached(tx, sql.as_str()).await?,
        &[&event.event_id, &event.received_at],
    )
    .await?;
    Ok(())
}
