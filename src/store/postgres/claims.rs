//! Exactly-once primitives of ingestion across instances, each run inside the caller's
//! write transaction: claim a webhook's dedup key, claim a replay nonce, lock a cash-out
//! for update (inserting it first when new). Each is one `INSERT … ON CONFLICT` on a
//! unique key, never a read followed by a write, so two instances receiving the same
//! webhook at once cannot both take it: the second waits for the first one's commit and
//! then sees its row.

use chrono::{DateTime, Utc};
use tokio_postgres::Transaction;

use super::from_postgres;
use crate::state::{CashoutStatus, CurrentState};
use crate::store::{to_millis, StoreError};

/// A verified webhook's event row as first written, before its rules are applied: the
/// caller then fills in its outcome, cash-out and snapshot in the same transaction.
#[derive(Debug, Clone, Copy)]
pub struct ReceivedWebhook<'a> {
    pub event_id: &'a str,
    pub provider: &'a str,
    /// The provider's event id, else the SHA-256 of the body.
    pub dedup_key: &'a str,
    pub body_sha256: &'a str,
    pub raw_body: &'a [u8],
    /// The headers that matter, as a JSON object.
    pub headers_json: &'a str,
    pub secret_index: usize,
    pub received_at: DateTime<Utc>,
}

/// The `outcome` of an event row claimed and not yet decided (rolled back or replaced
/// before the caller's commit).
pub const OUTCOME_CLAIMED: &str = "claimed";

/// Who holds a dedup key or a nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This transaction took it.
    Won,
    /// An earlier (committed) event holds it: its id and its body's SHA-256, for the
    /// caller to tell a duplicate (same body) from a replay (different body).
    Held {
        event_id: String,
        body_sha256: Option<String>,
    },
}

/// How often a claim retries when the row that blocked it is gone by the time it is read
/// (it cannot be, while events and replay-cache entries are only deleted by age).
const CLAIM_ATTEMPTS: usize = 3;

