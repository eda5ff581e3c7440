//! The expected ledger: idempotent registration of what the platform meant to pay.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::ingest::link_to_ledger;
use super::{to_millis, StoreError};

/// One expected cash-out (amount in minor units of `currency`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub provider: String,
    pub external_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub provider_ref: Option<String>,
    pub created_at: Option<DateTime<Utc>>,
}

/// What registering an entry did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerOutcome {
    /// New.
    Created,
    /// The same entry was already registered.
    Unchanged,
    /// Another entry is registered under the same `(provider, external_id)`.
    Conflict,
}

pub(super) fn register(
    connection: &Connection,
    entry: &LedgerEntry,
    at: DateTime<Utc>,
) -> Result<LedgerOutcome, StoreError> {
    let existing: Option<(i64, String, Option<String>, Option<i64>)> = connection
        .prepare_cached(
            "SELECT amount_minor, currency, provider_ref, created_at FROM ledger WHERE provider = ?1 AND external_id = ?2",
        )?
        .query_row(params![entry.provider, entry.external_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .optional()?;
    if let Some((amount, currency, provider_ref, created_at)) = existing {
        let same = amount == entry.amount_minor
            && currency == entry.currency
            && provider_ref == entry.provider_ref
            && entry
                .created_at
                .is_none_or(|t| Some(to_millis(t)) == created_at);
        return Ok(if same {
            LedgerOutcome::Unchanged
        } else {
            LedgerOutcome::Conflict
        });
    }
    let now = to_millis(at);
    connection
        .prepare_cached(
            "INSERT INTO ledger (provider, external_id, amount_minor, currency, provider_ref, created_at, registered_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            entry.provider,
            entry.external_id,
            entry.amount_minor,
            entry.currency,
            entry.provider_ref,
            entry.created_at.map(to_millis).unwrap_or(now),
            now,
        ])?;
    if let Some(provider_ref) = &entry.provider_ref {
        link_to_ledger(
            connection,
            &entry.provider,
            provider_ref,
            &entry.external_id,
            at,
        )?;
    }
    Ok(LedgerOutcome::Created)
}

/// Provider refs the ledger names that the book has never seen, registered before `cutoff`.
pub(super) fn unseen_refs(
    connection: &Connection,
    provider: &str,
    cutoff: DateTime<Utc>,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT l.provider_ref FROM ledger l
         LEFT JOIN cashouts c ON c.provider = l.provider AND c.provider_ref = l.provider_ref
         WHERE l.provider = ?1 AND l.provider_ref IS NOT NULL AND c.id IS NULL AND l.registered_at <= ?2
         ORDER BY l.registered_at, l.id LIMIT ?3",
    )?;
    let rows = statement.query_map(params![provider, to_millis(cutoff), limit as i64], |row| {
        row.get(0)
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
