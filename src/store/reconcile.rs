//! Loading what reconciliation examines and applying its plan; the rules themselves live
//! in [`crate::reconcile`].

use std::collections::{BTreeSet, HashMap};

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::queries::stored_name;
use super::StoreError;
use crate::reconcile::{
    CashoutFact, Finding, LedgerFact, MatchGroup, MismatchKind, OpenMismatch, Subject,
};
use crate::state::CashoutStatus;

/// What one group shares: a provider and an `external_id`, or (for a cash-out without
/// one) its `provider_ref`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupKey {
    External {
        provider: String,
        external_id: String,
    },
    Single {
        provider: String,
        provider_ref: String,
    },
}

impl GroupKey {
    /// The provider of the group.
    pub fn provider(&self) -> &str {
        match self {
            GroupKey::External { provider, .. } | GroupKey::Single { provider, .. } => provider,
        }
    }
}

/// Open mismatches by provider, then subject key.
pub type OpenByProvider = HashMap<String, HashMap<String, Vec<OpenMismatch>>>;

/// Where the continuous pass stopped (unix milliseconds for `passed_at`). SQLite follows
/// changes by `event_seq` and `ledger_id` (one writer commits in that order); PostgreSQL
/// by `xid_horizon`, and there the two ids are only the highest ones examined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileCursor {
    pub event_seq: i64,
    pub ledger_id: i64,
    pub passed_at: i64,
    /// PostgreSQL only: every change written by a transaction whose id (`xid8`) is below
    /// this has been examined. 0 on SQLite, and before the first pass on PostgreSQL.
    pub xid_horizon: i64,
}

/// What changed since a cursor, and the cursor to store once it is examined.
#[derive(Clone, Debug, Default)]
pub struct Changes {
    pub keys: BTreeSet<GroupKey>,
    pub next: ReconcileCursor,
    /// Queued cash-out ids to drop once examined.
    pub queued: Vec<i64>,
}

/// Per provider, what makes a cash-out or ledger entry due for a look with no change of its
/// own (unix milliseconds): in flight and created before `stuck_before`; registered
/// between the last pass's `grace_cutoff` and this one's.
#[derive(Clone, Debug)]
pub struct DueRule {
    pub provider: String,
    pub stuck_before: i64,
    pub missing_from: i64,
    pub missing_until: i64,
}

const CASHOUT_FACT_COLUMNS: &str = "provider_ref, external_id, status, amount_minor, currency, fee_minor, net_minor, method, created_at, conflict_status";

fn parse_status(text: String) -> rusqlite::Result<CashoutStatus> {
    text.parse().map_err(|err: crate::state::UnknownStatus| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(err))
    })
}

