//! Bulk ledger import: rows staged in a temporary SQLite database, checked against the
//! store by SQL, then written to the store in short batches.
//!
//! Nothing of the file is held in memory: the staging database (in a temporary
//! directory, removed on drop) finds repeated and conflicting rows through its UNIQUE
//! key, and the store is compared and written with the staging database attached or
//! read in pages. Writing goes through the store file directly (not the daemon's
//! writer), one transaction per batch, so a daemon sharing the file waits at most one
//! batch for its own commits.

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};

use super::replay_index::ReplayIndex;
use super::statement_shelf::StatementShelf;
use super::writer::WriteTx;
use super::{
    from_millis, ledger, open_error, open_writer, schema, to_millis, LedgerEntry, StoreError,
};
use crate::config::StoreSettings;

/// What staging one row found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staged {
    /// The first row with this `(provider, external_id)`.
    New,
    /// The same entry as an earlier row: fine, counted once.
    Repeated,
    /// Another entry under the same `(provider, external_id)` as the row at `first_line`
    /// (`first`); `fields` are the ones that differ.
    Conflict {
        first_line: u64,
        first: LedgerEntry,
        fields: Vec<&'static str>,
    },
}

/// A row of the file that conflicts with an entry already registered in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConflict {
    pub line: u64,
    pub entry: LedgerEntry,
    pub registered: LedgerEntry,
    pub fields: Vec<&'static str>,
}

/// What comparing the staged rows with the store found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreComparison {
    /// Staged entries already registered with the same values.
    pub already_registered: u64,
    /// How many staged entries conflict with a registered one.
    pub conflicts: u64,
    /// The first conflicts, by line.
    pub first_conflicts: Vec<StoreConflict>,
}

/// What writing the staged rows did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Entries inserted.
    pub created: u64,
    /// Entries found registered with the same values when their batch ran.
    pub unchanged: u64,
    /// Lines whose entry was registered with other values by someone else between the
    /// comparison and their batch (left as registered).
    pub conflicting_meanwhile: Vec<u64>,
}

/// How long the import may hold the store's write lock, batch after batch, before it
/// pauses for [`BREATHER`].
const HOLD_BEFORE_BREATHER: Duration = Duration::from_millis(200);

/// The pause: longer than the 25 ms between a waiting writer's early retries (SQLite's
/// busy handler), so a writer that started waiting within the last ~100 ms gets in.
const BREATHER: Duration = Duration::from_millis(30);

/// The staging database of one import.
pub struct LedgerStaging {
    connection: Connection,
    path: PathBuf,
    open_transaction: bool,
    uncommitted: usize,
    staged: u64,
    _dir: tempfile::TempDir,
}

/// Rows staged per staging transaction (the staging file has no journal, so this only
/// bounds how much SQLite keeps dirty in its cache).
const STAGE_COMMIT_ROWS: usize = 50_000;

impl LedgerStaging {
    /// Creates an empty staging database in a new temporary directory.
    pub fn create() -> Result<LedgerStaging, StoreError> {
        let dir = tempfile::Builder::new()
            .prefix("cashout-recon-ledger-")
            .tempdir()
            .map_err(|err| StoreError::Database(format!("cannot create a temp dir: {err}")))?;
        let path = dir.path().join("stage.db");
        let connection = Connection::open(&path).map_err(|err| open_error(&path, err))?;
        // A scratch file: a crash loses nothing the next import would not redo.
        connection
            .execute_batch(
                "PRAGMA journal_mode = OFF;
                 PRAGMA synchronous = OFF;
                 PRAGMA cache_size = -32768;
                 PRAGMA temp_store = FILE;
                 CREATE TABLE rows (
                     provider      TEXT    NOT NULL,
                     external_id   TEXT    NOT NULL,
                     line          INTEGER NOT NULL,
                     amount_minor  INTEGER NOT NULL,
                     currency      TEXT    NOT NULL,
                     provider_ref  TEXT,
                     created_at    INTEGER,
                     PRIMARY KEY (provider, external_id)
                 ) WITHOUT ROWID;",
            )
            .map_err(|err| open_error(&path, err))?;
        Ok(LedgerStaging {
            connection,
            path,
            open_transaction: false,
            uncommitted: 0,
            staged: 0,
            _dir: dir,
        })
    }

