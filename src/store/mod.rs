//! The store: one facade, [`Store`], over two backends with the same operations — the
//! embedded SQLite file ([`SqliteStore`]: one group-committing writer thread, read
//! connections) and PostgreSQL ([`PgStore`]: a pool several instances may share).
//!
//! Callers never see SQL, connections or the backend: the app, the jobs and the handlers
//! hold a `Store` and call its async operations, which dispatch to the backend chosen by
//! `[store] backend`. Ingestion's rules are not here: `ingest.rs` loads what
//! [`crate::ingest::plan`] needs and applies its plan, and its module doc lists the
//! atomic operations a backend provides.

mod alerts;
pub mod bench_seed;
mod console;
mod findings;
mod ingest;
pub mod lease;
mod ledger;
mod lock;
mod polling;
pub mod postgres;
mod queries;
mod reconcile;
mod replay_index;
pub(crate) mod reply_inbox;
mod report;
mod retention;
mod schema;
mod sqlite;
mod staging;
mod statement_shelf;
mod wal_batch;
mod writer;

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::ErrorCode;

pub use crate::ingest::{Applied, IngestOutcome, ObservationSource, WebhookRecord};
pub use alerts::{
    AlertFactsQuery, AlertFilter, AlertView, AppliedAlerts, AttemptView, DeliveryView,
    InFlightStats, LoadedAlertFacts, OutboxItem, OutboxNext,
};
pub use console::{
    CashoutAlert, ConsoleEvent, DeliverySummary, MismatchCount, ProviderFigures, IN_FLIGHT,
};
pub use findings::MismatchRow;
pub use lease::{JobLease, JobName};
pub use ledger::{LedgerEntry, LedgerOutcome};
pub use lock::{LockError, StoreLock};
pub use polling::CompletedRecheck;
pub use queries::{CashoutFilter, CashoutRow, EventRow, Page, StoredEvent};
pub use reconcile::{
    Changes, DueRule, GroupKey, MismatchFilter, MismatchRecord, OpenByProvider, ReconcileCursor,
    ScanCounts,
};
pub use report::{ReportIndexRow, ReportRow};
pub use retention::{ExpiredBatch, ExpiredBody};
pub use sqlite::SqliteStore;
// The ledger import stages into a SQLite file of its own with the store's settings.
use sqlite::{open_error, open_writer};
pub use staging::{
    ImportTarget, LedgerStaging, Staged, StoreComparison, StoreConflict, WriteOutcome,
};

use crate::config::{StoreBackend, StoreSettings};
use crate::ingest::FetchReason;
use crate::metrics::Metrics;
use crate::providers::Observation;
use crate::reconcile::{Finding, MatchGroup, OpenMismatch};
use postgres::{PgOptions, PgStore};

/// Why the store could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot take writes now (locked past the busy timeout, disk full,
    /// I/O error): the caller should answer 503 and let the sender retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Any other database error.
    #[error("store error: {0}")]
    Database(String),
    /// The writer has stopped (shutdown).
    #[error("store is shutting down")]
    Closed,
    /// The database could not be opened or migrated.
    #[error("cannot open store {path}: {reason}")]
    Open { path: String, reason: String },
    /// A write was asked of a store opened with [`Store::open_read_only`] (SQLite).
    #[error("the store was opened read-only")]
    ReadOnly,
    /// A write made under a job's lease after another instance took the lease over
    /// (see [`lease`]): nothing was written, the job must stop.
    #[error("lease {job} lost: another instance took it over")]
    LeaseLost { job: String },
}

