//! Store operations of the recovery poller: watermarks, due status checks, the fetch queue.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::{from_millis, to_millis, StoreError};

pub(super) fn watermark(
    connection: &Connection,
    provider: &str,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    Ok(connection
        .prepare_cached("SELECT watermark FROM poll_watermarks WHERE provider = ?1")?
        .query_row(params![provider], |row| row.get::<_, i64>(0))
        .optional()?
        .map(from_millis))
}

pub(super) fn set_watermark(
    connection: &Connection,
    provider: &str,
    watermark: DateTime<Utc>,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    // Never move a watermark backwards (a slow sweep finishing after a faster one).
    connection
        .prepare_cached(
            "INSERT INTO poll_watermarks (provider, watermark, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (provider) DO UPDATE SET watermark = MAX(watermark, excluded.watermark),
                                                  updated_at = excluded.updated_at",
        )?
        .execute(params![provider, to_millis(watermark), to_millis(at)])?;
    Ok(())
}

/// Which completed cash-outs to ask about again (a reversal may follow a completion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompletedRecheck {
    /// Only those completed at or after this.
    pub completed_since: DateTime<Utc>,
    /// Only those last checked before this (or never).
    pub checked_before: DateTime<Utc>,
}

/// Non-terminal cash-outs not updated since `cutoff` (then, with `recheck`, recently
/// completed ones), least recently checked first.
pub(super) fn due_status_checks(
    connection: &Connection,
    provider: &str,
    cutoff: DateTime<Utc>,
    recheck: Option<CompletedRecheck>,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT provider_ref FROM cashouts
         WHERE provider = ?1 AND updated_at <= ?2
           AND ((status IN ('pending', 'processing')
                 AND (last_status_check_at IS NULL OR last_status_check_at <= ?2))
             OR (?4 IS NOT NULL AND status = 'completed' AND completed_at >= ?4
                 AND (last_status_check_at IS NULL OR last_status_check_at <= ?5)))
         ORDER BY status = 'completed', COALESCE(last_status_check_at, 0), created_at, id LIMIT ?3",
    )?;
    let rows = statement.query_map(
        params![
            provider,
            to_millis(cutoff),
            limit as i64,
            recheck.map(|r| to_millis(r.completed_since)),
            recheck.map(|r| to_millis(r.checked_before)),
        ],
        |row| row.get(0),
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn mark_status_checked(
    connection: &Connection,
    provider: &str,
    provider_ref: &str,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    connection
        .prepare_cached("UPDATE cashouts SET last_status_check_at = ?3 WHERE provider = ?1 AND provider_ref = ?2")?
        .execute(params![provider, provider_ref, to_millis(at)])?;
    Ok(())
}

/// Queued fetches whose time has come, oldest first.
pub(super) fn due_fetches(
    connection: &Connection,
    provider: &str,
    now: DateTime<Utc>,
    limit: usize,
) -> Result<Vec<(String, String)>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT provider_ref, reason FROM status_fetch_queue WHERE provider = ?1 AND next_attempt_at <= ?2
         ORDER BY next_attempt_at, requested_at LIMIT ?3",
    )?;
    let rows = statement.query_map(params![provider, to_millis(now), limit as i64], |row| {
        Ok((row.get(0)?, row.get(1)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn complete_fetch(
    connection: &Connection,
    provider: &str,
    provider_ref: &str,
) -> Result<(), StoreError> {
    connection
        .prepare_cached("DELETE FROM status_fetch_queue WHERE provider = ?1 AND provider_ref = ?2")?
        .execute(params![provider, provider_ref])?;
    Ok(())
}

/// Pushes a failed fetch back with exponential backoff; gives up after `max_attempts`.
pub(super) fn defer_fetch(
    connection: &Connection,
    provider: &str,
    provider_ref: &str,
    now: DateTime<Utc>,
    max_attempts: i64,
) -> Result<bool, StoreError> {
    let attempts: Option<i64> = connection
        .prepare_cached(
            "SELECT attempts FROM status_fetch_queue WHERE provider = ?1 AND provider_ref = ?2",
        )?
        .query_row(params![provider, provider_ref], |row| row.get(0))
        .optional()?;
    let Some(attempts) = attempts else {
        return Ok(false);
    };
    if attempts + 1 >= max_attempts {
        complete_fetch(connection, provider, provider_ref)?;
        return Ok(false);
    }
    let backoff_ms = 1000i64.saturating_mul(1i64 << (attempts + 1).min(10));
    connection
        .prepare_cached(
            "UPDATE status_fetch_queue SET attempts = attempts + 1, next_attempt_at = ?3
             WHERE provider = ?1 AND provider_ref = ?2",
        )?
        .execute(params![provider, provider_ref, to_millis(now) + backoff_ms])?;
    Ok(true)
}

pub(super) fn queued_fetch_count(
    connection: &Connection,
    provider: &str,
) -> Result<i64, StoreError> {
    Ok(connection
        .prepare_cached("SELECT COUNT(*) FROM status_fetch_queue WHERE provider = ?1")?
        .query_row(params![provider], |row| row.get(0))?)
}