    /// Distinct entries staged so far.
    pub fn staged(&self) -> u64 {
        self.staged
    }

    /// Stages the entry of file line `line`.
    pub fn add(&mut self, line: u64, entry: &LedgerEntry) -> Result<Staged, StoreError> {
        if !self.open_transaction {
            self.connection.execute_batch("BEGIN")?;
            self.open_transaction = true;
        }
        let inserted = self
            .connection
            .prepare_cached(
                "INSERT INTO rows (line, provider, external_id, amount_minor, currency, provider_ref, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (provider, external_id) DO NOTHING",
            )?
            .execute(params![
                line as i64,
                entry.provider,
                entry.external_id,
                entry.amount_minor,
                entry.currency,
                entry.provider_ref,
                entry.created_at.map(to_millis),
            ])?
            > 0;
        let outcome = if inserted {
            self.staged += 1;
            Staged::New
        } else {
            self.compare_with_staged(entry)?
        };
        self.uncommitted += 1;
        if self.uncommitted >= STAGE_COMMIT_ROWS {
            self.commit()?;
        }
        Ok(outcome)
    }

    fn compare_with_staged(&mut self, entry: &LedgerEntry) -> Result<Staged, StoreError> {
        let first: Option<(i64, LedgerEntry)> = self
            .connection
            .prepare_cached(
                "SELECT line, amount_minor, currency, provider_ref, created_at FROM rows
                 WHERE provider = ?1 AND external_id = ?2",
            )?
            .query_row(params![entry.provider, entry.external_id], |row| {
                Ok((
                    row.get(0)?,
                    LedgerEntry {
                        provider: entry.provider.clone(),
                        external_id: entry.external_id.clone(),
                        amount_minor: row.get(1)?,
                        currency: row.get(2)?,
                        provider_ref: row.get(3)?,
                        created_at: row.get::<_, Option<i64>>(4)?.map(from_millis),
                    },
                ))
            })
            .optional()?;
        let Some((first_line, first)) = first else {
            return Err(StoreError::Database(format!(
                "staging lost {}/{}",
                entry.provider, entry.external_id
            )));
        };
        let fields = entry.differences(&first);
        if !fields.is_empty() {
            return Ok(Staged::Conflict {
                first_line: first_line as u64,
                first,
                fields,
            });
        }
        if first.created_at.is_none() && entry.created_at.is_some() {
            // The later row says when; later rows are compared with that.
            self.connection
                .prepare_cached(
                    "UPDATE rows SET created_at = ?3 WHERE provider = ?1 AND external_id = ?2",
                )?
                .execute(params![
                    entry.provider,
                    entry.external_id,
                    entry.created_at.map(to_millis)
                ])?;
        }
        Ok(Staged::Repeated)
    }

    /// Commits what is staged (before the staging file is read by another connection).
    pub fn commit(&mut self) -> Result<(), StoreError> {
        if self.open_transaction {
            self.connection.execute_batch("COMMIT")?;
            self.open_transaction = false;
        }
        self.uncommitted = 0;
        Ok(())
    }

    /// Compares every staged entry with the store's ledger in one join; keeps the first
    /// `keep` conflicts by line.
    pub fn compare_with_store(
        &mut self,
        target: &ImportTarget,
        keep: usize,
    ) -> Result<StoreComparison, StoreError> {
        self.commit()?;
        let connection = &target.connection;
        connection.execute(
            "ATTACH DATABASE ?1 AS stage",
            params![self.path.to_string_lossy()],
        )?;
        let result = compare_attached(connection, keep);
        let detached = connection.execute_batch("DETACH DATABASE stage");
        let comparison = result?;
        detached?;
        Ok(comparison)
    }

