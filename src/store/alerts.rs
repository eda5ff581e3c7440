//! Alerts as stored rows: the facts the rules read, the lifecycle plan applied in one
//! transaction with its outbox rows, the outbox's claims and attempts, and the API views.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::queries::stored_name;
use super::{to_millis, StoreError};
use crate::alert::rules::{InFlightCashout, OpenMismatch, QuarantinedEvent};
use crate::alert::{
    AlertKind, AlertNotice, AlertPlan, Delivery, NoticeStatus, Severity, StoredAlert,
};
use crate::state::CashoutStatus;

/// Most stuck cash-outs loaded per provider in one pass (a bound on memory; past
/// `group_over` they are one grouped alert anyway).
const STUCK_LOAD_LIMIT: i64 = 50_000;

/// What an alert pass asks the store for.
#[derive(Clone, Debug)]
pub struct AlertFactsQuery {
    /// Each provider with its stuck cutoff (unix ms): cash-outs created before it.
    pub providers: Vec<(String, i64)>,
    /// Also load what the signals remember across restarts (first pass).
    pub seed: bool,
}

/// Non-terminal cash-outs of one provider in one state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlightStats {
    pub provider: String,
    pub status: CashoutStatus,
    pub count: u64,
    pub oldest_created_at: i64,
}

/// The stored facts of one pass.
#[derive(Clone, Debug, Default)]
pub struct LoadedAlertFacts {
    pub mismatches: Vec<OpenMismatch>,
    pub quarantined: Vec<QuarantinedEvent>,
    pub stuck: Vec<InFlightCashout>,
    pub in_flight: Vec<InFlightStats>,
    pub open_alerts: Vec<StoredAlert>,
    /// Per provider: the last webhook and the last completed search sweep.
    pub seeds: Vec<(String, Option<i64>, Option<i64>)>,
}

/// What applying a plan did.
#[derive(Clone, Debug, Default)]
pub struct AppliedAlerts {
    /// What to send, in order.
    pub notices: Vec<AlertNotice>,
    /// Open alerts per kind after the plan.
    pub open_by_kind: Vec<(AlertKind, i64)>,
}

/// An outbox delivery claimed for an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxItem {
    pub id: i64,
    pub alert_id: i64,
    pub webhook_id: String,
    pub body: String,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// What follows an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboxNext {
    Delivered,
    RetryAt(DateTime<Utc>),
    GaveUp,
}

/// An alert in the API.
#[derive(Clone, Debug, Serialize)]
pub struct AlertView {
    pub id: i64,
    pub kind: AlertKind,
    pub severity: Severity,
    /// `firing` while open, else `resolved`.
    pub status: NoticeStatus,
    pub subject: String,
    pub provider: Option<String>,
    pub text: String,
    /// `individual`, `grouped`, `inhibited` or `group`.
    pub delivery: Delivery,
    pub opened_at: String,
    pub resolved_at: Option<String>,
    pub last_sent_at: Option<String>,
}

/// One delivery of an alert to the webhook sink, with its attempts.
#[derive(Clone, Debug, Serialize)]
pub struct DeliveryView {
    pub webhook_id: String,
    pub status: NoticeStatus,
    /// `pending`, `delivered` or `failed` (given up).
    pub state: &'static str,
    pub created_at: String,
    pub next_attempt_at: Option<String>,
    pub delivered_at: Option<String>,
    pub failed_at: Option<String>,
    pub attempts: Vec<AttemptView>,
}

/// One attempt of a delivery.
#[derive(Clone, Debug, Serialize)]
pub struct AttemptView {
    pub attempted_at: String,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: i64,
}

/// Filters of `GET /api/v1/alerts`.
#[derive(Clone, Debug, Default)]
pub struct AlertFilter {
    pub open_only: bool,
    pub kind: Option<AlertKind>,
    pub provider: Option<String>,
    /// Only alerts with a smaller id (the cursor).
    pub before_id: Option<i64>,
    pub limit: usize,
}

fn rfc3339(millis: i64) -> String {
    crate::alert::rfc3339(millis)
}

fn parse_status(text: &str) -> Result<CashoutStatus, StoreError> {
    text.parse()
        .map_err(|err: crate::state::UnknownStatus| StoreError::Database(err.to_string()))
}

/// Loads everything one pass needs, in one read transaction.
pub(super) fn load_facts(
    connection: &Connection,
    query: &AlertFactsQuery,
) -> Result<LoadedAlertFacts, StoreError> {
    let transaction = connection.unchecked_transaction()?;
    let facts = load_facts_in(&transaction, query)?;
    transaction.finish()?;
    Ok(facts)
}

