//! Store operations of ingestion, run by the writer thread inside its transaction: each
//! entry point loads what [`crate::ingest::plan`] needs, asks it, and applies the plan.
//! No rule lives here.
//!
//! The atomic operations a second backend must provide (SQLite runs them in the writer's
//! one transaction per group, each job under a savepoint; a backend with concurrent
//! writers runs one job per transaction and must make each a claim, not a read-then-write):
//!
//! - [`delivery_with_dedup_key`]: the event holding (provider, dedup key). Concurrent
//!   backends claim it instead (the unique key on `events (provider, dedup_key)` with
//!   `ON CONFLICT … DO NOTHING RETURNING`, answering the holder when taken).
//! - [`claim_nonce`]: claim (provider, nonce) in the replay cache unless held; answers
//!   [`NonceClaim::Claimed`] or the holder's event id and body hash. (SQLite keeps the
//!   cache in memory, following the writer's transaction, and the nonce on the event row:
//!   see [`super::replay_index`].)
//! - [`cashout_for_update`]: the cash-out with (provider, provider_ref), locked until the
//!   commit (`SELECT … FOR UPDATE`; SQLite's writer is the lock).
//! - [`ledger_external_id`]: the external id of the one ledger entry naming a provider ref.
//! - [`thin_fetch_pending`]: whether a thin notification's fetch of a cash-out is queued.
//! - [`insert_cashout`], [`advance_cashout`], [`fill_in_cashout`]: the three writes of a
//!   [`CashoutChange`] (an insert returns the row id and links earlier thin events).
//! - [`open_finding`]: open a mismatch unless one of its kind is open for the cash-out,
//!   or record one already resolved.
//! - [`queue_status_fetch`]: queue a fetch unless queued or the provider's queue is full.
//! - [`insert_event`]: the event row with a snapshot of its cash-out after the change.
//! - [`quarantined_event_provider`], [`set_event_error`], [`rewrite_event`] (with its
//!   snapshot and book time), [`queue_reconcile`]: reprocessing.
//! - [`set_external_id_if_unset`]: a ledger entry naming a cash-out without an external id.
//! - `polling::mark_status_checked`, `polling::complete_fetch`: poll bookkeeping.

use chrono::{DateTime, Utc};
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, ToSql};

use super::findings::open_mismatch;
use super::writer::WriteTx;
use super::{polling, to_millis, StoreError};
use crate::ingest::plan::{
    self, CashoutChange, ConflictMark, FindingToOpen, Loaded, NewEvent, NonceClaim,
    ObservationPlan, PollIntake, PollKind, PolledSnapshot, PriorDelivery, ReprocessPlan,
    StoredCashout, WebhookLoaded, WebhookPlan,
};
use crate::ingest::{Applied, EventOutcome, FetchReason, IngestOutcome, WebhookRecord};
use crate::providers::Observation;
use crate::state::{CashoutStatus, CurrentState};

/// Dedup, replay check, then quarantine or apply; all inside the caller's transaction.
pub(super) fn ingest_webhook(
    tx: &WriteTx<'_, '_>,
    record: &WebhookRecord,
) -> Result<IngestOutcome, StoreError> {
    let mut loaded = WebhookLoaded {
        prior: delivery_with_dedup_key(tx, &record.provider, &record.dedup_key)?,
        ..WebhookLoaded::default()
    };
    if loaded.prior.is_none() {
        if let Some(nonce) = &record.nonce {
            loaded.nonce = Some(claim_nonce(tx, record, nonce)?);
        }
    }
    if loaded.admission(&record.body_sha256) == plan::Admission::Admit {
        if let Ok(observation) = &record.parsed {
            loaded.observation = load_for(tx, &record.provider, observation)?;
        }
    }
    match plan::plan_webhook(record, loaded) {
        WebhookPlan::Duplicate { event_id } => Ok(IngestOutcome::Duplicate { event_id }),
        WebhookPlan::Replayed => Ok(IngestOutcome::Replayed),
        WebhookPlan::Quarantine { event, reason } => {
            insert_event(tx, &record.provider, CashoutAfter::None, &event)?;
            Ok(IngestOutcome::Quarantined {
                event_id: record.event_id.clone(),
                reason: reason.to_string(),
            })
        }
        WebhookPlan::Apply(plan) => {
            let (applied, after) = apply_effects(tx, &record.provider, &plan)?;
            insert_event(tx, &record.provider, after, &plan.event)?;
            Ok(IngestOutcome::Accepted {
                event_id: record.event_id.clone(),
                applied,
            })
        }
    }
}