/// `columns` (a comma-separated list) with each name qualified by `alias`.
fn qualified(columns: &str, alias: &str) -> String {
    columns
        .split(',')
        .map(|column| format!("{alias}.{}", column.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The cash-out a ledger entry names by `provider_ref` when it carries another (or no)
/// external id than the entry's: the `ref_named` side of an ambiguous match.
fn cashout_named_by(
    connection: &Connection,
    provider: &str,
    provider_ref: &str,
    external_id: &str,
) -> Result<Option<CashoutFact>, StoreError> {
    Ok(connection
        .prepare_cached(&format!(
            "SELECT {CASHOUT_FACT_COLUMNS} FROM cashouts
             WHERE provider = ?1 AND provider_ref = ?2 AND external_id IS NOT ?3"
        ))?
        .query_row(params![provider, provider_ref, external_id], |row| {
            cashout_fact(row, 0)
        })
        .optional()?
        .flatten())
}

/// A [`CashoutFact`] from `CASHOUT_FACT_COLUMNS` starting at column `at`; `None` when the
/// columns are NULL (an outer join that found nothing).
fn cashout_fact(row: &Row<'_>, at: usize) -> rusqlite::Result<Option<CashoutFact>> {
    let Some(provider_ref) = row.get::<_, Option<String>>(at)? else {
        return Ok(None);
    };
    Ok(Some(CashoutFact {
        provider_ref,
        external_id: row.get(at + 1)?,
        status: parse_status(row.get(at + 2)?)?,
        amount_minor: row.get(at + 3)?,
        currency: row.get(at + 4)?,
        fee_minor: row.get(at + 5)?,
        net_minor: row.get(at + 6)?,
        method: row.get(at + 7)?,
        created_at: row.get(at + 8)?,
        conflict_status: row
            .get::<_, Option<String>>(at + 9)?
            .map(parse_status)
            .transpose()?,
    }))
}

const LEDGER_FACT_COLUMNS: &str =
    "external_id, amount_minor, currency, provider_ref, created_at, registered_at";

fn ledger_fact(row: &Row<'_>, at: usize) -> rusqlite::Result<LedgerFact> {
    Ok(LedgerFact {
        external_id: row.get(at)?,
        amount_minor: row.get(at + 1)?,
        currency: row.get(at + 2)?,
        provider_ref: row.get(at + 3)?,
        created_at: row.get(at + 4)?,
        registered_at: row.get(at + 5)?,
    })
}

pub(super) fn cursor(connection: &Connection) -> Result<Option<ReconcileCursor>, StoreError> {
    Ok(connection
        .prepare_cached(
            "SELECT event_seq, ledger_id, passed_at FROM reconcile_cursor WHERE id = 1",
        )?
        .query_row([], |row| {
            Ok(ReconcileCursor {
                event_seq: row.get(0)?,
                ledger_id: row.get(1)?,
                passed_at: row.get(2)?,
                xid_horizon: 0,
            })
        })
        .optional()?)
}

fn key_of(provider: String, provider_ref: String, external_id: Option<String>) -> GroupKey {
    match external_id {
        Some(external_id) => GroupKey::External {
            provider,
            external_id,
        },
        None => GroupKey::Single {
            provider,
            provider_ref,
        },
    }
}

/// The groups touched since `since`, plus those due by time (`due`), and the cursor that
/// covers them. `now` becomes the new cursor's `passed_at`.
pub(super) fn changes_since(
    connection: &Connection,
    since: ReconcileCursor,
    due: &[DueRule],
    now: i64,
) -> Result<Changes, StoreError> {
    let max_seq: i64 =
        connection.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?;
    let max_ledger: i64 =
        connection.query_row("SELECT COALESCE(MAX(id), 0) FROM ledger", [], |r| r.get(0))?;
    let mut keys = BTreeSet::new();
    let mut touched = connection.prepare_cached(
        "SELECT DISTINCT c.provider, c.provider_ref, c.external_id FROM events e JOIN cashouts c ON c.id = e.cashout_id
         WHERE e.seq > ?1 AND e.seq <= ?2",
    )?;
    for row in touched.query_map(params![since.event_seq, max_seq], |row| {
        Ok(key_of(row.get(0)?, row.get(1)?, row.get(2)?))
    })? {
        keys.insert(row?);
    }
    let mut queued_ids = Vec::new();
    let mut queued = connection.prepare_cached(
        "SELECT q.cashout_id, c.provider, c.provider_ref, c.external_id FROM reconcile_queue q
         JOIN cashouts c ON c.id = q.cashout_id",
    )?;
    for row in queued.query_map([], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            key_of(row.get(1)?, row.get(2)?, row.get(3)?),
        ))
    })? {
        let (id, key) = row?;
        queued_ids.push(id);
        keys.insert(key);
    }
    let mut ledger = connection
        .prepare_cached("SELECT provider, external_id FROM ledger WHERE id > ?1 AND id <= ?2")?;
    for row in ledger.query_map(params![since.ledger_id, max_ledger], |row| {
        Ok(GroupKey::External {
            provider: row.get(0)?,
            external_id: row.get(1)?,
        })
    })? {
        keys.insert(row?);
    }
    let mut stuck = connection.prepare_cached(
        "SELECT c.provider, c.provider_ref, c.external_id FROM cashouts c
         WHERE c.provider = ?1 AND c.status IN ('pending', 'processing') AND c.created_at <= ?2
           AND NOT EXISTS (SELECT 1 FROM mismatches m WHERE m.provider = c.provider AND m.subject = c.provider_ref
                           AND m.kind = 'stuck' AND m.resolved_at IS NULL)",
    )?;
    let mut missing = connection.prepare_cached(
        "SELECT l.provider, l.external_id FROM ledger l
         WHERE l.provider = ?1 AND l.registered_at > ?2 AND l.registered_at <= ?3",
    )?;
    for rule in due {
        for row in stuck.query_map(params![rule.provider, rule.stuck_before], |row| {
            Ok(key_of(row.get(0)?, row.get(1)?, row.get(2)?))
        })? {
            keys.insert(row?);
        }
        if rule.missing_until > rule.missing_from {
            for row in missing.query_map(
                params![rule.provider, rule.missing_from, rule.missing_until],
                |row| {
                    Ok(GroupKey::External {
                        provider: row.get(0)?,
                        external_id: row.get(1)?,
                    })
                },
            )? {
                keys.insert(row?);
            }
        }
    }
    Ok(Changes {
        keys,
        next: ReconcileCursor {
            event_seq: max_seq,
            ledger_id: max_ledger,
            passed_at: now,
            xid_horizon: 0,
        },
        queued: queued_ids,
    })
}