fn load_facts_in(
    transaction: &Connection,
    query: &AlertFactsQuery,
) -> Result<LoadedAlertFacts, StoreError> {
    let mut facts = LoadedAlertFacts::default();

    let mut statement = transaction.prepare_cached(
        "SELECT kind, provider, COALESCE(subject, provider_ref, 'ext:' || external_id, ''), detail, opened_at
         FROM mismatches
         WHERE resolved_at IS NULL
           AND kind IN ('status_conflict', 'duplicate_payout', 'unknown_to_ledger', 'amount_mismatch')",
    )?;
    let rows = statement.query_map([], |row| {
        Ok(OpenMismatch {
            kind: stored_name(row, 0, "mismatches.kind")?,
            provider: row.get(1)?,
            subject: row.get(2)?,
            detail: row.get(3)?,
            opened_at: row.get(4)?,
        })
    })?;
    facts.mismatches = rows.collect::<Result<_, _>>()?;

    let mut statement = transaction.prepare_cached(
        "SELECT provider, event_id, error, received_at FROM events WHERE outcome = 'quarantined'",
    )?;
    let rows = statement.query_map([], |row| {
        Ok(QuarantinedEvent {
            provider: row.get(0)?,
            event_id: row.get(1)?,
            error: row.get(2)?,
            received_at: row.get(3)?,
        })
    })?;
    facts.quarantined = rows.collect::<Result<_, _>>()?;

    for (provider, stuck_cutoff) in &query.providers {
        for status in [CashoutStatus::Pending, CashoutStatus::Processing] {
            let stats: Option<(i64, i64)> = transaction
                .prepare_cached(
                    "SELECT COUNT(*), MIN(created_at) FROM cashouts WHERE provider = ?1 AND status = ?2",
                )?
                .query_row(params![provider, status.as_str()], |row| {
                    Ok((row.get(0)?, row.get::<_, Option<i64>>(1)?))
                })
                .map(|(count, oldest)| oldest.map(|oldest| (count, oldest)))?;
            if let Some((count, oldest)) = stats {
                facts.in_flight.push(InFlightStats {
                    provider: provider.clone(),
                    status,
                    count: u64::try_from(count).unwrap_or(0),
                    oldest_created_at: oldest,
                });
            }
        }
        let mut statement = transaction.prepare_cached(
            "SELECT provider_ref, status, created_at FROM cashouts
             WHERE provider = ?1 AND status IN ('pending', 'processing') AND created_at <= ?2
             ORDER BY created_at LIMIT ?3",
        )?;
        let rows =
            statement.query_map(params![provider, stuck_cutoff, STUCK_LOAD_LIMIT], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            })?;
        for row in rows {
            let (provider_ref, status, created_at) = row?;
            facts.stuck.push(InFlightCashout {
                provider: provider.clone(),
                provider_ref,
                status: parse_status(&status)?,
                created_at,
            });
        }
        if query.seed {
            // Newest first by insertion order: stops at the provider's last webhook.
            let last_webhook: Option<i64> = transaction
                .prepare_cached(
                    "SELECT received_at FROM events WHERE provider = ?1 AND source = 'webhook'
                     ORDER BY seq DESC LIMIT 1",
                )?
                .query_row(params![provider], |row| row.get(0))
                .optional()?;
            let last_sweep: Option<i64> = transaction
                .prepare_cached("SELECT updated_at FROM poll_watermarks WHERE provider = ?1")?
                .query_row(params![provider], |row| row.get(0))
                .optional()?;
            facts
                .seeds
                .push((provider.clone(), last_webhook, last_sweep));
        }
    }

    facts.open_alerts = open_alerts(transaction)?;
    Ok(facts)
}

fn open_alerts(connection: &Connection) -> Result<Vec<StoredAlert>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT id, kind, subject, provider, severity, text, opened_at, last_sent_at, delivery
         FROM alerts WHERE resolved_at IS NULL",
    )?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, Option<String>>(3)?,
            row.get::<_, String>(4)?,
            row.get::<_, String>(5)?,
            row.get::<_, i64>(6)?,
            row.get::<_, Option<i64>>(7)?,
            row.get::<_, String>(8)?,
        ))
    })?;
    let mut alerts = Vec::new();
    for row in rows {
        let (id, kind, subject, provider, severity, text, opened_at, last_sent_at, delivery) = row?;
        let Ok(kind) = kind.parse::<AlertKind>() else {
            tracing::warn!(
                id,
                kind,
                "an open alert of an unknown kind is left as it is"
            );
            continue;
        };
        alerts.push(StoredAlert {
            id,
            kind,
            subject,
            provider,
            severity: severity.parse().unwrap_or(Severity::Critical),
            summary: text,
            opened_at,
            last_sent_at,
            delivery: delivery.parse().unwrap_or(Delivery::Individual),
        });
    }
    Ok(alerts)
}

