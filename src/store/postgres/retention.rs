//! Raw-body retention on PostgreSQL (src/store/retention.rs): the events whose raw body
//! and headers are past the cut-off, walked in `seq` order from the stored cursor, and
//! clearing them by `seq` range — the same batches, the same archive (written by
//! [`crate::retention`] from the same [`ExpiredBody`] rows), the same cursor.
//!
//! Clearing is an `UPDATE … SET raw_body = NULL, headers = NULL` of at most one batch
//! (the event row, its hashes and the timeline stay). PostgreSQL keeps the old row
//! versions (and the bodies' TOAST chunks) until (auto)vacuum removes them; their space is
//! then reused by new rows, and the table files do not shrink (only `VACUUM FULL` or
//! `pg_repack` give space back to the file system, both outside the daemon). So
//! [`PgStore::free_pages`] and [`PgStore::incremental_vacuum`], SQLite's file-level space
//! return, have nothing to do here: they report 0 and do nothing (a run logs
//! `pages_freed=0`); bloat is watched with `pg_stat_user_tables.n_dead_tup`.
//!
//! Several writers commit `seq` values out of order, so the walk could step over a `seq`
//! still in flight; it never does in practice: the walk stops at the first event received
//! at or after the cut-off (at least a day ago), and a transaction in flight holds an
//! event received moments ago.

use chrono::{DateTime, Utc};

use super::reads::get;
use super::{from_postgres, PgStore};
use crate::store::{from_millis, to_millis, ExpiredBatch, ExpiredBody, StoreError};

/// `$1` after seq, `$2` limit: the walk with bodies and headers (for the archive).
pub(super) const EXPIRED_WITH_CONTENT: &str =
    "SELECT seq, event_id, provider, received_at, raw_body IS NOT NULL OR headers IS NOT NULL,
            headers, raw_body
     FROM events WHERE seq > $1 ORDER BY seq LIMIT $2";

/// `$1` after seq, `$2` limit: the walk without them.
pub(super) const EXPIRED: &str =
    "SELECT seq, event_id, provider, received_at, raw_body IS NOT NULL OR headers IS NOT NULL,
            NULL::TEXT, NULL::BYTEA
     FROM events WHERE seq > $1 ORDER BY seq LIMIT $2";

/// `$1` after seq, `$2` through seq, `$3` cut-off (ms).
pub(super) const CLEAR: &str = "UPDATE events SET raw_body = NULL, headers = NULL
     WHERE seq > $1 AND seq <= $2 AND received_at < $3
       AND (raw_body IS NOT NULL OR headers IS NOT NULL)";

impl PgStore {
    /// The `events.seq` through which raw bodies have been cleared by retention (0: none).
    pub async fn retention_cursor(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT cleared_through_seq FROM retention_cursor WHERE id = 1",
                &[],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        row.as_ref().map_or(Ok(0), |row| get(row, 0))
    }

    /// The next batch of events after `after_seq` whose raw body and headers are due
    /// (received before `cutoff`), stopping at the first one received at or after it;
    /// see [`ExpiredBatch`]. `with_content`: also bodies and headers (for the archive).
    pub async fn expired_raw_bodies(
        &self,
        after_seq: i64,
        cutoff: DateTime<Utc>,
        limit: usize,
        with_content: bool,
    ) -> Result<ExpiredBatch, StoreError> {
        let client = self.client().await?;
        let sql = if with_content {
            EXPIRED_WITH_CONTENT
        } else {
            EXPIRED
        };
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| from_postgres(&e))?;
        let rows = client
            .query(
                &statement,
                &[&after_seq, &i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        let cutoff = to_millis(cutoff);
        let mut batch = ExpiredBatch {
            through_seq: after_seq,
            ..ExpiredBatch::default()
        };
        for row in &rows {
            let received_at: i64 = get(row, 3)?;
            if received_at >= cutoff {
                batch.done = true;
                return Ok(batch);
            }
            let seq: i64 = get(row, 0)?;
            batch.through_seq = seq;
            if get::<bool>(row, 4)? {
                batch.rows.push(ExpiredBody {
                    seq,
                    event_id: get(row, 1)?,
                    provider: get(row, 2)?,
                    received_at: from_millis(received_at),
                    headers_json: get(row, 5)?,
                    raw_body: get(row, 6)?,
                });
            }
        }
        batch.done = rows.len() < limit;
        Ok(batch)
    }

    /// Drops raw bodies and headers of the events in `(after_seq, through_seq]` received
    /// before `cutoff` (events, hashes and timeline stay) and advances the retention
    /// cursor (never backwards), in one transaction. Returns the rows changed.
    pub async fn clear_raw_bodies(
        &self,
        after_seq: i64,
        through_seq: i64,
        cutoff: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| from_postgres(&e))?;
        let cleared = tx
            .execute(CLEAR, &[&after_seq, &through_seq, &to_millis(cutoff)])
            .await
            .map_err(|e| from_postgres(&e))?;
        tx.execute(
            "INSERT INTO retention_cursor (id, cleared_through_seq) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET cleared_through_seq =
                 GREATEST(retention_cursor.cleared_through_seq, EXCLUDED.cleared_through_seq)",
            &[&through_seq],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
        tx.commit().await.map_err(|e| from_postgres(&e))?;
        Ok(usize::try_from(cleared).unwrap_or(usize::MAX))
    }

    /// SQLite's incremental vacuum has no PostgreSQL counterpart the daemon runs:
    /// autovacuum makes the cleared rows' space reusable (see the module's note). Does
    /// nothing; `Some(0)`: no free pages left to give back.
    pub async fn incremental_vacuum(&self, pages: u32) -> Result<Option<i64>, StoreError> {
        let _ = pages;
        Ok(Some(0))
    }

    /// Always 0: PostgreSQL keeps no free-page list the daemon could hand back to the
    /// file system (see the module's note), so retention's vacuum phase is skipped.
    pub async fn free_pages(&self) -> Result<i64, StoreError> {
        Ok(0)
    }
}
