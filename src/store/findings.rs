//! Mismatches as stored rows: one open row per (kind, provider, subject).

use rusqlite::{params, Connection};
use serde::Serialize;

use super::queries::stored_name;
use super::{from_millis, StoreError};
use crate::reconcile::MismatchKind;

/// A stored mismatch.
#[derive(Debug, Clone, Serialize)]
pub struct MismatchRow {
    pub id: i64,
    pub kind: MismatchKind,
    pub provider: String,
    pub provider_ref: Option<String>,
    pub external_id: Option<String>,
    pub detail: String,
    pub opened_at: String,
    pub resolved_at: Option<String>,
}

fn rfc3339(millis: i64) -> String {
    from_millis(millis).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Opens a mismatch of `kind` for a cash-out (unless one is open); the alert pass
/// raises the alert while it stays open.
pub(super) fn open_mismatch(
    connection: &Connection,
    kind: &str,
    provider: &str,
    provider_ref: &str,
    external_id: Option<&str>,
    detail: &str,
    at: i64,
) -> Result<(), StoreError> {
    connection
        .prepare_cached(
            "INSERT OR IGNORE INTO mismatches (kind, provider, subject, provider_ref, external_id, detail, opened_at)
             VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![kind, provider, provider_ref, external_id, detail, at])?;
    Ok(())
}

pub(super) fn list_mismatches(
    connection: &Connection,
    kind: Option<&str>,
    open_only: bool,
) -> Result<Vec<MismatchRow>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT id, kind, provider, provider_ref, external_id, detail, opened_at, resolved_at FROM mismatches
         WHERE (?1 IS NULL OR kind = ?1) AND (?2 = 0 OR resolved_at IS NULL) ORDER BY id",
    )?;
    let rows = statement.query_map(params![kind, open_only], |row| {
        Ok(MismatchRow {
            id: row.get(0)?,
            kind: stored_name(row, 1, "mismatches.kind")?,
            provider: row.get(2)?,
            provider_ref: row.get(3)?,
            external_id: row.get(4)?,
            detail: row.get(5)?,
            opened_at: rfc3339(row.get(6)?),
            resolved_at: row.get::<_, Option<i64>>(7)?.map(rfc3339),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