/// Applies a lifecycle plan made at `now`: resolutions, updates and new alerts, plus one
/// outbox row per notice, due at `queued_at` (the wall clock), when `enqueue` (a webhook
/// sink is configured). Guarded by the open-alert index and `resolved_at IS NULL`, so a
/// plan made from stale rows changes nothing twice.
pub(super) fn apply_plan(
    connection: &Connection,
    plan: &AlertPlan,
    now: i64,
    enqueue: Option<i64>,
) -> Result<AppliedAlerts, StoreError> {
    let mut notices = Vec::new();
    for resolve in &plan.resolve {
        let row = connection
            .prepare_cached(
                "UPDATE alerts SET resolved_at = ?2 WHERE id = ?1 AND resolved_at IS NULL
                 RETURNING kind, subject, provider, severity, text, opened_at",
            )?
            .query_row(params![resolve.id, now], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Option<String>>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, i64>(5)?,
                ))
            })
            .optional()?;
        let Some((kind, subject, provider, severity, summary, opened_at)) = row else {
            continue;
        };
        if let (true, Ok(kind)) = (resolve.notify, kind.parse::<AlertKind>()) {
            notices.push(AlertNotice {
                id: resolve.id,
                kind,
                severity: severity.parse().unwrap_or(Severity::Critical),
                status: NoticeStatus::Resolved,
                subject,
                provider,
                summary,
                opened_at,
                resolved_at: Some(now),
            });
        }
    }
    for update in &plan.update {
        let row = connection
            .prepare_cached(
                "UPDATE alerts SET severity = ?2, text = ?3, delivery = ?4,
                        last_sent_at = CASE WHEN ?5 THEN ?6 ELSE last_sent_at END
                 WHERE id = ?1 AND resolved_at IS NULL
                 RETURNING kind, subject, provider, opened_at",
            )?
            .query_row(
                params![
                    update.id,
                    update.severity.as_str(),
                    update.summary,
                    update.delivery.as_str(),
                    update.notify,
                    now
                ],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Option<String>>(2)?,
                        row.get::<_, i64>(3)?,
                    ))
                },
            )
            .optional()?;
        let Some((kind, subject, provider, opened_at)) = row else {
            continue;
        };
        if let (true, Ok(kind)) = (update.notify, kind.parse::<AlertKind>()) {
            notices.push(AlertNotice {
                id: update.id,
                kind,
                severity: update.severity,
                status: NoticeStatus::Firing,
                subject,
                provider,
                summary: update.summary.clone(),
                opened_at,
                resolved_at: None,
            });
        }
    }
    for open in &plan.open {
        let alert = &open.alert;
        let inserted = connection
            .prepare_cached(
                "INSERT OR IGNORE INTO alerts (kind, subject, provider, severity, text, opened_at, last_sent_at, delivery)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, CASE WHEN ?7 THEN ?6 END, ?8)",
            )?
            .execute(params![
                alert.kind.as_str(),
                alert.subject,
                alert.provider,
                alert.severity.as_str(),
                alert.summary,
                now,
                open.notify,
                open.delivery.as_str(),
            ])?;
        if inserted > 0 && open.notify {
            notices.push(AlertNotice {
                id: connection.last_insert_rowid(),
                kind: alert.kind,
                severity: alert.severity,
                status: NoticeStatus::Firing,
                subject: alert.subject.clone(),
                provider: Some(alert.provider.clone()),
                summary: alert.summary.clone(),
                opened_at: now,
                resolved_at: None,
            });
        }
    }
    if let Some(queued_at) = enqueue {
        for notice in &notices {
            let webhook_id = format!("msg_{}", uuid::Uuid::now_v7().simple());
            connection
                .prepare_cached(
                    "INSERT INTO alert_outbox (alert_id, webhook_id, status, body, created_at, next_attempt_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                )?
                .execute(params![
                    notice.id,
                    webhook_id,
                    notice.status.as_str(),
                    notice.body(),
                    queued_at
                ])?;
        }
    }
    let mut statement = connection.prepare_cached(
        "SELECT kind, COUNT(*) FROM alerts WHERE resolved_at IS NULL GROUP BY kind",
    )?;
    let rows = statement.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
    })?;
    let mut open_by_kind = Vec::new();
    for row in rows {
        let (kind, count) = row?;
        if let Ok(kind) = kind.parse() {
            open_by_kind.push((kind, count));
        }
    }
    Ok(AppliedAlerts {
        notices,
        open_by_kind,
    })
}