/// Inserts the webhook's event row unless an event with the same `(provider, dedup_key)`
/// exists. When another transaction is inserting the same key, this waits for it: its
/// commit makes this one [`Claim::Held`] by its event, its rollback lets this one win.
pub async fn claim_dedup_key(
    tx: &Transaction<'_>,
    event: &ReceivedWebhook<'_>,
) -> Result<Claim, StoreError> {
    let secret_index = i64::try_from(event.secret_index).unwrap_or(i64::MAX);
    let received_at = to_millis(event.received_at);
    for _ in 0..CLAIM_ATTEMPTS {
        let won = tx
            .execute(
                "INSERT INTO events (event_id, provider, source, dedup_key, body_sha256, raw_body, headers,
                                     secret_index, outcome, received_at)
                 VALUES ($1, $2, 'webhook', $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (provider, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING",
                &[
                    &event.event_id,
                    &event.provider,
                    &event.dedup_key,
                    &event.body_sha256,
                    &event.raw_body,
                    &event.headers_json,
                    &secret_index,
                    &OUTCOME_CLAIMED,
                    &received_at,
                ],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        if won == 1 {
            return Ok(Claim::Won);
        }
        let held = tx
            .query_opt(
                "SELECT event_id, body_sha256 FROM events WHERE provider = $1 AND dedup_key = $2",
                &[&event.provider, &event.dedup_key],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        if let Some(row) = held {
            return Ok(Claim::Held {
                event_id: row.try_get(0).map_err(|e| from_postgres(&e))?,
                body_sha256: row.try_get(1).map_err(|e| from_postgres(&e))?,
            });
        }
    }
    Err(StoreError::Unavailable(format!(
        "dedup key of {} kept conflicting without a visible holder",
        event.provider
    )))
}

/// Records a signed request id (`nonce`) for `provider` with the body and event it came
/// with, unless it is recorded already: then [`Claim::Held`] by the first one.
pub async fn claim_nonce(
    tx: &Transaction<'_>,
    provider: &str,
    nonce: &str,
    body_sha256: &str,
    event_id: &str,
    seen_at: DateTime<Utc>,
) -> Result<Claim, StoreError> {
    let seen_at = to_millis(seen_at);
    for _ in 0..CLAIM_ATTEMPTS {
        let won = tx
            .execute(
                "INSERT INTO replay_cache (provider, nonce, body_sha256, event_id, seen_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (provider, nonce) DO NOTHING",
                &[&provider, &nonce, &body_sha256, &event_id, &seen_at],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        if won == 1 {
            return Ok(Claim::Won);
        }
        let held = tx
            .query_opt(
                "SELECT event_id, body_sha256 FROM replay_cache WHERE provider = $1 AND nonce = $2",
                &[&provider, &nonce],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        if let Some(row) = held {
            return Ok(Claim::Held {
                event_id: row.try_get(0).map_err(|e| from_postgres(&e))?,
                body_sha256: row.try_get(1).map_err(|e| from_postgres(&e))?,
            });
        }
    }
    Err(StoreError::Unavailable(format!(
        "nonce of {provider} kept conflicting without a visible holder"
    )))
}

/// A cash-out row locked `FOR UPDATE` until the caller's transaction ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockedCashout {
    pub id: i64,
    pub state: CurrentState,
    /// This transaction created it (its first report).
    pub inserted: bool,
}

/// Locks the cash-out `(provider, provider_ref)` for update; `None` when there is none.
pub async fn lock_cashout(
    tx: &Transaction<'_>,
    provider: &str,
    provider_ref: &str,
) -> Result<Option<LockedCashout>, StoreError> {
    let row = tx
        .query_opt(
            "SELECT id, status, held FROM cashouts WHERE provider = $1 AND provider_ref = $2 FOR UPDATE",
            &[&provider, &provider_ref],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
    row.map(|row| locked(&row, false)).transpose()
}

/// Locks the cash-out `(provider, provider_ref)` for update, first inserting it with
/// `state` (as first seen at `at`) when it does not exist. Two transactions doing this at
/// once for a new cash-out: one inserts it, the other waits for that commit and locks the
/// row it made.
pub async fn lock_or_insert_cashout(
    tx: &Transaction<'_>,
    provider: &str,
    provider_ref: &str,
    state: CurrentState,
    at: DateTime<Utc>,
) -> Result<LockedCashout, StoreError> {
    let now = to_millis(at);
    for _ in 0..CLAIM_ATTEMPTS {
        let inserted = tx
            .query_opt(
                "INSERT INTO cashouts (provider, provider_ref, status, held, created_at, first_seen_at,
                                       updated_at, book_changed_at)
                 VALUES ($1, $2, $3, $4, $5, $5, $5, $5)
                 ON CONFLICT (provider, provider_ref) DO NOTHING
                 RETURNING id, status, held",
                &[&provider, &provider_ref, &state.status.as_str(), &state.held, &now],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        // A row this transaction inserted is locked by it until the commit.
        if let Some(row) = inserted {
            return locked(&row, true);
        }
        if let Some(existing) = lock_cashout(tx, provider, provider_ref).await? {
            return Ok(existing);
        }
    }
    Err(StoreError::Unavailable(format!(
        "cash-out {provider}/{provider_ref} kept conflicting without a visible row"
    )))
}

fn locked(row: &tokio_postgres::Row, inserted: bool) -> Result<LockedCashout, StoreError> {
    let status: String = row.try_get(1).map_err(|e| from_postgres(&e))?;
    let status: CashoutStatus = status
        .parse()
        .map_err(|err: crate::state::UnknownStatus| StoreError::Database(err.to_string()))?;
    Ok(LockedCashout {
        id: row.try_get(0).map_err(|e| from_postgres(&e))?,
        state: CurrentState {
            status,
            held: row.try_get(2).map_err(|e| from_postgres(&e))?,
        },
        inserted,
    })
}
