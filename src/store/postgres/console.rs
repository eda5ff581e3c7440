//! The ops console's read queries on PostgreSQL (src/store/console.rs), with the SQLite
//! facade's signatures and results: per-provider overview figures, exact id look-ups,
//! stuck cash-outs, a cash-out's findings, quarantined events, one event, open-mismatch
//! counts and alert deliveries in short.
//!
//! Each statement reads a bounded index range or looks a row up, never a scan of the
//! cash-outs or the event log (checked with `EXPLAIN` on a seeded book, see
//! `console_tests.rs`): the in-flight figures and stuck cash-outs read
//! `cashouts_by_provider_status_created`, the providers holding cash-outs are found by one
//! index seek each, quarantined events are paged on `events_quarantined_by_seq` (migration
//! 6). Text sort keys are ordered `COLLATE "C"` (byte order, as SQLite's `BINARY`).

use chrono::{DateTime, Utc};
use tokio_postgres::Row;

use super::reads::{cashout_from_row, get, mismatch_from_row, name, CASHOUT_COLUMNS};
use super::{from_postgres, PgClient, PgStore};
use crate::store::{
    to_millis, CashoutAlert, CashoutRow, ConsoleEvent, DeliverySummary, MismatchCount,
    MismatchRecord, ProviderFigures, StoreError, IN_FLIGHT,
};

/// The providers holding cash-outs: one seek on `(provider, provider_ref)` per provider.
pub(super) const STORED_PROVIDERS: &str = "WITH RECURSIVE p(provider) AS (
         SELECT MIN(provider) FROM cashouts
         UNION ALL
         SELECT (SELECT MIN(provider) FROM cashouts WHERE provider > p.provider)
         FROM p WHERE p.provider IS NOT NULL)
     SELECT provider FROM p WHERE provider IS NOT NULL";

/// `$1` provider, `$2` in-flight state, `$3` stuck cut-off (ms): count, oldest creation
/// and stuck count of one index range.
pub(super) const IN_FLIGHT_FIGURES: &str =
    "SELECT COUNT(*), MIN(created_at), COUNT(*) FILTER (WHERE created_at <= $3)
     FROM cashouts WHERE provider = $1 AND status = $2";

/// `$1` provider: open alerts, open mismatches, quarantined events, last sweep.
pub(super) const PROVIDER_FIGURES: &str =
    "SELECT (SELECT COUNT(*) FROM alerts WHERE provider = $1 AND resolved_at IS NULL),
            (SELECT COUNT(*) FROM mismatches WHERE provider = $1 AND resolved_at IS NULL),
            (SELECT COUNT(*) FROM events WHERE outcome = 'quarantined' AND provider = $1),
            (SELECT updated_at FROM poll_watermarks WHERE provider = $1)";

/// `$1` provider, `$2` provider ref.
pub(super) fn by_ref_sql() -> String {
    format!("SELECT {CASHOUT_COLUMNS} FROM cashouts WHERE provider = $1 AND provider_ref = $2")
}

/// `$1` provider, `$2` external id.
pub(super) fn by_external_sql() -> String {
    format!(
        "SELECT {CASHOUT_COLUMNS} FROM cashouts WHERE provider = $1 AND external_id = $2
         ORDER BY id DESC LIMIT 100"
    )
}

/// `$1` provider, `$2` in-flight state, `$3` cut-off (ms), `$4` limit.
pub(super) fn stuck_sql() -> String {
    format!(
        "SELECT {CASHOUT_COLUMNS} FROM cashouts
         WHERE provider = $1 AND status = $2 AND created_at <= $3
         ORDER BY created_at, id LIMIT $4"
    )
}

/// `$1` provider, `$2` the cash-out's provider ref, `$3` `ext:<external id>` or NULL.
pub(super) const CASHOUT_MISMATCHES: &str =
    "SELECT id, kind, provider, subject, provider_ref, external_id, detail, opened_at, resolved_at
     FROM mismatches WHERE provider = $1 AND subject IN ($2, $3) ORDER BY id DESC LIMIT 200";

/// `$1` the alert subject `provider/provider_ref`.
pub(super) const CASHOUT_ALERTS: &str =
    "SELECT id, kind, severity, text, opened_at, resolved_at FROM alerts
     WHERE subject = $1 ORDER BY id DESC LIMIT 200";

const EVENT_COLUMNS: &str = "seq, event_id, provider, source, outcome, error, provider_ref,
    received_at, secret_index, body_sha256, octet_length(raw_body)::BIGINT";

/// `$1` before seq, `$2` limit.
pub(super) fn quarantined_sql() -> String {
    format!(
        "SELECT {EVENT_COLUMNS}, NULL::BYTEA FROM events
         WHERE outcome = 'quarantined' AND seq < $1 ORDER BY seq DESC LIMIT $2"
    )
}

/// `$1` event id, `$2` with the body.
pub(super) fn event_sql() -> String {
    format!(
        "SELECT {EVENT_COLUMNS}, CASE WHEN $2 THEN raw_body END FROM events WHERE event_id = $1"
    )
}

