//! Read queries of the ops console: per-provider overview figures, exact id look-ups,
//! a cash-out's findings, quarantined events, open-mismatch counts, alert deliveries —
//! each an index range or a look-up, never a scan of the cash-outs or the event log.

use rusqlite::{params, Connection, OptionalExtension};

use super::queries::{cashout_from_row, stored_name, CashoutRow, CASHOUT_COLUMNS};
use super::reconcile::MismatchRecord;
use super::StoreError;
use crate::alert::{AlertKind, Severity};
use crate::ingest::{EventOutcome, ObservationSource};
use crate::reconcile::MismatchKind;
use crate::state::CashoutStatus;

/// The states a cash-out is in flight in (not terminal).
pub const IN_FLIGHT: [CashoutStatus; 2] = [CashoutStatus::Pending, CashoutStatus::Processing];

/// One provider's figures on the overview.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProviderFigures {
    pub provider: String,
    /// In-flight cash-outs per state: (state, count, oldest created_at).
    pub in_flight: Vec<(CashoutStatus, u64, Option<i64>)>,
    /// In-flight cash-outs created at or before the provider's stuck cutoff.
    pub stuck: u64,
    pub open_alerts: u64,
    pub open_mismatches: u64,
    pub quarantined: u64,
    /// When the last search sweep completed (the poll watermark's update).
    pub last_sweep_at: Option<i64>,
}

/// A stored event as the console shows it (the body only when asked for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleEvent {
    pub seq: i64,
    pub event_id: String,
    pub provider: String,
    pub source: ObservationSource,
    pub outcome: EventOutcome,
    pub error: Option<String>,
    pub provider_ref: Option<String>,
    pub received_at: i64,
    pub secret_index: Option<i64>,
    pub body_sha256: Option<String>,
    pub body_bytes: Option<i64>,
    pub raw_body: Option<Vec<u8>>,
}

/// Open mismatches of one kind and provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MismatchCount {
    pub kind: MismatchKind,
    pub provider: String,
    pub count: u64,
    pub oldest_opened_at: i64,
}

/// An alert's deliveries to the webhook sink in short.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliverySummary {
    pub deliveries: u64,
    pub attempts: u64,
    pub delivered: u64,
    pub failed: u64,
    pub last_error: Option<String>,
}

/// An alert about one cash-out (its subject is `provider/provider_ref`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CashoutAlert {
    pub id: i64,
    pub kind: AlertKind,
    pub severity: Severity,
    pub text: String,
    pub opened_at: i64,
    pub resolved_at: Option<i64>,
}

