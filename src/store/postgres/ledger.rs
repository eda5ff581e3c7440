//! The expected ledger on PostgreSQL (src/store/ledger.rs): idempotent registration with
//! the SQLite facade's signatures and outcomes, safe when several instances register the
//! same entry at once.
//!
//! The entry is inserted `ON CONFLICT DO NOTHING`: of two instances inserting one
//! `(provider, external_id)` at once, the second waits for the first's commit and inserts
//! nothing; it then reads the registered entry and [`LedgerEntry::differences`] (the
//! SQLite store's rule) tells `Unchanged` from `Conflict`. A new entry naming a
//! `provider_ref` the book knows links that cash-out in the same transaction
//! ([`PgStore::link_to_ledger`]'s step).

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::ingest::{finish, link_to_ledger, TxError, TxResult};
use super::{cached, from_postgres, PgStore, PgTransaction};
use crate::store::{from_millis, to_millis, LedgerEntry, LedgerOutcome, StoreError};

impl PgStore {
    /// Registers an expected cash-out; the same entry again is `Unchanged`, another one
    /// under the same `(provider, external_id)` a `Conflict`.
    pub async fn register_expected(&self, entry: LedgerEntry) -> Result<LedgerOutcome, StoreError> {
        self.register_expected_at(entry, Utc::now()).await
    }

    /// [`PgStore::register_expected`] with the registration (book) time given.
    pub async fn register_expected_at(
        &self,
        entry: LedgerEntry,
        at: DateTime<Utc>,
    ) -> Result<LedgerOutcome, StoreError> {
        let entry = Arc::new(entry);
        self.transact("register a ledger entry", move |tx| {
            let entry = Arc::clone(&entry);
            Box::pin(async move {
                let outcome = register(&tx, &entry, at).await?;
                finish(tx, outcome == LedgerOutcome::Created).await?;
                Ok(outcome)
            })
        })
        .await
    }

    /// Provider refs the ledger names that the book has never seen, registered before `cutoff`.
    pub async fn ledger_refs_unseen(
        &self,
        provider: String,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT l.provider_ref FROM ledger l
                 LEFT JOIN cashouts c ON c.provider = l.provider AND c.provider_ref = l.provider_ref
                 WHERE l.provider = $1 AND l.provider_ref IS NOT NULL AND c.id IS NULL
                   AND l.registered_at <= $2
                 ORDER BY l.registered_at, l.id LIMIT $3",
                &[
                    &provider,
                    &to_millis(cutoff),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(|e| from_postgres(&e)))
            .collect()
    }
}

/// Inserts `entry` unless its key is registered (then compares), linking a known
/// cash-out when it is new.
async fn register(
    tx: &PgTransaction<'_>,
    entry: &LedgerEntry,
    at: DateTime<Utc>,
) -> TxResult<LedgerOutcome> {
    let now = to_millis(at);
    let inserted = tx
        .execute(
            &cached(
                tx,
                "INSERT INTO ledger (provider, external_id, amount_minor, currency, provider_ref, created_at, registered_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (provider, external_id) DO NOTHING",
            )
            .await?,
            &[
                &entry.provider,
                &entry.external_id,
                &entry.amount_minor,
                &entry.currency,
                &entry.provider_ref,
                &entry.created_at.map(to_millis).unwrap_or(now),
                &now,
            ],
        )
        .await?
        == 1;
    if inserted {
        if let Some(provider_ref) = &entry.provider_ref {
            link_to_ledger(tx, &entry.provider, provider_ref, &entry.external_id, at).await?;
        }
        return Ok(LedgerOutcome::Created);
    }
    // Registered by someone else (committed: `ON CONFLICT` waited for it), so this
    // statement's snapshot sees it.
    let Some(registered) = registered(tx, &entry.provider, &entry.external_id).await? else {
        return Err(TxError::Retry(format!(
            "ledger entry {}/{} conflicted but is not visible",
            entry.provider, entry.external_id
        )));
    };
    Ok(if entry.differences(&registered).is_empty() {
        LedgerOutcome::Unchanged
    } else {
        LedgerOutcome::Conflict
    })
}

/// The entry registered under `(provider, external_id)`, if any.
async fn registered(
    tx: &PgTransaction<'_>,
    provider: &str,
    external_id: &str,
) -> TxResult<Option<LedgerEntry>> {
    let row = tx
        .query_opt(
            &cached(
                tx,
                "SELECT amount_minor, currency, provider_ref, created_at FROM ledger
                 WHERE provider = $1 AND external_id = $2",
            )
            .await?,
            &[&provider, &external_id],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(LedgerEntry {
        provider: provider.to_string(),
        external_id: external_id.to_string(),
        amount_minor: row.try_get(0)?,
        currency: row.try_get(1)?,
        provider_ref: row.try_get(2)?,
        created_at: Some(from_millis(row.try_get(3)?)),
    }))
}
