//! The expected ledger: idempotent registration of what the platform meant to pay.

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::ingest::link_to_ledger;
use super::writer::WriteTx;
use super::{from_millis, to_millis, StoreError};

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

impl LedgerEntry {
    /// The fields in which this entry differs from `registered` (`amount`, `currency`,
    /// `provider_ref`, `created_at`), empty when it is the same entry. A `created_at`
    /// absent on either side is no difference: the store gave the registered one a time.
    pub fn differences(&self, registered: &LedgerEntry) -> Vec<&'static str> {
        let mut fields = Vec::new();
        if self.amount_minor != registered.amount_minor {
            fields.push("amount");
        }
        if self.currency != registered.currency {
            fields.push("currency");
        }
        if self.provider_ref != registered.provider_ref {
            fields.push("provider_ref");
        }
        if let (Some(mine), Some(theirs)) = (self.created_at, registered.created_at) {
            if to_millis(mine) != to_millis(theirs) {
                fields.push("created_at");
            }
        }
        fields
    }
}

pub(super) fn register(
    connection: &WriteTx<'_, '_>,
    entry: &LedgerEntry,
    at: DateTime<Utc>,
) -> Result<LedgerOutcome, StoreError> {
    if let Some(registered) = registered(connection, &entry.provider, &entry.external_id)? {
        return Ok(if entry.differences(&registered).is_empty() {
            LedgerOutcome::Unchanged
        } else {
            LedgerOutcome::Conflict
        });
    }
    insert_new(connection, entry, at)?;
    Ok(LedgerOutcome::Created)
}

/// The entry registered under `(provider, external_id)`, if any.
pub(super) fn registered(
    connection: &Connection,
    provider: &str,
    external_id: &str,
) -> Result<Option<LedgerEntry>, StoreError> {
    Ok(connection
        .prepare_cached(
            "SELECT amount_minor, currency, provider_ref, created_at FROM ledger WHERE provider = ?1 AND external_id = ?2",
        )?
        .query_row(params![provider, external_id], |row| {
            Ok(LedgerEntry {
                provider: provider.to_string(),
                external_id: external_id.to_string(),
                amount_minor: row.get(0)?,
                currency: row.get(1)?,
                provider_ref: row.get(2)?,
                created_at: Some(from_millis(row.get(3)?)),
            })
        })
        .optional()?)
}

/// Inserts `entry` unless its `(provider, external_id)` is registered; `true` when it
/// was new. A new entry naming a `provider_ref` that the book knows gives that cash-out
/// the ledger's `external_id` when it has none. The one place a ledger entry is written
/// (`POST /api/v1/ledger` and `import-ledger` alike).
pub(super) fn insert_new(
    connection: &WriteTx<'_, '_>,
    entry: &LedgerEntry,
    at: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let now = to_millis(at);
    let inserted = connection
        .prepare_cached(
            "INSERT INTO ledger (provider, external_id, amount_minor, currency, provider_ref, created_at, registered_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (provider, external_id) DO NOTHING",
        )?
        .execute(params![
            entry.provider,
            entry.external_id,
            entry.amount_minor,
            entry.currency,
            entry.provider_ref,
            entry.created_at.map(to_millis).unwrap_or(now),
            now,
        ])?
        > 0;
    if inserted {
        if let Some(provider_ref) = &entry.provider_ref {
            link_to_ledger(
                connection,
                &entry.provider,
                provider_ref,
                &entry.external_id,
                at,
            )?;
        }
    }
    Ok(inserted)
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
