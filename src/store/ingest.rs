//! Write-side operations run by the writer thread: webhook ingestion, the state rule
//! applied to stored cash-outs, reprocessing, and the status-fetch queue.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::findings::open_mismatch;
use super::{to_millis, StoreError};
use crate::providers::Observation;
use crate::state::{decide, CashoutStatus, CurrentState, Transition};

/// A verified webhook, ready to be committed.
#[derive(Debug, Clone)]
pub struct WebhookRecord {
    /// Generated before the write; returned to the provider when accepted.
    pub event_id: String,
    pub provider: String,
    /// The provider's event id, else the SHA-256 of the body.
    pub dedup_key: String,
    /// The signed request id, when the scheme has one (replay cache key).
    pub nonce: Option<String>,
    pub body_sha256: String,
    pub raw_body: Vec<u8>,
    /// The headers that matter, as a JSON object (credentials excluded).
    pub headers_json: String,
    /// Which configured secret (or key) verified it.
    pub secret_index: usize,
    pub received_at: DateTime<Utc>,
    /// The observation, or why the payload could not be parsed (quarantine).
    pub parsed: Result<Observation, String>,
}

/// How a webhook was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestOutcome {
    /// New and committed; `applied` says what it did to the cash-out.
    Accepted { event_id: String, applied: Applied },
    /// Seen before (same dedup key, same body): the first one's id.
    Duplicate { event_id: String },
    /// Its request id was already used with a different body.
    Replayed,
    /// Verified but not parseable: raw bytes kept, state untouched.
    Quarantined { event_id: String, reason: String },
}

/// Where an observation came from (the event's `source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObservationSource {
    Webhook,
    Poll,
    /// A ledger registration that named the cash-out (it took the ledger's external_id).
    Ledger,
}

impl ObservationSource {
    fn as_str(self) -> &'static str {
        match self {
            ObservationSource::Webhook => "webhook",
            ObservationSource::Poll => "poll",
            ObservationSource::Ledger => "ledger",
        }
    }
}

/// What applying one observation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// `None` for a thin notification (no state to judge).
    pub transition: Option<Transition>,
    /// The cash-out's state after the observation.
    pub status: CashoutStatus,
    /// A status fetch was queued (thin notification).
    pub status_fetch_queued: bool,
    /// The event id written to the timeline.
    pub event_id: String,
    /// A poll found this state change that no webhook reported.
    pub missed_webhook: bool,
    /// The cash-out's row id (`None` while a thin notification's fetch is pending).
    pub cashout_id: Option<i64>,
}

impl Applied {
    /// Whether the stored state changed.
    pub fn changed_state(&self) -> bool {
        self.transition.is_some_and(Transition::is_applied)
    }
}

fn outcome_name(transition: Option<Transition>) -> &'static str {
    match transition {
        None => "thin",
        Some(Transition::Created | Transition::Advanced { .. } | Transition::HoldChanged) => {
            "applied"
        }
        Some(Transition::Unchanged) => "unchanged",
        Some(Transition::OutOfOrder) => "out_of_order",
        Some(Transition::Conflict { .. }) => "conflict",
    }
}

