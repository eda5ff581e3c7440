//! Raw-body retention in SQL: the events whose raw body and headers are past the cut-off
//! (walked in `seq` order from a stored cursor), clearing them by `seq` range, and giving
//! the freed pages back to the file system (incremental vacuum).

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};

use super::{from_millis, to_millis, StoreError};

/// An event whose raw body and headers are due to be dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredBody {
    pub seq: i64,
    pub event_id: String,
    pub provider: String,
    pub received_at: DateTime<Utc>,
    /// The stored headers (a JSON object); `None` when not asked for or not stored.
    pub headers_json: Option<String>,
    /// The raw body; `None` when not asked for or not stored.
    pub raw_body: Option<Vec<u8>>,
}

/// One batch of the walk: the due events with something to drop among the rows after
/// the cursor, up to `through_seq`; `done` when a row at or after the cut-off (or the end
/// of the log) was reached, so nothing further is due now.
#[derive(Debug, Clone, Default)]
pub struct ExpiredBatch {
    pub rows: Vec<ExpiredBody>,
    pub through_seq: i64,
    pub done: bool,
}

/// The `seq` through which raw bodies have been cleared (0: none yet).
pub(super) fn cursor(connection: &Connection) -> Result<i64, StoreError> {
    let seq = connection
        .prepare_cached("SELECT cleared_through_seq FROM retention_cursor WHERE id = 1")?
        .query_row([], |row| row.get(0))
        .or_else(|err| match err {
            rusqlite::Error::QueryReturnedNoRows => Ok(0),
            other => Err(other),
        })?;
    Ok(seq)
}

/// Up to `limit` events after `after_seq`, in `seq` order, stopping at the first one
/// received at or after `cutoff` (events are logged in arrival order, so the rest are
/// newer; one out of order only waits for the cut-off to pass the one before it).
/// `with_content`: also read bodies and headers (for the archive).
pub(super) fn expired_batch(
    connection: &Connection,
    after_seq: i64,
    cutoff: DateTime<Utc>,
    limit: usize,
    with_content: bool,
) -> Result<ExpiredBatch, StoreError> {
    let sql = if with_content {
        "SELECT seq, event_id, provider, received_at, raw_body IS NOT NULL OR headers IS NOT NULL,
                headers, raw_body
         FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
    } else {
        "SELECT seq, event_id, provider, received_at, raw_body IS NOT NULL OR headers IS NOT NULL,
                NULL, NULL
         FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
    };
    let cutoff = to_millis(cutoff);
    let mut statement = connection.prepare_cached(sql)?;
    let mut rows = statement.query(params![after_seq, limit as i64])?;
    let mut batch = ExpiredBatch {
        through_seq: after_seq,
        ..ExpiredBatch::default()
    };
    let mut seen = 0;
    while let Some(row) = rows.next()? {
        seen += 1;
        let received_at: i64 = row.get(3)?;
        if received_at >= cutoff {
            batch.done = true;
            return Ok(batch);
        }
        let seq: i64 = row.get(0)?;
        batch.through_seq = seq;
        if row.get::<_, bool>(4)? {
            batch.rows.push(ExpiredBody {
                seq,
                event_id: row.get(1)?,
                provider: row.get(2)?,
                received_at: from_millis(received_at),
                headers_json: row.get(5)?,
                raw_body: row.get(6)?,
            });
        }
    }
    batch.done = seen < limit;
    Ok(batch)
}

/// Drops the raw body and headers of the events in `(after_seq, through_seq]` received
/// before `cutoff`, and moves the cursor to `through_seq`. Returns the rows changed.
///
/// The rows are deleted and inserted again without body and headers (same `seq`, every
/// other column as it was, whatever columns later migrations add): an `UPDATE` that
/// shrinks a row never rebalances the b-tree, so the pages the bodies filled would stay
/// allocated, each nearly empty; a delete merges underfull pages and frees the rest.
pub(super) fn clear(
    connection: &Connection,
    after_seq: i64,
    through_seq: i64,
    cutoff: DateTime<Utc>,
) -> Result<usize, StoreError> {
    // Integers only, formatted: CREATE TABLE … AS takes no parameters.
    connection.execute_batch(&format!(
        "DROP TABLE IF EXISTS temp.retention_rows;
         CREATE TEMP TABLE retention_rows AS
             SELECT * FROM main.events
             WHERE seq > {after_seq} AND seq <= {through_seq} AND received_at < {cutoff}
               AND (raw_body IS NOT NULL OR headers IS NOT NULL);",
        cutoff = to_millis(cutoff),
    ))?;
    let cleared = connection.execute(
        "UPDATE temp.retention_rows SET raw_body = NULL, headers = NULL",
        [],
    )?;
    connection.execute_batch(
        "DELETE FROM main.events WHERE seq IN (SELECT seq FROM temp.retention_rows);
         INSERT INTO main.events SELECT * FROM temp.retention_rows;
         DROP TABLE temp.retention_rows;",
    )?;
    connection
        .prepare_cached(
            "INSERT INTO retention_cursor (id, cleared_through_seq) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET
                 cleared_through_seq = max(cleared_through_seq, excluded.cleared_through_seq)",
        )?
        .execute([through_seq])?;
    Ok(cleared)
}

/// Free pages of the database file (`PRAGMA freelist_count`).
pub(super) fn free_pages(connection: &Connection) -> Result<i64, StoreError> {
    Ok(connection.query_row("PRAGMA freelist_count", [], |row| row.get(0))?)
}

/// Whether the database gives free pages back (`auto_vacuum = INCREMENTAL`).
pub(super) fn incremental(connection: &Connection) -> Result<bool, StoreError> {
    let mode: i64 = connection.query_row("PRAGMA auto_vacuum", [], |row| row.get(0))?;
    Ok(mode == 2)
}

/// Gives up to `pages` free pages back to the file system; returns the free pages left
/// (`None`: the database is not in incremental auto-vacuum mode, nothing was done).
pub(super) fn incremental_vacuum(
    connection: &Connection,
    pages: u32,
) -> Result<Option<i64>, StoreError> {
    if !incremental(connection)? {
        return Ok(None);
    }
    // One result row per page given back: step through all of them.
    let mut statement = connection.prepare(&format!("PRAGMA incremental_vacuum({pages})"))?;
    let mut rows = statement.query([])?;
    while rows.next()?.is_some() {}
    Ok(Some(free_pages(connection)?))
}
