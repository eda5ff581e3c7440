//! The book as it stood at an instant, for a day's report: cash-out rows from the latest
//! snapshot before the instant, the ledger and the mismatches open then; the reports index.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::queries::{stored_name, stored_name_opt};
use super::StoreError;
use crate::reconcile::MismatchKind;
use crate::state::CashoutStatus;

/// One row of a day's report, as the book stood at the report's instant (unix ms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportRow {
    pub provider: String,
    /// `None` for a ledger entry no cash-out answers.
    pub provider_ref: Option<String>,
    pub external_id: Option<String>,
    pub currency: Option<String>,
    pub amount_minor: Option<i64>,
    pub fee_minor: Option<i64>,
    pub net_minor: Option<i64>,
    pub expected_minor: Option<i64>,
    pub expected_currency: Option<String>,
    /// `None` for a ledger entry no cash-out answers.
    pub status: Option<CashoutStatus>,
    pub provider_status: Option<String>,
    pub created_at: i64,
    pub updated_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub webhooks: i64,
    pub recovered_by_poll: i64,
    /// The kinds open at the instant, sorted by name.
    pub mismatches: Vec<MismatchKind>,
    /// When each open mismatch of the row was opened (for the age buckets).
    pub opened_at: Vec<i64>,
}

/// One generated report, as listed by the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportIndexRow {
    pub date: String,
    pub is_final: bool,
    pub rows: i64,
    pub sha256: String,
    pub generated_at: i64,
}

/// Mismatches open at `until`, by provider then subject: kinds and opening times.
type OpenAt = HashMap<String, HashMap<String, Vec<(MismatchKind, i64)>>>;

fn open_at(connection: &Connection, until: i64) -> Result<OpenAt, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT provider, subject, kind, opened_at FROM mismatches
         WHERE opened_at < ?1 AND (resolved_at IS NULL OR resolved_at >= ?1)",
    )?;
    let mut open: OpenAt = HashMap::new();
    let rows = statement.query_map(params![until], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, Option<String>>(1)?,
            stored_name::<MismatchKind>(row, 2, "mismatches.kind")?,
            row.get::<_, i64>(3)?,
        ))
    })?;
    for row in rows {
        let (provider, subject, kind, opened_at) = row?;
        if let Some(subject) = subject {
            open.entry(provider)
                .or_default()
                .entry(subject)
                .or_default()
                .push((kind, opened_at));
        }
    }
    Ok(open)
}

fn kinds_of(open: Option<&Vec<(MismatchKind, i64)>>) -> (Vec<MismatchKind>, Vec<i64>) {
    let Some(open) = open else {
        return (Vec::new(), Vec::new());
    };
    let mut kinds: Vec<MismatchKind> = open.iter().map(|(k, _)| *k).collect();
    kinds.sort_unstable_by_key(|k| k.as_str());
    kinds.dedup();
    (kinds, open.iter().map(|(_, t)| *t).collect())
}

/// The rows of the business day `[from, until)` as the book stood at `until`, ordered by
/// provider, created_at, provider_ref (then external_id), handed to `emit` one by one.
/// Returns how many rows were emitted.
pub(super) fn day_rows(
    connection: &Connection,
    from: i64,
    until: i64,
    emit: &mut dyn FnMut(ReportRow) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let open = open_at(connection, until)?;
    // A day's rows are sorted by SQLite's sorter: let it use a helper thread and keep
    // more of the sort in memory (bounded: 16 MiB a sorter list), then hand the connection back as it was.
    connection.execute_batch("PRAGMA threads = 2; PRAGMA cache_size = -16384;")?;
    let result = stream_day_rows(connection, &open, from, until, emit);
    connection.execute_batch("PRAGMA threads = 0; PRAGMA cache_size = -2000;")?;
    result
}