/// Loads one group by its key, with the open mismatches of the subjects it covers.
pub(super) fn load_group(
    connection: &Connection,
    key: &GroupKey,
) -> Result<(MatchGroup, Vec<OpenMismatch>), StoreError> {
    let mut group = MatchGroup::default();
    match key {
        GroupKey::External {
            provider,
            external_id,
        } => {
            group.ledger = connection
                .prepare_cached(&format!(
                    "SELECT {LEDGER_FACT_COLUMNS} FROM ledger WHERE provider = ?1 AND external_id = ?2"
                ))?
                .query_row(params![provider, external_id], |row| ledger_fact(row, 0))
                .optional()?;
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {CASHOUT_FACT_COLUMNS} FROM cashouts WHERE provider = ?1 AND external_id = ?2 ORDER BY id"
            ))?;
            for fact in
                statement.query_map(params![provider, external_id], |row| cashout_fact(row, 0))?
            {
                group.cashouts.extend(fact?);
            }
            if let Some(named) = group.ledger.as_ref().and_then(|l| l.provider_ref.clone()) {
                group.ref_named = cashout_named_by(connection, provider, &named, external_id)?;
            }
        }
        GroupKey::Single {
            provider,
            provider_ref,
        } => {
            let fact = connection
                .prepare_cached(&format!(
                    "SELECT {CASHOUT_FACT_COLUMNS} FROM cashouts WHERE provider = ?1 AND provider_ref = ?2"
                ))?
                .query_row(params![provider, provider_ref], |row| cashout_fact(row, 0))
                .optional()?
                .flatten();
            match fact {
                // It has taken an external id since it was touched: load its real group.
                Some(CashoutFact {
                    external_id: Some(external_id),
                    ..
                }) => {
                    return load_group(
                        connection,
                        &GroupKey::External {
                            provider: provider.clone(),
                            external_id,
                        },
                    )
                }
                Some(fact) => group.cashouts.push(fact),
                None => {}
            }
        }
    }
    let open = open_mismatches_of(
        connection,
        key.provider(),
        &crate::reconcile::covered_subjects(&group),
    )?;
    Ok((group, open))
}

fn open_mismatches_of(
    connection: &Connection,
    provider: &str,
    subjects: &[Subject],
) -> Result<Vec<OpenMismatch>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT id, kind, subject FROM mismatches WHERE provider = ?1 AND subject = ?2 AND resolved_at IS NULL",
    )?;
    let mut open = Vec::new();
    for subject in subjects {
        for row in statement.query_map(params![provider, subject.key()], open_mismatch)? {
            open.extend(row?);
        }
    }
    Ok(open)
}