/// Applies a polled observation and logs it as a `poll` event (a recovered
/// `missed_webhook` when the plan says so), then the fetch-queue bookkeeping.
pub(super) fn record_poll(
    connection: &WriteTx<'_, '_>,
    provider: &str,
    observation: &Observation,
    kind: PollKind,
    counts_as_missed: bool,
    at: DateTime<Utc>,
) -> Result<Applied, StoreError> {
    let thin_fetch_pending = thin_fetch_pending(connection, provider, &observation.provider_ref)?;
    let loaded = load_for(connection, provider, observation)?;
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
    let (applied, after) = apply_effects(connection, provider, &plan.apply)?;
    insert_event(connection, provider, after, &plan.apply.event)?;
    if let (PolledSnapshot::DropIfUnchanged, Some(cashout_id)) = (plan.snapshot, applied.cashout_id)
    {
        drop_snapshot_if_unchanged(connection, &event_id, cashout_id)?;
    }
    if plan.mark_checked {
        polling::mark_status_checked(connection, provider, &observation.provider_ref, at)?;
    }
    if plan.complete_fetch {
        polling::complete_fetch(connection, provider, &observation.provider_ref)?;
    }
    Ok(applied)
}

/// Re-runs a quarantined event with a new parse result.
pub(super) fn reprocess(
    connection: &WriteTx<'_, '_>,
    event_id: &str,
    parsed: &Result<Observation, String>,
    at: DateTime<Utc>,
) -> Result<Option<IngestOutcome>, StoreError> {
    let provider = quarantined_event_provider(connection, event_id)?;
    let loaded = match (&provider, parsed) {
        (Some(provider), Ok(observation)) => load_for(connection, provider, observation)?,
        _ => Loaded::default(),
    };
    let now = to_millis(at);
    match plan::plan_reprocess(provider.as_deref(), event_id, parsed, now, loaded) {
        ReprocessPlan::NotQuarantined => Ok(None),
        ReprocessPlan::StillQuarantined { reason } => {
            set_event_error(connection, event_id, reason)?;
            Ok(Some(IngestOutcome::Quarantined {
                event_id: event_id.to_string(),
                reason: reason.to_string(),
            }))
        }
        ReprocessPlan::Apply(plan) => {
            let provider = provider.as_deref().unwrap_or_default();
            let (applied, _) = apply_effects(connection, provider, &plan)?;
            rewrite_event(connection, &plan.event, applied.cashout_id)?;
            if let Some(cashout_id) = applied.cashout_id {
                queue_reconcile(connection, cashout_id)?;
            }
            Ok(Some(IngestOutcome::Accepted {
                event_id: event_id.to_string(),
                applied,
            }))
        }
    }
}

/// Gives a cash-out without a platform id the `external_id` of the ledger entry that
/// names it, recording the change on its timeline (source `ledger`). Returns whether it
/// changed anything.
pub(super) fn link_to_ledger(
    connection: &WriteTx<'_, '_>,
    provider: &str,
    provider_ref: &str,
    external_id: &str,
    at: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let now = to_millis(at);
    let Some(cashout_id) =
        set_external_id_if_unset(connection, provider, provider_ref, external_id, now)?
    else {
        return Ok(false);
    };
    let event_id = uuid::Uuid::now_v7().to_string();
    let mut observation = Observation::new(provider_ref);
    observation.external_id = Some(external_id.to_string());
    let event = plan::plan_ledger_link(&event_id, &observation, now);
    insert_event(
        connection,
        provider,
        CashoutAfter::Stored(cashout_id),
        &event,
    )?;
    Ok(true)
}

