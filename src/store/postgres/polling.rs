//! The recovery poller's store operations on PostgreSQL (src/store/polling.rs): watermarks,
//! due status checks, the fetch queue and the replay cache's pruning, with the SQLite
//! facade's signatures and results.
//!
//! The one difference several instances need: [`PgStore::due_fetches`] claims the rows it
//! returns for this pool ([`queue::claim_due`], `FOR UPDATE SKIP LOCKED`, for
//! [`FETCH_CLAIM_TTL`]), so two instances never fetch the same cash-out at once; a claim
//! ends with [`PgStore::complete_fetch`] or [`PgStore::defer_fetch`], or expires (a killed
//! instance's fetches become due again for the others).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::queue::{self, Deferred};
use super::{from_postgres, PgStore};
use crate::store::{from_millis, to_millis, CompletedRecheck, StoreError};

/// How long fetches returned by [`PgStore::due_fetches`] stay this pool's: long enough
/// for a batch of 100 under a provider's `max_rps`, short enough that a killed
/// instance's batch is fetched by another soon after.
pub const FETCH_CLAIM_TTL: Duration = Duration::from_secs(300);

impl PgStore {
    /// The end of the last search window completed for `provider`.
    pub async fn watermark(&self, provider: String) -> Result<Option<DateTime<Utc>>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT watermark FROM poll_watermarks WHERE provider = $1",
                &[&provider],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        row.map(|row| row.try_get::<_, i64>(0).map(from_millis))
            .transpose()
            .map_err(|e| from_postgres(&e))
    }

    /// Records a completed search window (never moves backwards: a slow sweep finishing
    /// after a faster one, on this instance or another). Under a poll cycle's lease, the
    /// lease's fence is checked in the same transaction (see [`super::lease`]).
    pub async fn set_watermark(
        &self,
        provider: String,
        watermark: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| from_postgres(&e))?;
        super::lease::check_scoped_fence(&tx).await?;
        tx.execute(
            "INSERT INTO poll_watermarks (provider, watermark, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT (provider) DO UPDATE
                    SET watermark = GREATEST(poll_watermarks.watermark, EXCLUDED.watermark),
                        updated_at = EXCLUDED.updated_at",
            &[&provider, &to_millis(watermark), &to_millis(Utc::now())],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
        tx.commit().await.map_err(|e| from_postgres(&e))
    }

    /// Non-terminal cash-outs of `provider` unchanged since `cutoff` (then, with
    /// `recheck`, recently completed ones), least recently checked first.
    pub async fn due_status_checks(
        &self,
        provider: String,
        cutoff: DateTime<Utc>,
        recheck: Option<CompletedRecheck>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT provider_ref FROM cashouts
                 WHERE provider = $1 AND updated_at <= $2
                   AND ((status IN ('pending', 'processing')
                         AND (last_status_check_at IS NULL OR last_status_check_at <= $2))
                     OR ($4::BIGINT IS NOT NULL AND status = 'completed' AND completed_at >= $4
                         AND (last_status_check_at IS NULL OR last_status_check_at <= $5)))
                 ORDER BY status = 'completed', COALESCE(last_status_check_at, 0), created_at, id
                 LIMIT $3",
                &[
                    &provider,
                    &to_millis(cutoff),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                    &recheck.map(|r| to_millis(r.completed_since)),
                    &recheck.map(|r| to_millis(r.checked_before)),
                ],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(|e| from_postgres(&e)))
            .collect()
    }

    /// Marks a cash-out's status as checked without news (e.g. unknown to the provider).
    pub async fn mark_status_checked(
        &self,
        provider: String,
        provider_ref: String,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE cashouts SET last_status_check_at = $3 WHERE provider = $1 AND provider_ref = $2",
                &[&provider, &provider_ref, &to_millis(Utc::now())],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        Ok(())
    }

    /// Queued status fetches of `provider` that are due, oldest first, as
    /// `(provider_ref, reason)`: claimed for this pool (see the module), so another
    /// instance asking at the same time gets other rows or none.
    pub async fn due_fetches(
        &self,
        provider: String,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let client = self.client().await?;
        let claimed = queue::claim_due(
            &client,
            &provider,
            self.claimer(),
            Utc::now(),
            limit,
            FETCH_CLAIM_TTL,
        )
        .await?;
        Ok(claimed
            .into_iter()
            .map(|fetch| (fetch.provider_ref, fetch.reason.as_str().to_string()))
            .collect())
    }

    /// Drops a queued fetch (done, or nothing more to learn), whoever claimed it: as
    /// [`PgStore::record_fetched_status`] does, what has been learnt need not be asked again.
    pub async fn complete_fetch(
        &self,
        provider: String,
        provider_ref: String,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM status_fetch_queue WHERE provider = $1 AND provider_ref = $2",
                &[&provider, &provider_ref],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        Ok(())
    }

    /// Retries a failed queued fetch later (the SQLite store's backoff) and releases this
    /// pool's claim; `false` when it was given up, or is not this pool's claim any more
    /// (gone, or taken over after the claim expired: its new claimer decides).
    pub async fn defer_fetch(
        &self,
        provider: String,
        provider_ref: String,
        max_attempts: i64,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let deferred = queue::defer_ref(
            &client,
            &provider,
            &provider_ref,
            self.claimer(),
            Utc::now(),
            max_attempts,
        )
        .await?;
        Ok(deferred == Deferred::Retry)
    }

    /// How many status fetches are queued for `provider` (claimed or not).
    pub async fn queued_fetch_count(&self, provider: String) -> Result<i64, StoreError> {
        let client = self.client().await?;
        client
            .query_one(
                "SELECT COUNT(*) FROM status_fetch_queue WHERE provider = $1",
                &[&provider],
            )
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| from_postgres(&e))
    }

    /// Drops replay-cache entries older than `before` (their timestamps are stale anyway).
    pub async fn prune_replay_cache(&self, before: DateTime<Utc>) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let deleted = client
            .execute(
                "DELETE FROM replay_cache WHERE seen_at < $1",
                &[&to_millis(before)],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
    }
}