fn open_mismatch(row: &Row<'_>) -> rusqlite::Result<Option<OpenMismatch>> {
    let kind: String = row.get(1)?;
    let (id, subject): (i64, String) = (row.get(0)?, row.get(2)?);
    Ok(kind
        .parse::<MismatchKind>()
        .ok()
        .map(|kind| OpenMismatch { id, kind, subject }))
}

/// Every open mismatch of an examined kind, by provider then subject (the full pass diffs
/// against these).
pub(super) fn all_open_mismatches(connection: &Connection) -> Result<OpenByProvider, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT id, kind, subject, provider FROM mismatches WHERE resolved_at IS NULL AND kind <> 'missed_webhook'",
    )?;
    let mut open: OpenByProvider = HashMap::new();
    let rows = statement.query_map([], |row| {
        Ok((row.get::<_, String>(3)?, open_mismatch(row)?))
    })?;
    for row in rows {
        if let (provider, Some(mismatch)) = row? {
            open.entry(provider)
                .or_default()
                .entry(mismatch.subject.clone())
                .or_default()
                .push(mismatch);
        }
    }
    Ok(open)
}

/// Streams to `visit` each ledger entry created in the business day `[from, until)` (unix
/// ms) with every cash-out carrying its external id. Together with [`scan_day_uncovered`]
/// (which can run at the same time on another connection) these are every group of the
/// day. Memory stays flat: one group at a time, apart from the (rare) groups that need a
/// second look-up.
pub(super) fn scan_day_ledger(
    connection: &Connection,
    from: i64,
    until: i64,
    visit: &mut dyn FnMut(&str, MatchGroup),
) -> Result<ScanCounts, StoreError> {
    let mut counts = ScanCounts::default();
    // The cash-out a ledger entry names by provider_ref is almost always among those
    // carrying its external id; the few groups where it is not get a second look-up
    // after the stream (instead of a join probing every entry).
    let mut by_ledger = connection.prepare(&format!(
        "SELECT l.id, l.provider, {}, {}
         FROM ledger l
         LEFT JOIN cashouts c ON c.provider = l.provider AND c.external_id = l.external_id
         WHERE l.created_at >= ?1 AND l.created_at < ?2",
        qualified(LEDGER_FACT_COLUMNS, "l"),
        qualified(CASHOUT_FACT_COLUMNS, "c"),
    ))?;
    let mut named_elsewhere: Vec<(String, MatchGroup)> = Vec::new();
    let mut finish = |provider: String, group: MatchGroup, counts: &mut ScanCounts| {
        let named = group
            .ledger
            .as_ref()
            .and_then(|l| l.provider_ref.as_deref());
        match named {
            Some(named) if !group.cashouts.iter().any(|c| c.provider_ref == named) => {
                named_elsewhere.push((provider, group));
            }
            _ => {
                counts.groups += 1;
                visit(&provider, group);
            }
        }
    };
    let mut rows = by_ledger.query(params![from, until])?;
    let mut current: Option<(i64, String, MatchGroup)> = None;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        if current.as_ref().is_none_or(|(at, _, _)| *at != id) {
            if let Some((_, provider, group)) = current.take() {
                finish(provider, group, &mut counts);
            }
            counts.ledger_entries += 1;
            current = Some((
                id,
                row.get(1)?,
                MatchGroup {
                    ledger: Some(ledger_fact(row, 2)?),
                    cashouts: Vec::new(),
                    ref_named: None,
                },
            ));
        }
        if let (Some((_, _, group)), Some(fact)) = (current.as_mut(), cashout_fact(row, 8)?) {
            if !group
                .cashouts
                .iter()
                .any(|c| c.provider_ref == fact.provider_ref)
            {
                counts.cashouts += 1;
                group.cashouts.push(fact);
            }
        }
    }
    if let Some((_, provider, group)) = current.take() {
        finish(provider, group, &mut counts);
    }
    drop(rows);
    for (provider, mut group) in named_elsewhere {
        if let Some(entry) = &group.ledger {
            if let Some(named) = &entry.provider_ref {
                group.ref_named =
                    cashout_named_by(connection, &provider, named, &entry.external_id)?;
            }
        }
        counts.groups += 1;
        visit(&provider, group);
    }

    Ok(counts)
}