/// What [`plan::plan_observation`] needs about `observation`'s cash-out.
fn load_for(
    connection: &WriteTx<'_, '_>,
    provider: &str,
    observation: &Observation,
) -> Result<Loaded, StoreError> {
    let cashout = cashout_for_update(connection, provider, &observation.provider_ref)?;
    let ledger_external_id = if plan::needs_ledger_external_id(cashout, observation) {
        ledger_external_id(connection, provider, &observation.provider_ref)?
    } else {
        None
    };
    Ok(Loaded {
        cashout,
        ledger_external_id,
    })
}

/// Applies a plan's cash-out change, findings and fetches (not its event); also says
/// what its event's snapshot copies.
fn apply_effects(
    connection: &WriteTx<'_, '_>,
    provider: &str,
    plan: &ObservationPlan<'_>,
) -> Result<(Applied, CashoutAfter), StoreError> {
    let observation = plan.observation;
    let now = plan.event.received_at;
    // Findings and fetches leave the cash-out's row as the change wrote it.
    let after = match &plan.change {
        CashoutChange::Nothing { id } => id.map_or(CashoutAfter::None, CashoutAfter::Stored),
        CashoutChange::Insert {
            external_id,
            state,
            completed_at,
            webhook,
            recovered,
            link_earlier_events,
        } => {
            let (id, snapshot) = insert_cashout(
                connection,
                provider,
                observation,
                &NewCashout {
                    external_id: external_id.as_deref(),
                    state: *state,
                    completed_at: *completed_at,
                    webhook: *webhook,
                    recovered: *recovered,
                    link_earlier_events: *link_earlier_events,
                    now,
                },
            )?;
            CashoutAfter::Inserted {
                id,
                snapshot: Box::new(snapshot),
            }
        }
        CashoutChange::Advance {
            id,
            state,
            completed_at,
            webhook,
            recovered,
        } => {
            advance_cashout(
                connection,
                *id,
                observation,
                &CashoutAdvance {
                    state: *state,
                    completed_at: *completed_at,
                    webhook: *webhook,
                    recovered: *recovered,
                    now,
                },
            )?;
            CashoutAfter::Stored(*id)
        }
        CashoutChange::FillIn {
            id,
            webhook,
            conflict,
        } => {
            fill_in_cashout(connection, *id, observation, *webhook, *conflict, now)?;
            CashoutAfter::Stored(*id)
        }
    };
    let cashout_id = after.id();
    for finding in &plan.findings {
        open_finding(connection, provider, observation, finding, now)?;
    }
    let mut status_fetch_queued = false;
    for fetch in &plan.fetches {
        status_fetch_queued |= queue_status_fetch(
            connection,
            provider,
            &observation.provider_ref,
            fetch.reason,
            fetch.max_pending.unwrap_or(usize::MAX),
            now,
        )?;
    }
    let applied = Applied {
        transition: plan.transition,
        status: plan.status,
        status_fetch_queued,
        event_id: plan.event.event_id.to_string(),
        missed_webhook: plan.missed_webhook,
        cashout_id,
    };
    Ok((applied, after))
}

/// The event holding (provider, dedup key).
pub(super) fn delivery_with_dedup_key(
    connection: &WriteTx<'_, '_>,
    provider: &str,
    dedup_key: &str,
) -> Result<Option<PriorDelivery>, StoreError> {
    Ok(connection
        .statement(
            "SELECT event_id, body_sha256 FROM events WHERE provider = ?1 AND dedup_key = ?2",
        )?
        .query_row(params![provider, dedup_key], |row| {
            Ok(PriorDelivery {
                event_id: row.get(0)?,
                body_sha256: row.get(1)?,
            })
        })
        .optional()?)
}

/// Claims a signed request's nonce for `record` in the writer's replay index (no
/// statement when it is new, the usual case), else reads the holder's body hash.
pub(super) fn claim_nonce(
    tx: &WriteTx<'_, '_>,
    record: &WebhookRecord,
    nonce: &str,
) -> Result<NonceClaim, StoreError> {
    let holder = tx.replay().claim(
        &record.provider,
        nonce,
        &record.event_id,
        to_millis(record.received_at),
    );
    let Some(event_id) = holder else {
        return Ok(NonceClaim::Claimed);
    };
    // The holder's event row is committed, or written earlier in this transaction.
    let body_sha256 = tx
        .prepare_cached("SELECT body_sha256 FROM events WHERE event_id = ?1")?
        .query_row(params![event_id], |row| row.get::<_, Option<String>>(0))
        .optional()?
        .flatten();
    Ok(NonceClaim::Taken(PriorDelivery {
        event_id,
        body_sha256,
    }))
}