    /// Writes the staged entries to the store, `batch_rows` per transaction, calling
    /// `progress` with the number of staged entries handled so far after each batch.
    pub fn write_to_store(
        &mut self,
        target: &ImportTarget,
        batch_rows: usize,
        at: DateTime<Utc>,
        mut progress: impl FnMut(u64),
    ) -> Result<WriteOutcome, StoreError> {
        self.commit()?;
        let mut outcome = WriteOutcome::default();
        let mut after: Option<(String, String)> = None;
        let mut handled = 0u64;
        let mut batch: Vec<(i64, LedgerEntry)> = Vec::with_capacity(batch_rows);
        let mut held = Duration::ZERO;
        loop {
            batch.clear();
            self.read_page(after.as_ref(), batch_rows, &mut batch)?;
            let Some((_, last)) = batch.last() else {
                break;
            };
            after = Some((last.provider.clone(), last.external_id.clone()));
            let started = Instant::now();
            target.write_batch(&batch, at, &mut outcome)?;
            held += started.elapsed();
            handled += batch.len() as u64;
            progress(handled);
            if held >= HOLD_BEFORE_BREATHER {
                // SQLite's locks are not fair: a daemon waiting for the write lock polls
                // it at growing intervals and can keep missing the short gaps between
                // batches. A pause now and then lets it in.
                std::thread::sleep(BREATHER);
                held = Duration::ZERO;
            }
        }
        outcome.conflicting_meanwhile.sort_unstable();
        Ok(outcome)
    }

    /// The next `limit` staged entries in key order after `after`: the store's ledger
    /// index then takes them at neighbouring places, batch after batch.
    fn read_page(
        &self,
        after: Option<&(String, String)>,
        limit: usize,
        page: &mut Vec<(i64, LedgerEntry)>,
    ) -> Result<(), StoreError> {
        let mut statement = self.connection.prepare_cached(
            "SELECT line, provider, external_id, amount_minor, currency, provider_ref, created_at
             FROM rows WHERE (provider, external_id) > (?1, ?2)
             ORDER BY provider, external_id LIMIT ?3",
        )?;
        // Every key is greater than ('', ''): ids are never empty.
        let (provider, external_id) = after.map_or(("", ""), |(p, e)| (p.as_str(), e.as_str()));
        let rows = statement.query_map(params![provider, external_id, limit as i64], |row| {
            Ok((
                row.get(0)?,
                LedgerEntry {
                    provider: row.get(1)?,
                    external_id: row.get(2)?,
                    amount_minor: row.get(3)?,
                    currency: row.get(4)?,
                    provider_ref: row.get(5)?,
                    created_at: row.get::<_, Option<i64>>(6)?.map(from_millis),
                },
            ))
        })?;
        for row in rows {
            page.push(row?);
        }
        Ok(())
    }
}

fn compare_attached(connection: &Connection, keep: usize) -> Result<StoreComparison, StoreError> {
    let mut statement = connection.prepare(
        "SELECT s.line, s.provider, s.external_id, s.amount_minor, s.currency, s.provider_ref, s.created_at,
                l.amount_minor, l.currency, l.provider_ref, l.created_at
         FROM stage.rows s
         JOIN main.ledger l ON l.provider = s.provider AND l.external_id = s.external_id",
    )?;
    let mut rows = statement.query([])?;
    let mut comparison = StoreComparison::default();
    while let Some(row) = rows.next()? {
        let provider: String = row.get(1)?;
        let external_id: String = row.get(2)?;
        let entry = LedgerEntry {
            provider: provider.clone(),
            external_id: external_id.clone(),
            amount_minor: row.get(3)?,
            currency: row.get(4)?,
            provider_ref: row.get(5)?,
            created_at: row.get::<_, Option<i64>>(6)?.map(from_millis),
        };
        let registered = LedgerEntry {
            provider,
            external_id,
            amount_minor: row.get(7)?,
            currency: row.get(8)?,
            provider_ref: row.get(9)?,
            created_at: Some(from_millis(row.get(10)?)),
        };
        let fields = entry.differences(&registered);
        if fields.is_empty() {
            comparison.already_registered += 1;
            continue;
        }
        comparison.conflicts += 1;
        let line = row.get::<_, i64>(0)? as u64;
        let first = &mut comparison.first_conflicts;
        if first.len() < keep || first.last().is_some_and(|last| line < last.line) {
            // Keep the `keep` smallest lines: the join runs in key order, not line order.
            let at = first.partition_point(|kept| kept.line < line);
            first.insert(
                at,
                StoreConflict {
                    line,
                    entry,
                    registered,
                    fields,
                },
            );
            first.truncate(keep);
        }
    }
    Ok(comparison)
}

