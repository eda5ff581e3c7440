//! A day's report rows on PostgreSQL (src/store/report.rs): the book as it stood at the
//! day's end, read in one repeatable-read snapshot and streamed in report order.
//!
//! The point-in-time rules are SQLite's: a cash-out's row is its current one when it has
//! not changed since the instant, else its latest snapshot (an event's `after_*` columns)
//! booked before it; the ledger as registered by then; the mismatches open then. Text is
//! ordered `COLLATE "C"` (byte order, as SQLite's `BINARY`) whatever the database's
//! collation, so both stores emit the same rows in the same order.

use std::collections::HashMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::Row;

use super::reconcile::snapshot;
use super::{from_postgres, PgStore, PgTransaction};
use crate::reconcile::MismatchKind;
use crate::store::queries::UnknownStoredValue;
use crate::store::{to_millis, ReportRow, StoreError};

/// The kinds of the mismatches open on one subject at the instant, and their opening times.
type OpenKinds = Vec<(MismatchKind, i64)>;

/// Mismatches open at the instant, by provider then subject.
type OpenAt = HashMap<String, HashMap<String, OpenKinds>>;

fn get<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<T, StoreError> {
    row.try_get(index).map_err(|e| from_postgres(&e))
}

fn parse_name<T: FromStr>(column: &'static str, value: String) -> Result<T, StoreError> {
    value
        .parse()
        .map_err(|_| StoreError::Database(UnknownStoredValue { column, value }.to_string()))
}

async fn open_at(tx: &PgTransaction<'_>, until: i64) -> Result<OpenAt, StoreError> {
    let mut open: OpenAt = HashMap::new();
    for row in tx
        .query(
            "SELECT provider, subject, kind, opened_at FROM mismatches
             WHERE opened_at < $1 AND (resolved_at IS NULL OR resolved_at >= $1) ORDER BY id",
            &[&until],
        )
        .await?
    {
        let kind: MismatchKind = parse_name("mismatches.kind", get(&row, 2)?)?;
        if let Some(subject) = get::<Option<String>>(&row, 1)? {
            open.entry(get(&row, 0)?)
                .or_default()
                .entry(subject)
                .or_default()
                .push((kind, get(&row, 3)?));
        }
    }
    Ok(open)
}

fn kinds_of(open: Option<&OpenKinds>) -> (Vec<MismatchKind>, Vec<i64>) {
    let Some(open) = open else {
        return (Vec::new(), Vec::new());
    };
    let mut kinds: Vec<MismatchKind> = open.iter().map(|(k, _)| *k).collect();
    kinds.sort_unstable_by_key(|k| k.as_str());
    kinds.dedup();
    (kinds, open.iter().map(|(_, t)| *t).collect())
}

/// A unix-millisecond time as the CSV shows it (whole seconds, rounded down).
fn csv_second(millis: i64) -> i64 {
    millis.div_euclid(1000)
}

/// The day's cash-out rows as of `$2` (SQLite's query; text compared byte-wise).
const DAY_CASHOUTS: &str = r#"
WITH day(id) AS (
    SELECT cashout_id FROM events WHERE after_status IS NOT NULL AND book_at >= $1 AND book_at < $2
    UNION
    SELECT c.id FROM mismatches m JOIN cashouts c ON c.provider = m.provider AND c.provider_ref = m.subject
    WHERE m.opened_at < $2 AND (m.resolved_at IS NULL OR m.resolved_at >= $1)
),
pit AS (
    SELECT c.id AS id, c.book_changed_at >= $2 AS later,
           CASE WHEN c.book_changed_at < $2 THEN NULL ELSE
               (SELECT e.seq FROM events e WHERE e.cashout_id = c.id AND e.after_status IS NOT NULL
                  AND e.book_at < $2 ORDER BY e.book_at DESC, e.seq DESC LIMIT 1) END AS snap
    FROM day d JOIN cashouts c ON c.id = d.id
),
rows AS (
    SELECT c.provider AS provider, c.provider_ref AS provider_ref,
           CASE WHEN p.later THEN s.after_external_id ELSE c.external_id END AS external_id,
           CASE WHEN p.later THEN s.after_currency ELSE c.currency END AS currency,
           CASE WHEN p.later THEN s.after_amount_minor ELSE c.amount_minor END AS amount_minor,
           CASE WHEN p.later THEN s.after_fee_minor ELSE c.fee_minor END AS fee_minor,
           CASE WHEN p.later THEN s.after_net_minor ELSE c.net_minor END AS net_minor,
           CASE WHEN p.later THEN s.after_status ELSE c.status END AS status,
           CASE WHEN p.later THEN s.after_provider_status ELSE c.provider_status END AS provider_status,
           CASE WHEN p.later THEN s.after_created_at ELSE c.created_at END AS created_at,
           CASE WHEN p.later THEN s.after_updated_at ELSE c.updated_at END AS updated_at,
           CASE WHEN p.later THEN s.after_completed_at ELSE c.completed_at END AS completed_at,
           CASE WHEN p.later THEN s.after_webhooks ELSE c.webhook_count END AS webhooks,
           CASE WHEN p.later THEN s.after_recovered ELSE c.recovered_by_poll END AS recovered
    FROM pit p JOIN cashouts c ON c.id = p.id LEFT JOIN events s ON s.seq = p.snap
    WHERE NOT p.later OR p.snap IS NOT NULL
)
SELECT r.provider, r.provider_ref, r.external_id, r.currency, r.amount_minor, r.fee_minor, r.net_minor,
       r.status, r.provider_status, r.created_at, r.updated_at, r.completed_at, r.webhooks, r.recovered,
       l.amount_minor, l.currency