/// The cash-out an observation is judged against (the writer holds the only write lock).
pub(super) fn cashout_for_update(
    connection: &WriteTx<'_, '_>,
    provider: &str,
    provider_ref: &str,
) -> Result<Option<StoredCashout>, StoreError> {
    let row: Option<(i64, String, bool)> = connection
        .statement(
            "SELECT id, status, held FROM cashouts WHERE provider = ?1 AND provider_ref = ?2",
        )?
        .query_row(params![provider, provider_ref], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    row.map(|(id, status, held)| {
        let status: CashoutStatus = status
            .parse()
            .map_err(|err: crate::state::UnknownStatus| StoreError::Database(err.to_string()))?;
        Ok(StoredCashout {
            id,
            state: CurrentState { status, held },
        })
    })
    .transpose()
}

/// Whether a thin notification asked for this cash-out's status and is still waiting.
pub(super) fn thin_fetch_pending(
    connection: &WriteTx<'_, '_>,
    provider: &str,
    provider_ref: &str,
) -> Result<bool, StoreError> {
    Ok(connection
        .statement(
            "SELECT 1 FROM status_fetch_queue WHERE provider = ?1 AND provider_ref = ?2 AND reason = ?3",
        )?
        .query_row(
            params![provider, provider_ref, FetchReason::ThinNotification.as_str()],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// The external id of the one ledger entry naming `provider_ref`, if exactly one does.
pub(super) fn ledger_external_id(
    connection: &WriteTx<'_, '_>,
    provider: &str,
    provider_ref: &str,
) -> Result<Option<String>, StoreError> {
    let mut statement = connection.statement(
        "SELECT external_id FROM ledger WHERE provider = ?1 AND provider_ref = ?2 LIMIT 2",
    )?;
    let ids = statement
        .query_map(params![provider, provider_ref], |row| {
            row.get::<_, String>(0)
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match <[String; 1]>::try_from(ids) {
        Ok([id]) => Some(id),
        Err(_) => None,
    })
}

/// The computed columns of a new cash-out (facts come from the observation).
pub(super) struct NewCashout<'a> {
    pub external_id: Option<&'a str>,
    pub state: CurrentState,
    pub completed_at: Option<i64>,
    pub webhook: bool,
    pub recovered: bool,
    pub link_earlier_events: bool,
    pub now: i64,
}

/// Inserts a new cash-out, links the events that arrived before it (thin notifications)
/// when asked, and returns its row id with its snapshot columns: the values inserted,
/// so its event needs no read of the row.
pub(super) fn insert_cashout(
    connection: &WriteTx<'_, '_>,
    provider: &str,
    observation: &Observation,
    row: &NewCashout<'_>,
) -> Result<(i64, Snapshot), StoreError> {
    let snapshot: Snapshot = [
        row.state.status.as_str().to_string().into(),
        observation.raw_status.clone().into(),
        row.external_id.map(str::to_string).into(),
        observation.amount.map(|m| m.minor).into(),
        observation
            .amount
            .map(|m| m.currency.code().to_string())
            .into(),
        observation.fee_minor.into(),
        observation.net_minor.into(),
        observation.created_at.map_or(row.now, to_millis).into(),
        row.now.into(),
        row.completed_at.into(),
        i64::from(row.webhook).into(),
        i64::from(row.recovered).into(),
    ];
    let [status, provider_status, external_id, amount_minor, currency, fee_minor, net_minor, created_at, updated_at, completed_at, webhook_count, recovered_by_poll] =
        &snapshot;
    connection
        .statement(
            "INSERT INTO cashouts (provider, provider_ref, external_id, status, held, provider_status, reason_code,
                                   amount_minor, currency, fee_minor, created_at, provider_created_at,
                                   provider_updated_at, first_seen_at, updated_at, completed_at, webhook_count,
                                   recovered_by_poll, method, net_minor, book_changed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?14)",
        )?
        .execute(params![
            provider,
            observation.provider_ref,
            external_id,
            status,
            row.state.held,
            provider_status,
            observation.reason_code,
            amount_minor,
            currency,
            fee_minor,
            created_at,
            observation.created_at.map(to_millis),
            observation.updated_at.map(to_millis),
            row.now,
            updated_at,
            completed_at,
            webhook_count,
            recovered_by_poll,
            observation.method,
            net_minor,
        ])?;
    let id = connection.last_insert_rowid();
    if row.link_earlier_events {
        connection
            .statement(
                "UPDATE events SET cashout_id = ?1 WHERE provider = ?2 AND provider_ref = ?3 AND cashout_id IS NULL",
            )?
            .execute(params![id, provider, observation.provider_ref])?;
    }
    Ok((id, snapshot))
}

/// The computed columns of a state change (facts come from the observation).
pub(super) struct CashoutAdvance {
    pub state: CurrentState,
    pub completed_at: Option<i64>,
    pub webhook: bool,
    pub recovered: bool,
    pub now: i64,
}

/// Moves a cash-out to a new state with every fact the observation brings.
pub(super) fn advance_cashout(
    connection: &WriteTx<'_, '_>,
    id: i64,
    observation: &Observation,
    change: &CashoutAdvance,
) -> Result<(), StoreError> {
    connection
        .statement(
            "UPDATE cashouts SET status = ?2, held = ?3, provider_status = ?4, reason_code = ?5,
                amount_minor = COALESCE(?6, amount_minor), currency = COALESCE(?7, currency),
                fee_minor = COALESCE(?8, fee_minor), external_id = COALESCE(external_id, ?9),
                provider_created_at = COALESCE(provider_created_at, ?10),
                created_at = COALESCE(provider_created_at, ?10, created_at),
                provider_updated_at = COALESCE(?11, provider_updated_at),
                completed_at = COALESCE(?12, completed_at),
                updated_at = ?13, webhook_count = webhook_count + ?14,
                recovered_by_poll = recovered_by_poll + ?15,
                method = COALESCE(?16, method), net_minor = COALESCE(?17, net_minor),
                conflict_status = NULL, book_changed_at = ?13
             WHERE id = ?1",
        )?
        .execute(params![
            id,
            change.state.status.as_str(),
            change.state.held,
            observation.raw_status,
            observation.reason_code,
            observation.amount.map(|m| m.minor),
            observation.amount.map(|m| m.currency.code()),
            observation.fee_minor,
            observation.external_id,
            observation.created_at.map(to_millis),
            observation.updated_at.map(to_millis),
            change.completed_at,
            change.now,
            i64::from(change.webhook),
            i64::from(change.recovered),
            observation.method,
            observation.net_minor,
        ])?;
    Ok(())
}

/// Fills facts the cash-out lacked without touching its state.
pub(super) fn fill_in_cashout(
    connection: &WriteTx<'_, '_>,
    id: i64,
    observation: &Observation,
    webhook: bool,
    conflict: ConflictMark,
    now: i64,
) -> Result<(), StoreError> {
    let (set_conflict, conflict_status) = match conflict {
        ConflictMark::Set(reported) => (true, Some(reported.as_str())),
        ConflictMark::Clear => (true, None),
        ConflictMark::Keep => (false, None),
    };
    connection
        .statement(
            "UPDATE cashouts SET
                amount_minor = COALESCE(amount_minor, ?2), currency = COALESCE(currency, ?3),
                fee_minor = COALESCE(fee_minor, ?4), external_id = COALESCE(external_id, ?5),
                provider_created_at = COALESCE(provider_created_at, ?6),
                created_at = COALESCE(provider_created_at, ?6, created_at),
                webhook_count = webhook_count + ?7,
                method = COALESCE(method, ?8), net_minor = COALESCE(net_minor, ?9),
                conflict_status = CASE WHEN ?10 THEN ?11 ELSE conflict_status END,
                book_changed_at = ?12
             WHERE id = ?1",
        )?
        .execute(params![
            id,
            observation.amount.map(|m| m.minor),
            observation.amount.map(|m| m.currency.code()),
            observation.fee_minor,
            observation.external_id,
            observation.created_at.map(to_millis),
            i64::from(webhook),
            observation.method,
            observation.net_minor,
            set_conflict,
            conflict_status,
            now,
        ])?;
    Ok(())
}

/// Opens a finding about the observation's cash-out: an open one unless one of its kind
/// is open, or one already resolved (always recorded).
pub(super) fn open_finding(
    connection: &WriteTx<'_, '_>,
    provider: &str,
    observation: &Observation,
    finding: &FindingToOpen,
    at: i64,
) -> Result<(), StoreError> {
    if !finding.resolved {
        return open_mismatch(
            connection,
            finding.kind.as_str(),
            provider,
            &observation.provider_ref,
            observation.external_id.as_deref(),
            &finding.detail,
            at,
        );
    }
    connection
        .prepare_cached(
            "INSERT INTO mismatches (kind, provider, subject, provider_ref, external_id, detail, opened_at, resolved_at)
             VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?6)",
        )?
        .execute(params![
            finding.kind.as_str(),
            provider,
            observation.provider_ref,
            observation.external_id,
            finding.detail,
            at,
        ])?;
    Ok(())
}

/// Queues a status fetch unless one is queued or the provider's queue is full.
pub(super) fn queue_status_fetch(
    connection: &WriteTx<'_, '_>,
    provider: &str,
    provider_ref: &str,
    reason: FetchReason,
    max_pending: usize,
    at: i64,
) -> Result<bool, StoreError> {
    if max_pending != usize::MAX {
        let pending: i64 = connection
            .statement("SELECT COUNT(*) FROM status_fetch_queue WHERE provider = ?1")?
            .query_row(params![provider], |row| row.get(0))?;
        if pending as usize >= max_pending {
            return Ok(false);
        }
    }
    let inserted = connection
        .statement(
            "INSERT OR IGNORE INTO status_fetch_queue (provider, provider_ref, reason, requested_at, next_attempt_at)
             VALUES (?1, ?2, ?3, ?4, ?4)",
        )?
        .execute(params![provider, provider_ref, reason.as_str(), at])?;
    Ok(inserted > 0)
}

/// How many cash-out columns an event copies as its `after_*` snapshot.
const SNAPSHOT_COLUMNS: usize = 12;

/// A cash-out's snapshot columns (see [`cashout_snapshot`] for their order).
pub(super) type Snapshot = [Value; SNAPSHOT_COLUMNS];

/// The cash-out an event is logged against, for the event's snapshot of it.
pub(super) enum CashoutAfter {
    /// None (a quarantined event): the snapshot is empty.
    None,
    /// This row, read as it stands now.
    Stored(i64),
    /// This row, just inserted with these columns (read back, they are the same values).
    Inserted { id: i64, snapshot: Box<Snapshot> },
}

impl CashoutAfter {
    fn id(&self) -> Option<i64> {
        match self {
            CashoutAfter::None => None,
            CashoutAfter::Stored(id) | CashoutAfter::Inserted { id, .. } => Some(*id),
        }
    }
}

/// The cash-out's snapshot columns as stored (status, provider status, external id, amount,
/// currency, fee, net, created, updated, completed, webhooks, recovered); all NULL without
/// a cash-out.
fn cashout_snapshot(
    connection: &WriteTx<'_, '_>,
    cashout_id: Option<i64>,
) -> Result<Snapshot, StoreError> {
    let mut snapshot = std::array::from_fn(|_| Value::Null);
    let Some(cashout_id) = cashout_id else {
        return Ok(snapshot);
    };
    connection
        .statement(
            "SELECT status, provider_status, external_id, amount_minor, currency, fee_minor, net_minor,
                    created_at, updated_at, completed_at, webhook_count, recovered_by_poll
             FROM cashouts WHERE id = ?1",
        )?
        .query_row(params![cashout_id], |row| {
            for (index, value) in snapshot.iter_mut().enumerate() {
                *value = row.get(index)?;
            }
            Ok(())
        })
        .optional()?;
    Ok(snapshot)
}

/// Inserts an event row; the cash-out as it stands after this event is copied beside
/// it: a day's report reads the latest copy before the day's end (SPEC §6, point in time).
///
/// The snapshot is the values just inserted for a new cash-out, else read first; the row
/// is inserted with `VALUES`: an `INSERT … SELECT` is a multi-row write to SQLite, which
/// opens a statement journal for it and copies every page the insert touches into that
/// journal first (about a tenth of the writer's time under wrk).
pub(super) fn insert_event(
    connection: &WriteTx<'_, '_>,
    provider: &str,
    cashout: CashoutAfter,
    event: &NewEvent<'_>,
) -> Result<(), StoreError> {
    let observation = event.observation;
    let delivery = event.delivery;
    let cashout_id = cashout.id();
    let snapshot = match cashout {
        CashoutAfter::Inserted { snapshot, .. } => *snapshot,
        CashoutAfter::None | CashoutAfter::Stored(_) => cashout_snapshot(connection, cashout_id)?,
    };
    connection
        .statement(
            "INSERT INTO events (event_id, provider, source, dedup_key, body_sha256, raw_body, headers, secret_index,
                                 outcome, error, provider_ref, raw_status, reason_code, status, applied, received_at,
                                 cashout_id, book_at, after_status, after_provider_status, after_external_id,
                                 after_amount_minor, after_currency, after_fee_minor, after_net_minor, after_created_at,
                                 after_updated_at, after_completed_at, after_webhooks, after_recovered, replay_nonce)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?16,
                     ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?18)",
        )?
        .execute(params_from_iter(
            params![
                event.event_id,
                provider,
                event.source.as_str(),
                delivery.map(|d| d.dedup_key.as_str()),
                delivery.map(|d| d.body_sha256.as_str()),
                delivery.map(|d| d.raw_body.as_slice()),
                delivery.map(|d| d.headers_json.as_str()),
                delivery.map(|d| d.secret_index as i64),
                event.outcome.as_str(),
                event.error,
                observation.map(|o| o.provider_ref.as_str()),
                observation.and_then(|o| o.raw_status.as_deref()),
                observation.and_then(|o| o.reason_code.as_deref()),
                event.status.map(CashoutStatus::as_str),
                event.applied,
                event.received_at,
                cashout_id,
                delivery.and_then(|d| d.nonce.as_deref()),
            ]
            .iter()
            .copied()
            // ?19 … ?30: the snapshot, in its column order.
            .chain(snapshot.iter().map(|value| value as &dyn ToSql)),
        ))?;
    Ok(())
}