/// Dedup, replay check, then quarantine or apply; all inside the caller's transaction.
pub(super) fn ingest_webhook(
    connection: &Connection,
    record: &WebhookRecord,
) -> Result<IngestOutcome, StoreError> {
    let seen: Option<(String, Option<String>)> = connection
        .prepare_cached(
            "SELECT event_id, body_sha256 FROM events WHERE provider = ?1 AND dedup_key = ?2",
        )?
        .query_row(params![record.provider, record.dedup_key], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .optional()?;
    if let Some((event_id, body_sha256)) = seen {
        return Ok(
            if body_sha256.as_deref() == Some(record.body_sha256.as_str()) {
                IngestOutcome::Duplicate { event_id }
            } else {
                IngestOutcome::Replayed
            },
        );
    }
    let received = to_millis(record.received_at);
    if let Some(nonce) = &record.nonce {
        // Claim the signed request; one lookup when it is new (the usual case).
        let claimed = connection
            .prepare_cached(
                "INSERT INTO replay_cache (provider, nonce, body_sha256, event_id, seen_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (provider, nonce) DO NOTHING",
            )?
            .execute(params![record.provider, nonce, record.body_sha256, record.event_id, received])?;
        if claimed == 0 {
            let (body_sha256, event_id): (String, String) = connection
                .prepare_cached(
                    "SELECT body_sha256, event_id FROM replay_cache WHERE provider = ?1 AND nonce = ?2",
                )?
                .query_row(params![record.provider, nonce], |row| Ok((row.get(0)?, row.get(1)?)))?;
            return Ok(if body_sha256 == record.body_sha256 {
                IngestOutcome::Duplicate { event_id }
            } else {
                IngestOutcome::Replayed
            });
        }
    }
    let observation = match &record.parsed {
        Ok(observation) => observation,
        Err(reason) => {
            insert_event(
                connection,
                &EventInsert {
                    event_id: &record.event_id,
                    cashout_id: None,
                    provider: &record.provider,
                    source: ObservationSource::Webhook,
                    dedup_key: Some(&record.dedup_key),
                    body_sha256: Some(&record.body_sha256),
                    raw_body: Some(&record.raw_body),
                    headers: Some(&record.headers_json),
                    secret_index: Some(record.secret_index),
                    outcome: "quarantined",
                    error: Some(reason),
                    observation: None,
                    status: None,
                    applied: false,
                    received_at: received,
                },
            )?;
            return Ok(IngestOutcome::Quarantined {
                event_id: record.event_id.clone(),
                reason: reason.clone(),
            });
        }
    };
    let applied = apply(
        connection,
        &record.provider,
        observation,
        ObservationSource::Webhook,
        record.received_at,
        &record.event_id,
    )?;
    insert_event(
        connection,
        &EventInsert {
            event_id: &record.event_id,
            cashout_id: applied.cashout_id,
            provider: &record.provider,
            source: ObservationSource::Webhook,
            dedup_key: Some(&record.dedup_key),
            body_sha256: Some(&record.body_sha256),
            raw_body: Some(&record.raw_body),
            headers: Some(&record.headers_json),
            secret_index: Some(record.secret_index),
            outcome: outcome_name(applied.transition),
            error: None,
            observation: Some(observation),
            status: observation.status.map(|s| s.status),
            applied: applied.changed_state(),
            received_at: received,
        },
    )?;
    Ok(IngestOutcome::Accepted {
        event_id: record.event_id.clone(),
        applied,
    })
}

/// Whether a thin notification asked for this cash-out's status and is still waiting.
pub(super) fn thin_fetch_pending(
    connection: &Connection,
    provider: &str,
    provider_ref: &str,
) -> Result<bool, StoreError> {
    Ok(connection
        .prepare_cached(
            "SELECT 1 FROM status_fetch_queue WHERE provider = ?1 AND provider_ref = ?2 AND reason = 'thin_notification'",
        )?
        .query_row(params![provider, provider_ref], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Applies a polled observation and logs it as a `poll` event. When it changes the state
/// and `counts_as_missed`, the change is a recovered `missed_webhook`: the event says so
/// and a (resolved) mismatch records it for the day's report.
pub(super) fn record_poll(
    connection: &Connection,
    provider: &str,
    observation: &Observation,
    source: ObservationSource,
    at: DateTime<Utc>,
    counts_as_missed: bool,
) -> Result<Applied, StoreError> {
    let event_id = uuid::Uuid::now_v7().to_string();
    let mut applied = apply(connection, provider, observation, source, at, &event_id)?;
    let missed = counts_as_missed && applied.changed_state();
    if missed {
        record_missed_webhook(connection, provider, observation, &applied, to_millis(at))?;
        applied.missed_webhook = true;
    }
    insert_event(
        connection,
        &EventInsert {
            event_id: &event_id,
            cashout_id: applied.cashout_id,
            provider,
            source,
            dedup_key: None,
            body_sha256: None,
            raw_body: None,
            headers: None,
            secret_index: None,
            outcome: if missed {
                "missed_webhook"
            } else {
                outcome_name(applied.transition)
            },
            error: None,
            observation: Some(observation),
            status: observation.status.map(|s| s.status),
            applied: applied.changed_state(),
            received_at: to_millis(at),
        },
    )?;
    Ok(applied)
}

fn record_missed_webhook(
    connection: &Connection,
    provider: &str,
    observation: &Observation,
    applied: &Applied,
    at: i64,
) -> Result<(), StoreError> {
    connection
        .prepare_cached(
            "INSERT INTO mismatches (kind, provider, subject, provider_ref, external_id, detail, opened_at, resolved_at)
             VALUES ('missed_webhook', ?1, ?2, ?2, ?3, ?4, ?5, ?5)",
        )?
        .execute(params![
            provider,
            observation.provider_ref,
            observation.external_id,
            format!(
                "poll found {} (raw {:?}) that no webhook reported; recovered",
                applied.status,
                observation.raw_status.as_deref().unwrap_or("")
            ),
            at,
        ])?;
    Ok(())
}

/// Re-runs a quarantined event with a new parse result.
pub(super) fn reprocess(
    connection: &Connection,
    event_id: &str,
    parsed: &Result<Observation, String>,
    at: DateTime<Utc>,
) -> Result<Option<IngestOutcome>, StoreError> {
    let provider: Option<String> = connection
        .query_row(
            "SELECT provider FROM events WHERE event_id = ?1 AND outcome = 'quarantined'",
            params![event_id],
            |row| row.get(0),
        )
        .optional()?;
    let Some(provider) = provider else {
        return Ok(None);
    };
    match parsed {
        Err(reason) => {
            connection.execute(
                "UPDATE events SET error = ?2 WHERE event_id = ?1",
                params![event_id, reason],
            )?;
            Ok(Some(IngestOutcome::Quarantined {
                event_id: event_id.to_string(),
                reason: reason.clone(),
            }))
        }
        Ok(observation) => {
            let applied = apply(
                connection,
                &provider,
                observation,
                ObservationSource::Webhook,
                at,
                event_id,
            )?;
            connection.execute(
                "UPDATE events SET outcome = ?2, error = NULL, provider_ref = ?3, raw_status = ?4, reason_code = ?5,
                        status = ?6, applied = ?7, cashout_id = ?8
                 WHERE event_id = ?1",
                params![
                    event_id,
                    outcome_name(applied.transition),
                    observation.provider_ref,
                    observation.raw_status,
                    observation.reason_code,
                    observation.status.map(|s| s.status.as_str()),
                    applied.changed_state(),
                    applied.cashout_id,
                ],
            )?;
            resnapshot_event(connection, event_id, to_millis(at))?;
            if let Some(cashout_id) = applied.cashout_id {
                connection
                    .prepare_cached(
                        "INSERT OR IGNORE INTO reconcile_queue (cashout_id) VALUES (?1)",
                    )?
                    .execute(params![cashout_id])?;
            }
            Ok(Some(IngestOutcome::Accepted {
                event_id: event_id.to_string(),
                applied,
            }))
        }
    }
}

struct EventInsert<'a> {
    event_id: &'a str,
    cashout_id: Option<i64>,
    provider: &'a str,
    source: ObservationSource,
    dedup_key: Option<&'a str>,
    body_sha256: Option<&'a str>,
    raw_body: Option<&'a [u8]>,
    headers: Option<&'a str>,
    secret_index: Option<usize>,
    outcome: &'a str,
    error: Option<&'a str>,
    observation: Option<&'a Observation>,
    status: Option<CashoutStatus>,
    applied: bool,
    received_at: i64,
}

fn insert_event(connection: &Connection, event: &EventInsert<'_>) -> Result<(), StoreError> {
    let observation = event.observation;
    // The cash-out as it stands after this event is copied beside it: a day's report
    // reads the latest copy before the day's end (SPEC §6, point in time).
    connection
        .prepare_cached(
            "INSERT INTO events (event_id, provider, source, dedup_key, body_sha256, raw_body, headers, secret_index,
                                 outcome, error, provider_ref, raw_status, reason_code, status, applied, received_at,
                                 cashout_id, book_at, after_status, after_provider_status, after_external_id,
                                 after_amount_minor, after_currency, after_fee_minor, after_net_minor, after_created_at,
                                 after_updated_at, after_completed_at, after_webhooks, after_recovered)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?16,
                    c.status, c.provider_status, c.external_id, c.amount_minor, c.currency, c.fee_minor, c.net_minor,
                    c.created_at, c.updated_at, c.completed_at, c.webhook_count, c.recovered_by_poll
             FROM (SELECT 1) LEFT JOIN cashouts c ON c.id = ?17",
        )?
        .execute(params![
            event.event_id,
            event.provider,
            event.source.as_str(),
            event.dedup_key,
            event.body_sha256,
            event.raw_body,
            event.headers,
            event.secret_index.map(|i| i as i64),
            event.outcome,
            event.error,
            observation.map(|o| o.provider_ref.as_str()),
            observation.and_then(|o| o.raw_status.as_deref()),
            observation.and_then(|o| o.reason_code.as_deref()),
            event.status.map(CashoutStatus::as_str),
            event.applied,
            event.received_at,
            event.cashout_id,
        ])?;
    Ok(())
}

/// Re-copies the cash-out's current state into one event's snapshot and book time (a
/// reprocessed event enters the book when it is reprocessed).
fn resnapshot_event(
    connection: &Connection,
    event_id: &str,
    book_at: i64,
) -> Result<(), StoreError> {
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
        .execute(params![event_id, book_at])?;
    Ok(())
}

/// Gives a cash-out without a platform id the `external_id` of the ledger entry that
/// names it, recording the change on its timeline (source `ledger`). Returns whether it
/// changed anything.
pub(super) fn link_to_ledger(
    connection: &Connection,
    provider: &str,
    provider_ref: &str,
    external_id: &str,
    at: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let now = to_millis(at);
    let linked: Option<i64> = connection
        .prepare_cached(
            "UPDATE cashouts SET external_id = ?3, book_changed_at = ?4
             WHERE provider = ?1 AND provider_ref = ?2 AND external_id IS NULL RETURNING id",
        )?
        .query_row(params![provider, provider_ref, external_id, now], |row| {
            row.get(0)
        })
        .optional()?;
    let Some(cashout_id) = linked else {
        return Ok(false);
    };
    let event_id = uuid::Uuid::now_v7().to_string();
    let mut observation = Observation::new(provider_ref);
    observation.external_id = Some(external_id.to_string());
    insert_event(
        connection,
        &EventInsert {
            event_id: &event_id,
            cashout_id: Some(cashout_id),
            provider,
            source: ObservationSource::Ledger,
            dedup_key: None,
            body_sha256: None,
            raw_body: None,
            headers: None,
            secret_index: None,
            outcome: "ledger_linked",
            error: None,
            observation: Some(&observation),
            status: None,
            applied: false,
            received_at: now,
        },
    )?;
    Ok(true)
}

/// The state rule applied to the stored cash-out; creates it on first sight.
fn apply(
    connection: &Connection,
    provider: &str,
    observation: &Observation,
    source: ObservationSource,
    at: DateTime<Utc>,
    event_id: &str,
) -> Result<Applied, StoreError> {
    let now = to_millis(at);
    let current: Option<(i64, String, bool)> = connection
        .prepare_cached(
            "SELECT id, status, held FROM cashouts WHERE provider = ?1 AND provider_ref = ?2",
        )?
        .query_row(params![provider, observation.provider_ref], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    let current = match current {
        Some((id, status, held)) => {
            let status: CashoutStatus =
                status.parse().map_err(|err: crate::state::UnknownStatus| {
                    StoreError::Database(err.to_string())
                })?;
            Some((id, CurrentState { status, held }))
        }
        None => None,
    };
    let amount = observation.amount.map(|m| m.minor);
    let currency = observation.amount.map(|m| m.currency.code().to_string());
    let provider_created = observation.created_at.map(to_millis);
    let provider_updated = observation.updated_at.map(to_millis);
    let webhook = i64::from(source == ObservationSource::Webhook);

    let Some(update) = observation.status else {
        // A thin notification only says "go and look". Its signature may not cover the
        // cash-out id (Tupay signs external_id only), so it changes nothing by itself:
        // the authenticated status fetch it queues creates or updates the cash-out.
        let queued = queue_status_fetch(
            connection,
            provider,
            &observation.provider_ref,
            "thin_notification",
            usize::MAX,
            at,
        )?;
        let status = current
            .map(|(_, c)| c.status)
            .unwrap_or(CashoutStatus::Pending);
        return Ok(Applied {
            transition: None,
            status,
            status_fetch_queued: queued,
            event_id: event_id.to_string(),
            missed_webhook: false,
            cashout_id: current.map(|(id, _)| id),
        });
    };

    let decision = decide(current.map(|(_, state)| state), update);
    let cashout_id = match current {
        Some((id, _)) => id,
        None => insert_cashout(
            connection,
            provider,
            observation,
            decision.next,
            now,
            source,
        )?,
    };
    match (current, decision.transition) {
        (None, _) => {}
        (Some((id, _)), transition) if transition.is_applied() => {
            let completed_at = (decision.next.status == CashoutStatus::Completed)
                .then(|| provider_updated.unwrap_or(now));
            connection
                .prepare_cached(
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
                    decision.next.status.as_str(),
                    decision.next.held,
                    observation.raw_status,
                    observation.reason_code,
                    amount,
                    currency,
                    observation.fee_minor,
                    observation.external_id,
                    provider_created,
                    provider_updated,
                    completed_at,
                    now,
                    webhook,
                    i64::from(source == ObservationSource::Poll),
                    observation.method,
                    observation.net_minor,
                ])?;
        }
        (Some((id, state)), transition) => {
            // A report that agrees with the book settles an earlier conflicting one; a
            // conflicting report is kept until then (the `status_conflict` finding).
            let conflict = match transition {
                Transition::Conflict { reported, .. } => ConflictMark::Set(reported),
                _ if update.status == state.status => ConflictMark::Clear,
                _ => ConflictMark::Keep,
            };
            fill_in_facts(connection, id, observation, webhook, conflict, now)?
        }
    }
    if let Transition::Conflict { current, reported } = decision.transition {
        open_mismatch(
            connection,
            "status_conflict",
            provider,
            &observation.provider_ref,
            observation.external_id.as_deref(),
            &format!(
                "{provider} reported {reported} (raw {:?}) for {} which is already {current}; not applied",
                observation.raw_status.as_deref().unwrap_or(""),
                observation.provider_ref
            ),
            now,
        )?;
    }
    Ok(Applied {
        transition: Some(decision.transition),
        status: decision.next.status,
        status_fetch_queued: false,
        event_id: event_id.to_string(),
        missed_webhook: false,
        cashout_id: Some(cashout_id),
    })
}

/// Inserts a new cash-out, links the events that arrived before it (thin notifications)
/// and returns its row id.
fn insert_cashout(
    connection: &Connection,
    provider: &str,
    observation: &Observation,
    state: CurrentState,
    now: i64,
    source: ObservationSource,
) -> Result<i64, StoreError> {
    let webhook = i64::from(source == ObservationSource::Webhook);
    let provider_created = observation.created_at.map(to_millis);
    let provider_updated = observation.updated_at.map(to_millis);
    let completed_at =
        (state.status == CashoutStatus::Completed).then(|| provider_updated.unwrap_or(now));
    let recovered = i64::from(webhook == 0 && observation.status.is_some());
    // A provider that does not echo the platform's id (Mannco) is matched through the
    // ledger entry that names its cash-out, when exactly one does.
    let external_id = match &observation.external_id {
        Some(id) => Some(id.clone()),
        None => ledger_external_id(connection, provider, &observation.provider_ref)?,
    };
    connection
        .prepare_cached(
            "INSERT INTO cashouts (provider, provider_ref, external_id, status, held, provider_status, reason_code,
                                   amount_minor, currency, fee_minor, created_at, provider_created_at,
                                   provider_updated_at, first_seen_at, updated_at, completed_at, webhook_count,
                                   recovered_by_poll, method, net_minor, book_changed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, COALESCE(?11, ?12), ?11, ?13, ?12, ?12, ?14, ?15, ?16,
                     ?17, ?18, ?12)",
        )?
        .execute(params![
            provider,
            observation.provider_ref,
            external_id,
            state.status.as_str(),
            state.held,
            observation.raw_status,
            observation.reason_code,
            observation.amount.map(|m| m.minor),
            observation.amount.map(|m| m.currency.code().to_string()),
            observation.fee_minor,
            provider_created,
            now,
            provider_updated,
            completed_at,
            webhook,
            recovered,
            observation.method,
            observation.net_minor,
        ])?;
    let id = connection.last_insert_rowid();
    // Only a status fetch creates a cash-out after thin notifications about it.
    if source == ObservationSource::Poll {
        connection
            .prepare_cached(
                "UPDATE events SET cashout_id = ?1 WHERE provider = ?2 AND provider_ref = ?3 AND cashout_id IS NULL",
            )?
            .execute(params![id, provider, observation.provider_ref])?;
    }
    Ok(id)
}

/// What an observation that did not move the state does to the cash-out's open conflict.
enum ConflictMark {
    /// It reports a terminal state against the book's.
    Set(CashoutStatus),
    /// It agrees with the book.
    Clear,
    Keep,
}

/// The external id of the one ledger entry naming `provider_ref`, if exactly one does.
fn ledger_external_id(
    connection: &Connection,
    provider: &str,
    provider_ref: &str,
) -> Result<Option<String>, StoreError> {
    let mut statement = connection.prepare_cached(
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

/// Fills facts the cash-out lacked without touching its state.
fn fill_in_facts(
    connection: &Connection,
    id: i64,
    observation: &Observation,
    webhook: i64,
    conflict: ConflictMark,
    now: i64,
) -> Result<(), StoreError> {
    let provider_created = observation.created_at.map(to_millis);
    let (set_conflict, conflict_status) = match conflict {
        ConflictMark::Set(reported) => (true, Some(reported.as_str())),
        ConflictMark::Clear => (true, None),
        ConflictMark::Keep => (false, None),
    };
    connection
        .prepare_cached(
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
            observation.amount.map(|m| m.currency.code().to_string()),
            observation.fee_minor,
            observation.external_id,
            provider_created,
            webhook,
            observation.method,
            observation.net_minor,
            set_conflict,
            conflict_status,
            now,
        ])?;
    Ok(())
}

/// Queues a status fetch unless one is queued or the provider's queue is full.
pub(super) fn queue_status_fetch(
    connection: &Connection,
    provider: &str,
    provider_ref: &str,
    reason: &str,
    max_pending: usize,
    at: DateTime<Utc>,
) -> Result<bool, StoreError> {
    if max_pending != usize::MAX {
        let pending: i64 = connection
            .prepare_cached("SELECT COUNT(*) FROM status_fetch_queue WHERE provider = ?1")?
            .query_row(params![provider], |row| row.get(0))?;
        if pending as usize >= max_pending {
            return Ok(false);
        }
    }
    let now = to_millis(at);
    let inserted = connection
        .prepare_cached(
            "INSERT OR IGNORE INTO status_fetch_queue (provider, provider_ref, reason, requested_at, next_attempt_at)
             VALUES (?1, ?2, ?3, ?4, ?4)",
        )?
        .execute(params![provider, provider_ref, reason, now])?;
    Ok(inserted > 0)
}
