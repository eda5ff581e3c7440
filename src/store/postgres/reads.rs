//! The API's read queries and the reports index on PostgreSQL (src/store/queries.rs,
//! the index part of src/store/report.rs, the mismatch listings), with the SQLite
//! facade's signatures and results: the same rows, in the same order, with the same
//! cursors ([`Page::next`] is `(created_at ms, id)`, a mismatch page continues below an id).
//!
//! A cash-out listing is one ordered query (`cashouts_by_provider_status_created` with
//! both filters, `cashouts_by_created` otherwise) where SQLite merges one bounded index
//! range per (provider, status): both give the newest `limit` rows before the cursor.
//! Text keys are ordered `COLLATE "C"` (byte order, as SQLite's `BINARY`).

use chrono::{DateTime, SecondsFormat, Utc};
use std::str::FromStr;

use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::Row;

use super::{from_postgres, PgStore};
use crate::ingest::FetchReason;
use crate::reconcile::MismatchKind;
use crate::state::CashoutStatus;
use crate::store::queries::UnknownStoredValue;
use crate::store::{
    from_millis, to_millis, CashoutFilter, CashoutRow, EventRow, MismatchFilter, MismatchRecord,
    MismatchRow, Page, ReportIndexRow, StoreError, StoredEvent,
};

pub(super) const CASHOUT_COLUMNS: &str = "id, provider, provider_ref, external_id, status, held, provider_status, reason_code,
    amount_minor, currency, fee_minor, created_at, updated_at, completed_at, webhook_count, recovered_by_poll";

pub(super) fn cashout_from_row(row: &Row) -> Result<CashoutRow, StoreError> {
    Ok(CashoutRow {
        id: get(row, 0)?,
        provider: get(row, 1)?,
        provider_ref: get(row, 2)?,
        external_id: get(row, 3)?,
        status: name(row, 4, "cashouts.status")?,
        held: get(row, 5)?,
        provider_status: get(row, 6)?,
        reason_code: get(row, 7)?,
        amount_minor: get(row, 8)?,
        currency: get(row, 9)?,
        fee_minor: get(row, 10)?,
        created_at: from_millis(get(row, 11)?),
        updated_at: from_millis(get(row, 12)?),
        completed_at: get::<Option<i64>>(row, 13)?.map(from_millis),
        webhook_count: get(row, 14)?,
        recovered_by_poll: get(row, 15)?,
    })
}

fn index_row(row: &Row) -> Result<ReportIndexRow, StoreError> {
    Ok(ReportIndexRow {
        date: get(row, 0)?,
        is_final: get(row, 1)?,
        rows: get(row, 2)?,
        sha256: get(row, 3)?,
        generated_at: get(row, 4)?,
    })
}

/// Column `index` of `row`.
pub(super) fn get<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<T, StoreError> {
    row.try_get(index).map_err(|e| from_postgres(&e))
}

/// The value named in text column `index` (`column`, for the error) of `row`: a name
/// none of the type's values has is a store error naming column and value, as on SQLite.
pub(super) fn name<T: FromStr>(
    row: &Row,
    index: usize,
    column: &'static str,
) -> Result<T, StoreError> {
    let value: String = get(row, index)?;
    parse_name(column, value)
}

/// The value named in nullable text column `index` of `row`, if any.
fn name_opt<T: FromStr>(
    row: &Row,
    index: usize,
    column: &'static str,
) -> Result<Option<T>, StoreError> {
    get::<Option<String>>(row, index)?
        .map(|value| parse_name(column, value))
        .transpose()
}

fn parse_name<T: FromStr>(column: &'static str, value: String) -> Result<T, StoreError> {
    value
        .parse()
        .map_err(|_| StoreError::Database(UnknownStoredValue { column, value }.to_string()))
}