/// Streams to `visit` the cash-outs created in the business day `[from, until)` that no
/// ledger entry of that day covers: each alone in its group unless another cash-out
/// shares its external id or an entry of another day names it (those groups are loaded
/// whole).
pub(super) fn scan_day_uncovered(
    connection: &Connection,
    from: i64,
    until: i64,
    visit: &mut dyn FnMut(&str, MatchGroup),
) -> Result<ScanCounts, StoreError> {
    let mut counts = ScanCounts::default();
    let mut uncovered = connection.prepare(&format!(
        "SELECT c.provider, {},
                c.external_id IS NOT NULL AND (
                    EXISTS (SELECT 1 FROM ledger l2 WHERE l2.provider = c.provider AND l2.external_id = c.external_id)
                    OR EXISTS (SELECT 1 FROM cashouts c2 WHERE c2.provider = c.provider AND c2.external_id = c.external_id
                               AND c2.id <> c.id)) AS shared
         FROM cashouts c
         WHERE c.created_at >= ?1 AND c.created_at < ?2
           AND NOT EXISTS (SELECT 1 FROM ledger l WHERE l.provider = c.provider AND l.external_id = c.external_id
                           AND l.created_at >= ?1 AND l.created_at < ?2)",
        qualified(CASHOUT_FACT_COLUMNS, "c"),
    ))?;
    let mut shared_keys = BTreeSet::new();
    let mut rows = uncovered.query(params![from, until])?;
    while let Some(row) = rows.next()? {
        let provider: String = row.get(0)?;
        let Some(fact) = cashout_fact(row, 1)? else {
            continue;
        };
        let shared: bool = row.get(11)?;
        take_uncovered(provider, fact, shared, &mut shared_keys, &mut counts, visit);
    }
    drop(rows);
    for key in shared_keys {
        let (group, _) = load_group(connection, &key)?;
        counts.groups += 1;
        counts.cashouts += group.cashouts.len() as u64;
        visit(key.provider(), group);
    }
    Ok(counts)
}

/// One cash-out of the day that no ledger entry of the day covers (either store's scan):
/// a group of its own, visited now, or, when its external id is shared with a ledger entry
/// or another cash-out, the key of the group the scan loads whole afterwards.
pub(crate) fn take_uncovered(
    provider: String,
    fact: CashoutFact,
    shared: bool,
    shared_keys: &mut BTreeSet<GroupKey>,
    counts: &mut ScanCounts,
    visit: &mut dyn FnMut(&str, MatchGroup),
) {
    match (&fact.external_id, shared) {
        (Some(external_id), true) => {
            shared_keys.insert(GroupKey::External {
                provider,
                external_id: external_id.clone(),
            });
        }
        _ => {
            counts.groups += 1;
            counts.cashouts += 1;
            visit(
                &provider,
                MatchGroup {
                    ledger: None,
                    cashouts: vec![fact],
                    ref_named: None,
                },
            );
        }
    }
}

/// How much a day's scan read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ScanCounts {
    pub groups: u64,
    pub ledger_entries: u64,
    pub cashouts: u64,
}

impl std::ops::Add for ScanCounts {
    type Output = ScanCounts;
    fn add(self, other: ScanCounts) -> ScanCounts {
        ScanCounts {
            groups: self.groups + other.groups,
            ledger_entries: self.ledger_entries + other.ledger_entries,
            cashouts: self.cashouts + other.cashouts,
        }
    }
}

