//! Read-side queries on a read connection: cash-out lists, one cash-out's timeline, events.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{from_millis, to_millis, StoreError};
use crate::ingest::{EventOutcome, FetchReason, ObservationSource};
use crate::state::CashoutStatus;

/// Filters and position of a cash-out listing.
#[derive(Debug, Clone, Default)]
pub struct CashoutFilter {
    pub provider: Option<String>,
    pub status: Option<CashoutStatus>,
    /// Created at or after.
    pub from: Option<DateTime<Utc>>,
    /// Created before.
    pub to: Option<DateTime<Utc>>,
    pub limit: usize,
    /// Continue after this (created_at millis, id) position.
    pub after: Option<(i64, i64)>,
}

/// A page of results and where the next one starts.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<(i64, i64)>,
}

/// A stored cash-out (amounts in minor units).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CashoutRow {
    pub id: i64,
    pub provider: String,
    pub provider_ref: String,
    pub external_id: Option<String>,
    pub status: CashoutStatus,
    pub held: bool,
    pub provider_status: Option<String>,
    pub reason_code: Option<String>,
    pub amount_minor: Option<i64>,
    pub currency: Option<String>,
    pub fee_minor: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub webhook_count: i64,
    pub recovered_by_poll: i64,
}

/// One entry of a cash-out's timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub event_id: String,
    pub source: ObservationSource,
    pub outcome: EventOutcome,
    pub raw_status: Option<String>,
    pub reason_code: Option<String>,
    pub status: Option<CashoutStatus>,
    pub received_at: DateTime<Utc>,
    pub applied: bool,
    /// Which of the provider's webhook secrets verified it (0 = the first), if a webhook.
    pub secret_index: Option<i64>,
}

/// A stored webhook event with its raw bytes.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub event_id: String,
    pub provider: String,
    pub source: ObservationSource,
    pub outcome: EventOutcome,
    pub error: Option<String>,
    pub raw_body: Option<Vec<u8>>,
    pub headers_json: Option<String>,
    pub secret_index: Option<i64>,
}

/// A stored name that none of its column's values has (a store written by a newer
/// version, or edited by hand).
#[derive(Debug, thiserror::Error)]
#[error("unknown value {value:?} in column {column}")]
pub struct UnknownStoredValue {
    pub column: &'static str,
    pub value: String,
}

/// The value named in text column `index` (`column`, for the error) of `row`.
pub(super) fn stored_name<T: FromStr>(
    row: &Row<'_>,
    index: usize,
    column: &'static str,
) -> rusqlite::Result<T> {
    let value: String = row.get(index)?;
    parse_name(index, column, value)
}

/// The value named in nullable text column `index` of `row`, if any.
pub(super) fn stored_name_opt<T: FromStr>(
    row: &Row<'_>,
    index: usize,
    column: &'static str,
) -> rusqlite::Result<Option<T>> {
    row.get::<_, Option<String>>(index)?
        .map(|value| parse_name(index, column, value))
        .transpose()
}

fn parse_name<T: FromStr>(
    index: usize,
    column: &'static str,
    value: String,
) -> rusqlite::Result<T> {
    value.parse().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            Box::new(UnknownStoredValue { column, value }),
        )
    })
}

pub(super) const CASHOUT_COLUMNS: &str = "id, provider, provider_ref, external_id, status, held, provider_status, reason_code,
    amount_minor, currency, fee_minor, created_at, updated_at, completed_at, webhook_count, recovered_by_poll";

pub(super) fn cashout_from_row(row: &Row<'_>) -> rusqlite::Result<CashoutRow> {
    Ok(CashoutRow {
        id: row.get(0)?,
        provider: row.get(1)?,
        provider_ref: row.get(2)?,
        external_id: row.get(3)?,
        status: stored_name(row, 4, "cashouts.status")?,
        held: row.get(5)?,
        provider_status: row.get(6)?,
        reason_code: row.get(7)?,
        amount_minor: row.get(8)?,
        currency: row.get(9)?,
        fee_minor: row.get(10)?,
        created_at: from_millis(row.get(11)?),
        updated_at: from_millis(row.get(12)?),
        completed_at: row.get::<_, Option<i64>>(13)?.map(from_millis),
        webhook_count: row.get(14)?,
        recovered_by_poll: row.get(15)?,
    })
}