fn rfc3339(millis: i64) -> String {
    from_millis(millis).to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl PgStore {
    /// One page of cash-outs, newest first (see the module's note on the plan).
    pub async fn list_cashouts(
        &self,
        filter: CashoutFilter,
    ) -> Result<Page<CashoutRow>, StoreError> {
        let limit = filter.limit.clamp(1, 1000);
        // Created in [from, below): `below` is the earlier of `to` and the cursor's position.
        let from = filter.from.map_or(i64::MIN, to_millis);
        let mut below = filter
            .to
            .map_or((i64::MAX, i64::MIN), |to| (to_millis(to), i64::MIN));
        if let Some(after) = filter.after {
            below = below.min(after);
        }
        let fetch = (limit + 1) as i64;
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&from, &below.0, &below.1, &fetch];
        // Only the filters given appear in the statement, so the planner picks the index
        // that serves them (a `$n IS NULL OR …` form would hide it).
        let mut conditions = String::new();
        if let Some(provider) = &filter.provider {
            params.push(provider);
            conditions.push_str(&format!(" AND provider = ${}", params.len()));
        }
        let status = filter.status.map(CashoutStatus::as_str);
        if let Some(status) = &status {
            params.push(status);
            conditions.push_str(&format!(" AND status = ${}", params.len()));
        }
        let sql = format!(
            "SELECT {CASHOUT_COLUMNS} FROM cashouts
             WHERE created_at >= $1 AND (created_at, id) < ($2, $3){conditions}
             ORDER BY created_at DESC, id DESC LIMIT $4"
        );
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&sql)
            .await
            .map_err(|e| from_postgres(&e))?;
        let rows = client
            .query(&statement, &params)
            .await
            .map_err(|e| from_postgres(&e))?;
        let mut items = rows
            .iter()
            .map(cashout_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let next = if items.len() > limit {
            items.truncate(limit);
            items
                .last()
                .map(|last| (to_millis(last.created_at), last.id))
        } else {
            None
        };
        Ok(Page { items, next })
    }

    /// One cash-out and its event timeline (in arrival order).
    pub async fn get_cashout(
        &self,
        provider: String,
        provider_ref: String,
    ) -> Result<Option<(CashoutRow, Vec<EventRow>)>, StoreError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {CASHOUT_COLUMNS} FROM cashouts WHERE provider = $1 AND provider_ref = $2"
        );
        let row = client
            .query_opt(&sql, &[&provider, &provider_ref])
            .await
            .map_err(|e| from_postgres(&e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let cashout = cashout_from_row(&row)?;
        let rows = client
            .query(
                "SELECT event_id, source, outcome, raw_status, reason_code, status, received_at, applied, secret_index
                 FROM events WHERE cashout_id = $1 ORDER BY seq",
                &[&cashout.id],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        let events = rows
            .iter()
            .map(|row| {
                Ok(EventRow {
                    event_id: get(row, 0)?,
                    source: name(row, 1, "events.source")?,
                    outcome: name(row, 2, "events.outcome")?,
                    raw_status: get(row, 3)?,
                    reason_code: get(row, 4)?,
                    status: name_opt(row, 5, "events.status")?,
                    received_at: from_millis(get(row, 6)?),
                    applied: get(row, 7)?,
                    secret_index: get(row, 8)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some((cashout, events)))
    }

    /// A stored event with its raw body (for reprocessing).
    pub async fn get_event(&self, event_id: String) -> Result<Option<StoredEvent>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT event_id, provider, source, outcome, error, raw_body, headers, secret_index
                 FROM events WHERE event_id = $1",
                &[&event_id],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        row.as_ref()
            .map(|row| {
                Ok(StoredEvent {
                    event_id: get(row, 0)?,
                    provider: get(row, 1)?,
                    source: name(row, 2, "events.source")?,
                    outcome: name(row, 3, "events.outcome")?,
                    error: get(row, 4)?,
                    raw_body: get(row, 5)?,
                    headers_json: get(row, 6)?,
                    secret_index: get(row, 7)?,
                })
            })
            .transpose()
    }

    /// Whether an event with this id is stored.
    pub async fn event_exists(&self, event_id: String) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt("SELECT 1 FROM events WHERE event_id = $1", &[&event_id])
            .await
            .map_err(|e| from_postgres(&e))?;
        Ok(row.is_some())
    }

    /// Queued status fetches of a provider, oldest first (claimed or not).
    pub async fn pending_status_fetches(
        &self,
        provider: String,
        limit: usize,
    ) -> Result<Vec<(String, FetchReason)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT provider_ref, reason FROM status_fetch_queue WHERE provider = $1
                 ORDER BY next_attempt_at, provider_ref COLLATE \"C\" LIMIT $2",
                &[&provider, &(limit as i64)],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        rows.iter()
            .map(|row| Ok((get(row, 0)?, name(row, 1, "status_fetch_queue.reason")?)))
            .collect::<Result<_, StoreError>>()
    }

    /// Mismatches, optionally only open ones or one kind, oldest first.
    pub async fn list_mismatches(
        &self,
        kind: Option<String>,
        open_only: bool,
    ) -> Result<Vec<MismatchRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, kind, provider, provider_ref, external_id, detail, opened_at, resolved_at
                 FROM mismatches
                 WHERE ($1::TEXT IS NULL OR kind = $1) AND (NOT $2 OR resolved_at IS NULL)
                 ORDER BY id",
                &[&kind, &open_only],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        rows.iter()
            .map(|row| {
                Ok(MismatchRow {
                    id: get(row, 0)?,
                    kind: name(row, 1, "mismatches.kind")?,
                    provider: get(row, 2)?,
                    provider_ref: get(row, 3)?,
                    external_id: get(row, 4)?,
                    detail: get(row, 5)?,
                    opened_at: rfc3339(get(row, 6)?),
                    resolved_at: get::<Option<i64>>(row, 7)?.map(rfc3339),
                })
            })
            .collect::<Result<_, StoreError>>()
    }

    /// One page of mismatches, newest first, and the id the next page continues below.
    pub async fn mismatch_page(
        &self,
        filter: MismatchFilter,
    ) -> Result<(Vec<MismatchRecord>, Option<i64>), StoreError> {
        let limit = filter.limit.clamp(1, 1000);
        let (from, until) = filter.flagged_during.unzip();
        let kind = filter.kind.map(MismatchKind::as_str);
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, kind, provider, subject, provider_ref, external_id, detail, opened_at, resolved_at
                 FROM mismatches
                 WHERE ($1::TEXT IS NULL OR kind = $1) AND ($2::TEXT IS NULL OR provider = $2)
                   AND ($3::BOOLEAN IS NULL OR ($3 AND resolved_at IS NULL)
                        OR (NOT $3 AND resolved_at IS NOT NULL))
                   AND ($4::BIGINT IS NULL
                        OR (opened_at < $5::BIGINT AND (resolved_at IS NULL OR resolved_at >= $4)))
                   AND ($6::BIGINT IS NULL OR id < $6)
                 ORDER BY id DESC LIMIT $7",
                &[
                    &kind,
                    &filter.provider,
                    &filter.open,
                    &from,
                    &until,
                    &filter.before_id,
                    &((limit + 1) as i64),
                ],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        let mut items = rows
            .iter()
            .map(mismatch_from_row)
            .collect::<Result<Vec<_>, StoreError>>()?;
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|m| m.id)
        } else {
            None
        };
        Ok((items, next))
    }

    /// Records a generated report in the index (a later generation replaces it). Under a
    /// daily report's lease, refused once another instance took it over.
    pub async fn record_report(&self, row: ReportIndexRow) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| from_postgres(&e))?;
        super::lease::check_scoped_fence(&tx).await?;
        tx.execute(
                "INSERT INTO reports (date, final, rows, sha256, generated_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (date) DO UPDATE SET final = EXCLUDED.final, rows = EXCLUDED.rows,
                    sha256 = EXCLUDED.sha256, generated_at = EXCLUDED.generated_at",
            &[&row.date, &row.is_final, &row.rows, &row.sha256, &row.generated_at],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
        tx.commit().await.map_err(|e| from_postgres(&e))
    }

    /// When the book first learned anything (its oldest event or ledger entry), if ever.
    pub async fn first_entry_at(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT (SELECT received_at FROM events ORDER BY seq LIMIT 1),
                        (SELECT registered_at FROM ledger ORDER BY id LIMIT 1)",
                &[],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        let event: Option<i64> = row.try_get(0).map_err(|e| from_postgres(&e))?;
        let ledger: Option<i64> = row.try_get(1).map_err(|e| from_postgres(&e))?;
        let first = match (event, ledger) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(first.map(from_millis))
    }

    /// The generated reports, newest date first.
    pub async fn list_reports(&self) -> Result<Vec<ReportIndexRow>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT date, final, rows, sha256, generated_at FROM reports
                 ORDER BY date COLLATE \"C\" DESC",
                &[],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        rows.iter().map(index_row).collect()
    }

    /// One generated report's index row.
    pub async fn get_report(&self, date: String) -> Result<Option<ReportIndexRow>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT date, final, rows, sha256, generated_at FROM reports WHERE date = $1",
                &[&date],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        row.as_ref().map(index_row).transpose()
    }
}

/// A mismatch row read as `id, kind, provider, subject, provider_ref, external_id,
/// detail, opened_at, resolved_at`.
pub(super) fn mismatch_from_row(row: &Row) -> Result<MismatchRecord, StoreError> {
    Ok(MismatchRecord {
        id: get(row, 0)?,
        kind: name(row, 1, "mismatches.kind")?,
        provider: get(row, 2)?,
        subject: get(row, 3)?,
        provider_ref: get(row, 4)?,
        external_id: get(row, 5)?,
        detail: get(row, 6)?,
        opened_at: get(row, 7)?,
        resolved_at: get(row, 8)?,
    })
}