/// The store file opened directly for an import (migrated to the latest schema).
pub struct ImportTarget {
    connection: Connection,
    busy_timeout: Duration,
}

/// How long a batch keeps retrying to start while the daemon holds the write lock.
const BATCH_START_PATIENCE: Duration = Duration::from_secs(60);

impl ImportTarget {
    /// Opens (creating and migrating as needed) the store of `settings`. The daemon may
    /// be running on the same file: SQLite's locks and the busy timeout share it.
    pub fn open(settings: &StoreSettings) -> Result<ImportTarget, StoreError> {
        let path = &settings.path;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|err| open_error(path, err))?;
        }
        // The daemon writer's own settings (WAL, synchronous FULL, the WAL-gathering VFS).
        let mut connection = open_writer(path, settings.busy_timeout)?;
        // The ledger's indexes take scattered inserts: keep their pages in memory across
        // batches (bounded: 64 MiB).
        connection
            .pragma_update(None, "cache_size", -65536)
            .map_err(|err| open_error(path, err))?;
        schema::migrations()
            .to_latest(&mut connection)
            .map_err(|err| open_error(path, err))?;
        Ok(ImportTarget {
            connection,
            busy_timeout: settings.busy_timeout,
        })
    }

    fn write_batch(
        &self,
        batch: &[(i64, LedgerEntry)],
        at: DateTime<Utc>,
        outcome: &mut WriteOutcome,
    ) -> Result<(), StoreError> {
        self.begin_immediate()?;
        let result = self.write(|tx| {
            let mut created = 0;
            let mut unchanged = 0;
            let mut conflicting = Vec::new();
            for (line, entry) in batch {
                if ledger::insert_new(tx, entry, at)? {
                    created += 1;
                    continue;
                }
                let same =
                    ledger::registered(&self.connection, &entry.provider, &entry.external_id)?
                        .is_some_and(|registered| entry.differences(&registered).is_empty());
                if same {
                    unchanged += 1;
                } else {
                    conflicting.push(*line as u64);
                }
            }
            Ok::<_, StoreError>((created, unchanged, conflicting))
        });
        match result {
            Ok((created, unchanged, conflicting)) => {
                self.connection.execute_batch("COMMIT")?;
                outcome.created += created;
                outcome.unchanged += unchanged;
                outcome.conflicting_meanwhile.extend(conflicting);
                Ok(())
            }
            Err(err) => {
                let _ = self.connection.execute_batch("ROLLBACK");
                Err(err)
            }
        }
    }

    /// Runs `write` through the store functions' view of this connection (statements
    /// kept for the call; no replay claims).
    fn write<T>(&self, write: impl FnOnce(&WriteTx<'_, '_>) -> T) -> T {
        let statements = StatementShelf::new(&self.connection);
        let replay = RefCell::new(ReplayIndex::default());
        write(&WriteTx::outside_writer(
            &self.connection,
            &statements,
            &replay,
        ))
    }

    /// `BEGIN IMMEDIATE`, retried while the database stays locked (the daemon's writer
    /// commits in short groups; each attempt already waits the busy timeout).
    fn begin_immediate(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        loop {
            match self.connection.execute_batch("BEGIN IMMEDIATE") {
                Ok(()) => return Ok(()),
                Err(err) => {
                    let error = StoreError::from_sqlite(&err);
                    let locked = matches!(
                        err.sqlite_error_code(),
                        Some(
                            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                        )
                    );
                    if !locked || started.elapsed() + self.busy_timeout > BATCH_START_PATIENCE {
                        return Err(error);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Registers `entry` in the import target as the store would.
    fn insert_new(
        target: &ImportTarget,
        entry: &LedgerEntry,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        target.write(|tx| ledger::insert_new(tx, entry, at))
    }

    fn entry(external_id: &str, amount_minor: i64, created_at: Option<i64>) -> LedgerEntry {
        LedgerEntry {
            provider: "fiserv".to_string(),
            external_id: external_id.to_string(),
            amount_minor,
            currency: "BRL".to_string(),
            provider_ref: Some(format!("tx-{external_id}")),
            created_at: created_at.map(from_millis),
        }
    }

    fn target(dir: &Path) -> ImportTarget {
        ImportTarget::open(&StoreSettings {
            backend: crate::config::StoreBackend::Sqlite,
            path: dir.join("store.db"),
            busy_timeout: Duration::from_millis(500),
            max_batch: 64,
            read_connections: 1,
            replay_window: crate::config::MIN_REPLAY_WINDOW,
        })
        .unwrap()
    }

    #[test]
    fn repeated_rows_are_fine_and_different_values_conflict() {
        let mut staging = LedgerStaging::create().unwrap();
        assert_eq!(staging.add(2, &entry("a", 100, None)).unwrap(), Staged::New);
        assert_eq!(
            staging.add(3, &entry("a", 100, None)).unwrap(),
            Staged::Repeated,
            "the same row again"
        );
        assert_eq!(
            staging.add(4, &entry("a", 100, Some(1_000))).unwrap(),
            Staged::Repeated,
            "a created_at the first row left out"
        );
        assert_eq!(
            staging.add(5, &entry("a", 100, Some(2_000))).unwrap(),
            Staged::Conflict {
                first_line: 2,
                first: entry("a", 100, Some(1_000)),
                fields: vec!["created_at"],
            },
            "another created_at than the one learned on line 4"
        );
        assert_eq!(
            staging.add(6, &entry("a", 101, None)).unwrap(),
            Staged::Conflict {
                first_line: 2,
                first: entry("a", 100, Some(1_000)),
                fields: vec!["amount"],
            },
            "another amount"
        );
        assert_eq!(staging.staged(), 1);
    }

    #[test]
    fn staged_rows_are_compared_with_the_store_then_written_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let target = target(dir.path());
        let at = from_millis(5_000);
        insert_new(&target, &entry("same", 100, Some(1_000)), at).unwrap();
        insert_new(&target, &entry("other", 100, None), at).unwrap();
        target
            .connection
            .execute(
                "INSERT INTO cashouts (provider, provider_ref, status, created_at, first_seen_at, updated_at)
                 VALUES ('fiserv', 'tx-new-2', 'completed', 0, 0, 0)",
                [],
            )
            .unwrap();
        let mut staging = LedgerStaging::create().unwrap();
        staging.add(2, &entry("same", 100, None)).unwrap();
        staging.add(3, &entry("other", 250, None)).unwrap();
        for n in 1..=5 {
            staging
                .add(3 + n, &entry(&format!("new-{n}"), 100 * n as i64, None))
                .unwrap();
        }

        let comparison = staging.compare_with_store(&target, 20).unwrap();
        assert_eq!(comparison.already_registered, 1);
        assert_eq!(comparison.conflicts, 1);
        assert_eq!(comparison.first_conflicts[0].line, 3);
        assert_eq!(comparison.first_conflicts[0].fields, vec!["amount"]);

        let mut seen = Vec::new();
        let outcome = staging
            .write_to_store(&target, 2, at, |done| seen.push(done))
            .unwrap();
        assert_eq!(outcome.created, 5);
        assert_eq!(outcome.unchanged, 1);
        assert_eq!(outcome.conflicting_meanwhile, vec![3]);
        assert_eq!(seen, vec![2, 4, 6, 7], "progress after each batch of two");
        let linked: Option<String> = target
            .connection
            .query_row(
                "SELECT external_id FROM cashouts WHERE provider_ref = 'tx-new-2'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(linked.as_deref(), Some("new-2"));
    }

    #[test]
    fn the_first_store_conflicts_are_the_smallest_lines_whatever_the_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let target = target(dir.path());
        let at = from_millis(5_000);
        for id in ["a", "b", "c"] {
            insert_new(&target, &entry(id, 100, None), at).unwrap();
        }
        let mut staging = LedgerStaging::create().unwrap();
        staging.add(2, &entry("c", 1, None)).unwrap();
        staging.add(3, &entry("b", 1, None)).unwrap();
        staging.add(4, &entry("a", 1, None)).unwrap();

        let comparison = staging.compare_with_store(&target, 2).unwrap();

        assert_eq!(comparison.conflicts, 3);
        let lines: Vec<u64> = comparison.first_conflicts.iter().map(|c| c.line).collect();
        assert_eq!(lines, vec![2, 3]);
    }
}
