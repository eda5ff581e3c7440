//! Alerts on PostgreSQL (src/store/alerts.rs): the facts an alert pass reads, the
//! lifecycle plan applied with its outbox rows, the outbox's claims and attempts, and the
//! API views, with the SQLite facade's signatures and results. The decisions stay in
//! [`crate::alert`]; this loads and applies.
//!
//! What several instances need:
//! - [`PgStore::apply_alert_plan`] opens an alert `ON CONFLICT` on the open-alert index
//!   (`alerts_open`, one open alert per kind and subject): of two instances opening one
//!   alert at once, the second waits for the first's commit and opens (and sends) nothing.
//!   Resolutions and updates are guarded by `resolved_at IS NULL`, re-checked on the
//!   locked row, so a plan made from stale rows changes nothing twice.
//! - [`PgStore::claim_alert_deliveries`] claims due outbox rows `FOR UPDATE SKIP LOCKED`
//!   until `leased_until` (the claim expiry): two instances never hold one row at once,
//!   and a killed instance's rows are due again when the claim expires. A redelivery is
//!   the same row, so it keeps its `webhook-id`.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::ingest::TxResult;
use super::{cached, from_postgres, PgClient, PgStore, PgTransaction};
use crate::alert::rules::{InFlightCashout, OpenMismatch, QuarantinedEvent};
use crate::alert::{
    AlertKind, AlertNotice, AlertPlan, Delivery, NoticeStatus, Severity, StoredAlert,
};
use crate::state::CashoutStatus;
use crate::store::{
    to_millis, AlertFactsQuery, AlertFilter, AlertView, AppliedAlerts, AttemptView, DeliveryView,
    InFlightStats, LoadedAlertFacts, OutboxItem, OutboxNext, StoreError,
};

/// Most stuck cash-outs loaded per provider in one pass (as on SQLite).
const STUCK_LOAD_LIMIT: i64 = 50_000;

const VIEW_COLUMNS: &str =
    "id, kind, subject, provider, severity, text, opened_at, resolved_at, last_sent_at, delivery";

fn rfc3339(millis: i64) -> String {
    crate::alert::rfc3339(millis)
}

fn parse_status(text: &str) -> Result<CashoutStatus, StoreError> {
    text.parse()
        .map_err(|err: crate::state::UnknownStatus| StoreError::Database(err.to_string()))
}

fn pg(err: tokio_postgres::Error) -> StoreError {
    from_postgres(&err)
}

/// The value named in text column `index` of `row` (`column` names it in the error, as
/// on SQLite: an unknown stored name is a store error).
fn stored_name<T: FromStr>(
    row: &tokio_postgres::Row,
    index: usize,
    column: &'static str,
) -> Result<T, StoreError> {
    let value: String = row.try_get(index).map_err(pg)?;
    value
        .parse()
        .map_err(|_| StoreError::Database(format!("unknown value {value:?} in column {column}")))
}