/// Open mismatches by kind and provider (the open ones' partial index).
pub(super) const OPEN_MISMATCH_COUNTS: &str =
    "SELECT kind, provider, COUNT(*), MIN(opened_at) FROM mismatches
     WHERE resolved_at IS NULL GROUP BY kind, provider
     ORDER BY kind COLLATE \"C\", provider COLLATE \"C\"";

/// `$1` alert ids: one row per id, in the order given (duplicates included).
pub(super) const DELIVERY_SUMMARIES: &str =
    "SELECT COUNT(o.id), COALESCE(SUM(o.attempts), 0)::BIGINT, COUNT(o.delivered_at),
            COUNT(o.failed_at),
            (SELECT l.last_error FROM alert_outbox l
             WHERE l.alert_id = ids.id AND l.last_error IS NOT NULL ORDER BY l.id DESC LIMIT 1)
     FROM unnest($1::BIGINT[]) WITH ORDINALITY AS ids(id, n)
     LEFT JOIN alert_outbox o ON o.alert_id = ids.id
     GROUP BY ids.id, ids.n ORDER BY ids.n";

/// A count column as the console's `u64`.
fn count(row: &Row, index: usize) -> Result<u64, StoreError> {
    Ok(u64::try_from(get::<i64>(row, index)?).unwrap_or(0))
}

fn event_from_row(row: &Row) -> Result<ConsoleEvent, StoreError> {
    Ok(ConsoleEvent {
        seq: get(row, 0)?,
        event_id: get(row, 1)?,
        provider: get(row, 2)?,
        source: name(row, 3, "events.source")?,
        outcome: name(row, 4, "events.outcome")?,
        error: get(row, 5)?,
        provider_ref: get(row, 6)?,
        received_at: get(row, 7)?,
        secret_index: get(row, 8)?,
        body_sha256: get(row, 9)?,
        body_bytes: get(row, 10)?,
        raw_body: get(row, 11)?,
    })
}

fn alert_from_row(row: &Row) -> Result<CashoutAlert, StoreError> {
    Ok(CashoutAlert {
        id: get(row, 0)?,
        kind: name(row, 1, "alerts.kind")?,
        severity: name(row, 2, "alerts.severity")?,
        text: get(row, 3)?,
        opened_at: get(row, 4)?,
        resolved_at: get(row, 5)?,
    })
}

/// The providers that hold cash-outs (byte order, as on SQLite).
async fn stored_providers(client: &PgClient) -> Result<Vec<String>, StoreError> {
    let rows = client
        .query(STORED_PROVIDERS, &[])
        .await
        .map_err(|e| from_postgres(&e))?;
    let mut providers = rows
        .iter()
        .map(|row| get(row, 0))
        .collect::<Result<Vec<String>, _>>()?;
    providers.sort();
    Ok(providers)
}

