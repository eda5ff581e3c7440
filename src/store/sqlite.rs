//! The SQLite backend: migrations, the single group-committing writer, and read connections.
//!
//! Callers never see SQL or connections: they call async operations that either queue a
//! job for the writer thread (answered after its commit) or run a query on a read
//! connection in the blocking pool. The [`Store`](super::Store) facade dispatches to this
//! or to [`PgStore`](super::postgres::PgStore), whose operations have the same signatures.
//! Ingestion's rules are not here: `ingest.rs` loads what [`crate::ingest::plan`] needs and
//! applies its plan, and its module doc lists the atomic operations a backend provides.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

use super::replay_index::ReplayIndex;
use super::writer::WriteTx;
use super::{
    alerts, console, findings, from_millis, ingest, ledger, polling, queries, reconcile, report,
    retention, schema, to_millis, wal_batch, writer, AlertFactsQuery, AlertFilter, AlertView,
    Applied, AppliedAlerts, CashoutAlert, CashoutFilter, CashoutRow, Changes, CompletedRecheck,
    ConsoleEvent, DeliverySummary, DeliveryView, DueRule, EventRow, ExpiredBatch, GroupKey,
    IngestOutcome, LedgerEntry, LedgerOutcome, LoadedAlertFacts, MismatchCount, MismatchFilter,
    MismatchRecord, MismatchRow, OutboxItem, OutboxNext, Page, ProviderFigures, ReconcileCursor,
    ReportIndexRow, ReportRow, ScanCounts, StoreError, StoredEvent, WebhookRecord, READY_FRESH,
};
use crate::config::StoreSettings;
use crate::ingest::plan::PollKind;
use crate::ingest::FetchReason;
use crate::metrics::Metrics;
use crate::providers::Observation;
use crate::reconcile::{Finding, MatchGroup, OpenMismatch};

/// The store, cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` when opened with [`SqliteStore::open_read_only`].
    writer: Option<writer::WriterHandle>,
    writer_thread: Mutex<Option<writer::WriterThread>>,
    readers: Arc<ReadPool>,
    path: PathBuf,
}

struct ReadPool {
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
    path: PathBuf,
    busy_timeout: Duration,
}

impl ReadPool {
    fn take(&self) -> Result<Connection, StoreError> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match idle {
            Some(connection) => Ok(connection),
            None => open_reader(&self.path, self.busy_timeout),
        }
    }

    fn put_back(&self, connection: Connection) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(connection);
        }
    }
}

pub(super) fn open_error(path: &Path, err: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: path.display().to_string(),
        reason: err.to_string(),
    }
}

/// Opens the writer's connection: WAL, `synchronous = FULL`, on the WAL-gathering VFS
/// when the linked SQLite is the one it was verified against (else, and when it cannot
/// be registered, on the default VFS with a WARN). Refuses to run the gathering VFS
/// without `synchronous = FULL` (see [`wal_batch`]).
pub(super) fn open_writer(path: &Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let gathering = match wal_batch::verified_sqlite().and_then(|()| {
        wal_batch::register()
            .map_err(|code| format!("cannot register the WAL-gathering VFS (SQLite code {code})"))
    }) {
        Ok(()) => true,
        Err(reason) => {
            tracing::warn!(
                reason,
                "store: using the default VFS (ingestion is slower; nothing else changes)"
            );
            false
        }
    };
    let connection = if gathering {
        Connection::open_with_flags_and_vfs(path, OpenFlags::default(), wal_batch::VFS_NAME)
    } else {
        Connection::open(path)
    }
    .map_err(|err| open_error(path, err))?;
    // A new database gives freed pages back (retention's incremental vacuum): SQLite
    // fixes auto_vacuum when the first table is created. An existing one is left as it
    // is (setting it again would be a write, refused on a read-only file; converting one
    // needs a VACUUM, see the README).
    let new_database = connection
        .query_row("PRAGMA page_count", [], |row| row.get::<_, i64>(0))
        .map_err(|err| open_error(path, err))?
        == 0;
    if new_database {
        connection
            .pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(|err| open_error(path, err))?;
    }
    connection
        .busy_timeout(busy_timeout)
        .and_then(|_| connection.pragma_update(None, "journal_mode", "WAL"))
        .and_then(|_| connection.pragma_update(None, "synchronous", "FULL"))
        .and_then(|_| connection.pragma_update(None, "foreign_keys", "ON"))
        .map_err(|err| open_error(path, err))?;
    if gathering {
        wal_batch::require_full_sync(&connection).map_err(|reason| open_error(path, reason))?;
    }
    Ok(connection)
}

