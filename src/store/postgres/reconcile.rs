//! Reconciliation's store operations on PostgreSQL (src/store/reconcile.rs): the
//! continuous pass's cursor and changes, loading groups, a day's scan, applying a plan.
//!
//! # Following changes with several writers
//!
//! SQLite's cursor is `events.seq`/`ledger.id`: safe there because its one writer commits
//! in id order. Here identity values are handed out at insert and transactions commit in
//! any order, so a pass could read seq 11 committed while seq 10 is still in flight, move
//! past 10 and never see it. The pass follows transaction ids instead (migration 4):
//! `events`, `ledger` and `reconcile_queue` rows carry the id of the transaction that
//! inserted them (`xid8 DEFAULT pg_current_xact_id()`), and a pass reads, in one
//! snapshot, every change at or above its cursor that the snapshot sees, then stores
//! `horizon = pg_snapshot_xmin(pg_current_snapshot())` of that snapshot as the next
//! cursor: every transaction below it had finished (committed or rolled back), and every
//! transaction still running or yet to write has an id at or above it. So a pass sees
//! everything committed before it started, as SQLite's does, and never skips a row; a
//! row committed above the horizon is read by this pass and again by the next, which is
//! harmless (examining a group is idempotent). `xid8` is 64-bit with the epoch, so it
//! never wraps.
//!
//! Chosen over a touched-subjects queue claimed with `DELETE … RETURNING` because it
//! costs ingestion nothing but a column default and an index entry (a queue is one more
//! row, and a hot one, per accepted event) and leaves `ingest.rs` untouched. Its price: a
//! writing transaction left open (on any database of the server: transaction ids are the
//! server's) holds the horizon back, so changes committed since are read again by every
//! pass until it ends (re-examined, never lost nor delayed). Read-only transactions take
//! no id and hold nothing back.
//!
//! The queue of re-examined cash-outs (a reprocessed quarantined event rewrites an old
//! event row, whose transaction id does not change) is one row per queueing with its own
//! transaction id: a pass examines every queued row its snapshot sees and drops exactly
//! those below its horizon (by cash-out and `queued_xid < horizon`), so a cash-out queued
//! again meanwhile stays queued (and is examined again).
//!
//! # Two passes at once
//!
//! Leases make it rare, but a lease can expire mid-pass. Applying a plan opens findings
//! with `ON CONFLICT DO NOTHING` on the partial unique index `mismatches_open` (in key
//! order, so two passes opening the same findings wait for each other instead of
//! deadlocking), resolves only what is still open, and moves the cursor with `GREATEST`,
//! so neither pass duplicates a mismatch or moves the cursor backwards.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use futures_util::{pin_mut, StreamExt, TryStreamExt};
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, Row};

use super::{from_postgres, PgStore, PgTransaction};
use crate::reconcile::{
    covered_subjects, CashoutFact, Finding, LedgerFact, MatchGroup, MismatchKind, OpenMismatch,
};
use crate::state::CashoutStatus;
use crate::store::{
    to_millis, Changes, DueRule, GroupKey, OpenByProvider, ReconcileCursor, ScanCounts, StoreError,
};

/// Groups loaded at once on one connection (their queries pipelined).
const LOAD_CONCURRENCY: usize = 16;

const CASHOUT_FACT_COLUMNS: &str = "provider_ref, external_id, status, amount_minor, currency, fee_minor, net_minor, method, created_at, conflict_status";

const LEDGER_FACT_COLUMNS: &str =
    "external_id, amount_minor, currency, provider_ref, created_at, registered_at";

/// A transaction-id parameter (`xid8`) passed as BIGINT.
const XID_PARAM: &str = "::BIGINT::TEXT::xid8";

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    index: usize,
) -> Result<T, StoreError> {
    row.try_get(index).map_err(|e| from_postgres(&e))
}

fn parse_status(text: &str) -> Result<CashoutStatus, StoreError> {
    text.parse()
        .map_err(|err: crate::state::UnknownStatus| StoreError::Database(err.to_string()))
}