/// One page of cash-outs, newest first. Read as one index range per (provider, state)
/// (`cashouts_by_provider_status_created`), each bounded by the page size, then merged:
/// no filter combination scans the table, however rare the cash-outs it matches.
pub(super) fn list_cashouts(
    connection: &Connection,
    filter: &CashoutFilter,
) -> Result<Page<CashoutRow>, StoreError> {
    let limit = filter.limit.clamp(1, 1000);
    let providers = match &filter.provider {
        Some(provider) => vec![provider.clone()],
        None => super::console::stored_providers(connection)?,
    };
    let statuses: Vec<&str> = match filter.status {
        Some(status) => vec![status.as_str()],
        None => CashoutStatus::ALL.iter().map(|s| s.as_str()).collect(),
    };
    // Created in [from, below): `below` is the earlier of `to` and the cursor's position.
    let from = filter.from.map_or(i64::MIN, to_millis);
    let mut below = filter
        .to
        .map_or((i64::MAX, i64::MIN), |to| (to_millis(to), i64::MIN));
    if let Some(after) = filter.after {
        below = below.min(after);
    }
    let sql = format!(
        "SELECT {CASHOUT_COLUMNS} FROM cashouts
         WHERE provider = ?1 AND status = ?2 AND created_at >= ?3 AND (created_at, id) < (?4, ?5)
         ORDER BY created_at DESC, id DESC LIMIT ?6"
    );
    let mut statement = connection.prepare_cached(&sql)?;
    let mut items: Vec<CashoutRow> = Vec::new();
    for provider in &providers {
        for status in &statuses {
            let rows = statement.query_map(
                params![provider, status, from, below.0, below.1, (limit + 1) as i64],
                cashout_from_row,
            )?;
            for row in rows {
                items.push(row?);
            }
        }
    }
    items.sort_by_key(|c| std::cmp::Reverse((c.created_at, c.id)));
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

pub(super) fn get_cashout(
    connection: &Connection,
    provider: &str,
    provider_ref: &str,
) -> Result<Option<(CashoutRow, Vec<EventRow>)>, StoreError> {
    let sql =
        format!("SELECT {CASHOUT_COLUMNS} FROM cashouts WHERE provider = ?1 AND provider_ref = ?2");
    let cashout = connection
        .prepare_cached(&sql)?
        .query_row(params![provider, provider_ref], cashout_from_row)
        .optional()?;
    let Some(cashout) = cashout else {
        return Ok(None);
    };
    let mut statement = connection.prepare_cached(
        "SELECT event_id, source, outcome, raw_status, reason_code, status, received_at, applied, secret_index FROM events
         WHERE cashout_id = ?1 ORDER BY seq",
    )?;
    let events = statement
        .query_map(params![cashout.id], |row| {
            Ok(EventRow {
                event_id: row.get(0)?,
                source: stored_name(row, 1, "events.source")?,
                outcome: stored_name(row, 2, "events.outcome")?,
                raw_status: row.get(3)?,
                reason_code: row.get(4)?,
                status: stored_name_opt(row, 5, "events.status")?,
                received_at: from_millis(row.get(6)?),
                applied: row.get(7)?,
                secret_index: row.get(8)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some((cashout, events)))
}

pub(super) fn get_event(
    connection: &Connection,
    event_id: &str,
) -> Result<Option<StoredEvent>, StoreError> {
    Ok(connection
        .prepare_cached(
            "SELECT event_id, provider, source, outcome, error, raw_body, headers, secret_index FROM events WHERE event_id = ?1",
        )?
        .query_row(params![event_id], |row| {
            Ok(StoredEvent {
                event_id: row.get(0)?,
                provider: row.get(1)?,
                source: stored_name(row, 2, "events.source")?,
                outcome: stored_name(row, 3, "events.outcome")?,
                error: row.get(4)?,
                raw_body: row.get(5)?,
                headers_json: row.get(6)?,
                secret_index: row.get(7)?,
            })
        })
        .optional()?)
}

pub(super) fn event_exists(connection: &Connection, event_id: &str) -> Result<bool, StoreError> {
    Ok(connection
        .prepare_cached("SELECT 1 FROM events WHERE event_id = ?1")?
        .query_row(params![event_id], |_| Ok(()))
        .optional()?
        .is_some())
}

pub(super) fn pending_status_fetches(
    connection: &Connection,
    provider: &str,
    limit: usize,
) -> Result<Vec<(String, FetchReason)>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT provider_ref, reason FROM status_fetch_queue WHERE provider = ?1 ORDER BY next_attempt_at, provider_ref LIMIT ?2",
    )?;
    let rows = statement.query_map(params![provider, limit as i64], |row| {
        Ok((
            row.get(0)?,
            stored_name(row, 1, "status_fetch_queue.reason")?,
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