impl StoreError {
    /// Classifies a SQLite error.
    pub fn from_sqlite(err: &rusqlite::Error) -> StoreError {
        match err.sqlite_error_code() {
            Some(
                ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::ReadOnly
                | ErrorCode::CannotOpen
                | ErrorCode::OutOfMemory,
            ) => StoreError::Unavailable(err.to_string()),
            _ => StoreError::Database(err.to_string()),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::from_sqlite(&err)
    }
}

/// How recent the writer's last outcome must be for `/readyz` to trust it without a
/// heartbeat write (also the heartbeat's own time limit).
pub const READY_FRESH: Duration = Duration::from_secs(2);

/// Unix milliseconds of a UTC time (the store's time format).
pub fn to_millis(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

/// The UTC time of stored unix milliseconds.
pub fn from_millis(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// The store, cheap to clone: every operation dispatches to the configured backend.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

/// Calls the same operation on whichever backend `$facade` holds (the two have the same
/// signatures).
macro_rules! dispatch {
    ($facade:expr, $store:ident => $call:expr) => {
        match &$facade.backend {
            Backend::Sqlite($store) => $call,
            Backend::Postgres($store) => $call,
        }
    };
}

impl From<SqliteStore> for Store {
    fn from(store: SqliteStore) -> Store {
        Store {
            backend: Backend::Sqlite(store),
        }
    }
}

impl From<PgStore> for Store {
    fn from(store: PgStore) -> Store {
        Store {
            backend: Backend::Postgres(store),
        }
    }
}

impl Store {
    /// Opens the configured backend: the SQLite file (created and migrated as needed, its
    /// writer started), or a PostgreSQL pool, migrated (advisory-locked: instances starting
    /// at once apply each migration once). The SQLite store lock is the caller's (`serve`).
    pub async fn connect(settings: &StoreSettings, metrics: Metrics) -> Result<Store, StoreError> {
        match &settings.backend {
            StoreBackend::Sqlite => Store::open(settings, metrics),
            StoreBackend::Postgres(postgres) => {
                let (store, applied) =
                    PgStore::open_target(postgres.target()?, pg_options(settings)).await?;
                if !applied.is_empty() {
                    tracing::info!(
                        target = store.target(),
                        versions = ?applied,
                        "store: PostgreSQL migrations applied"
                    );
                }
                Ok(store.into())
            }
        }
    }

    /// Opens (creating and migrating as needed) the SQLite file of `settings` and starts
    /// its writer. A PostgreSQL configuration is refused: it is opened by [`Store::connect`].
    pub fn open(settings: &StoreSettings, metrics: Metrics) -> Result<Store, StoreError> {
        match &settings.backend {
            StoreBackend::Sqlite => Ok(SqliteStore::open(settings, metrics)?.into()),
            StoreBackend::Postgres(postgres) => Err(StoreError::Open {
                path: postgres.describe(),
                reason: "a PostgreSQL store is opened with Store::connect".to_string(),
            }),
        }
    }

    /// Opens the configured store for reading beside a running `serve`: on SQLite the file
    /// read-only (no migration, no writer, no lock; every write answers
    /// [`StoreError::ReadOnly`], a missing file is an error); on PostgreSQL a small pool,
    /// not migrated (the daemon's instances migrate), whose first query reaches the server.
    pub fn open_read_only(settings: &StoreSettings) -> Result<Store, StoreError> {
        match &settings.backend {
            StoreBackend::Sqlite => {
                Ok(SqliteStore::open_read_only(&settings.path, settings.busy_timeout)?.into())
            }
            StoreBackend::Postgres(postgres) => Ok(PgStore::from_target(
                postgres.target()?,
                PgOptions {
                    max_connections: 2,
                    ..pg_options(settings)
                },
            )?
            .into()),
        }
    }

    /// What the store is, for logs and messages: the SQLite file's path, or the PostgreSQL
    /// database's `postgresql://host:port/db` (never its credentials).
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Sqlite(store) => store.path().display().to_string(),
            Backend::Postgres(store) => store.target().to_string(),
        }
    }

    /// The PostgreSQL pool, `None` on SQLite (for what only PostgreSQL has: leases, the
    /// claim queue, wake-ups).
    pub fn postgres(&self) -> Option<&PgStore> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(store) => Some(store),
        }
    }

    /// Stops taking work: on SQLite commits what is queued and stops the writer; on
    /// PostgreSQL closes the pool (every write was committed when it was answered). Later
    /// operations answer `Closed`.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(store) => store.close().await,
            Backend::Postgres(store) => store.close(),
        }
    }

    /// Whether a commit can succeed now (for `/readyz`), proven by a tiny real write when
    /// the last outcome is not fresh (see [`SqliteStore::readiness`], [`PgStore::readiness`]).
    /// `Err` holds the reason.
    pub async fn readiness(&self) -> Result<(), String> {
        dispatch!(self, store => store.readiness().await)
    }

    /// Resolves when the SQLite writer thread has ended: at shutdown, or when it died (then
    /// the daemon must exit so that its supervisor restarts it). Never on PostgreSQL: no
    /// thread of the process commits for the others, and a lost server is a 503 and a
    /// failing `/readyz`, not a reason to exit.
    pub async fn writer_ended(&self) {
        match &self.backend {
            Backend::Sqlite(store) => store.writer_ended().await,
            Backend::Postgres(_) => std::future::pending().await,
        }
    }

    /// Commits one verified webhook: dedup, replay check, state rule, event log.
    pub async fn ingest_webhook(&self, record: WebhookRecord) -> Result<IngestOutcome, StoreError> {
        dispatch!(self, store => store.ingest_webhook(record).await)
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
        dispatch!(self, store => store.apply_polled(provider, observation, counts_as_missed, at).await)
    }

    /// Re-runs a quarantined event with the observation a fixed parser now produces
    /// (or the new error). Returns `None` when there is no such quarantined event.
    pub async fn reprocess_event(
        &self,
        event_id: String,
        parsed: Result<Observation, String>,
        at: DateTime<Utc>,
    ) -> Result<Option<IngestOutcome>, StoreError> {
        dispatch!(self, store => store.reprocess_event(event_id, parsed, at).await)
    }

    /// Records that a cash-out's status should be fetched from its provider, unless one
    /// is already queued, the provider's queue holds `max_pending` requests or the id
    /// breaks the id rule of [`crate::ids`] (answered `false`).
    pub async fn request_status_fetch(
        &self,
        provider: String,
        provider_ref: String,
        reason: FetchReason,
        max_pending: usize,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        // Never queue what could not be asked for, on either store.
        if crate::ids::valid_id(&provider_ref).is_none() {
            return Ok(false);
        }
        dispatch!(self, store => store.request_status_fetch(provider, provider_ref, reason, max_pending, at).await)
    }

    /// The end of the last search window completed for `provider`.
    pub async fn watermark(&self, provider: String) -> Result<Option<DateTime<Utc>>, StoreError> {
        dispatch!(self, store => store.watermark(provider).await)
    }

    /// Records a completed search window (never moves backwards).
    pub async fn set_watermark(
        &self,
        provider: String,
        watermark: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        dispatch!(self, store => store.set_watermark(provider, watermark).await)
    }

    /// Non-terminal cash-outs of `provider` unchanged since `cutoff`, least recently checked first.
    pub async fn due_status_checks(
        &self,
        provider: String,
        cutoff: DateTime<Utc>,
        recheck: Option<CompletedRecheck>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        dispatch!(self, store => store.due_status_checks(provider, cutoff, recheck, limit).await)
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
        dispatch!(self, store => store.record_fetched_status(provider, observation, counts_as_missed, at).await)
    }

    /// Marks a cash-out's status as checked without news (e.g. unknown to the provider).
    pub async fn mark_status_checked(
        &self,
        provider: String,
        provider_ref: String,
    ) -> Result<(), StoreError> {
        dispatch!(self, store => store.mark_status_checked(provider, provider_ref).await)
    }

    /// Queued status fetches of `provider` that are due.
    pub async fn due_fetches(
        &self,
        provider: String,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        dispatch!(self, store => store.due_fetches(provider, limit).await)
    }

    /// Drops a queued fetch (done, or nothing more to learn).
    pub async fn complete_fetch(
        &self,
        provider: String,
        provider_ref: String,
    ) -> Result<(), StoreError> {
        dispatch!(self, store => store.complete_fetch(provider, provider_ref).await)
    }

    /// Retries a failed queued fetch later; `false` when it was given up.
    pub async fn defer_fetch(
        &self,
        provider: String,
        provider_ref: String,
        max_attempts: i64,
    ) -> Result<bool, StoreError> {
        dispatch!(self, store => store.defer_fetch(provider, provider_ref, max_attempts).await)
    }

    /// How many status fetches are queued for `provider`.
    pub async fn queued_fetch_count(&self, provider: String) -> Result<i64, StoreError> {
        dispatch!(self, store => store.queued_fetch_count(provider).await)
    }

    /// Drops replay-cache entries older than `before`.
    pub async fn prune_replay_cache(&self, before: DateTime<Utc>) -> Result<usize, StoreError> {
        dispatch!(self, store => store.prune_replay_cache(before).await)
    }

    /// The `events.seq` through which raw bodies have been cleared by retention.
    pub async fn retention_cursor(&self) -> Result<i64, StoreError> {
        dispatch!(self, store => store.retention_cursor().await)
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
        dispatch!(self, store => store.expired_raw_bodies(after_seq, cutoff, limit, with_content).await)
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
        dispatch!(self, store => store.clear_raw_bodies(after_seq, through_seq, cutoff).await)
    }

    /// Gives up to `pages` free pages back to the file system; the free pages left, or
    /// `None` when the database is not in `auto_vacuum = INCREMENTAL` mode (one created
    /// before it was the default: a one-time `VACUUM` converts it).
    pub async fn incremental_vacuum(&self, pages: u32) -> Result<Option<i64>, StoreError> {
        dispatch!(self, store => store.incremental_vacuum(pages).await)
    }

    /// Free pages in the database file (`PRAGMA freelist_count`).
    pub async fn free_pages(&self) -> Result<i64, StoreError> {
        dispatch!(self, store => store.free_pages().await)
    }

    /// Registers an expected cash-out; the same entry again is `Unchanged`, another one
    /// under the same `(provider, external_id)` a `Conflict`.
    pub async fn register_expected(&self, entry: LedgerEntry) -> Result<LedgerOutcome, StoreError> {
        dispatch!(self, store => store.register_expected(entry).await)
    }

    /// [`Store::register_expected`] with the registration (book) time given.
    pub async fn register_expected_at(
        &self,
        entry: LedgerEntry,
        at: DateTime<Utc>,
    ) -> Result<LedgerOutcome, StoreError> {
        dispatch!(self, store => store.register_expected_at(entry, at).await)
    }

    /// Provider refs the ledger names that the book has never seen.
    pub async fn ledger_refs_unseen(
        &self,
        provider: String,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        dispatch!(self, store => store.ledger_refs_unseen(provider, cutoff, limit).await)
    }

    /// One page of cash-outs, newest first.
    pub async fn list_cashouts(
        &self,
        filter: CashoutFilter,
    ) -> Result<Page<CashoutRow>, StoreError> {
        dispatch!(self, store => store.list_cashouts(filter).await)
    }

    /// One cash-out and its event timeline.
    pub async fn get_cashout(
        &self,
        provider: String,
        provider_ref: String,
    ) -> Result<Option<(CashoutRow, Vec<EventRow>)>, StoreError> {
        dispatch!(self, store => store.get_cashout(provider, provider_ref).await)
    }

    /// A stored event with its raw body (for reprocessing).
    pub async fn get_event(&self, event_id: String) -> Result<Option<StoredEvent>, StoreError> {
        dispatch!(self, store => store.get_event(event_id).await)
    }

    /// Whether an event with this id is stored (for crash tests and audits).
    pub async fn event_exists(&self, event_id: String) -> Result<bool, StoreError> {
        dispatch!(self, store => store.event_exists(event_id).await)
    }

    /// Queued status fetches of a provider, oldest first.
    pub async fn pending_status_fetches(
        &self,
        provider: String,
        limit: usize,
    ) -> Result<Vec<(String, FetchReason)>, StoreError> {
        dispatch!(self, store => store.pending_status_fetches(provider, limit).await)
    }

    /// Mismatches, optionally only open ones or one kind.
    pub async fn list_mismatches(
        &self,
        kind: Option<String>,
        open_only: bool,
    ) -> Result<Vec<MismatchRow>, StoreError> {
        dispatch!(self, store => store.list_mismatches(kind, open_only).await)
    }

    /// Publishes this instance's alert signals of every provider for the other instances
    /// (PostgreSQL, one statement; see [`crate::alert::shared`]). On SQLite there are no
    /// other instances: nothing is written.
    pub async fn publish_signals(
        &self,
        signals: Vec<(String, crate::alert::signals::SignalSnapshot)>,
    ) -> Result<(), StoreError> {
        dispatch!(self, store => store.publish_signals(signals).await)
    }

    /// The alert signals every other instance published (PostgreSQL); none on SQLite,
    /// where this instance's in-memory signals are all there is.
    pub async fn peer_signals(&self) -> Result<Vec<crate::alert::shared::PeerSignals>, StoreError> {
        dispatch!(self, store => store.peer_signals().await)
    }

    /// Forgets the published signals of `rows` (`(instance, provider)`) still unpublished
    /// for longer than `silent_for` (PostgreSQL; nothing is published on SQLite): how many.
    pub async fn forget_peer_signals(
        &self,
        rows: &[(String, String)],
        silent_for: std::time::Duration,
    ) -> Result<u64, StoreError> {
        dispatch!(self, store => store.forget_peer_signals(rows, silent_for).await)
    }

    /// What an alert pass reads: open mismatches, quarantined events, stuck and in-flight
    /// cash-outs, open alerts (and, on the first pass, what the signals remember).
    pub async fn alert_facts(
        &self,
        query: AlertFactsQuery,
    ) -> Result<LoadedAlertFacts, StoreError> {
        dispatch!(self, store => store.alert_facts(query).await)
    }

    /// Applies an alert lifecycle plan made at `now` and queues its deliveries (when
    /// `enqueue`, due at once by the wall clock), in one transaction; returns the notices.
    pub async fn apply_alert_plan(
        &self,
        plan: crate::alert::AlertPlan,
        now: DateTime<Utc>,
        enqueue: bool,
    ) -> Result<AppliedAlerts, StoreError> {
        dispatch!(self, store => store.apply_alert_plan(plan, now, enqueue).await)
    }

    /// Claims due alert deliveries for `lease` (another worker skips them meanwhile).
    pub async fn claim_alert_deliveries(
        &self,
        now: DateTime<Utc>,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, StoreError> {
        dispatch!(self, store => store.claim_alert_deliveries(now, lease, limit).await)
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
        dispatch!(self, store => store.record_alert_delivery(outbox_id, at, http_status, error, duration_ms, next).await)
    }

    /// Alert deliveries pending and given up.
    pub async fn alert_outbox_counts(&self) -> Result<(i64, i64), StoreError> {
        dispatch!(self, store => store.alert_outbox_counts().await)
    }

    /// A page of alerts, newest first, and the cursor (an id) of the next page.
    pub async fn list_alerts(
        &self,
        filter: AlertFilter,
    ) -> Result<(Vec<AlertView>, Option<i64>), StoreError> {
        dispatch!(self, store => store.list_alerts(filter).await)
    }

    /// One alert with its deliveries and their attempts.
    pub async fn get_alert(
        &self,
        id: i64,
    ) -> Result<Option<(AlertView, Vec<DeliveryView>)>, StoreError> {
        dispatch!(self, store => store.get_alert(id).await)
    }

    /// Where the continuous reconciliation pass stopped, if it ever ran.
    pub async fn reconcile_cursor(&self) -> Result<Option<ReconcileCursor>, StoreError> {
        dispatch!(self, store => store.reconcile_cursor().await)
    }

    /// The groups touched since `since` or due by time, and the cursor covering them.
    pub async fn reconcile_changes(
        &self,
        since: ReconcileCursor,
        due: Vec<DueRule>,
        now: DateTime<Utc>,
    ) -> Result<Changes, StoreError> {
        dispatch!(self, store => store.reconcile_changes(since, due, now).await)
    }

    /// Loads groups by key, each with the open mismatches of the subjects it covers.
    pub async fn load_groups(
        &self,
        keys: Vec<GroupKey>,
    ) -> Result<Vec<(GroupKey, MatchGroup, Vec<OpenMismatch>)>, StoreError> {
        dispatch!(self, store => store.load_groups(keys).await)
    }

    /// Every open mismatch of an examined kind as `(kind, provider, subject)`.
    pub async fn open_findings(
        &self,
    ) -> Result<
        std::collections::BTreeSet<(crate::reconcile::MismatchKind, String, String)>,
        StoreError,
    > {
        dispatch!(self, store => store.open_findings().await)
    }

    /// Every open mismatch of an examined kind, by `(provider, subject)`.
    pub async fn open_mismatches(&self) -> Result<OpenByProvider, StoreError> {
        dispatch!(self, store => store.open_mismatches().await)
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
        dispatch!(self, store => store.scan_day(from, until, visit).await)
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
        dispatch!(self, store => store.apply_reconcile_plan(opens, resolves, cursor, at).await)
    }

    /// Streams the rows of the business day `[from, until)` as the book stood at `until`
    /// to `emit` (on a blocking thread), in report order; returns how many.
    pub async fn report_rows<E>(
        &self,
        from: DateTime<Utc>,
        until: DateTime<Utc>,
        emit: E,
    ) -> Result<u64, StoreError>
    where
        E: FnMut(ReportRow) -> Result<(), StoreError> + Send + 'static,
    {
        dispatch!(self, store => store.report_rows(from, until, emit).await)
    }

    /// Records a generated report in the index (a later generation replaces it).
    pub async fn record_report(&self, row: ReportIndexRow) -> Result<(), StoreError> {
        dispatch!(self, store => store.record_report(row).await)
    }

    /// When the book first learned anything (its oldest event or ledger entry), if ever.
    pub async fn first_entry_at(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        dispatch!(self, store => store.first_entry_at().await)
    }

    /// The generated reports, newest date first.
    pub async fn list_reports(&self) -> Result<Vec<ReportIndexRow>, StoreError> {
        dispatch!(self, store => store.list_reports().await)
    }

    /// One generated report's index row.
    pub async fn get_report(&self, date: String) -> Result<Option<ReportIndexRow>, StoreError> {
        dispatch!(self, store => store.get_report(date).await)
    }

    /// The ops console's overview figures of each `(provider, stuck cutoff)`.
    pub async fn console_overview(
        &self,
        providers: Vec<(String, DateTime<Utc>)>,
    ) -> Result<Vec<ProviderFigures>, StoreError> {
        dispatch!(self, store => store.console_overview(providers).await)
    }

    /// Cash-outs whose provider ref or external id is exactly `id`, newest first.
    pub async fn find_cashouts_by_id(
        &self,
        provider: Option<String>,
        id: String,
    ) -> Result<Vec<CashoutRow>, StoreError> {
        dispatch!(self, store => store.find_cashouts_by_id(provider, id).await)
    }

    /// Stuck cash-outs of `provider` (in flight, created at or before `cutoff`), oldest first.
    pub async fn stuck_cashouts(
        &self,
        provider: String,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<CashoutRow>, StoreError> {
        dispatch!(self, store => store.stuck_cashouts(provider, cutoff, limit).await)
    }

    /// The mismatches and alerts (open and resolved) about one cash-out.
    pub async fn cashout_findings(
        &self,
        provider: String,
        provider_ref: String,
        external_id: Option<String>,
    ) -> Result<(Vec<MismatchRecord>, Vec<CashoutAlert>), StoreError> {
        dispatch!(self, store => store.cashout_findings(provider, provider_ref, external_id).await)
    }

    /// Quarantined events, newest first, and the cursor (an event seq) of the next page.
    pub async fn quarantined_events(
        &self,
        before_seq: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<ConsoleEvent>, Option<i64>), StoreError> {
        dispatch!(self, store => store.quarantined_events(before_seq, limit).await)
    }

    /// One stored event as the console shows it, with its raw body when `with_body`.
    pub async fn console_event(
        &self,
        event_id: String,
        with_body: bool,
    ) -> Result<Option<ConsoleEvent>, StoreError> {
        dispatch!(self, store => store.console_event(event_id, with_body).await)
    }

    /// Open mismatches counted by kind and provider.
    pub async fn open_mismatch_counts(&self) -> Result<Vec<MismatchCount>, StoreError> {
        dispatch!(self, store => store.open_mismatch_counts().await)
    }

    /// The deliveries in short of each alert in `ids`.
    pub async fn alert_delivery_summaries(
        &self,
        ids: Vec<i64>,
    ) -> Result<Vec<(i64, DeliverySummary)>, StoreError> {
        dispatch!(self, store => store.alert_delivery_summaries(ids).await)
    }

    /// One page of mismatches, newest first, and where the next page starts.
    pub async fn mismatch_page(
        &self,
        filter: MismatchFilter,
    ) -> Result<(Vec<MismatchRecord>, Option<i64>), StoreError> {
        dispatch!(self, store => store.mismatch_page(filter).await)
    }
}

/// The pool's options of a PostgreSQL store: `store.busy_timeout` bounds both the wait for a
/// lock and the wait for a pooled connection (past it a request is answered 503).
fn pg_options(settings: &StoreSettings) -> PgOptions {
    let max_connections = match &settings.backend {
        StoreBackend::Postgres(postgres) => postgres.max_connections,
        StoreBackend::Sqlite => PgOptions::default().max_connections,
    };
    PgOptions {
        max_connections,
        wait_timeout: settings.busy_timeout,
        lock_timeout: settings.busy_timeout,
        ..PgOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PostgresSettings;
    use postgres::testing::TestDatabase;
    use secrecy::SecretString;
    use sqlite::tests::webhook;

    fn postgres_settings(url: &str) -> StoreSettings {
        StoreSettings {
            backend: StoreBackend::Postgres(PostgresSettings {
                url: SecretString::from(url.to_string()),
                url_env: "BOOK_URL".to_string(),
                max_connections: 4,
                ca_file: None,
            }),
            path: "unused.db".into(),
            busy_timeout: Duration::from_secs(30),
            max_batch: 64,
            read_connections: 2,
            replay_window: crate::config::MIN_REPLAY_WINDOW,
        }
    }

    #[tokio::test]
    async fn the_facade_on_postgres_migrates_commits_reads_and_closes() {
        let database = TestDatabase::create().await;
        let settings = postgres_settings(database.url());
        assert!(
            matches!(
                Store::open(&settings, Metrics::new()),
                Err(StoreError::Open { .. })
            ),
            "the synchronous SQLite open refuses a PostgreSQL configuration"
        );

        let store = Store::connect(&settings, Metrics::new())
            .await
            .expect("connect and migrate");
        assert!(store.postgres().is_some());
        assert!(
            store.describe().starts_with("postgresql://"),
            "{}",
            store.describe()
        );
        assert!(
            !store.describe().contains('@'),
            "no credentials: {}",
            store.describe()
        );
        assert_eq!(store.readiness().await, Ok(()));
        store
            .ingest_webhook(webhook("ev-pg-1"))
            .await
            .expect("ingest");
        assert!(store.event_exists("ev-pg-1".into()).await.expect("read"));

        // The read-only open of the CLI views reads the same book without migrating.
        let reader = Store::open_read_only(&settings).expect("read-only pool");
        assert!(reader.event_exists("ev-pg-1".into()).await.expect("read"));
        reader.close().await;

        // The writer never "ends" on PostgreSQL: there is no thread to die.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), store.writer_ended())
                .await
                .is_err()
        );
        store.close().await;
        assert!(matches!(
            store.event_exists("ev-pg-1".into()).await,
            Err(StoreError::Closed)
        ));
    }
}