fn open_reader(path: &Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let connection =
        Connection::open_with_flags(path, flags).map_err(|err| open_error(path, err))?;
    connection
        .busy_timeout(busy_timeout)
        .map_err(|err| open_error(path, err))?;
    Ok(connection)
}

impl SqliteStore {
    /// Opens (creating and migrating as needed) the database and starts the writer.
    pub fn open(settings: &StoreSettings, metrics: Metrics) -> Result<SqliteStore, StoreError> {
        let path = settings.path.clone();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|err| open_error(&path, err))?;
        }
        let mut connection = open_writer(&path, settings.busy_timeout)?;
        schema::migrations()
            .to_latest(&mut connection)
            .map_err(|err| open_error(&path, err))?;
        let replay_since = Utc::now() - settings.replay_window;
        let replay = ReplayIndex::load(&connection, to_millis(replay_since))
            .map_err(|err| open_error(&path, err))?;
        let readers = (0..settings.read_connections)
            .map(|_| open_reader(&path, settings.busy_timeout))
            .collect::<Result<Vec<_>, _>>()?;
        let (writer, writer_thread) =
            writer::start(connection, replay, settings.max_batch, metrics);
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writer: Some(writer),
                writer_thread: Mutex::new(Some(writer_thread)),
                readers: Arc::new(ReadPool {
                    idle: Mutex::new(readers),
                    permits: Semaphore::new(settings.read_connections),
                    path: path.clone(),
                    busy_timeout: settings.busy_timeout,
                }),
                path,
            }),
        })
    }

    /// Opens an existing database for reading only: no migration, no writer thread, no
    /// store lock, so it works beside a running `serve` (WAL readers never block the
    /// writer). Every write answers [`StoreError::ReadOnly`]. A missing file is an error.
    pub fn open_read_only(path: &Path, busy_timeout: Duration) -> Result<SqliteStore, StoreError> {
        if !path.is_file() {
            return Err(open_error(path, "no such file"));
        }
        let connection = open_reader(path, busy_timeout)?;
        let version: i64 = connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(|err| open_error(path, err))?;
        if version == 0 {
            return Err(open_error(path, "not a cashout-recon store (no schema)"));
        }
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writer: None,
                writer_thread: Mutex::new(None),
                readers: Arc::new(ReadPool {
                    idle: Mutex::new(vec![connection]),
                    permits: Semaphore::new(1),
                    path: path.to_path_buf(),
                    busy_timeout,
                }),
                path: path.to_path_buf(),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Commits what is queued and stops the writer; later writes answer `Closed`.
    pub async fn close(&self) {
        let thread = self
            .inner
            .writer_thread
            .lock()
            .ok()
            .and_then(|mut t| t.take());
        if let Some(thread) = thread {
            thread.stop().await;
        }
    }

    /// Queues `job` for the writer; it may run more than once (see
    /// [`writer::WriterHandle::write`]), so it acts only through the connection.
    async fn write<T, F>(&self, job: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&WriteTx<'_, '_>) -> Result<T, StoreError> + Send + 'static,
    {
        match &self.inner.writer {
            Some(writer) => writer.write(job).await,
            None => Err(StoreError::ReadOnly),
        }
    }

    async fn read<T, F>(&self, query: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let _permit = self
            .inner
            .readers
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let pool = self.inner.readers.clone();
        tokio::task::spawn_blocking(move || {
            let connection = pool.take()?;
            let result = query(&connection);
            pool.put_back(connection);
            result
        })
        .await
        .map_err(|err| StoreError::Database(format!("read task failed: {err}")))?
    }

    /// Whether a commit can succeed now (for `/readyz`): the writer's last outcome (its
    /// last group that changed rows committed, and no job found the database read-only,
    /// full or locked; a group that changed nothing commits even then, so it proves nothing),
    /// refreshed by a tiny real write (the one-row `heartbeat` table) when nothing was
    /// written in the last [`READY_FRESH`] or the last outcome was a failure. An empty
    /// transaction would not do: it commits on a full disk or a read-only file. `Err`
    /// holds the reason.
    pub async fn readiness(&self) -> Result<(), String> {
        let Some(writer) = &self.inner.writer else {
            return Err("the store was opened read-only".to_string());
        };
        let (health, at) = writer.health();
        let fresh = at.is_some_and(|at| at.elapsed() < READY_FRESH);
        if matches!(
            health,
            writer::WriterHealth::Unknown | writer::WriterHealth::Failing(_)
        ) || !fresh
        {
            match tokio::time::timeout(READY_FRESH, self.heartbeat()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => writer.record_failure(err.to_string()),
                Err(_) => {
                    return Err(format!(
                        "the store did not complete a write within {} s",
                        READY_FRESH.as_secs()
                    ))
                }
            }
        }
        match writer.health().0 {
            writer::WriterHealth::Writing => Ok(()),
            writer::WriterHealth::Unknown => Err("the store has not written yet".to_string()),
            writer::WriterHealth::Failing(reason) => {
                Err(format!("the store cannot commit: {reason}"))
            }
            writer::WriterHealth::Stopped => Err("the store writer has stopped".to_string()),
        }
    }

    /// Upserts the one row of `heartbeat`: the smallest real write.
    async fn heartbeat(&self) -> Result<(), StoreError> {
        self.write(|connection| {
            connection
                .prepare_cached(
                    "INSERT INTO heartbeat (id, written_at) VALUES (1, ?1)
                     ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at",
                )?
                .execute([to_millis(Utc::now())])?;
            Ok(())
        })
        .await
    }

    /// Resolves when the writer thread has ended: at shutdown, or when it died (then the
    /// daemon must exit so that its supervisor restarts it).
    pub async fn writer_ended(&self) {
        match &self.inner.writer {
            Some(writer) => writer.ended().await,
            None => std::future::pending().await,
        }
    }

    /// Commits one verified webhook: dedup, replay check, state rule, event log.
    pub async fn ingest_webhook(&self, record: WebhookRecord) -> Result<IngestOutcome, StoreError> {
        self.write(move |connection| ingest::ingest_webhook(connection, &record))
            .await
    }

    /// Applies an observation found by a search sweep. `counts_as_missed`: a state
    /// change found this way is a `missed_webhook` (unless a thin notification had
    /// already asked for this cash-out's status).
    pub async fn apply_polled(
        &self,
        provider: String,
        observation: Observation,
        counts_as_missed: bool,
        at: DateTime<Utc>,
    ) -> Result<Applied, StoreError> {
        self.write(move |connection| {
            ingest::record_poll(
                connection,
                &provider,
                &observation,
                PollKind::Sweep,
                counts_as_missed,
                at,
            )
        })
        .await
    }

    /// Re-runs a quarantined event with the observation a fixed parser now produces
    /// (or the new error). Returns `None` when there is no such quarantined event.
    pub async fn reprocess_event(
        &self,
        event_id: String,
        parsed: Result<Observation, String>,
        at: DateTime<Utc>,
    ) -> Result<Option<IngestOutcome>, StoreError> {
        self.write(move |connection| ingest::reprocess(connection, &event_id, &parsed, at))
            .await
    }

    /// Records that a cash-out's status should be fetched from its provider, unless one
    /// is already queued or the provider's queue holds `max_pending` requests (answered
    /// `false`; the id rule is the facade's, [`super::Store::request_status_fetch`]).
    pub async fn request_status_fetch(
        &self,
        provider: String,
        provider_ref: String,
        reason: FetchReason,
        max_pending: usize,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.write(move |connection| {
            ingest::queue_status_fetch(
                connection,
                &provider,
                &provider_ref,
                reason,
                max_pending,
                to_millis(at),
            )
        })
        .await
    }

    /// The end of the last search window completed for `provider`.
    pub async fn watermark(&self, provider: String) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.read(move |connection| polling::watermark(connection, &provider))
            .await
    }

    /// Records a completed search window (never moves backwards).
    pub async fn set_watermark(
        &self,
        provider: String,
        watermark: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.write(move |connection| {
            polling::set_watermark(connection, &provider, watermark, Utc::now())
        })
        .await
    }

    /// Non-terminal cash-outs of `provider` unchanged since `cutoff`, least recently checked first.
    pub async fn due_status_checks(
        &self,
        provider: String,
        cutoff: DateTime<Utc>,
        recheck: Option<CompletedRecheck>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.read(move |connection| {
            polling::due_status_checks(connection, &provider, cutoff, recheck, limit)
        })
        .await
    }

    /// Applies a fetched status, marks the cash-out checked and completes a queued fetch,
    /// in one transaction. `counts_as_missed`: a state change found this way is a
    /// `missed_webhook` (unless a thin notification had asked for the fetch).
    pub async fn record_fetched_status(
        &self,
        provider: String,
        observation: Observation,
        counts_as_missed: bool,
        at: DateTime<Utc>,
    ) -> Result<Applied, StoreError> {
        self.write(move |connection| {
            ingest::record_poll(
                connection,
                &provider,
                &observation,
                PollKind::StatusFetch,
                counts_as_missed,
                at,
            )
        })
        .await
    }

    /// Marks a cash-out's status as checked without news (e.g. unknown to the provider).
    pub async fn mark_status_checked(
        &self,
        provider: String,
        provider_ref: String,
    ) -> Result<(), StoreError> {
        self.write(move |connection| {
            polling::mark_status_checked(connection, &provider, &provider_ref, Utc::now())
        })
        .await
    }

    /// Queued status fetches of `provider` that are due.
    pub async fn due_fetches(
        &self,
        provider: String,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.read(move |connection| polling::due_fetches(connection, &provider, Utc::now(), limit))
            .await
    }

    /// Drops a queued fetch (done, or nothing more to learn).
    pub async fn complete_fetch(
        &self,
        provider: String,
        provider_ref: String,
    ) -> Result<(), StoreError> {
        self.write(move |connection| polling::complete_fetch(connection, &provider, &provider_ref))
            .await
    }

    /// Retries a failed queued fetch later; `false` when it was given up.
    pub async fn defer_fetch(
        &self,
        provider: String,
        provider_ref: String,
        max_attempts: i64,
    ) -> Result<bool, StoreError> {
        self.write(move |connection| {
            polling::defer_fetch(
                connection,
                &provider,
                &provider_ref,
                Utc::now(),
                max_attempts,
            )
        })
        .await
    }

    /// How many status fetches are queued for `provider`.
    pub async fn queued_fetch_count(&self, provider: String) -> Result<i64, StoreError> {
        self.read(move |connection| polling::queued_fetch_count(connection, &provider))
            .await
    }

    /// Drops replay-cache entries older than `before`.
    pub async fn prune_replay_cache(&self, before: DateTime<Utc>) -> Result<usize, StoreError> {
        let before = to_millis(before);
        self.write(move |tx| Ok(tx.replay().prune(before))).await
    }

    /// The `events.seq` through which raw bodies have been cleared by retention.
    pub async fn retention_cursor(&self) -> Result<i64, StoreError> {
        self.read(retention::cursor).await
    }

    /// The next batch of events after `after_seq` whose raw body and headers are due
    /// (received before `cutoff`); see [`ExpiredBatch`]. A read: the writer is not held.
    pub async fn expired_raw_bodies(
        &self,
        after_seq: i64,
        cutoff: DateTime<Utc>,
        limit: usize,
        with_content: bool,
    ) -> Result<ExpiredBatch, StoreError> {
        self.read(move |connection| {
            retention::expired_batch(connection, after_seq, cutoff, limit, with_content)
        })
        .await
    }

    /// Drops raw bodies and headers of the events in `(after_seq, through_seq]` received
    /// before `cutoff` (events, hashes and timeline stay) and advances the retention
    /// cursor. One bounded write: callers pass ranges of one [`ExpiredBatch`].
    pub async fn clear_raw_bodies(
        &self,
        after_seq: i64,
        through_seq: i64,
        cutoff: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        self.write(move |connection| retention::clear(connection, after_seq, through_seq, cutoff))
            .await
    }

    /// Gives up to `pages` free pages back to the file system; the free pages left, or
    /// `None` when the database is not in `auto_vacuum = INCREMENTAL` mode (one created
    /// before it was the default: a one-time `VACUUM` converts it).
    pub async fn incremental_vacuum(&self, pages: u32) -> Result<Option<i64>, StoreError> {
        self.write(move |connection| retention::incremental_vacuum(connection, pages))
            .await
    }

    /// Free pages in the database file (`PRAGMA freelist_count`).
    pub async fn free_pages(&self) -> Result<i64, StoreError> {
        self.read(retention::free_pages).await
    }

    /// Registers an expected cash-out; the same entry again is `Unchanged`, another one
    /// under the same `(provider, external_id)` a `Conflict`.
    pub async fn register_expected(&self, entry: LedgerEntry) -> Result<LedgerOutcome, StoreError> {
        self.register_expected_at(entry, Utc::now()).await
    }

    /// [`SqliteStore::register_expected`] with the registration (book) time given.
    pub async fn register_expected_at(
        &self,
        entry: LedgerEntry,
        at: DateTime<Utc>,
    ) -> Result<LedgerOutcome, StoreError> {
        self.write(move |connection| ledger::register(connection, &entry, at))
            .await
    }

    /// Provider refs the ledger names that the book has never seen.
    pub async fn ledger_refs_unseen(
        &self,
        provider: String,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.read(move |connection| ledger::unseen_refs(connection, &provider, cutoff, limit))
            .await
    }

    /// One page of cash-outs, newest first.
    pub async fn list_cashouts(
        &self,
        filter: CashoutFilter,
    ) -> Result<Page<CashoutRow>, StoreError> {
        self.read(move |connection| queries::list_cashouts(connection, &filter))
            .await
    }

    /// One cash-out and its event timeline.
    pub async fn get_cashout(
        &self,
        provider: String,
        provider_ref: String,
    ) -> Result<Option<(CashoutRow, Vec<EventRow>)>, StoreError> {
        self.read(move |connection| queries::get_cashout(connection, &provider, &provider_ref))
            .await
    }

    /// A stored event with its raw body (for reprocessing).
    pub async fn get_event(&self, event_id: String) -> Result<Option<StoredEvent>, StoreError> {
        self.read(move |connection| queries::get_event(connection, &event_id))
            .await
    }

    /// Whether an event with this id is stored (for crash tests and audits).
    pub async fn event_exists(&self, event_id: String) -> Result<bool, StoreError> {
        self.read(move |connection| queries::event_exists(connection, &event_id))
            .await
    }

    /// Queued status fetches of a provider, oldest first.
    pub async fn pending_status_fetches(
        &self,
        provider: String,
        limit: usize,
    ) -> Result<Vec<(String, FetchReason)>, StoreError> {
        self.read(move |connection| queries::pending_status_fetches(connection, &provider, limit))
            .await
    }

    /// Mismatches, optionally only open ones or one kind.
    pub async fn list_mismatches(
        &self,
        kind: Option<String>,
        open_only: bool,
    ) -> Result<Vec<MismatchRow>, StoreError> {
        self.read(move |connection| {
            findings::list_mismatches(connection, kind.as_deref(), open_only)
        })
        .await
    }

    /// Nothing to publish: one instance runs on a SQLite file, and its alert signals are
    /// in its memory (the facade's operation, for [`crate::alert::shared`]).
    pub async fn publish_signals(
        &self,
        _signals: Vec<(String, crate::alert::signals::SignalSnapshot)>,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// No other instance on a SQLite file: no peer signals.
    pub async fn peer_signals(&self) -> Result<Vec<crate::alert::shared::PeerSignals>, StoreError> {
        Ok(Vec::new())
    }

    /// Nothing is published on SQLite: nothing to forget.
    pub async fn forget_peer_signals(
        &self,
        _rows: &[(String, String)],
        _silent_for: std::time::Duration,
    ) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// What an alert pass reads: open mismatches, quarantined events, stuck and in-flight
    /// cash-outs, open alerts (and, on the first pass, what the signals remember).
    pub async fn alert_facts(
        &self,
        query: AlertFactsQuery,
    ) -> Result<LoadedAlertFacts, StoreError> {
        self.read(move |connection| alerts::load_facts(connection, &query))
            .await
    }

    /// Applies an alert lifecycle plan made at `now` and queues its deliveries (when
    /// `enqueue`, due at once by the wall clock), in one transaction; returns the notices.
    pub async fn apply_alert_plan(
        &self,
        plan: crate::alert::AlertPlan,
        now: DateTime<Utc>,
        enqueue: bool,
    ) -> Result<AppliedAlerts, StoreError> {
        let now = to_millis(now);
        let enqueue = enqueue.then(|| to_millis(Utc::now()));
        self.write(move |connection| alerts::apply_plan(connection, &plan, now, enqueue))
            .await
    }

    /// Claims due alert deliveries for `lease` (another worker skips them meanwhile).
    pub async fn claim_alert_deliveries(
        &self,
        now: DateTime<Utc>,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        let now = to_millis(now);
        let lease = i64::try_from(lease.as_millis()).unwrap_or(60_000);
        self.write(move |connection| alerts::claim_deliveries(connection, now, lease, limit))
            .await
    }

    /// Records one delivery attempt and what follows it (delivered, retry, given up).
    pub async fn record_alert_delivery(
        &self,
        outbox_id: i64,
        at: DateTime<Utc>,
        http_status: Option<u16>,
        error: Option<String>,
        duration_ms: i64,
        next: OutboxNext,
    ) -> Result<(), StoreError> {
        let at = to_millis(at);
        self.write(move |connection| {
            alerts::record_delivery(
                connection,
                outbox_id,
                at,
                http_status,
                error.as_deref(),
                duration_ms,
                next,
            )
        })
        .await
    }

    /// Alert deliveries pending and given up.
    pub async fn alert_outbox_counts(&self) -> Result<(i64, i64), StoreError> {
        self.read(alerts::outbox_counts).await
    }

    /// A page of alerts, newest first, and the cursor (an id) of the next page.
    pub async fn list_alerts(
        &self,
        filter: AlertFilter,
    ) -> Result<(Vec<AlertView>, Option<i64>), StoreError> {
        self.read(move |connection| alerts::list(connection, &filter))
            .await
    }

    /// One alert with its deliveries and their attempts.
    pub async fn get_alert(
        &self,
        id: i64,
    ) -> Result<Option<(AlertView, Vec<DeliveryView>)>, StoreError> {
        self.read(move |connection| alerts::get(connection, id))
            .await
    }

    /// Where the continuous reconciliation pass stopped, if it ever ran.
    pub async fn reconcile_cursor(&self) -> Result<Option<ReconcileCursor>, StoreError> {
        self.read(reconcile::cursor).await
    }

    /// The groups touched since `since` or due by time, and the cursor covering them.
    pub async fn reconcile_changes(
        &self,
        since: ReconcileCursor,
        due: Vec<DueRule>,
        now: DateTime<Utc>,
    ) -> Result<Changes, StoreError> {
        self.read(move |connection| {
            reconcile::changes_since(connection, since, &due, to_millis(now))
        })
        .await
    }

    /// Loads groups by key, each with the open mismatches of the subjects it covers.
    pub async fn load_groups(
        &self,
        keys: Vec<GroupKey>,
    ) -> Result<Vec<(GroupKey, MatchGroup, Vec<OpenMismatch>)>, StoreError> {
        self.read(move |connection| {
            keys.into_iter()
                .map(|key| {
                    let (group, open) = reconcile::load_group(connection, &key)?;
                    Ok((key, group, open))
                })
                .collect()
        })
        .await
    }

    /// Every open mismatch of an examined kind as `(kind, provider, subject)`.
    pub async fn open_findings(
        &self,
    ) -> Result<
        std::collections::BTreeSet<(crate::reconcile::MismatchKind, String, String)>,
        StoreError,
    > {
        let open = self.read(reconcile::all_open_mismatches).await?;
        Ok(open
            .into_iter()
            .flat_map(|(provider, subjects)| {
                subjects
                    .into_values()
                    .flatten()
                    .map(move |m| (m.kind, provider.clone(), m.subject))
            })
            .collect())
    }

    /// Every open mismatch of an examined kind, by `(provider, subject)`.
    pub async fn open_mismatches(&self) -> Result<reconcile::OpenByProvider, StoreError> {
        self.read(reconcile::all_open_mismatches).await
    }

    /// Streams the groups of the business day `[from, until)` to `visit` (a copy of it on
    /// each of two read connections at once: the ledger's groups and the cash-outs no
    /// ledger entry of the day covers); returns what was read.
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
        let mut by_ledger = visit.clone();
        let mut uncovered = visit;
        let (ledger, rest) = tokio::try_join!(
            self.read(move |connection| {
                reconcile::scan_day_ledger(connection, from, until, &mut by_ledger)
            }),
            self.read(move |connection| {
                reconcile::scan_day_uncovered(connection, from, until, &mut uncovered)
            }),
        )?;
        Ok(ledger + rest)
    }

    /// Applies a reconciliation plan decided at `at`: opens `opens` (per provider) and
    /// resolves `resolves` as of then, and, for a continuous pass, stores its cursor — all
    /// in one transaction. Returns how many were opened and resolved.
    pub async fn apply_reconcile_plan(
        &self,
        opens: Vec<(String, Finding)>,
        resolves: Vec<i64>,
        cursor: Option<(ReconcileCursor, Vec<i64>)>,
        at: DateTime<Utc>,
    ) -> Result<(u64, u64), StoreError> {
        self.write(move |connection| {
            let counts = reconcile::apply_plan(connection, &opens, &resolves, to_millis(at))?;
            if let Some((cursor, queued)) = &cursor {
                reconcile::advance_cursor(connection, *cursor, queued)?;
            }
            Ok(counts)
        })
        .await
    }

    /// Streams the rows of the business day `[from, until)` as the book stood at `until`
    /// to `emit` (on a blocking thread), in report order; returns how many.
    pub async fn report_rows<E>(
        &self,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        mut emit: E,
    ) -> Result<u64, StoreError>
    where
        E: FnMut(ReportRow) -> Result<(), StoreError> + Send + 'static,
    {
        self.read(move |connection| {
            report::day_rows(connection, to_millis(from), to_millis(until), &mut emit)
        })
        .await
    }

    /// Records a generated report in the index (a later generation replaces it).
    pub async fn record_report(&self, row: ReportIndexRow) -> Result<(), StoreError> {
        self.write(move |connection| report::record_report(connection, &row))
            .await
    }

    /// When the book first learned anything (its oldest event or ledger entry), if ever.
    pub async fn first_entry_at(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(self.read(report::first_entry_at).await?.map(from_millis))
    }

    /// The generated reports, newest date first.
    pub async fn list_reports(&self) -> Result<Vec<ReportIndexRow>, StoreError> {
        self.read(report::list_reports).await
    }

    /// One generated report's index row.
    pub async fn get_report(&self, date: String) -> Result<Option<ReportIndexRow>, StoreError> {
        self.read(move |connection| report::get_report(connection, &date))
            .await
    }

    /// The ops console's overview figures of each `(provider, stuck cutoff)`.
    pub async fn console_overview(
        &self,
        providers: Vec<(String, DateTime<Utc>)>,
    ) -> Result<Vec<ProviderFigures>, StoreError> {
        let providers: Vec<(String, i64)> = providers
            .into_iter()
            .map(|(id, cutoff)| (id, to_millis(cutoff)))
            .collect();
        self.read(move |connection| console::overview(connection, &providers))
            .await
    }

    /// Cash-outs whose provider ref or external id is exactly `id`, newest first.
    pub async fn find_cashouts_by_id(
        &self,
        provider: Option<String>,
        id: String,
    ) -> Result<Vec<CashoutRow>, StoreError> {
        self.read(move |connection| console::find_by_id(connection, provider.as_deref(), &id))
            .await
    }

    /// Stuck cash-outs of `provider` (in flight, created at or before `cutoff`), oldest first.
    pub async fn stuck_cashouts(
        &self,
        provider: String,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<CashoutRow>, StoreError> {
        let cutoff = to_millis(cutoff);
        self.read(move |connection| console::stuck(connection, &provider, cutoff, limit))
            .await
    }

    /// The mismatches and alerts (open and resolved) about one cash-out.
    pub async fn cashout_findings(
        &self,
        provider: String,
        provider_ref: String,
        external_id: Option<String>,
    ) -> Result<(Vec<MismatchRecord>, Vec<CashoutAlert>), StoreError> {
        self.read(move |connection| {
            Ok((
                console::cashout_mismatches(
                    connection,
                    &provider,
                    &provider_ref,
                    external_id.as_deref(),
                )?,
                console::cashout_alerts(connection, &provider, &provider_ref)?,
            ))
        })
        .await
    }

    /// Quarantined events, newest first, and the cursor (an event seq) of the next page.
    pub async fn quarantined_events(
        &self,
        before_seq: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<ConsoleEvent>, Option<i64>), StoreError> {
        self.read(move |connection| console::quarantined(connection, before_seq, limit))
            .await
    }

    /// One stored event as the console shows it, with its raw body when `with_body`.
    pub async fn console_event(
        &self,
        event_id: String,
        with_body: bool,
    ) -> Result<Option<ConsoleEvent>, StoreError> {
        self.read(move |connection| console::event(connection, &event_id, with_body))
            .await
    }

    /// Open mismatches counted by kind and provider.
    pub async fn open_mismatch_counts(&self) -> Result<Vec<MismatchCount>, StoreError> {
        self.read(console::open_mismatch_counts).await
    }

    /// The deliveries in short of each alert in `ids`.
    pub async fn alert_delivery_summaries(
        &self,
        ids: Vec<i64>,
    ) -> Result<Vec<(i64, DeliverySummary)>, StoreError> {
        self.read(move |connection| console::delivery_summaries(connection, &ids))
            .await
    }

    /// One page of mismatches, newest first, and where the next page starts.
    pub async fn mismatch_page(
        &self,
        filter: MismatchFilter,
    ) -> Result<(Vec<MismatchRecord>, Option<i64>), StoreError> {
        self.read(move |connection| reconcile::list_mismatch_records(connection, &filter))
            .await
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A webhook whose body cannot be parsed (it is quarantined), with keys made of `id`.
    pub(in crate::store) fn webhook(id: &str) -> WebhookRecord {
        WebhookRecord {
            event_id: id.to_string(),
            provider: "fiserv".to_string(),
            dedup_key: format!("key-{id}"),
            nonce: None,
            body_sha256: format!("sha-{id}"),
            raw_body: format!("{{\"id\":\"{id}\"}}").into_bytes(),
            headers_json: "{}".to_string(),
            secret_index: 0,
            received_at: Utc::now(),
            parsed: Err("unparseable on purpose".to_string()),
        }
    }

    /// A webhook reporting `observation`, with keys made of `id`.
    fn observed(id: &str, observation: crate::providers::Observation) -> WebhookRecord {
        WebhookRecord {
            parsed: Ok(observation),
            ..webhook(id)
        }
    }

    #[tokio::test]
    async fn a_new_cashouts_event_copies_exactly_the_row_inserted() {
        use crate::money::{Currency, Money};
        use crate::providers::Observation;
        use crate::state::{CashoutStatus, StatusUpdate};

        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("snapshot.db");
        let store = SqliteStore::open(&settings(path.clone()), Metrics::new()).expect("open");
        let bare = Observation {
            status: Some(StatusUpdate::to(CashoutStatus::Pending)),
            ..Observation::new("ref-bare")
        };
        let full = Observation {
            external_id: Some("ext-9".into()),
            status: Some(StatusUpdate::to(CashoutStatus::Completed)),
            raw_status: Some("SUCCESS".into()),
            reason_code: Some("00".into()),
            amount: Some(Money {
                minor: 12_345,
                currency: Currency::from_code("BRL").expect("BRL"),
            }),
            fee_minor: Some(45),
            method: Some("pix".into()),
            net_minor: Some(12_300),
            created_at: Some(from_millis(1_700_000_000_123)),
            updated_at: Some(from_millis(1_700_000_000_456)),
            ..Observation::new("ref-full")
        };
        for (id, observation) in [("ev-bare", bare), ("ev-full", full)] {
            let outcome = store
                .ingest_webhook(observed(id, observation))
                .await
                .expect("ingest");
            assert!(
                matches!(outcome, IngestOutcome::Accepted { .. }),
                "{outcome:?}"
            );
        }
        store.close().await;

        let book = Connection::open(&path).expect("open the book");
        let rows = |sql: &str| -> Vec<Vec<rusqlite::types::Value>> {
            let mut statement = book.prepare(sql).expect("prepare");
            let columns = statement.column_count();
            statement
                .query_map([], |row| (0..columns).map(|i| row.get(i)).collect())
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("rows")
        };
        let copied = rows(
            "SELECT after_status, after_provider_status, after_external_id, after_amount_minor,
                    after_currency, after_fee_minor, after_net_minor, after_created_at,
                    after_updated_at, after_completed_at, after_webhooks, after_recovered
             FROM events ORDER BY seq",
        );
        let stored = rows(
            "SELECT status, provider_status, external_id, amount_minor, currency, fee_minor,
                    net_minor, created_at, updated_at, completed_at, webhook_count, recovered_by_poll
             FROM cashouts ORDER BY id",
        );
        assert_eq!(copied.len(), 2);
        assert_eq!(copied, stored);
        // The full one's columns are the observation's, not defaults.
        assert_eq!(
            stored[1][7],
            rusqlite::types::Value::Integer(1_700_000_000_123)
        );
        assert_eq!(stored[1][4], rusqlite::types::Value::Text("BRL".into()));
        assert_ne!(stored[1][9], rusqlite::types::Value::Null, "completed_at");
    }

    fn settings(path: PathBuf) -> StoreSettings {
        StoreSettings {
            backend: crate::config::StoreBackend::Sqlite,
            path,
            busy_timeout: Duration::from_secs(5),
            max_batch: 64,
            read_connections: 2,
            replay_window: crate::config::MIN_REPLAY_WINDOW,
        }
    }

    #[tokio::test]
    async fn a_webhook_whose_wal_write_fails_is_not_acknowledged_and_later_ones_are() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&settings(dir.path().join("store-fault.db")), Metrics::new())
            .expect("open");
        store.ingest_webhook(webhook("ev-1")).await.expect("first");

        wal_batch::fault::fail_write_outs("store-fault.db-wal", rusqlite::ffi::SQLITE_FULL, 1);
        let failed = store.ingest_webhook(webhook("ev-2")).await;
        wal_batch::fault::clear("store-fault.db-wal");
        // Unavailable is what the webhook handler answers 503 + Retry-After for.
        assert!(
            matches!(failed, Err(StoreError::Unavailable(_))),
            "{failed:?}"
        );
        assert!(!store.event_exists("ev-2".into()).await.expect("read"));

        store
            .ingest_webhook(webhook("ev-3"))
            .await
            .expect("a later one");
        assert!(store.event_exists("ev-1".into()).await.expect("read"));
        assert!(store.event_exists("ev-3".into()).await.expect("read"));
        assert!(!store.event_exists("ev-2".into()).await.expect("read"));
        assert_eq!(store.readiness().await, Ok(()));
        store.close().await;
    }
}