/// Claims up to `limit` due deliveries, oldest first, for `lease`. Only the oldest
/// undelivered notice of each alert is claimable, so a resolution never overtakes the
/// retries of its firing notice.
pub(super) fn claim_deliveries(
    connection: &Connection,
    now: i64,
    lease_ms: i64,
    limit: usize,
) -> Result<Vec<OutboxItem>, StoreError> {
    let mut statement = connection.prepare_cached(
        "UPDATE alert_outbox SET leased_until = ?2
         WHERE id IN (SELECT id FROM alert_outbox AS due
                      WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= ?1
                        AND (leased_until IS NULL OR leased_until <= ?1)
                        AND NOT EXISTS (SELECT 1 FROM alert_outbox AS earlier
                                        WHERE earlier.alert_id = due.alert_id AND earlier.id < due.id
                                          AND earlier.delivered_at IS NULL AND earlier.failed_at IS NULL)
                      ORDER BY next_attempt_at, id LIMIT ?3)
         RETURNING id, alert_id, webhook_id, body, attempts",
    )?;
    let rows = statement.query_map(
        params![now, now + lease_ms, i64::try_from(limit).unwrap_or(16)],
        |row| {
            Ok(OutboxItem {
                id: row.get(0)?,
                alert_id: row.get(1)?,
                webhook_id: row.get(2)?,
                body: row.get(3)?,
                attempts: u32::try_from(row.get::<_, i64>(4)?).unwrap_or(u32::MAX),
            })
        },
    )?;
    let mut items: Vec<OutboxItem> = rows.collect::<Result<_, _>>()?;
    items.sort_by_key(|item| item.id);
    Ok(items)
}

/// Records one attempt and what follows it.
pub(super) fn record_delivery(
    connection: &Connection,
    outbox_id: i64,
    at: i64,
    http_status: Option<u16>,
    error: Option<&str>,
    duration_ms: i64,
    next: OutboxNext,
) -> Result<(), StoreError> {
    connection
        .prepare_cached(
            "INSERT INTO alert_delivery_attempts (outbox_id, attempted_at, http_status, error, duration_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![outbox_id, at, http_status, error, duration_ms])?;
    let last_error = match (http_status, error) {
        (_, Some(error)) => Some(error.to_string()),
        (Some(code), None) if !(200..300).contains(&code) => Some(format!("HTTP {code}")),
        _ => None,
    };
    let (delivered_at, failed_at, next_attempt_at) = match next {
        OutboxNext::Delivered => (Some(at), None, None),
        OutboxNext::GaveUp => (None, Some(at), None),
        OutboxNext::RetryAt(when) => (None, None, Some(to_millis(when))),
    };
    connection
        .prepare_cached(
            "UPDATE alert_outbox SET attempts = attempts + 1, leased_until = NULL, last_error = ?2,
                    delivered_at = ?3, failed_at = ?4, next_attempt_at = COALESCE(?5, next_attempt_at)
             WHERE id = ?1",
        )?
        .execute(params![outbox_id, last_error, delivered_at, failed_at, next_attempt_at])?;
    Ok(())
}

/// Deliveries pending and given up.
pub(super) fn outbox_counts(connection: &Connection) -> Result<(i64, i64), StoreError> {
    let pending: i64 = connection
        .prepare_cached(
            "SELECT COUNT(*) FROM alert_outbox WHERE delivered_at IS NULL AND failed_at IS NULL",
        )?
        .query_row([], |row| row.get(0))?;
    let failed: i64 = connection
        .prepare_cached("SELECT COUNT(*) FROM alert_outbox WHERE failed_at IS NOT NULL")?
        .query_row([], |row| row.get(0))?;
    Ok((pending, failed))
}

fn view(row: &rusqlite::Row<'_>) -> rusqlite::Result<AlertView> {
    let resolved_at: Option<i64> = row.get(7)?;
    Ok(AlertView {
        id: row.get(0)?,
        kind: stored_name(row, 1, "alerts.kind")?,
        subject: row.get(2)?,
        provider: row.get(3)?,
        severity: stored_name(row, 4, "alerts.severity")?,
        text: row.get(5)?,
        opened_at: rfc3339(row.get(6)?),
        status: if resolved_at.is_some() {
            NoticeStatus::Resolved
        } else {
            NoticeStatus::Firing
        },
        resolved_at: resolved_at.map(rfc3339),
        last_sent_at: row.get::<_, Option<i64>>(8)?.map(rfc3339),
        delivery: stored_name(row, 9, "alerts.delivery")?,
    })
}

const VIEW_COLUMNS: &str =
    "id, kind, subject, provider, severity, text, opened_at, resolved_at, last_sent_at, delivery";

/// A page of alerts, newest first; the second value is the cursor of the next page.
pub(super) fn list(
    connection: &Connection,
    filter: &AlertFilter,
) -> Result<(Vec<AlertView>, Option<i64>), StoreError> {
    let limit = filter.limit.clamp(1, 1000);
    let mut statement = connection.prepare_cached(&format!(
        "SELECT {VIEW_COLUMNS} FROM alerts
         WHERE (?1 = 0 OR resolved_at IS NULL) AND (?2 IS NULL OR kind = ?2)
           AND (?3 IS NULL OR provider = ?3) AND (?4 IS NULL OR id < ?4)
         ORDER BY id DESC LIMIT ?5"
    ))?;
    let rows = statement.query_map(
        params![
            filter.open_only,
            filter.kind.map(AlertKind::as_str),
            filter.provider,
            filter.before_id,
            i64::try_from(limit + 1).unwrap_or(1001)
        ],
        view,
    )?;
    let mut items: Vec<AlertView> = rows.collect::<Result<_, _>>()?;
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|a| a.id)
    } else {
        None
    };
    Ok((items, next))
}