FROM rows r
LEFT JOIN ledger l ON l.provider = r.provider AND l.external_id = r.external_id AND l.registered_at < $2
ORDER BY r.provider COLLATE "C", r.created_at / 1000, r.provider_ref COLLATE "C"
"#;

impl PgStore {
    /// Streams the rows of the business day `[from, until)` as the book stood at `until`
    /// to `emit`, in report order (provider, created second, provider_ref); returns how
    /// many.
    pub async fn report_rows<E>(
        &self,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        mut emit: E,
    ) -> Result<u64, StoreError>
    where
        E: FnMut(ReportRow) -> Result<(), StoreError> + Send + 'static,
    {
        let (from, until) = (to_millis(from), to_millis(until));
        let mut client = self.client().await?;
        let tx = snapshot(&mut client).await?;
        let emitted = day_rows(&tx, from, until, &mut emit).await?;
        tx.commit().await?;
        Ok(emitted)
    }
}

async fn day_rows(
    tx: &PgTransaction<'_>,
    from: i64,
    until: i64,
    emit: &mut (dyn FnMut(ReportRow) -> Result<(), StoreError> + Send),
) -> Result<u64, StoreError> {
    let open = open_at(tx, until).await?;
    // Ledger entries no cash-out answered at the instant (an open ledger-subject mismatch).
    let ledger_statement = tx
        .prepare(
            "SELECT amount_minor, currency, created_at FROM ledger
             WHERE provider = $1 AND external_id = $2 AND registered_at < $3",
        )
        .await?;
    let ledger_subjects: Vec<(&String, &str, &OpenKinds)> = open
        .iter()
        .flat_map(|(p, subjects)| {
            subjects
                .iter()
                .filter_map(move |(s, k)| Some((p, s.strip_prefix("ext:")?, k)))
        })
        .collect();
    let mut ledger_rows = Vec::new();
    for (provider, external_id, kinds) in ledger_subjects {
        let Some(entry) = tx
            .query_opt(&ledger_statement, &[provider, &external_id, &until])
            .await?
        else {
            continue;
        };
        let currency: String = get(&entry, 1)?;
        let (mismatches, opened_at) = kinds_of(Some(kinds));
        ledger_rows.push(ReportRow {
            provider: provider.clone(),
            provider_ref: None,
            external_id: Some(external_id.to_string()),
            currency: Some(currency.clone()),
            amount_minor: None,
            fee_minor: None,
            net_minor: None,
            expected_minor: Some(get(&entry, 0)?),
            expected_currency: Some(currency),
            status: None,
            provider_status: None,
            created_at: get(&entry, 2)?,
            updated_at: None,
            completed_at: None,
            webhooks: 0,
            recovered_by_poll: 0,
            mismatches,
            opened_at,
        });
    }
    // Rust orders strings by their bytes, as the query's `COLLATE "C"`.
    ledger_rows.sort_by(|a, b| {
        (&a.provider, csv_second(a.created_at), &a.external_id).cmp(&(
            &b.provider,
            csv_second(b.created_at),
            &b.external_id,
        ))
    });
    let mut ledger_rows = ledger_rows.into_iter().peekable();

    let params: [&(dyn ToSql + Sync); 2] = [&from, &until];
    let rows = tx.query_raw(DAY_CASHOUTS, params).await?;
    pin_mut!(rows);
    let mut emitted = 0;
    while let Some(row) = rows.try_next().await? {
        let provider: String = get(&row, 0)?;
        let provider_ref: String = get(&row, 1)?;
        let (mismatches, opened_at) =
            kinds_of(open.get(&provider).and_then(|s| s.get(&provider_ref)));
        let cashout = ReportRow {
            provider,
            provider_ref: Some(provider_ref),
            external_id: get(&row, 2)?,
            currency: get(&row, 3)?,
            amount_minor: get(&row, 4)?,
            fee_minor: get(&row, 5)?,
            net_minor: get(&row, 6)?,
            status: get::<Option<String>>(&row, 7)?
                .map(|value| parse_name("cashouts.status", value))
                .transpose()?,
            provider_status: get(&row, 8)?,
            created_at: get(&row, 9)?,
            updated_at: get(&row, 10)?,
            completed_at: get(&row, 11)?,
            webhooks: get(&row, 12)?,
            recovered_by_poll: get(&row, 13)?,
            expected_minor: get(&row, 14)?,
            expected_currency: get(&row, 15)?,
            mismatches,
            opened_at,
        };
        while let Some(ledger_row) = ledger_rows.next_if(|l| {
            (&l.provider, csv_second(l.created_at))
                <= (&cashout.provider, csv_second(cashout.created_at))
        }) {
            emit(ledger_row)?;
            emitted += 1;
        }
        emit(cashout)?;
        emitted += 1;
    }
    for ledger_row in ledger_rows {
        emit(ledger_row)?;
        emitted += 1;
    }
    Ok(emitted)
}