fn stream_day_rows(
    connection: &Connection,
    open: &OpenAt,
    from: i64,
    until: i64,
    emit: &mut dyn FnMut(ReportRow) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    // Ledger entries no cash-out answered at the instant (an open ledger-subject mismatch).
    let mut ledger_rows = Vec::new();
    let mut ledger_statement = connection.prepare_cached(
        "SELECT amount_minor, currency, provider_ref, created_at FROM ledger
         WHERE provider = ?1 AND external_id = ?2 AND registered_at < ?3",
    )?;
    for (provider, subject, kinds) in open
        .iter()
        .flat_map(|(p, subjects)| subjects.iter().map(move |(s, k)| (p, s, k)))
    {
        let Some(external_id) = subject.strip_prefix("ext:") else {
            continue;
        };
        let entry = ledger_statement
            .query_row(params![provider, external_id, until], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(3)?,
                ))
            })
            .optional()?;
        if let Some((amount, currency, created_at)) = entry {
            let (mismatches, opened_at) = kinds_of(Some(kinds));
            ledger_rows.push(ReportRow {
                provider: provider.clone(),
                provider_ref: None,
                external_id: Some(external_id.to_string()),
                currency: Some(currency.clone()),
                amount_minor: None,
                fee_minor: None,
                net_minor: None,
                expected_minor: Some(amount),
                expected_currency: Some(currency),
                status: None,
                provider_status: None,
                created_at,
                updated_at: None,
                completed_at: None,
                webhooks: 0,
                recovered_by_poll: 0,
                mismatches,
                opened_at,
            });
        }
    }
    // Rows are ordered by the CSV's own columns: `created_at` shows whole seconds, so
    // ties within one second go by provider_ref (a ledger-only row's is empty: first).
    ledger_rows.sort_by(|a, b| {
        (&a.provider, csv_second(a.created_at), &a.external_id).cmp(&(
            &b.provider,
            csv_second(b.created_at),
            &b.external_id,
        ))
    });
    let mut ledger_rows = ledger_rows.into_iter().peekable();

    // Cash-outs changed that day or flagged during it, each from the current row when it
    // has not changed since the instant, else from its latest snapshot before it.
    let mut statement = connection.prepare_cached(
        "WITH day(id) AS (
             SELECT cashout_id FROM events WHERE after_status IS NOT NULL AND book_at >= ?1 AND book_at < ?2
             UNION
             SELECT c.id FROM mismatches m JOIN cashouts c ON c.provider = m.provider AND c.provider_ref = m.subject
             WHERE m.opened_at < ?2 AND (m.resolved_at IS NULL OR m.resolved_at >= ?1)
         ),
         pit AS (
             SELECT c.id AS id, c.book_changed_at >= ?2 AS later,
                    CASE WHEN c.book_changed_at < ?2 THEN NULL ELSE
                        (SELECT e.seq FROM events e WHERE e.cashout_id = c.id AND e.after_status IS NOT NULL
                           AND e.book_at < ?2 ORDER BY e.book_at DESC, e.seq DESC LIMIT 1) END AS snap
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
         LEFT JOIN ledger l ON l.provider = r.provider AND l.external_id = r.external_id AND l.registered_at < ?2
         ORDER BY r.provider, r.created_at / 1000, r.provider_ref",
    )?;
    let mut rows = statement.query(params![from, until])?;
    let mut emitted = 0;
    while let Some(row) = rows.next()? {
        let provider: String = row.get(0)?;
        let provider_ref: String = row.get(1)?;
        let (mismatches, opened_at) =
            kinds_of(open.get(&provider).and_then(|s| s.get(&provider_ref)));
        let cashout = ReportRow {
            provider,
            provider_ref: Some(provider_ref),
            external_id: row.get(2)?,
            currency: row.get(3)?,
            amount_minor: row.get(4)?,
            fee_minor: row.get(5)?,
            net_minor: row.get(6)?,
            status: stored_name_opt(row, 7, "cashouts.status")?,
            provider_status: row.get(8)?,
            created_at: row.get(9)?,
            updated_at: row.get(10)?,
            completed_at: row.get(11)?,
            webhooks: row.get(12)?,
            recovered_by_poll: row.get(13)?,
            expected_minor: row.get(14)?,
            expected_currency: row.get(15)?,
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

/// A unix-millisecond time as the CSV shows it (whole seconds, rounded down).
fn csv_second(millis: i64) -> i64 {
    millis.div_euclid(1000)
}

pub(super) fn record_report(
    connection: &Connection,
    row: &ReportIndexRow,
) -> Result<(), StoreError> {
    connection
        .prepare_cached(
            "INSERT INTO reports (date, final, rows, sha256, generated_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (date) DO UPDATE SET final = ?2, rows = ?3, sha256 = ?4, generated_at = ?5",
        )?
        .execute(params![row.date, row.is_final, row.rows, row.sha256, row.generated_at])?;
    Ok(())
}

fn index_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ReportIndexRow> {
    Ok(ReportIndexRow {
        date: row.get(0)?,
        is_final: row.get(1)?,
        rows: row.get(2)?,
        sha256: row.get(3)?,
        generated_at: row.get(4)?,
    })
}

pub(super) fn list_reports(connection: &Connection) -> Result<Vec<ReportIndexRow>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT date, final, rows, sha256, generated_at FROM reports ORDER BY date DESC",
    )?;
    let rows = statement.query_map([], index_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn get_report(
    connection: &Connection,
    date: &str,
) -> Result<Option<ReportIndexRow>, StoreError> {
    Ok(connection
        .prepare_cached(
            "SELECT date, final, rows, sha256, generated_at FROM reports WHERE date = ?1",
        )?
        .query_row(params![date], index_row)
        .optional()?)
}

/// When the book first learned anything (its oldest event or ledger entry), if ever.
pub(super) fn first_entry_at(connection: &Connection) -> Result<Option<i64>, StoreError> {
    let event: Option<i64> = connection
        .prepare_cached("SELECT received_at FROM events ORDER BY seq LIMIT 1")?
        .query_row([], |row| row.get(0))
        .optional()?;
    let ledger: Option<i64> = connection
        .prepare_cached("SELECT registered_at FROM ledger ORDER BY id LIMIT 1")?
        .query_row([], |row| row.get(0))
        .optional()?;
    Ok(match (event, ledger) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}
