//! Exactly-once primitives of ingestion across instances, each run inside the caller's
//! write transaction, on the types of [`crate::ingest::plan`]: claim a webhook's dedup key,
//! claim its replay nonce, lock a cash-out for update (inserting it first when new). Each
//! is one `INSERT … ON CONFLICT` on a unique key, never a read followed by a write, so two
//! instances receiving the same webhook at once cannot both take it: the second waits for
//! the first one's commit and then answers its holder.
//!
//! They are the concurrent forms of the SQLite store's `delivery_with_dedup_key`,
//! `claim_nonce` and `cashout_for_update` (src/store/ingest.rs).

use chrono::{DateTime, Utc};

use super::{cached, from_postgres, PgTransaction};
use crate::ingest::plan::{NonceClaim, PriorDelivery, StoredCashout};
use crate::ingest::{EventOutcome, ObservationSource, WebhookRecord};
use crate::state::{CashoutStatus, CurrentState};
use crate::store::{to_millis, StoreError};

/// How often a claim retries when the row that blocked it is gone by the time it is read
/// (it cannot be, while events and replay-cache entries are only deleted by age).
const CLAIM_ATTEMPTS: usize = 3;

/// Claims the webhook's dedup key by inserting its event row (the delivery's columns,
/// outcome `quarantined` until the caller rewrites it with the plan's event in the same
/// transaction), unless an event with the same `(provider, dedup_key)` exists: then that
/// event, for [`crate::ingest::plan::admit`]. `None` when this delivery now holds the key.
/// When another transaction is inserting the same key, this waits for it: its commit
/// makes that one the holder, its rollback lets this one claim the key. A delivery the
/// plan then refuses (its nonce taken: a replay) rolls its transaction back, which frees
/// the key again.
pub async fn claim_dedup_key(
    tx: &PgTransaction<'_>,
    record: &WebhookRecord,
) -> Result<Option<PriorDelivery>, StoreError> {
    let secret_index = i64::try_from(record.secret_index).unwrap_or(i64::MAX);
    let received_at = to_millis(record.received_at);
    for _ in 0..CLAIM_ATTEMPTS {
        let claimed = tx
            .execute(
                &cached(
                    tx,
                    "INSERT INTO events (event_id, provider, source, dedup_key, body_sha256, raw_body, headers,
                                     secret_index, outcome, received_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (provider, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING",
                )
                .await?,
                &[
                    &record.event_id,
                    &record.provider,
                    &ObservationSource::Webhook.as_str(),
                    &record.dedup_key,
                    &record.body_sha256,
                    &record.raw_body,
                    &record.headers_json,
                    &secret_index,
                    &EventOutcome::Quarantined.as_str(),
                    &received_at,
                ],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        if claimed == 1 {
            return Ok(None);
        }
        let holder = tx
            .query_opt(
                &cached(
                    tx,
                    "SELECT event_id, body_sha256 FROM events WHERE provider = $1 AND dedup_key = $2",
                )
                .await?,
                &[&record.provider, &record.dedup_key],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        if let Some(row) = holder {
            return Ok(Some(PriorDelivery {
                event_id: row.try_get(0).map_err(|e| from_postgres(&e))?,
                body_sha256: row.try_get(1).map_err(|e| from_postgres(&e))?,
            }));
        }
    }
    Err(StoreError::Unavailable(format!(
        "the dedup key of a {} webhook kept conflicting without a visible holder",
        record.provider
    )))
}

/// Records the signed request's `nonce` for `record` in the replay cache unless it is
/// recorded already: then the first delivery holds it.
pub async fn claim_nonce(
    tx: &PgTransaction<'_>,
    record: &WebhookRecord,
    nonce: &str,
) -> Result<NonceClaim, StoreError> {
    let seen_at = to_millis(record.received_at);
    for _ in 0..CLAIM_ATTEMPTS {
        let claimed = tx
            .execute(
                &cached(
                    tx,
                    "INSERT INTO replay_cache (provider, nonce, body_sha256, event_id, seen_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (provider, nonce) DO NOTHING",
                )
                .await?,
                &[
                    &record.provider,
                    &nonce,
                    &record.body_sha256,
                    &record.event_id,
                    &seen_at,
                ],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        if claimed == 1 {
            return Ok(NonceClaim::Claimed);
        }
        let holder = tx
            .query_opt(
                &cached(
                    tx,
                    "SELECT event_id, body_sha256 FROM replay_cache WHERE provider = $1 AND nonce = $2",
                )
                .await?,
                &[&record.provider, &nonce],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        if let Some(row) = holder {
            return Ok(NonceClaim::Taken(PriorDelivery {
                event_id: row.try_get(0).map_err(|e| from_postgres(&e))?,
                body_sha256: row.try_get(1).map_err(|e| from_postgres(&e))?,
            }));
        }
    }
    Err(StoreError::Unavailable(format!(
        "a nonce of {} kept conflicting without a visible holder",
        record.provider
    )))
}

/// The cash-out `(provider, provider_ref)`, locked for update until the caller's
/// transaction ends; `None` when there is none.
pub async fn cashout_for_update(
    tx: &PgTransaction<'_>,
    provider: &str,
    provider_ref: &str,
) -> Result<Option<StoredCashout>, StoreError> {
    let row = tx
        .query_opt(
            &cached(
                tx,
                "SELECT id, status, held FROM cashouts WHERE provider = $1 AND provider_ref = $2 FOR UPDATE",
            )
            .await?,
            &[&provider, &provider_ref],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
    row.map(|row| stored(&row)).transpose()
}

/// A cash-out locked by [`cashout_or_insert_for_update`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockedCashout {
    pub cashout: StoredCashout,
    /// This transaction created it (with the state it was asked to insert).
    pub inserted: bool,
}

/// The cash-out `(provider, provider_ref)` locked for update, first inserted with `state`
/// (first seen at `at`) when it does not exist. Two transactions doing this at once for a
/// new cash-out: one inserts it, the other waits for that commit and locks the row it made
/// (no unique violation to retry).
pub async fn cashout_or_insert_for_update(
    tx: &PgTransaction<'_>,
    provider: &str,
    provider_ref: &str,
    state: CurrentState,
    at: DateTime<Utc>,
) -> Result<LockedCashout, StoreError> {
    let now = to_millis(at);
    for _ in 0..CLAIM_ATTEMPTS {
        let inserted = tx
            .query_opt(
                &cached(
                    tx,
                    "INSERT INTO cashouts (provider, provider_ref, status, held, created_at, first_seen_at,
                                       updated_at, book_changed_at)
                 VALUES ($1, $2, $3, $4, $5, $5, $5, $5)
                 ON CONFLICT (provider, provider_ref) DO NOTHING
                 RETURNING id, status, held",
                )
                .await?,
                &[&provider, &provider_ref, &state.status.as_str(), &state.held, &now],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        // A row this transaction inserted is locked by it until the commit.
        if let Some(row) = inserted {
            return Ok(LockedCashout {
                cashout: stored(&row)?,
                inserted: true,
            });
        }
        if let Some(cashout) = cashout_for_update(tx, provider, provider_ref).await? {
            return Ok(LockedCashout {
                cashout,
                inserted: false,
            });
        }
    }
    Err(StoreError::Unavailable(format!(
        "cash-out {provider}/{provider_ref} kept conflicting without a visible row"
    )))
}

/// A cash-out from a row whose first columns are `id, status, held`.
pub(super) fn stored(row: &tokio_postgres::Row) -> Result<StoredCashout, StoreError> {
    let status: String = row.try_get(1).map_err(|e| from_postgres(&e))?;
    let status: CashoutStatus = status
        .parse()
        .map_err(|err: crate::state::UnknownStatus| StoreError::Database(err.to_string()))?;
    Ok(StoredCashout {
        id: row.try_get(0).map_err(|e| from_postgres(&e))?,
        state: CurrentState {
            status,
            held: row.try_get(2).map_err(|e| from_postgres(&e))?,
        },
    })
}