/// Drops a polled event's snapshot when it equals the cash-out's latest earlier one
/// ([`PolledSnapshot::DropIfUnchanged`]): a poll that changed nothing (a sweep's overlap,
/// a recheck) stays on the timeline but is no change of the book, so it does not list the
/// cash-out in that day's report (SPEC §6: created, changed or flagged). The report's
/// point-in-time read then finds the earlier, identical snapshot.
fn drop_snapshot_if_unchanged(
    connection: &WriteTx<'_, '_>,
    event_id: &str,
    cashout_id: i64,
) -> Result<(), StoreError> {
    connection
        .prepare_cached(
            "UPDATE events SET after_status = NULL, after_provider_status = NULL, after_external_id = NULL,
                    after_amount_minor = NULL, after_currency = NULL, after_fee_minor = NULL,
                    after_net_minor = NULL, after_created_at = NULL, after_updated_at = NULL,
                    after_completed_at = NULL, after_webhooks = NULL, after_recovered = NULL
             WHERE event_id = ?1 AND EXISTS (
                 SELECT 1 FROM events p
                 WHERE p.seq = (SELECT e.seq FROM events e
                                WHERE e.cashout_id = ?2 AND e.after_status IS NOT NULL AND e.event_id <> ?1
                                ORDER BY e.book_at DESC, e.seq DESC LIMIT 1)
                   AND p.after_status IS events.after_status
                   AND p.after_provider_status IS events.after_provider_status
                   AND p.after_external_id IS events.after_external_id
                   AND p.after_amount_minor IS events.after_amount_minor
                   AND p.after_currency IS events.after_currency
                   AND p.after_fee_minor IS events.after_fee_minor
                   AND p.after_net_minor IS events.after_net_minor
                   AND p.after_created_at IS events.after_created_at
                   AND p.after_updated_at IS events.after_updated_at
                   AND p.after_completed_at IS events.after_completed_at
                   AND p.after_webhooks IS events.after_webhooks
                   AND p.after_recovered IS events.after_recovered)",
        )?
        .execute(params![event_id, cashout_id])?;
    Ok(())
}