/// One alert and its deliveries with their attempts.
pub(super) fn get(
    connection: &Connection,
    id: i64,
) -> Result<Option<(AlertView, Vec<DeliveryView>)>, StoreError> {
    let alert = connection
        .prepare_cached(&format!("SELECT {VIEW_COLUMNS} FROM alerts WHERE id = ?1"))?
        .query_row(params![id], view)
        .optional()?;
    let Some(alert) = alert else {
        return Ok(None);
    };
    let mut statement = connection.prepare_cached(
        "SELECT id, webhook_id, status, created_at, next_attempt_at, delivered_at, failed_at
         FROM alert_outbox WHERE alert_id = ?1 ORDER BY id",
    )?;
    let rows = statement.query_map(params![id], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            stored_name::<NoticeStatus>(row, 2, "alert_outbox.status")?,
            row.get::<_, i64>(3)?,
            row.get::<_, i64>(4)?,
            row.get::<_, Option<i64>>(5)?,
            row.get::<_, Option<i64>>(6)?,
        ))
    })?;
    let outbox: Vec<_> = rows.collect::<Result<_, _>>()?;
    let mut deliveries = Vec::with_capacity(outbox.len());
    for (outbox_id, webhook_id, status, created_at, next_attempt_at, delivered_at, failed_at) in
        outbox
    {
        let mut statement = connection.prepare_cached(
            "SELECT attempted_at, http_status, error, duration_ms FROM alert_delivery_attempts
             WHERE outbox_id = ?1 ORDER BY id",
        )?;
        let attempts = statement
            .query_map(params![outbox_id], |row| {
                Ok(AttemptView {
                    attempted_at: rfc3339(row.get(0)?),
                    http_status: row
                        .get::<_, Option<i64>>(1)?
                        .and_then(|code| u16::try_from(code).ok()),
                    error: row.get(2)?,
                    duration_ms: row.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let pending = delivered_at.is_none() && failed_at.is_none();
        deliveries.push(DeliveryView {
            webhook_id,
            status,
            state: match (delivered_at, failed_at) {
                (Some(_), _) => "delivered",
                (None, Some(_)) => "failed",
                (None, None) => "pending",
            },
            created_at: rfc3339(created_at),
            next_attempt_at: pending.then(|| rfc3339(next_attempt_at)),
            delivered_at: delivered_at.map(rfc3339),
            failed_at: failed_at.map(rfc3339),
            attempts,
        });
    }
    Ok(Some((alert, deliveries)))
}