impl PgStore {
    /// The ops console's overview figures of each `(provider, stuck cutoff)`, from one
    /// repeatable-read snapshot.
    pub async fn console_overview(
        &self,
        providers: Vec<(String, DateTime<Utc>)>,
    ) -> Result<Vec<ProviderFigures>, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| from_postgres(&e))?;
        let in_flight = tx
            .prepare_cached(IN_FLIGHT_FIGURES)
            .await
            .map_err(|e| from_postgres(&e))?;
        let others = tx
            .prepare_cached(PROVIDER_FIGURES)
            .await
            .map_err(|e| from_postgres(&e))?;
        let mut out = Vec::with_capacity(providers.len());
        for (provider, stuck_cutoff) in providers {
            let stuck_cutoff = to_millis(stuck_cutoff);
            let mut figures = ProviderFigures::default();
            for status in IN_FLIGHT {
                let row = tx
                    .query_one(&in_flight, &[&provider, &status.as_str(), &stuck_cutoff])
                    .await
                    .map_err(|e| from_postgres(&e))?;
                figures
                    .in_flight
                    .push((status, count(&row, 0)?, get(&row, 1)?));
                figures.stuck += count(&row, 2)?;
            }
            let row = tx
                .query_one(&others, &[&provider])
                .await
                .map_err(|e| from_postgres(&e))?;
            figures.open_alerts = count(&row, 0)?;
            figures.open_mismatches = count(&row, 1)?;
            figures.quarantined = count(&row, 2)?;
            figures.last_sweep_at = get(&row, 3)?;
            figures.provider = provider;
            out.push(figures);
        }
        tx.commit().await.map_err(|e| from_postgres(&e))?;
        Ok(out)
    }

    /// Cash-outs whose provider ref or external id is exactly `id` (each provider looked
    /// up by its indexes), optionally of one provider only; newest first.
    pub async fn find_cashouts_by_id(
        &self,
        provider: Option<String>,
        id: String,
    ) -> Result<Vec<CashoutRow>, StoreError> {
        let client = self.client().await?;
        let providers = match provider {
            Some(provider) => vec![provider],
            None => stored_providers(&client).await?,
        };
        let by_ref = client
            .prepare_cached(&by_ref_sql())
            .await
            .map_err(|e| from_postgres(&e))?;
        let by_external = client
            .prepare_cached(&by_external_sql())
            .await
            .map_err(|e| from_postgres(&e))?;
        let mut found: Vec<CashoutRow> = Vec::new();
        for provider in &providers {
            if let Some(row) = client
                .query_opt(&by_ref, &[provider, &id])
                .await
                .map_err(|e| from_postgres(&e))?
            {
                found.push(cashout_from_row(&row)?);
            }
            for row in client
                .query(&by_external, &[provider, &id])
                .await
                .map_err(|e| from_postgres(&e))?
            {
                let row = cashout_from_row(&row)?;
                if !found.iter().any(|f| f.id == row.id) {
                    found.push(row);
                }
            }
        }
        found.sort_by_key(|c| std::cmp::Reverse((c.created_at, c.id)));
        Ok(found)
    }

    /// Stuck cash-outs of `provider` (in flight, created at or before `cutoff`), oldest
    /// first, at most `limit`: one bounded index range per in-flight state, merged.
    ///
    /// Prepared per call, not cached: a cached statement gets a generic plan after five
    /// executions, and the generic plan (blind to how few cash-outs are in flight) walks
    /// `cashouts_by_created` in order and filters, reading every cash-out older than the
    /// cut-off; planned with its values it reads `(provider, status, created_at)`.
    pub async fn stuck_cashouts(
        &self,
        provider: String,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<CashoutRow>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare(&stuck_sql())
            .await
            .map_err(|e| from_postgres(&e))?;
        let cutoff = to_millis(cutoff);
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut items = Vec::new();
        for status in IN_FLIGHT {
            let rows = client
                .query(&statement, &[&provider, &status.as_str(), &cutoff, &fetch])
                .await
                .map_err(|e| from_postgres(&e))?;
            for row in &rows {
                items.push(cashout_from_row(row)?);
            }
        }
        items.sort_by_key(|c| (c.created_at, c.id));
        items.truncate(limit);
        Ok(items)
    }

    /// The mismatches and alerts (open and resolved) about one cash-out.
    pub async fn cashout_findings(
        &self,
        provider: String,
        provider_ref: String,
        external_id: Option<String>,
    ) -> Result<(Vec<MismatchRecord>, Vec<CashoutAlert>), StoreError> {
        let client = self.client().await?;
        let ledger_subject = external_id.map(|e| format!("ext:{e}"));
        let mismatches = client
            .query(
                CASHOUT_MISMATCHES,
                &[&provider, &provider_ref, &ledger_subject],
            )
            .await
            .map_err(|e| from_postgres(&e))?
            .iter()
            .map(mismatch_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let alerts = client
            .query(CASHOUT_ALERTS, &[&format!("{provider}/{provider_ref}")])
            .await
            .map_err(|e| from_postgres(&e))?
            .iter()
            .map(alert_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((mismatches, alerts))
    }

    /// Quarantined events, newest first, and the cursor (an event seq) of the next page.
    pub async fn quarantined_events(
        &self,
        before_seq: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<ConsoleEvent>, Option<i64>), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&quarantined_sql())
            .await
            .map_err(|e| from_postgres(&e))?;
        let fetch = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let rows = client
            .query(&statement, &[&before_seq.unwrap_or(i64::MAX), &fetch])
            .await
            .map_err(|e| from_postgres(&e))?;
        let mut items = rows
            .iter()
            .map(event_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|e| e.seq)
        } else {
            None
        };
        Ok((items, next))
    }

    /// One stored event as the console shows it, with its raw body when `with_body`.
    pub async fn console_event(
        &self,
        event_id: String,
        with_body: bool,
    ) -> Result<Option<ConsoleEvent>, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&event_sql())
            .await
            .map_err(|e| from_postgres(&e))?;
        client
            .query_opt(&statement, &[&event_id, &with_body])
            .await
            .map_err(|e| from_postgres(&e))?
            .as_ref()
            .map(event_from_row)
            .transpose()
    }

    /// Open mismatches counted by kind and provider, with the oldest of each.
    pub async fn open_mismatch_counts(&self) -> Result<Vec<MismatchCount>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(OPEN_MISMATCH_COUNTS, &[])
            .await
            .map_err(|e| from_postgres(&e))?;
        rows.iter()
            .map(|row| {
                Ok(MismatchCount {
                    kind: name(row, 0, "mismatches.kind")?,
                    provider: get(row, 1)?,
                    count: count(row, 2)?,
                    oldest_opened_at: get(row, 3)?,
                })
            })
            .collect()
    }

    /// The deliveries in short of each alert in `ids` (one round trip for all).
    pub async fn alert_delivery_summaries(
        &self,
        ids: Vec<i64>,
    ) -> Result<Vec<(i64, DeliverySummary)>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let rows = client
            .query(DELIVERY_SUMMARIES, &[&ids])
            .await
            .map_err(|e| from_postgres(&e))?;
        ids.into_iter()
            .zip(&rows)
            .map(|(id, row)| {
                Ok((
                    id,
                    DeliverySummary {
                        deliveries: count(row, 0)?,
                        attempts: count(row, 1)?,
                        delivered: count(row, 2)?,
                        failed: count(row, 3)?,
                        last_error: get(row, 4)?,
                    },
                ))
            })
            .collect()
    }
}