/// Opens the findings of a plan (once: an open one of the same kind and subject stays)
/// and resolves the listed mismatches, at `at`.
pub(super) fn apply_plan(
    connection: &Connection,
    opens: &[(String, Finding)],
    resolves: &[i64],
    at: i64,
) -> Result<(u64, u64), StoreError> {
    let mut insert = connection.prepare_cached(
        "INSERT OR IGNORE INTO mismatches (kind, provider, subject, provider_ref, external_id, detail, opened_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    let mut opened = 0;
    for (provider, finding) in opens {
        opened += insert.execute(params![
            finding.kind.as_str(),
            provider,
            finding.subject.key(),
            finding.provider_ref,
            finding.external_id,
            finding.detail,
            at
        ])? as u64;
    }
    let mut resolve = connection.prepare_cached(
        "UPDATE mismatches SET resolved_at = ?2 WHERE id = ?1 AND resolved_at IS NULL",
    )?;
    let mut resolved = 0;
    for id in resolves {
        resolved += resolve.execute(params![id, at])? as u64;
    }
    Ok((opened, resolved))
}

/// Stores the continuous pass's cursor and drops the queued cash-outs it examined.
pub(super) fn advance_cursor(
    connection: &Connection,
    cursor: ReconcileCursor,
    queued: &[i64],
) -> Result<(), StoreError> {
    connection
        .prepare_cached(
            "INSERT INTO reconcile_cursor (id, event_seq, ledger_id, passed_at) VALUES (1, ?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET event_seq = MAX(event_seq, ?1), ledger_id = MAX(ledger_id, ?2),
                                            passed_at = MAX(passed_at, ?3)",
        )?
        .execute(params![cursor.event_seq, cursor.ledger_id, cursor.passed_at])?;
    let mut dequeue =
        connection.prepare_cached("DELETE FROM reconcile_queue WHERE cashout_id = ?1")?;
    for id in queued {
        dequeue.execute(params![id])?;
    }
    Ok(())
}

/// Filters and position of a mismatch listing (times in unix ms).
#[derive(Clone, Debug, Default)]
pub struct MismatchFilter {
    pub kind: Option<MismatchKind>,
    pub provider: Option<String>,
    /// Only those open now (`Some(true)`) or resolved (`Some(false)`).
    pub open: Option<bool>,
    /// Only those open at some moment of `[from, until)`.
    pub flagged_during: Option<(i64, i64)>,
    pub limit: usize,
    /// Continue below this id (newest first).
    pub before_id: Option<i64>,
}

/// A stored mismatch (times in unix ms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MismatchRecord {
    pub id: i64,
    pub kind: MismatchKind,
    pub provider: String,
    pub subject: Option<String>,
    pub provider_ref: Option<String>,
    pub external_id: Option<String>,
    pub detail: String,
    pub opened_at: i64,
    pub resolved_at: Option<i64>,
}

/// One page of mismatches, newest first, and the id the next page continues below.
pub(super) fn list_mismatch_records(
    connection: &Connection,
    filter: &MismatchFilter,
) -> Result<(Vec<MismatchRecord>, Option<i64>), StoreError> {
    let limit = filter.limit.clamp(1, 1000);
    let mut statement = connection.prepare_cached(
        "SELECT id, kind, provider, subject, provider_ref, external_id, detail, opened_at, resolved_at
         FROM mismatches
         WHERE (?1 IS NULL OR kind = ?1) AND (?2 IS NULL OR provider = ?2)
           AND (?3 IS NULL OR (?3 = 1 AND resolved_at IS NULL) OR (?3 = 0 AND resolved_at IS NOT NULL))
           AND (?4 IS NULL OR (opened_at < ?5 AND (resolved_at IS NULL OR resolved_at >= ?4)))
           AND (?6 IS NULL OR id < ?6)
         ORDER BY id DESC LIMIT ?7",
    )?;
    let (from, until) = filter.flagged_during.unzip();
    let rows = statement.query_map(
        params![
            filter.kind.map(MismatchKind::as_str),
            filter.provider,
            filter.open,
            from,
            until,
            filter.before_id,
            (limit + 1) as i64
        ],
        |row| {
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
        },
    )?;
    let mut items = rows.collect::<Result<Vec<_>, _>>()?;
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|m| m.id)
    } else {
        None
    };
    Ok((items, next))
}