impl PgStore {
    /// What an alert pass reads (one repeatable-read snapshot): open mismatches,
    /// quarantined events, stuck and in-flight cash-outs, open alerts (and, with `seed`,
    /// what the signals remember).
    pub async fn alert_facts(
        &self,
        query: AlertFactsQuery,
    ) -> Result<LoadedAlertFacts, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg)?;
        let facts = load_facts(&tx, &query).await?;
        tx.commit().await.map_err(pg)?;
        Ok(facts)
    }

    /// Applies an alert lifecycle plan made at `now` and queues its deliveries (when
    /// `enqueue`, due at once by the wall clock), in one transaction; returns the notices.
    /// Under the alert pass's lease, its fence is checked in that transaction.
    pub async fn apply_alert_plan(
        &self,
        plan: AlertPlan,
        now: DateTime<Utc>,
        enqueue: bool,
    ) -> Result<AppliedAlerts, StoreError> {
        let now = to_millis(now);
        let enqueue = enqueue.then(|| to_millis(Utc::now()));
        let plan = std::sync::Arc::new(plan);
        self.transact("apply an alert plan", move |tx| {
            let plan = std::sync::Arc::clone(&plan);
            Box::pin(async move {
                super::lease::check_scoped_fence(&tx).await?;
                let applied = apply_plan(&tx, &plan, now, enqueue).await?;
                tx.commit().await?;
                Ok(applied)
            })
        })
        .await
    }

    /// Claims up to `limit` due deliveries for `lease`, oldest first (another instance
    /// skips them meanwhile). Only the oldest undelivered notice of each alert is
    /// claimable, so a resolution never overtakes the retries of its firing notice.
    pub async fn claim_alert_deliveries(
        &self,
        now: DateTime<Utc>,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        let now = to_millis(now);
        let lease = i64::try_from(lease.as_millis()).unwrap_or(60_000);
        let client = self.client().await?;
        let rows = client
            .query(
                "WITH due AS (
                    SELECT id FROM alert_outbox AS due
                    WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= $1
                      AND (leased_until IS NULL OR leased_until <= $1)
                      AND NOT EXISTS (SELECT 1 FROM alert_outbox AS earlier
                                      WHERE earlier.alert_id = due.alert_id AND earlier.id < due.id
                                        AND earlier.delivered_at IS NULL AND earlier.failed_at IS NULL)
                    ORDER BY next_attempt_at, id LIMIT $3
                    FOR UPDATE SKIP LOCKED)
                 UPDATE alert_outbox AS o SET leased_until = $2 FROM due WHERE o.id = due.id
                 RETURNING o.id, o.alert_id, o.webhook_id, o.body, o.attempts",
                &[
                    &now,
                    &(now + lease),
                    &i64::try_from(limit).unwrap_or(16),
                ],
            )
            .await
            .map_err(pg)?;
        let mut items = rows
            .iter()
            .map(|row| {
                Ok(OutboxItem {
                    id: row.try_get(0)?,
                    alert_id: row.try_get(1)?,
                    webhook_id: row.try_get(2)?,
                    body: row.try_get(3)?,
                    attempts: u32::try_from(row.try_get::<_, i64>(4)?).unwrap_or(u32::MAX),
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(pg)?;
        items.sort_by_key(|item| item.id);
        Ok(items)
    }

    /// Records one delivery attempt and what follows it (delivered, retry, given up), and
    /// ends the claim.
    pub async fn record_alert_delivery(
        &self,
        outbox_id: i64,
        at: DateTime<Utc>,
        http_status: Option<u16>,
        error: Option<String>,
        duration_ms: i64,
        next: OutboxNext,
    ) -> Result<(), StoreError> {
        let at = to_millis(at);
        let last_error = match (http_status, error.as_deref()) {
            (_, Some(error)) => Some(error.to_string()),
            (Some(code), None) if !(200..300).contains(&code) => Some(format!("HTTP {code}")),
            _ => None,
        };
        let (delivered_at, failed_at, next_attempt_at) = match next {
            OutboxNext::Delivered => (Some(at), None, None),
            OutboxNext::GaveUp => (None, Some(at), None),
            OutboxNext::RetryAt(when) => (None, None, Some(to_millis(when))),
        };
        let status = http_status.map(i64::from);
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute(
            "INSERT INTO alert_delivery_attempts (outbox_id, attempted_at, http_status, error, duration_ms)
             VALUES ($1, $2, $3, $4, $5)",
            &[&outbox_id, &at, &status, &error, &duration_ms],
        )
        .await
        .map_err(pg)?;
        tx.execute(
            "UPDATE alert_outbox SET attempts = attempts + 1, leased_until = NULL, last_error = $2,
                    delivered_at = $3, failed_at = $4,
                    next_attempt_at = COALESCE($5, next_attempt_at)
             WHERE id = $1",
            &[
                &outbox_id,
                &last_error,
                &delivered_at,
                &failed_at,
                &next_attempt_at,
            ],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(())
    }

    /// Alert deliveries pending and given up.
    pub async fn alert_outbox_counts(&self) -> Result<(i64, i64), StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT COUNT(*) FILTER (WHERE delivered_at IS NULL AND failed_at IS NULL),
                        COUNT(*) FILTER (WHERE failed_at IS NOT NULL)
                 FROM alert_outbox",
                &[],
            )
            .await
            .map_err(pg)?;
        Ok((row.try_get(0).map_err(pg)?, row.try_get(1).map_err(pg)?))
    }

    /// A page of alerts, newest first, and the cursor (an id) of the next page.
    pub async fn list_alerts(
        &self,
        filter: AlertFilter,
    ) -> Result<(Vec<AlertView>, Option<i64>), StoreError> {
        let limit = filter.limit.clamp(1, 1000);
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {VIEW_COLUMNS} FROM alerts
                     WHERE (NOT $1::BOOLEAN OR resolved_at IS NULL)
                       AND ($2::TEXT IS NULL OR kind = $2)
                       AND ($3::TEXT IS NULL OR provider = $3)
                       AND ($4::BIGINT IS NULL OR id < $4)
                     ORDER BY id DESC LIMIT $5"
                ),
                &[
                    &filter.open_only,
                    &filter.kind.map(AlertKind::as_str),
                    &filter.provider,
                    &filter.before_id,
                    &i64::try_from(limit + 1).unwrap_or(1001),
                ],
            )
            .await
            .map_err(pg)?;
        let mut items = rows.iter().map(view).collect::<Result<Vec<_>, _>>()?;
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|a| a.id)
        } else {
            None
        };
        Ok((items, next))
    }

    /// One alert with its deliveries and their attempts.
    pub async fn get_alert(
        &self,
        id: i64,
    ) -> Result<Option<(AlertView, Vec<DeliveryView>)>, StoreError> {
        let client = self.client().await?;
        get(&client, id).await
    }
}