/// The providers that hold cash-outs, each found by one index seek (no scan).
pub(super) fn stored_providers(connection: &Connection) -> Result<Vec<String>, StoreError> {
    let mut statement = connection.prepare_cached(
        "WITH RECURSIVE p(provider) AS (
             SELECT MIN(provider) FROM cashouts
             UNION ALL
             SELECT (SELECT MIN(provider) FROM cashouts WHERE provider > p.provider)
             FROM p WHERE p.provider IS NOT NULL)
         SELECT provider FROM p WHERE provider IS NOT NULL",
    )?;
    let rows = statement.query_map([], |row| row.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The overview figures of each `(provider, stuck cutoff in unix ms)`.
pub(super) fn overview(
    connection: &Connection,
    providers: &[(String, i64)],
) -> Result<Vec<ProviderFigures>, StoreError> {
    let transaction = connection.unchecked_transaction()?;
    let mut out = Vec::with_capacity(providers.len());
    for (provider, stuck_cutoff) in providers {
        let mut figures = ProviderFigures {
            provider: provider.clone(),
            ..ProviderFigures::default()
        };
        for status in IN_FLIGHT {
            let (count, oldest): (i64, Option<i64>) = transaction
                .prepare_cached(
                    "SELECT COUNT(*), MIN(created_at) FROM cashouts WHERE provider = ?1 AND status = ?2",
                )?
                .query_row(params![provider, status.as_str()], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })?;
            figures
                .in_flight
                .push((status, u64::try_from(count).unwrap_or(0), oldest));
            let stuck: i64 = transaction
                .prepare_cached(
                    "SELECT COUNT(*) FROM cashouts WHERE provider = ?1 AND status = ?2 AND created_at <= ?3",
                )?
                .query_row(params![provider, status.as_str(), stuck_cutoff], |row| {
                    row.get(0)
                })?;
            figures.stuck += u64::try_from(stuck).unwrap_or(0);
        }
        let count = |sql: &str| -> Result<u64, StoreError> {
            let n: i64 = transaction
                .prepare_cached(sql)?
                .query_row(params![provider], |row| row.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        figures.open_alerts =
            count("SELECT COUNT(*) FROM alerts WHERE provider = ?1 AND resolved_at IS NULL")?;
        figures.open_mismatches =
            count("SELECT COUNT(*) FROM mismatches WHERE provider = ?1 AND resolved_at IS NULL")?;
        figures.quarantined =
            count("SELECT COUNT(*) FROM events WHERE outcome = 'quarantined' AND provider = ?1")?;
        figures.last_sweep_at = transaction
            .prepare_cached("SELECT updated_at FROM poll_watermarks WHERE provider = ?1")?
            .query_row(params![provider], |row| row.get(0))
            .optional()?;
        out.push(figures);
    }
    transaction.finish()?;
    Ok(out)
}

/// Cash-outs whose provider ref or external id is exactly `id` (each provider looked up
/// by its unique index), optionally of one provider only.
pub(super) fn find_by_id(
    connection: &Connection,
    provider: Option<&str>,
    id: &str,
) -> Result<Vec<CashoutRow>, StoreError> {
    let providers = match provider {
        Some(provider) => vec![provider.to_string()],
        None => stored_providers(connection)?,
    };
    let by_ref =
        format!("SELECT {CASHOUT_COLUMNS} FROM cashouts WHERE provider = ?1 AND provider_ref = ?2");
    let by_external = format!(
        "SELECT {CASHOUT_COLUMNS} FROM cashouts WHERE provider = ?1 AND external_id = ?2 ORDER BY id DESC LIMIT 100"
    );
    let mut found: Vec<CashoutRow> = Vec::new();
    for provider in &providers {
        if let Some(row) = connection
            .prepare_cached(&by_ref)?
            .query_row(params![provider, id], cashout_from_row)
            .optional()?
        {
            found.push(row);
        }
        let mut statement = connection.prepare_cached(&by_external)?;
        for row in statement.query_map(params![provider, id], cashout_from_row)? {
            let row = row?;
            if !found.iter().any(|f| f.id == row.id) {
                found.push(row);
            }
        }
    }
    found.sort_by_key(|c| std::cmp::Reverse((c.created_at, c.id)));
    Ok(found)
}

/// The mismatches (open and resolved) whose subject is the cash-out or its ledger entry.
pub(super) fn cashout_mismatches(
    connection: &Connection,
    provider: &str,
    provider_ref: &str,
    external_id: Option<&str>,
) -> Result<Vec<MismatchRecord>, StoreError> {
    let ledger_subject = external_id.map(|e| format!("ext:{e}"));
    let mut statement = connection.prepare_cached(
        "SELECT id, kind, provider, subject, provider_ref, external_id, detail, opened_at, resolved_at
         FROM mismatches WHERE provider = ?1 AND subject IN (?2, ?3) ORDER BY id DESC LIMIT 200",
    )?;
    let rows = statement.query_map(params![provider, provider_ref, ledger_subject], |row| {
        Ok(MismatchRecord {
            id: row.get(0)?,
            kind: stored_name(row, 1, "mismatches.kind")?,
            provider: row.get(2)?,
            subject: row.get(3)?,
            provider_ref: row.get(4)?,
            external_id: row.get(5)?,
            detail: row.get(6)?,
            opened_at: row.get(7)?,
            resolved_at: row.get(8)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The alerts (open and resolved) raised about one cash-out.
pub(super) fn cashout_alerts(
    connection: &Connection,
    provider: &str,
    provider_ref: &str,
) -> Result<Vec<CashoutAlert>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT id, kind, severity, text, opened_at, resolved_at FROM alerts
         WHERE subject = ?1 ORDER BY id DESC LIMIT 200",
    )?;
    let rows = statement.query_map(params![format!("{provider}/{provider_ref}")], |row| {
        Ok(CashoutAlert {
            id: row.get(0)?,
            kind: stored_name(row, 1, "alerts.kind")?,
            severity: stored_name(row, 2, "alerts.severity")?,
            text: row.get(3)?,
            opened_at: row.get(4)?,
            resolved_at: row.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn event_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ConsoleEvent> {
    Ok(ConsoleEvent {
        seq: row.get(0)?,
        event_id: row.get(1)?,
        provider: row.get(2)?,
        source: stored_name(row, 3, "events.source")?,
        outcome: stored_name(row, 4, "events.outcome")?,
        error: row.get(5)?,
        provider_ref: row.get(6)?,
        received_at: row.get(7)?,
        secret_index: row.get(8)?,
        body_sha256: row.get(9)?,
        body_bytes: row.get(10)?,
        raw_body: row.get(11)?,
    })
}

/// Quarantined events, newest first, before event `before_seq`; and the next page's.
pub(super) fn quarantined(
    connection: &Connection,
    before_seq: Option<i64>,
    limit: usize,
) -> Result<(Vec<ConsoleEvent>, Option<i64>), StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT seq, event_id, provider, source, outcome, error, provider_ref, received_at, secret_index,
                body_sha256, length(raw_body), NULL
         FROM events WHERE outcome = 'quarantined' AND seq < ?1 ORDER BY seq DESC LIMIT ?2",
    )?;
    let rows = statement.query_map(
        params![before_seq.unwrap_or(i64::MAX), (limit + 1) as i64],
        event_from_row,
    )?;
    let mut items = rows.collect::<Result<Vec<_>, _>>()?;
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|e| e.seq)
    } else {
        None
    };
    Ok((items, next))
}

/// One event, with its raw body when `with_body`.
pub(super) fn event(
    connection: &Connection,
    event_id: &str,
    with_body: bool,
) -> Result<Option<ConsoleEvent>, StoreError> {
    Ok(connection
        .prepare_cached(
            "SELECT seq, event_id, provider, source, outcome, error, provider_ref, received_at, secret_index,
                    body_sha256, length(raw_body), CASE WHEN ?2 THEN raw_body END
             FROM events WHERE event_id = ?1",
        )?
        .query_row(params![event_id, with_body], event_from_row)
        .optional()?)
}

/// Open mismatches counted by kind and provider, with the oldest of each.
pub(super) fn open_mismatch_counts(
    connection: &Connection,
) -> Result<Vec<MismatchCount>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT kind, provider, COUNT(*), MIN(opened_at) FROM mismatches
         WHERE resolved_at IS NULL GROUP BY kind, provider ORDER BY kind, provider",
    )?;
    let rows = statement.query_map([], |row| {
        Ok(MismatchCount {
            kind: stored_name(row, 0, "mismatches.kind")?,
            provider: row.get(1)?,
            count: u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
            oldest_opened_at: row.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The deliveries in short of each alert in `ids`.
pub(super) fn delivery_summaries(
    connection: &Connection,
    ids: &[i64],
) -> Result<Vec<(i64, DeliverySummary)>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT COUNT(*), COALESCE(SUM(attempts), 0), COUNT(delivered_at), COUNT(failed_at),
                (SELECT last_error FROM alert_outbox WHERE alert_id = ?1 AND last_error IS NOT NULL
                 ORDER BY id DESC LIMIT 1)
         FROM alert_outbox WHERE alert_id = ?1",
    )?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let summary = statement.query_row(params![id], |row| {
            let n = |i: usize| row.get::<_, i64>(i).map(|v| u64::try_from(v).unwrap_or(0));
            Ok(DeliverySummary {
                deliveries: n(0)?,
                attempts: n(1)?,
                delivered: n(2)?,
                failed: n(3)?,
                last_error: row.get(4)?,
            })
        })?;
        out.push((*id, summary));
    }
    Ok(out)
}

/// In-flight cash-outs of `provider` created at or before `cutoff` (stuck), oldest
/// first, at most `limit`: one bounded index range per in-flight state, merged.
pub(super) fn stuck(
    connection: &Connection,
    provider: &str,
    cutoff: i64,
    limit: usize,
) -> Result<Vec<CashoutRow>, StoreError> {
    let sql = format!(
        "SELECT {CASHOUT_COLUMNS} FROM cashouts
         WHERE provider = ?1 AND status = ?2 AND created_at <= ?3
         ORDER BY created_at, id LIMIT ?4"
    );
    let mut statement = connection.prepare_cached(&sql)?;
    let mut items = Vec::new();
    for status in IN_FLIGHT {
        let rows = statement.query_map(
            params![provider, status.as_str(), cutoff, limit as i64],
            cashout_from_row,
        )?;
        for row in rows {
            items.push(row?);
        }
    }
    items.sort_by_key(|c| (c.created_at, c.id));
    items.truncate(limit);
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::queries::{list_cashouts, CashoutFilter};
    use crate::store::{from_millis, schema};

    /// A migrated in-memory book of `n` cash-outs over three providers and every state,
    /// several created at the same millisecond (the cursor's tie-break on id).
    fn book(n: i64) -> Connection {
        let mut connection = Connection::open_in_memory().expect("in-memory database");
        schema::migrations()
            .to_latest(&mut connection)
            .expect("migrations");
        let providers = ["fiserv", "mannco", "simpay"];
        for i in 0..n {
            let status = CashoutStatus::ALL[(i as usize * 7 / 3) % CashoutStatus::ALL.len()];
            connection
                .execute(
                    "INSERT INTO cashouts (provider, provider_ref, external_id, status, created_at, first_seen_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?5)",
                    params![
                        providers[(i % 3) as usize],
                        format!("ref-{i}"),
                        format!("ord-{}", i / 2),
                        status.as_str(),
                        1_000 + (i / 4) * 10,
                    ],
                )
                .expect("insert");
        }
        connection
    }

    fn all_pages(connection: &Connection, filter: CashoutFilter) -> Vec<i64> {
        let mut seen = Vec::new();
        let mut filter = CashoutFilter { limit: 7, ..filter };
        loop {
            let page = list_cashouts(connection, &filter).expect("a page");
            seen.extend(page.items.iter().map(|c| c.id));
            match page.next {
                Some(next) => filter.after = Some(next),
                None => return seen,
            }
        }
    }

    #[test]
    fn merged_index_ranges_page_like_one_ordered_scan() {
        let connection = book(200);
        let expected = |provider: Option<&str>, status: Option<&str>, from: i64, to: i64| {
            let mut rows: Vec<(i64, i64)> = connection
                .prepare(
                    "SELECT created_at, id FROM cashouts WHERE (?1 IS NULL OR provider = ?1)
                     AND (?2 IS NULL OR status = ?2) AND created_at >= ?3 AND created_at < ?4",
                )
                .expect("prepare")
                .query_map(params![provider, status, from, to], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("rows");
            rows.sort_by(|a, b| b.cmp(a));
            rows.into_iter().map(|(_, id)| id).collect::<Vec<_>>()
        };
        let cases = [
            (None, None, None, None),
            (Some("mannco"), None, None, None),
            (None, Some("failed"), None, None),
            (Some("fiserv"), Some("pending"), Some(1_100), Some(1_300)),
            (Some("simpay"), Some("reversed"), Some(5_000), None),
        ];
        for (provider, status, from, to) in cases {
            let filter = CashoutFilter {
                provider: provider.map(str::to_string),
                status: status.map(|s| s.parse().expect("a status")),
                from: from.map(from_millis),
                to: to.map(from_millis),
                ..CashoutFilter::default()
            };
            assert_eq!(
                all_pages(&connection, filter),
                expected(
                    provider,
                    status,
                    from.unwrap_or(i64::MIN),
                    to.unwrap_or(i64::MAX)
                ),
                "{provider:?} {status:?} {from:?} {to:?}"
            );
        }
    }

    #[test]
    fn the_cash_out_list_and_the_overview_read_index_ranges_not_the_table() {
        let connection = book(50);
        let plan = |sql: &str| -> String {
            connection
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .expect("explain")
                .query_map([], |r| r.get::<_, String>(3))
                .expect("plan")
                .collect::<Result<Vec<_>, _>>()
                .expect("rows")
                .join("; ")
        };
        let list = plan(&format!(
            "SELECT {CASHOUT_COLUMNS} FROM cashouts
             WHERE provider = 'a' AND status = 'b' AND created_at >= 0 AND (created_at, id) < (9, 9)
             ORDER BY created_at DESC, id DESC LIMIT 51"
        ));
        assert!(
            list.contains("cashouts_by_provider_status_created"),
            "{list}"
        );
        assert!(!list.contains("TEMP B-TREE"), "no sort: {list}");
        let stuck = plan(
            "SELECT COUNT(*) FROM cashouts WHERE provider = 'a' AND status = 'b' AND created_at <= 5",
        );
        assert!(
            stuck.contains("COVERING INDEX cashouts_by_provider_status_created"),
            "{stuck}"
        );
        let providers = plan("SELECT MIN(provider) FROM cashouts WHERE provider > 'a'");
        assert!(!providers.starts_with("SCAN cashouts"), "{providers}");
    }

    #[test]
    fn ids_are_found_by_provider_ref_or_external_id_in_every_provider() {
        let connection = book(30);
        let found: Vec<String> = find_by_id(&connection, None, "ord-4")
            .expect("find")
            .into_iter()
            .map(|c| c.provider_ref)
            .collect();
        assert_eq!(found, ["ref-9", "ref-8"]);
        let by_ref = find_by_id(&connection, None, "ref-11").expect("find");
        assert_eq!(by_ref.len(), 1);
        assert!(find_by_id(&connection, Some("fiserv"), "ref-11")
            .expect("find")
            .is_empty());
        assert_eq!(
            stored_providers(&connection).expect("providers"),
            ["fiserv", "mannco", "simpay"]
        );
    }

    #[test]
    fn an_unknown_stored_name_is_a_store_error_naming_column_and_value() {
        let connection = book(3);
        connection
            .execute(
                "UPDATE cashouts SET status = 'teleported' WHERE provider_ref = 'ref-1'",
                [],
            )
            .expect("update");
        let err = find_by_id(&connection, None, "ref-1").expect_err("an unknown status");
        assert!(
            matches!(&err, StoreError::Database(text)
                if text.contains("cashouts.status") && text.contains("\"teleported\"")),
            "{err}"
        );
    }
}
