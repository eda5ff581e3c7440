//! The status-fetch queue shared by several instances: due rows are claimed with
//! `FOR UPDATE SKIP LOCKED` and a claim expiry, so two claimers never get the same row
//! and a killed claimer's rows become claimable again once its claims expire.
//!
//! The same pattern serves every job table (the alert outbox, reconciliation work):
//! claim with a short expiry, do the work, then complete or defer as the claimer.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;

use super::from_postgres;
use crate::ingest::FetchReason;
use crate::store::{to_millis, StoreError};

/// A claimed fetch: the claimer fetches the cash-out's status, then completes or defers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedFetch {
    pub provider: String,
    pub provider_ref: String,
    pub reason: FetchReason,
    /// Failed attempts before this one.
    pub attempts: i64,
}

/// What [`defer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferred {
    /// Retried later (exponential backoff).
    Retry,
    /// `max_attempts` reached: dropped.
    GivenUp,
    /// The claim was no longer the caller's (it expired and another claimer took it,
    /// or the row is gone): nothing changed.
    NotClaimed,
}

/// Queues a status fetch for `provider_ref` unless one is queued already; `true` when new.
pub async fn enqueue(
    client: &impl GenericClient,
    provider: &str,
    provider_ref: &str,
    reason: FetchReason,
    at: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let now = to_millis(at);
    let inserted = client
        .execute(
            "INSERT INTO status_fetch_queue (provider, provider_ref, reason, requested_at, next_attempt_at)
             VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (provider, provider_ref) DO NOTHING",
            &[&provider, &provider_ref, &reason.as_str(), &now],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
    Ok(inserted == 1)
}

/// Claims up to `limit` fetches of `provider` that are due at `now` and not claimed (or
/// whose claim expired), oldest first, for `claimer` until `claim_ttl` from now (server
/// time). Rows another transaction is claiming at this instant are skipped, not waited for.
pub async fn claim_due(
    client: &impl GenericClient,
    provider: &str,
    claimer: &str,
    now: DateTime<Utc>,
    limit: usize,
    claim_ttl: Duration,
) -> Result<Vec<ClaimedFetch>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let ttl_ms = i64::try_from(claim_ttl.as_millis()).unwrap_or(i64::MAX) as f64;
    let rows = client
        .query(
            "WITH due AS (
                 SELECT provider, provider_ref FROM status_fetch_queue
                 WHERE provider = $1 AND next_attempt_at <= $2
                   AND (claimed_until IS NULL OR claimed_until < now())
                 ORDER BY next_attempt_at, requested_at
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE status_fetch_queue q
                SET claimed_by = $4, claimed_until = now() + $5 * interval '1 millisecond'
               FROM due
              WHERE q.provider = due.provider AND q.provider_ref = due.provider_ref
             RETURNING q.provider, q.provider_ref, q.reason, q.attempts",
            &[&provider, &to_millis(now), &limit, &claimer, &ttl_ms],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
    rows.iter()
        .map(|row| {
            let reason: String = row.try_get(2).map_err(|e| from_postgres(&e))?;
            Ok(ClaimedFetch {
                provider: row.try_get(0).map_err(|e| from_postgres(&e))?,
                provider_ref: row.try_get(1).map_err(|e| from_postgres(&e))?,
                reason: reason.parse().map_err(|err: crate::ingest::UnknownName| {
                    StoreError::Database(err.to_string())
                })?,
                attempts: row.try_get(3).map_err(|e| from_postgres(&e))?,
            })
        })
        .collect()
}

/// Drops a fetch `claimer` did; `false` when the claim was no longer its own (another
/// claimer took it over after it expired, and will finish it).
pub async fn complete(
    client: &impl GenericClient,
    fetch: &ClaimedFetch,
    claimer: &str,
) -> Result<bool, StoreError> {
    let deleted = client
        .execute(
            "DELETE FROM status_fetch_queue WHERE provider = $1 AND provider_ref = $2 AND claimed_by = $3",
            &[&fetch.provider, &fetch.provider_ref, &claimer],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
    Ok(deleted == 1)
}

/// Releases a failed fetch for a retry with exponential backoff (1 s × 2^attempts, at
/// most ~17 min), or drops it after `max_attempts`. Same backoff as the SQLite store.
pub async fn defer(
    client: &impl GenericClient,
    fetch: &ClaimedFetch,
    claimer: &str,
    now: DateTime<Utc>,
    max_attempts: i64,
) -> Result<Deferred, StoreError> {
    defer_ref(
        client,
        &fetch.provider,
        &fetch.provider_ref,
        claimer,
        now,
        max_attempts,
    )
    .await
}

/// [`defer`] for the fetch of `provider_ref` claimed by `claimer`.
pub async fn defer_ref(
    client: &impl GenericClient,
    provider: &str,
    provider_ref: &str,
    claimer: &str,
    now: DateTime<Utc>,
    max_attempts: i64,
) -> Result<Deferred, StoreError> {
    let given_up = client
        .execute(
            "DELETE FROM status_fetch_queue
             WHERE provider = $1 AND provider_ref = $2 AND claimed_by = $3 AND attempts + 1 >= $4",
            &[&provider, &provider_ref, &claimer, &max_attempts],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
    if given_up == 1 {
        return Ok(Deferred::GivenUp);
    }
    let retried = client
        .execute(
            "UPDATE status_fetch_queue
                SET attempts = attempts + 1,
                    next_attempt_at = $4 + 1000 * (1::BIGINT << LEAST(attempts + 1, 10)::INT),
                    claimed_by = NULL, claimed_until = NULL
              WHERE provider = $1 AND provider_ref = $2 AND claimed_by = $3",
            &[&provider, &provider_ref, &claimer, &to_millis(now)],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
    Ok(if retried == 1 {
        Deferred::Retry
    } else {
        Deferred::NotClaimed
    })
}