/// The provider of a quarantined event.
pub(super) fn quarantined_event_provider(
    connection: &WriteTx<'_, '_>,
    event_id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(connection
        .prepare_cached("SELECT provider FROM events WHERE event_id = ?1 AND outcome = ?2")?
        .query_row(
            params![event_id, EventOutcome::Quarantined.as_str()],
            |row| row.get(0),
        )
        .optional()?)
}

/// Keeps a quarantined event quarantined with a new reason.
pub(super) fn set_event_error(
    connection: &WriteTx<'_, '_>,
    event_id: &str,
    reason: &str,
) -> Result<(), StoreError> {
    connection
        .prepare_cached("UPDATE events SET error = ?2 WHERE event_id = ?1")?
        .execute(params![event_id, reason])?;
    Ok(())
}

/// Rewrites a reprocessed event in place: its outcome and observation, then the
/// cash-out's current state as its snapshot, and its book time (it enters the book when
/// it is reprocessed).
pub(super) fn rewrite_event(
    connection: &WriteTx<'_, '_>,
    event: &NewEvent<'_>,
    cashout_id: Option<i64>,
) -> Result<(), StoreError> {
    let observation = event.observation;
    connection
        .prepare_cached(
            "UPDATE events SET outcome = ?2, error = NULL, provider_ref = ?3, raw_status = ?4, reason_code = ?5,
                    status = ?6, applied = ?7, cashout_id = ?8
             WHERE event_id = ?1",
        )?
        .execute(params![
            event.event_id,
            event.outcome.as_str(),
            observation.map(|o| o.provider_ref.as_str()),
            observation.and_then(|o| o.raw_status.as_deref()),
            observation.and_then(|o| o.reason_code.as_deref()),
            event.status.map(CashoutStatus::as_str),
            event.applied,
            cashout_id,
        ])?;
    connection
        .prepare_cached(
            "UPDATE events SET book_at = ?2,
                (after_status, after_provider_status, after_external_id, after_amount_minor, after_currency,
                 after_fee_minor, after_net_minor, after_created_at, after_updated_at, after_completed_at,
                 after_webhooks, after_recovered) =
                (SELECT c.status, c.provider_status, c.external_id, c.amount_minor, c.currency, c.fee_minor,
                        c.net_minor, c.created_at, c.updated_at, c.completed_at, c.webhook_count, c.recovered_by_poll
                 FROM cashouts c WHERE c.id = events.cashout_id)
             WHERE event_id = ?1",
        )?
        .execute(params![event.event_id, event.received_at])?;
    Ok(())
}

/// Queues a cash-out for the next reconciliation pass.
pub(super) fn queue_reconcile(connection: &Connection, cashout_id: i64) -> Result<(), StoreError> {
    connection
        .prepare_cached("INSERT OR IGNORE INTO reconcile_queue (cashout_id) VALUES (?1)")?
        .execute(params![cashout_id])?;
    Ok(())
}

/// Sets a cash-out's external id when it has none; its row id when it did.
pub(super) fn set_external_id_if_unset(
    connection: &WriteTx<'_, '_>,
    provider: &str,
    provider_ref: &str,
    external_id: &str,
    at: i64,
) -> Result<Option<i64>, StoreError> {
    Ok(connection
        .prepare_cached(
            "UPDATE cashouts SET external_id = ?3, book_changed_at = ?4
             WHERE provider = ?1 AND provider_ref = ?2 AND external_id IS NULL RETURNING id",
        )?
        .query_row(params![provider, provider_ref, external_id, at], |row| {
            row.get(0)
        })
        .optional()?)
}