async fn get(
    client: &PgClient,
    id: i64,
) -> Result<Option<(AlertView, Vec<DeliveryView>)>, StoreError> {
    let Some(row) = client
        .query_opt(
            &format!("SELECT {VIEW_COLUMNS} FROM alerts WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(pg)?
    else {
        return Ok(None);
    };
    let alert = view(&row)?;
    let outbox = client
        .query(
            "SELECT id, webhook_id, status, created_at, next_attempt_at, delivered_at, failed_at
             FROM alert_outbox WHERE alert_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .map_err(pg)?;
    let attempts = client
        .query(
            "SELECT a.outbox_id, a.attempted_at, a.http_status, a.error, a.duration_ms
             FROM alert_delivery_attempts AS a JOIN alert_outbox AS o ON o.id = a.outbox_id
             WHERE o.alert_id = $1 ORDER BY a.id",
            &[&id],
        )
        .await
        .map_err(pg)?;
    let mut deliveries = Vec::with_capacity(outbox.len());
    for row in &outbox {
        deliveries.push(delivery(row, &attempts)?);
    }
    Ok(Some((alert, deliveries)))
}

/// One outbox row as a delivery, with its attempts among `attempts` (in order).
fn delivery(
    row: &tokio_postgres::Row,
    attempts: &[tokio_postgres::Row],
) -> Result<DeliveryView, StoreError> {
    let outbox_id: i64 = row.try_get(0).map_err(pg)?;
    let delivered_at: Option<i64> = row.try_get(5).map_err(pg)?;
    let failed_at: Option<i64> = row.try_get(6).map_err(pg)?;
    let mut tried = Vec::new();
    for attempt in attempts {
        if attempt.try_get::<_, i64>(0).map_err(pg)? != outbox_id {
            continue;
        }
        tried.push(AttemptView {
            attempted_at: rfc3339(attempt.try_get(1).map_err(pg)?),
            http_status: attempt
                .try_get::<_, Option<i64>>(2)
                .map_err(pg)?
                .and_then(|code| u16::try_from(code).ok()),
            error: attempt.try_get(3).map_err(pg)?,
            duration_ms: attempt.try_get(4).map_err(pg)?,
        });
    }
    let pending = delivered_at.is_none() && failed_at.is_none();
    let next_attempt_at: i64 = row.try_get(4).map_err(pg)?;
    Ok(DeliveryView {
        webhook_id: row.try_get(1).map_err(pg)?,
        status: stored_name(row, 2, "alert_outbox.status")?,
        state: match (delivered_at, failed_at) {
            (Some(_), _) => "delivered",
            (None, Some(_)) => "failed",
            (None, None) => "pending",
        },
        created_at: rfc3339(row.try_get(3).map_err(pg)?),
        next_attempt_at: pending.then(|| rfc3339(next_attempt_at)),
        delivered_at: delivered_at.map(rfc3339),
        failed_at: failed_at.map(rfc3339),
        attempts: tried,
    })
}

fn view(row: &tokio_postgres::Row) -> Result<AlertView, StoreError> {
    let resolved_at: Option<i64> = row.try_get(7).map_err(pg)?;
    Ok(AlertView {
        id: row.try_get(0).map_err(pg)?,
        kind: stored_name(row, 1, "alerts.kind")?,
        subject: row.try_get(2).map_err(pg)?,
        provider: row.try_get(3).map_err(pg)?,
        severity: stored_name(row, 4, "alerts.severity")?,
        text: row.try_get(5).map_err(pg)?,
        opened_at: rfc3339(row.try_get(6).map_err(pg)?),
        status: if resolved_at.is_some() {
            NoticeStatus::Resolved
        } else {
            NoticeStatus::Firing
        },
        resolved_at: resolved_at.map(rfc3339),
        last_sent_at: row.try_get::<_, Option<i64>>(8).map_err(pg)?.map(rfc3339),
        delivery: stored_name(row, 9, "alerts.delivery")?,
    })
}

async fn load_facts(
    tx: &PgTransaction<'_>,
    query: &AlertFactsQuery,
) -> Result<LoadedAlertFacts, StoreError> {
    let mut facts = LoadedAlertFacts::default();
    let rows = tx
        .query(
            "SELECT kind, provider, COALESCE(subject, provider_ref, 'ext:' || external_id, ''), detail, opened_at
             FROM mismatches
             WHERE resolved_at IS NULL
               AND kind IN ('status_conflict', 'duplicate_payout', 'unknown_to_ledger', 'amount_mismatch')",
            &[],
        )
        .await
        .map_err(pg)?;
    for row in &rows {
        facts.mismatches.push(OpenMismatch {
            kind: stored_name(row, 0, "mismatches.kind")?,
            provider: row.try_get(1).map_err(pg)?,
            subject: row.try_get(2).map_err(pg)?,
            detail: row.try_get(3).map_err(pg)?,
            opened_at: row.try_get(4).map_err(pg)?,
        });
    }
    let rows = tx
        .query(
            "SELECT provider, event_id, error, received_at FROM events WHERE outcome = 'quarantined'",
            &[],
        )
        .await
        .map_err(pg)?;
    for row in &rows {
        facts.quarantined.push(QuarantinedEvent {
            provider: row.try_get(0).map_err(pg)?,
            event_id: row.try_get(1).map_err(pg)?,
            error: row.try_get(2).map_err(pg)?,
            received_at: row.try_get(3).map_err(pg)?,
        });
    }
    for (provider, stuck_cutoff) in &query.providers {
        for status in [CashoutStatus::Pending, CashoutStatus::Processing] {
            let row = tx
                .query_one(
                    "SELECT COUNT(*), MIN(created_at) FROM cashouts WHERE provider = $1 AND status = $2",
                    &[provider, &status.as_str()],
                )
                .await
                .map_err(pg)?;
            let count: i64 = row.try_get(0).map_err(pg)?;
            if let Some(oldest) = row.try_get::<_, Option<i64>>(1).map_err(pg)? {
                facts.in_flight.push(InFlightStats {
                    provider: provider.clone(),
                    status,
                    count: u64::try_from(count).unwrap_or(0),
                    oldest_created_at: oldest,
                });
            }
        }
        let rows = tx
            .query(
                "SELECT provider_ref, status, created_at FROM cashouts
                 WHERE provider = $1 AND status IN ('pending', 'processing') AND created_at <= $2
                 ORDER BY created_at LIMIT $3",
                &[provider, stuck_cutoff, &STUCK_LOAD_LIMIT],
            )
            .await
            .map_err(pg)?;
        for row in &rows {
            let status: String = row.try_get(1).map_err(pg)?;
            facts.stuck.push(InFlightCashout {
                provider: provider.clone(),
                provider_ref: row.try_get(0).map_err(pg)?,
                status: parse_status(&status)?,
                created_at: row.try_get(2).map_err(pg)?,
            });
        }
        if query.seed {
            let last_webhook: Option<i64> = tx
                .query_opt(
                    "SELECT received_at FROM events WHERE provider = $1 AND source = 'webhook'
                     ORDER BY seq DESC LIMIT 1",
                    &[provider],
                )
                .await
                .map_err(pg)?
                .map(|row| row.try_get(0))
                .transpose()
                .map_err(pg)?;
            let last_sweep: Option<i64> = tx
                .query_opt(
                    "SELECT updated_at FROM poll_watermarks WHERE provider = $1",
                    &[provider],
                )
                .await
                .map_err(pg)?
                .map(|row| row.try_get(0))
                .transpose()
                .map_err(pg)?;
            facts
                .seeds
                .push((provider.clone(), last_webhook, last_sweep));
        }
    }
    facts.open_alerts = open_alerts(tx).await?;
    Ok(facts)
}

async fn open_alerts(tx: &PgTransaction<'_>) -> Result<Vec<StoredAlert>, StoreError> {
    let rows = tx
        .query(
            "SELECT id, kind, subject, provider, severity, text, opened_at, last_sent_at, delivery
             FROM alerts WHERE resolved_at IS NULL",
            &[],
        )
        .await
        .map_err(pg)?;
    let mut alerts = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: i64 = row.try_get(0).map_err(pg)?;
        let kind: String = row.try_get(1).map_err(pg)?;
        let Ok(kind) = kind.parse::<AlertKind>() else {
            tracing::warn!(
                id,
                kind,
                "an open alert of an unknown kind is left as it is"
            );
            continue;
        };
        let severity: String = row.try_get(4).map_err(pg)?;
        let delivery: String = row.try_get(8).map_err(pg)?;
        alerts.push(StoredAlert {
            id,
            kind,
            subject: row.try_get(2).map_err(pg)?,
            provider: row.try_get(3).map_err(pg)?,
            severity: severity.parse().unwrap_or(Severity::Critical),
            summary: row.try_get(5).map_err(pg)?,
            opened_at: row.try_get(6).map_err(pg)?,
            last_sent_at: row.try_get(7).map_err(pg)?,
            delivery: delivery.parse().unwrap_or(Delivery::Individual),
        });
    }
    Ok(alerts)
}

/// Resolutions, updates and opens (each guarded as on SQLite, the opens by the open-alert
/// index `ON CONFLICT`), one outbox row per notice when `enqueue`, then the open counts.
async fn apply_plan(
    tx: &PgTransaction<'_>,
    plan: &AlertPlan,
    now: i64,
    enqueue: Option<i64>,
) -> TxResult<AppliedAlerts> {
    let mut notices = Vec::new();
    let resolve = cached(
        tx,
        "UPDATE alerts SET resolved_at = $2 WHERE id = $1 AND resolved_at IS NULL
         RETURNING kind, subject, provider, severity, text, opened_at",
    )
    .await?;
    for item in &plan.resolve {
        let Some(row) = tx.query_opt(&resolve, &[&item.id, &now]).await? else {
            continue;
        };
        let kind: String = row.try_get(0)?;
        let severity: String = row.try_get(3)?;
        if let (true, Ok(kind)) = (item.notify, kind.parse::<AlertKind>()) {
            notices.push(AlertNotice {
                id: item.id,
                kind,
                severity: severity.parse().unwrap_or(Severity::Critical),
                status: NoticeStatus::Resolved,
                subject: row.try_get(1)?,
                provider: row.try_get(2)?,
                summary: row.try_get(4)?,
                opened_at: row.try_get(5)?,
                resolved_at: Some(now),
            });
        }
    }
    let update = cached(
        tx,
        "UPDATE alerts SET severity = $2, text = $3, delivery = $4,
                last_sent_at = CASE WHEN $5 THEN $6 ELSE last_sent_at END
         WHERE id = $1 AND resolved_at IS NULL
         RETURNING kind, subject, provider, opened_at",
    )
    .await?;
    for item in &plan.update {
        let row = tx
            .query_opt(
                &update,
                &[
                    &item.id,
                    &item.severity.as_str(),
                    &item.summary,
                    &item.delivery.as_str(),
                    &item.notify,
                    &now,
                ],
            )
            .await?;
        let Some(row) = row else {
            continue;
        };
        let kind: String = row.try_get(0)?;
        if let (true, Ok(kind)) = (item.notify, kind.parse::<AlertKind>()) {
            notices.push(AlertNotice {
                id: item.id,
                kind,
                severity: item.severity,
                status: NoticeStatus::Firing,
                subject: row.try_get(1)?,
                provider: row.try_get(2)?,
                summary: item.summary.clone(),
                opened_at: row.try_get(3)?,
                resolved_at: None,
            });
        }
    }
    let open = cached(
        tx,
        "INSERT INTO alerts (kind, subject, provider, severity, text, opened_at, last_sent_at, delivery)
         VALUES ($1, $2, $3, $4, $5, $6::BIGINT, CASE WHEN $7::BOOLEAN THEN $6::BIGINT END, $8)
         ON CONFLICT (kind, subject) WHERE resolved_at IS NULL DO NOTHING
         RETURNING id",
    )
    .await?;
    for item in &plan.open {
        let alert = &item.alert;
        let row = tx
            .query_opt(
                &open,
                &[
                    &alert.kind.as_str(),
                    &alert.subject,
                    &alert.provider,
                    &alert.severity.as_str(),
                    &alert.summary,
                    &now,
                    &item.notify,
                    &item.delivery.as_str(),
                ],
            )
            .await?;
        if let (Some(row), true) = (row, item.notify) {
            notices.push(AlertNotice {
                id: row.try_get(0)?,
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
        let insert = cached(
            tx,
            "INSERT INTO alert_outbox (alert_id, webhook_id, status, body, created_at, next_attempt_at)
             VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .await?;
        for notice in &notices {
            let webhook_id = format!("msg_{}", uuid::Uuid::now_v7().simple());
            tx.execute(
                &insert,
                &[
                    &notice.id,
                    &webhook_id,
                    &notice.status.as_str(),
                    &notice.body(),
                    &queued_at,
                ],
            )
            .await?;
        }
    }
    let rows = tx
        .query(
            "SELECT kind, COUNT(*) FROM alerts WHERE resolved_at IS NULL GROUP BY kind",
            &[],
        )
        .await?;
    let mut open_by_kind = Vec::new();
    for row in &rows {
        let kind: String = row.try_get(0)?;
        if let Ok(kind) = kind.parse() {
            open_by_kind.push((kind, row.try_get::<_, i64>(1)?));
        }
    }
    Ok(AppliedAlerts {
        notices,
        open_by_kind,
    })
}