/// `columns` (a comma-separated list) with each name qualified by `alias`.
fn qualified(columns: &str, alias: &str) -> String {
    columns
        .split(',')
        .map(|column| format!("{alias}.{}", column.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A [`CashoutFact`] from `CASHOUT_FACT_COLUMNS` starting at column `at`; `None` when the
/// columns are NULL (an outer join that found nothing).
fn cashout_fact(row: &Row, at: usize) -> Result<Option<CashoutFact>, StoreError> {
    let Some(provider_ref) = get::<Option<String>>(row, at)? else {
        return Ok(None);
    };
    Ok(Some(CashoutFact {
        provider_ref,
        external_id: get(row, at + 1)?,
        status: parse_status(get(row, at + 2)?)?,
        amount_minor: get(row, at + 3)?,
        currency: get(row, at + 4)?,
        fee_minor: get(row, at + 5)?,
        net_minor: get(row, at + 6)?,
        method: get(row, at + 7)?,
        created_at: get(row, at + 8)?,
        conflict_status: get::<Option<&str>>(row, at + 9)?
            .map(parse_status)
            .transpose()?,
    }))
}

fn ledger_fact(row: &Row, at: usize) -> Result<LedgerFact, StoreError> {
    Ok(LedgerFact {
        external_id: get(row, at)?,
        amount_minor: get(row, at + 1)?,
        currency: get(row, at + 2)?,
        provider_ref: get(row, at + 3)?,
        created_at: get(row, at + 4)?,
        registered_at: get(row, at + 5)?,
    })
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

fn open_mismatch(row: &Row) -> Result<Option<OpenMismatch>, StoreError> {
    let kind: String = get(row, 1)?;
    let Ok(kind) = kind.parse::<MismatchKind>() else {
        return Ok(None);
    };
    Ok(Some(OpenMismatch {
        id: get(row, 0)?,
        kind,
        subject: get(row, 2)?,
    }))
}

/// A read-only transaction seeing one snapshot.
pub(super) async fn snapshot(
    client: &mut super::PgClient,
) -> Result<PgTransaction<'_>, StoreError> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|e| from_postgres(&e))
}

impl PgStore {
    /// Where the continuous pass stopped, if it ever passed (see the module doc).
    pub async fn reconcile_cursor(&self) -> Result<Option<ReconcileCursor>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT event_seq, ledger_id, passed_at, COALESCE(horizon::TEXT::BIGINT, 0)
                 FROM reconcile_cursor WHERE id = 1",
                &[],
            )
            .await?;
        row.map(|row| {
            Ok(ReconcileCursor {
                event_seq: get(&row, 0)?,
                ledger_id: get(&row, 1)?,
                passed_at: get(&row, 2)?,
                xid_horizon: get(&row, 3)?,
            })
        })
        .transpose()
    }

    /// The groups touched since `since` (every change this snapshot sees at or above
    /// `since.xid_horizon`), plus those due by time, and the cursor covering them (this
    /// snapshot's horizon: see the module doc).
    pub async fn reconcile_changes(
        &self,
        since: ReconcileCursor,
        due: Vec<DueRule>,
        now: DateTime<Utc>,
    ) -> Result<Changes, StoreError> {
        let mut client = self.client().await?;
        let tx = snapshot(&mut client).await?;
        let horizon: i64 = get(
            &tx.query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::TEXT::BIGINT",
                &[],
            )
            .await?,
            0,
        )?;
        let mut keys = BTreeSet::new();
        let mut next = ReconcileCursor {
            event_seq: since.event_seq,
            ledger_id: since.ledger_id,
            passed_at: to_millis(now),
            xid_horizon: horizon.max(since.xid_horizon),
        };
        for row in tx
            .query(
                &format!(
                    "SELECT c.provider, c.provider_ref, c.external_id, e.seq
                     FROM events e JOIN cashouts c ON c.id = e.cashout_id
                     WHERE e.change_xid >= $1{XID_PARAM}"
                ),
                &[&since.xid_horizon],
            )
            .await?
        {
            next.event_seq = next.event_seq.max(get(&row, 3)?);
            keys.insert(key_of(get(&row, 0)?, get(&row, 1)?, get(&row, 2)?));
        }
        let mut queued = BTreeSet::new();
        for row in tx
            .query(
                "SELECT q.cashout_id, c.provider, c.provider_ref, c.external_id FROM reconcile_queue q
                 JOIN cashouts c ON c.id = q.cashout_id",
                &[],
            )
            .await?
        {
            queued.insert(get::<i64>(&row, 0)?);
            keys.insert(key_of(get(&row, 1)?, get(&row, 2)?, get(&row, 3)?));
        }
        for row in tx
            .query(
                &format!(
                    "SELECT provider, external_id, id FROM ledger
                     WHERE change_xid >= $1{XID_PARAM}"
                ),
                &[&since.xid_horizon],
            )
            .await?
        {
            next.ledger_id = next.ledger_id.max(get(&row, 2)?);
            keys.insert(GroupKey::External {
                provider: get(&row, 0)?,
                external_id: get(&row, 1)?,
            });
        }
        let stuck = tx
            .prepare(
                "SELECT c.provider, c.provider_ref, c.external_id FROM cashouts c
                 WHERE c.provider = $1 AND c.status IN ('pending', 'processing') AND c.created_at <= $2
                   AND NOT EXISTS (SELECT 1 FROM mismatches m WHERE m.provider = c.provider AND m.subject = c.provider_ref
                                   AND m.kind = 'stuck' AND m.resolved_at IS NULL)",
            )
            .await?;
        let missing = tx
            .prepare(
                "SELECT provider, external_id FROM ledger
                 WHERE provider = $1 AND registered_at > $2 AND registered_at <= $3",
            )
            .await?;
        for rule in &due {
            for row in tx
                .query(&stuck, &[&rule.provider, &rule.stuck_before])
                .await?
            {
                keys.insert(key_of(get(&row, 0)?, get(&row, 1)?, get(&row, 2)?));
            }
            if rule.missing_until > rule.missing_from {
                for row in tx
                    .query(
                        &missing,
                        &[&rule.provider, &rule.missing_from, &rule.missing_until],
                    )
                    .await?
                {
                    keys.insert(GroupKey::External {
                        provider: get(&row, 0)?,
                        external_id: get(&row, 1)?,
                    });
                }
            }
        }
        tx.commit().await?;
        Ok(Changes {
            keys,
            next,
            queued: queued.into_iter().collect(),
        })
    }

    /// Loads groups by key, each with the open mismatches of the subjects it covers (one
    /// snapshot; the groups' queries pipelined on one connection).
    pub async fn load_groups(
        &self,
        keys: Vec<GroupKey>,
    ) -> Result<Vec<(GroupKey, MatchGroup, Vec<OpenMismatch>)>, StoreError> {
        let mut client = self.client().await?;
        let tx = snapshot(&mut client).await?;
        let loaded = {
            let tx = &tx;
            futures_util::stream::iter(keys.into_iter().map(|key| async move {
                let (group, open) = load_group(tx, &key).await?;
                Ok::<_, StoreError>((key, group, open))
            }))
            .buffered(LOAD_CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await?
        };
        tx.commit().await?;
        Ok(loaded)
    }

    /// Every open mismatch of an examined kind as `(kind, provider, subject)`.
    pub async fn open_findings(
        &self,
    ) -> Result<BTreeSet<(MismatchKind, String, String)>, StoreError> {
        Ok(self
            .open_mismatches()
            .await?
            .into_iter()
            .flat_map(|(provider, subjects)| {
                subjects
                    .into_values()
                    .flatten()
                    .map(move |m| (m.kind, provider.clone(), m.subject))
            })
            .collect())
    }

    /// Every open mismatch of an examined kind, by provider then subject.
    pub async fn open_mismatches(&self) -> Result<OpenByProvider, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, kind, subject, provider FROM mismatches
                 WHERE resolved_at IS NULL AND kind <> 'missed_webhook' ORDER BY id",
                &[],
            )
            .await?;
        let mut open: OpenByProvider = HashMap::new();
        for row in &rows {
            if let Some(mismatch) = open_mismatch(row)? {
                open.entry(get(row, 3)?)
                    .or_default()
                    .entry(mismatch.subject.clone())
                    .or_default()
                    .push(mismatch);
            }
        }
        Ok(open)
    }

    /// Streams the groups of the business day `[from, until)` to `visit`: the ledger's
    /// groups and the cash-outs no ledger entry of the day covers, each streamed from its
    /// own connection at once (rows arrive as `visit` takes them, never one whole `Vec`).
    pub async fn scan_day<V>(
        &self,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        visit: V,
    ) -> Result<ScanCounts, StoreError>
    where
        V: FnMut(&str, MatchGroup) + Clone + Send + 'static,
    {
        let (from, until) = (to_millis(from), to_millis(until));
        let (mut ledger_client, mut uncovered_client) =
            tokio::try_join!(self.client(), self.client())?;
        let (by_ledger, uncovered) = tokio::try_join!(
            async {
                let tx = snapshot(&mut ledger_client).await?;
                let counts = scan_day_ledger(&tx, from, until, visit.clone()).await?;
                tx.commit().await?;
                Ok::<_, StoreError>(counts)
            },
            async {
                let tx = snapshot(&mut uncovered_client).await?;
                let counts = scan_day_uncovered(&tx, from, until, visit.clone()).await?;
                tx.commit().await?;
                Ok::<_, StoreError>(counts)
            },
        )?;
        Ok(by_ledger + uncovered)
    }

    /// Applies a reconciliation plan decided at `at` in one transaction: opens `opens` once
    /// (an open one of the same kind and subject stays), resolves `resolves` still open,
    /// and, for a continuous pass, moves the cursor forward only and drops the queued
    /// cash-outs it examined. Returns how many were opened and resolved.
    pub async fn apply_reconcile_plan(
        &self,
        opens: Vec<(String, Finding)>,
        resolves: Vec<i64>,
        cursor: Option<(ReconcileCursor, Vec<i64>)>,
        at: DateTime<Utc>,
    ) -> Result<(u64, u64), StoreError> {
        let at = to_millis(at);
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Under the reconciliation pass's (or a daily report's) lease: refused once taken over.
        super::lease::check_scoped_fence(&tx).await?;
        let (mut kinds, mut providers, mut subjects) = (Vec::new(), Vec::new(), Vec::new());
        let (mut refs, mut externals, mut details) = (Vec::new(), Vec::new(), Vec::new());
        for (provider, finding) in &opens {
            kinds.push(finding.kind.as_str());
            providers.push(provider.as_str());
            subjects.push(finding.subject.key());
            refs.push(finding.provider_ref.as_deref());
            externals.push(finding.external_id.as_deref());
            details.push(finding.detail.as_str());
        }
        let opened = if opens.is_empty() {
            0
        } else {
            tx.execute(
                "INSERT INTO mismatches (kind, provider, subject, provider_ref, external_id, detail, opened_at)
                 SELECT kind, provider, subject, provider_ref, external_id, detail, $7
                 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[])
                      AS o (kind, provider, subject, provider_ref, external_id, detail)
                 ORDER BY provider COLLATE \"C\", subject COLLATE \"C\", kind COLLATE \"C\"
                 ON CONFLICT (kind, provider, subject) WHERE resolved_at IS NULL DO NOTHING",
                &[&kinds, &providers, &subjects, &refs, &externals, &details, &at],
            )
            .await?
        };
        let resolved = if resolves.is_empty() {
            0
        } else {
            tx.execute(
                "UPDATE mismatches SET resolved_at = $2 WHERE id = ANY($1) AND resolved_at IS NULL",
                &[&resolves, &at],
            )
            .await?
        };
        if let Some((cursor, queued)) = cursor {
            tx.execute(
                &format!(
                    "INSERT INTO reconcile_cursor (id, event_seq, ledger_id, passed_at, horizon)
                     VALUES (1, $1, $2, $3, $4{XID_PARAM})
                     ON CONFLICT (id) DO UPDATE SET
                         event_seq = GREATEST(reconcile_cursor.event_seq, EXCLUDED.event_seq),
                         ledger_id = GREATEST(reconcile_cursor.ledger_id, EXCLUDED.ledger_id),
                         passed_at = GREATEST(reconcile_cursor.passed_at, EXCLUDED.passed_at),
                         horizon = GREATEST(reconcile_cursor.horizon, EXCLUDED.horizon)"
                ),
                &[
                    &cursor.event_seq,
                    &cursor.ledger_id,
                    &cursor.passed_at,
                    &cursor.xid_horizon,
                ],
            )
            .await?;
            if !queued.is_empty() {
                tx.execute(
                    &format!(
                        "DELETE FROM reconcile_queue
                         WHERE cashout_id = ANY($1) AND queued_xid < $2{XID_PARAM}"
                    ),
                    &[&queued, &cursor.xid_horizon],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok((opened, resolved))
    }
}

/// The cash-out a ledger entry names by `provider_ref` when it carries another (or no)
/// external id than the entry's: the `ref_named` side of an ambiguous match.
async fn cashout_named_by(
    tx: &PgTransaction<'_>,
    provider: &str,
    provider_ref: &str,
    external_id: &str,
) -> Result<Option<CashoutFact>, StoreError> {
    let statement = super::cached(
        tx,
        &format!(
            "SELECT {CASHOUT_FACT_COLUMNS} FROM cashouts
             WHERE provider = $1 AND provider_ref = $2 AND external_id IS DISTINCT FROM $3"
        ),
    )
    .await?;
    match tx
        .query_opt(&statement, &[&provider, &provider_ref, &external_id])
        .await?
    {
        Some(row) => cashout_fact(&row, 0),
        None => Ok(None),
    }
}

/// Loads one group by its key, with the open mismatches of the subjects it covers.
async fn load_group(
    tx: &PgTransaction<'_>,
    key: &GroupKey,
) -> Result<(MatchGroup, Vec<OpenMismatch>), StoreError> {
    let group = match key {
        GroupKey::External {
            provider,
            external_id,
        } => load_external(tx, provider, external_id).await?,
        GroupKey::Single {
            provider,
            provider_ref,
        } => {
            let statement = super::cached(
                tx,
                &format!(
                    "SELECT {CASHOUT_FACT_COLUMNS} FROM cashouts WHERE provider = $1 AND provider_ref = $2"
                ),
            )
            .await?;
            let fact = match tx.query_opt(&statement, &[provider, provider_ref]).await? {
                Some(row) => cashout_fact(&row, 0)?,
                None => None,
            };
            match fact {
                // It has taken an external id since it was touched: load its real group.
                Some(CashoutFact {
                    external_id: Some(external_id),
                    ..
                }) => load_external(tx, provider, &external_id).await?,
                Some(fact) => MatchGroup {
                    cashouts: vec![fact],
                    ..MatchGroup::default()
                },
                None => MatchGroup::default(),
            }
        }
    };
    let subjects: Vec<String> = covered_subjects(&group).iter().map(|s| s.key()).collect();
    let mut open = Vec::new();
    if !subjects.is_empty() {
        let statement = super::cached(
            tx,
            "SELECT id, kind, subject FROM mismatches
             WHERE provider = $1 AND subject = ANY($2) AND resolved_at IS NULL
             ORDER BY array_position($2, subject), id",
        )
        .await?;
        for row in tx.query(&statement, &[&key.provider(), &subjects]).await? {
            open.extend(open_mismatch(&row)?);
        }
    }
    Ok((group, open))
}

async fn load_external(
    tx: &PgTransaction<'_>,
    provider: &str,
    external_id: &str,
) -> Result<MatchGroup, StoreError> {
    let mut group = MatchGroup::default();
    let ledger = super::cached(
        tx,
        &format!(
            "SELECT {LEDGER_FACT_COLUMNS} FROM ledger WHERE provider = $1 AND external_id = $2"
        ),
    )
    .await?;
    let cashouts = super::cached(
        tx,
        &format!(
            "SELECT {CASHOUT_FACT_COLUMNS} FROM cashouts WHERE provider = $1 AND external_id = $2 ORDER BY id"
        ),
    )
    .await?;
    let params: [&(dyn ToSql + Sync); 2] = [&provider, &external_id];
    let (entry, rows) =
        tokio::try_join!(tx.query_opt(&ledger, &params), tx.query(&cashouts, &params),)?;
    group.ledger = entry.map(|row| ledger_fact(&row, 0)).transpose()?;
    for row in &rows {
        group.cashouts.extend(cashout_fact(row, 0)?);
    }
    if let Some(named) = group.ledger.as_ref().and_then(|l| l.provider_ref.clone()) {
        group.ref_named = cashout_named_by(tx, provider, &named, external_id).await?;
    }
    Ok(group)
}

/// Streams to `visit` each ledger entry created in `[from, until)` with every cash-out
/// carrying its external id (as SQLite's `scan_day_ledger`; rows ordered by entry so a
/// group's rows are consecutive).
async fn scan_day_ledger<V>(
    tx: &PgTransaction<'_>,
    from: i64,
    until: i64,
    mut visit: V,
) -> Result<ScanCounts, StoreError>
where
    V: FnMut(&str, MatchGroup),
{
    let mut counts = ScanCounts::default();
    let sql = format!(
        "SELECT l.id, l.provider, {}, {}
         FROM ledger l
         LEFT JOIN cashouts c ON c.provider = l.provider AND c.external_id = l.external_id
         WHERE l.created_at >= $1 AND l.created_at < $2
         ORDER BY l.id, c.id",
        qualified(LEDGER_FACT_COLUMNS, "l"),
        qualified(CASHOUT_FACT_COLUMNS, "c"),
    );
    let params: [&(dyn ToSql + Sync); 2] = [&from, &until];
    let rows = tx.query_raw(&sql, params).await?;
    pin_mut!(rows);
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
    let mut current: Option<(i64, String, MatchGroup)> = None;
    while let Some(row) = rows.try_next().await? {
        let id: i64 = get(&row, 0)?;
        if current.as_ref().is_none_or(|(at, _, _)| *at != id) {
            if let Some((_, provider, group)) = current.take() {
                finish(provider, group, &mut counts);
            }
            counts.ledger_entries += 1;
            current = Some((
                id,
                get(&row, 1)?,
                MatchGroup {
                    ledger: Some(ledger_fact(&row, 2)?),
                    cashouts: Vec::new(),
                    ref_named: None,
                },
            ));
        }
        if let (Some((_, _, group)), Some(fact)) = (current.as_mut(), cashout_fact(&row, 8)?) {
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
    for (provider, mut group) in named_elsewhere {
        if let Some(entry) = &group.ledger {
            if let Some(named) = &entry.provider_ref {
                group.ref_named =
                    cashout_named_by(tx, &provider, named, &entry.external_id).await?;
            }
        }
        counts.groups += 1;
        visit(&provider, group);
    }
    Ok(counts)
}

/// Streams to `visit` the cash-outs created in `[from, until)` that no ledger entry of
/// that day covers (as SQLite's `scan_day_uncovered`).
async fn scan_day_uncovered<V>(
    tx: &PgTransaction<'_>,
    from: i64,
    until: i64,
    mut visit: V,
) -> Result<ScanCounts, StoreError>
where
    V: FnMut(&str, MatchGroup),
{
    let mut counts = ScanCounts::default();
    let sql = format!(
        "SELECT c.provider, {},
                c.external_id IS NOT NULL AND (
                    EXISTS (SELECT 1 FROM ledger l2 WHERE l2.provider = c.provider AND l2.external_id = c.external_id)
                    OR EXISTS (SELECT 1 FROM cashouts c2 WHERE c2.provider = c.provider AND c2.external_id = c.external_id
                               AND c2.id <> c.id)) AS shared
         FROM cashouts c
         WHERE c.created_at >= $1 AND c.created_at < $2
           AND NOT EXISTS (SELECT 1 FROM ledger l WHERE l.provider = c.provider AND l.external_id = c.external_id
                           AND l.created_at >= $1 AND l.created_at < $2)",
        qualified(CASHOUT_FACT_COLUMNS, "c"),
    );
    let params: [&(dyn ToSql + Sync); 2] = [&from, &until];
    let rows = tx.query_raw(&sql, params).await?;
    pin_mut!(rows);
    let mut shared_keys = BTreeSet::new();
    while let Some(row) = rows.try_next().await? {
        let provider: String = get(&row, 0)?;
        let Some(fact) = cashout_fact(&row, 1)? else {
            continue;
        };
        let shared: bool = get(&row, 11)?;
        crate::store::reconcile::take_uncovered(
            provider,
            fact,
            shared,
            &mut shared_keys,
            &mut counts,
            &mut visit,
        );
    }
    for key in shared_keys {
        let (group, _) = load_group(tx, &key).await?;
        counts.groups += 1;
        counts.cashouts += group.cashouts.len() as u64;
        visit(key.provider(), group);
    }
    Ok(counts)
}
