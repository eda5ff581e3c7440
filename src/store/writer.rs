//! The single writer: one thread owns the write connection and commits queued writes in
//! groups (one fsync for many), answering each caller only after its own commit.
//!
//! A second thread checkpoints the WAL in the background (copying committed pages into
//! the database file and syncing it), so that work stays off the commit path; see
//! [`Checkpointer`]. A store that cannot write logs its failed commits and checkpoints
//! rate-limited (see [`FAILURE_LOG_EVERY`]).

use std::cell::{RefCell, RefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::replay_index::ReplayIndex;
use super::reply_inbox::{self, ReplyBatch, ReplyInbox};
use super::statement_shelf::{ShelvedStatement, StatementShelf};
use super::StoreError;
use crate::metrics::Metrics;
use crate::telemetry::{LogVerdict, RateLimitedLog};

/// What a write job acts through: the group's transaction (it derefs to the connection),
/// the writer's kept statements and the replay index, whose claims follow that
/// transaction.
pub struct WriteTx<'a, 'c> {
    connection: &'a Connection,
    statements: &'a StatementShelf<'c>,
    replay: &'a RefCell<ReplayIndex>,
}

impl<'a, 'c> WriteTx<'a, 'c> {
    /// Store functions' view of a connection written outside the writer thread (a ledger
    /// import's own transactions), with statements kept for as long as `statements` lives
    /// and a replay index of its own (nothing written that way claims a nonce).
    pub fn outside_writer(
        connection: &'a Connection,
        statements: &'a StatementShelf<'c>,
        replay: &'a RefCell<ReplayIndex>,
    ) -> WriteTx<'a, 'c> {
        WriteTx {
            connection,
            statements,
            replay,
        }
    }

    /// The writer's prepared statement for `sql`, a constant of the hot path (see
    /// [`StatementShelf`]); other statements go through rusqlite's cache.
    pub fn statement(&self, sql: &'static str) -> rusqlite::Result<ShelvedStatement<'_, 'c>> {
        self.statements.take(sql)
    }

    /// The replay index (see [`ReplayIndex`]): claims made here are undone with the job's
    /// or the group's rollback.
    pub fn replay(&self) -> RefMut<'_, ReplayIndex> {
        self.replay.borrow_mut()
    }
}

impl std::ops::Deref for WriteTx<'_, '_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.connection
    }
}

/// A unit of work queued for the writer.
trait Job: Send {
    /// Runs inside the group's transaction and keeps its result; says how it went. Runs
    /// again, from scratch, when the group is rolled back and retried. A panic is caught
    /// here and fails this job alone.
    fn run(&mut self, tx: &WriteTx<'_, '_>) -> JobRun;
    /// Answers the caller: the error when one is given (the group could not be
    /// committed), else the kept result.
    fn finish(self: Box<Self>, err: Option<StoreError>);
}

/// A queued job and where its caller waits for the answer (see [`super::reply_inbox`]).
struct Work {
    job: Box<dyn Job>,
    inbox: Option<ReplyInbox>,
}

impl Work {
    fn run(&mut self, tx: &WriteTx<'_, '_>) -> JobRun {
        self.job.run(tx)
    }
}

/// How one run of a job went.
#[derive(Clone, Debug, PartialEq, Eq)]
enum JobRun {
    Succeeded,
    /// Failed; its writes are undone.
    Failed,
    /// Failed because the database cannot take writes now (read-only, disk full, locked):
    /// counts against readiness like a failed commit.
    Unavailable(String),
}

struct TypedJob<T, F> {
    job: F,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for TypedJob<T, F>
where
    T: Send + 'static,
    F: FnMut(&WriteTx<'_, '_>) -> Result<T, StoreError> + Send + 'static,
{
    fn run(&mut self, tx: &WriteTx<'_, '_>) -> JobRun {
        let job = &mut self.job;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(tx)))
            .unwrap_or_else(|_| {
                tracing::error!("store: a write job panicked; it fails alone");
                Err(StoreError::Database("the write job panicked".to_string()))
            });
        let run = match &result {
            Ok(_) => JobRun::Succeeded,
            Err(StoreError::Unavailable(reason)) => JobRun::Unavailable(reason.clone()),
            Err(_) => JobRun::Failed,
        };
        self.result = Some(result);
        run
    }

    fn finish(self: Box<Self>, err: Option<StoreError>) {
        let answer = match (err, self.result) {
            (Some(err), _) => Err(err),
            (None, Some(result)) => result,
            (None, None) => Err(StoreError::Database("write job never ran".to_string())),
        };
        let _ = self.reply.send(answer);
    }
}

enum Message {
    Work(Work),
    Stop,
}

/// The handle callers use to queue writes.
#[derive(Clone)]
pub struct WriterHandle {
    sender: mpsc::Sender<Message>,
    shared: Arc<Shared>,
}

/// Whether the writer can commit now, as far as its last attempt shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriterHealth {
    /// Its last group that changed rows committed (and no job found the database
    /// unwritable).
    Writing,
    /// Nothing attempted yet.
    Unknown,
    /// Its last group could not commit, or a job found the database unwritable.
    Failing(String),
    /// The thread has ended (shutdown, or a panic outside any job).
    Stopped,
}

/// The writer thread (and its checkpointer), joined on shutdown.
pub struct WriterThread {
    handle: Option<JoinHandle<()>>,
    sender: mpsc::Sender<Message>,
    checkpointer: Option<Checkpointer>,
}

/// What the writer, its handles and the checkpointer share.
#[derive(Default)]
struct Shared {
    /// When the writer last finished a group, and whether it could write.
    last_outcome: Mutex<Option<(Instant, Result<(), String>)>>,
    /// Set when the writer thread ends, however it ends.
    ended: AtomicBool,
    /// Woken when the writer thread ends.
    ended_notify: tokio::sync::Notify,
    /// Group commits so far (the checkpointer skips its turn when nothing was committed).
    commits: AtomicU64,
    /// Set by the checkpointer when the WAL is long: one of [`CatchUp`] as a `u8`.
    catch_up: AtomicU8,
    /// Failed commits and checkpoints, logged rate-limited (see [`FAILURE_LOG_EVERY`]).
    failure_log: FailureLog,
}

/// A store that cannot write (a full disk, a read-only file) fails every commit and every
/// checkpoint: the first failure of each kind is logged, then at most one line per this
/// interval, carrying the count held back meanwhile. Metrics and readiness see every one.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// The writer's and the checkpointer's rate limit for failure lines.
struct FailureLog(RateLimitedLog);

impl Default for FailureLog {
    fn default() -> Self {
        FailureLog(RateLimitedLog::new(FAILURE_LOG_EVERY))
    }
}

impl FailureLog {
    /// Whether a failure of `kind` may be logged now (and how many were held back).
    fn admit(&self, kind: &'static str) -> Option<u64> {
        match self.0.admit("store", kind, Instant::now()) {
            LogVerdict::Log { suppressed } => Some(suppressed),
            LogVerdict::Suppress => None,
        }
    }
}

/// Whether the writer should finish a checkpoint between two groups. Such a checkpoint
/// completes (no write can interleave), so the next transaction restarts the WAL from its
/// beginning; it pauses the writer for what the background pass left plus two syncs
/// (`cashout_recon_store_checkpoint_pause_seconds`: 2–10 ms under wrk at 21–23k webhooks/s),
/// so it is done when the writer is lightly loaded, unless the WAL has grown past
/// [`FORCE_RESTART_WAL_PAGES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum CatchUp {
    /// Nothing to do.
    No = 0,
    /// When the writer is lightly loaded (see [`IDLE_BEFORE_GROUP`]).
    WhenIdle = 1,
    /// After the current group, even with callers waiting.
    Now = 2,
}

impl CatchUp {
    fn from_u8(value: u8) -> CatchUp {
        match value {
            1 => CatchUp::WhenIdle,
            2 => CatchUp::Now,
            _ => CatchUp::No,
        }
    }
}

/// Starts the writer thread on `connection`, and the background checkpointer.
pub fn start(
    connection: Connection,
    replay: ReplayIndex,
    max_batch: usize,
    metrics: Metrics,
) -> (WriterHandle, WriterThread) {
    // A group rerun after a failure puts each job under a savepoint; keep their journals in
    // memory rather than in a temporary file (a spilled statement journal cost a quarter
    // of the writer's time when every job had one).
    if let Err(err) = connection.pragma_update(None, "temp_store", "MEMORY") {
        tracing::warn!(error = %err, "store: cannot keep savepoint journals in memory");
    }
    let shared = Arc::new(Shared::default());
    let checkpointer = Checkpointer::start(&connection, shared.clone());
    if checkpointer.is_some() {
        // Only a safety valve now: the checkpointer keeps the WAL far below this.
        if let Err(err) =
            connection.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)
        {
            tracing::warn!(error = %err, "store: cannot raise the writer's checkpoint threshold");
        }
    }
    let (sender, receiver) = mpsc::channel(16_384);
    let thread_shared = shared.clone();
    let handle = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || {
            let _ended = EndedGuard(&thread_shared);
            run(
                connection,
                replay,
                receiver,
                max_batch,
                metrics,
                &thread_shared,
            )
        })
        .ok();
    if handle.is_none() {
        shared.ended.store(true, Ordering::SeqCst);
    }
    (
        WriterHandle {
            sender: sender.clone(),
            shared,
        },
        WriterThread {
            handle,
            sender,
            checkpointer,
        },
    )
}

/// WAL pages (4 KiB each by default: ~16 MiB) after which the writer finishes a
/// checkpoint when it is lightly loaded.
const RESTART_WAL_PAGES: i64 = 4_096;

/// WAL pages after which the writer finishes a checkpoint even under sustained load
/// (bounding the WAL at ~256 MiB). Under a saturating load this happens about once a
/// second; at 16 384 pages (4 times a second) the pauses alone put p99 above 20 ms.
const FORCE_RESTART_WAL_PAGES: i64 = 65_536;

/// WAL pages after which the writer checkpoints by itself inside a commit, should the
/// checkpointer fall behind (SQLite's default of 1000 put a checkpoint in every ~40th
/// group commit, the main source of tail latency).
const WRITER_CHECKPOINT_PAGES: i64 = 2 * FORCE_RESTART_WAL_PAGES;

/// A writer that waited this long for its last group is lightly loaded: a catch-up
/// checkpoint then delays nobody much.
const IDLE_BEFORE_GROUP: Duration = Duration::from_millis(5);

/// Before asking the writer to finish a checkpoint, the checkpointer runs up to this many
/// passes back to back, stopping at the first that copied at most [`SHORT_PASS_FRAMES`]
/// (what a pass copies is what was committed during the one before: each is shorter).
const MAX_CONVERGING_PASSES: usize = 4;

/// A pass that copied this few frames (~1 MiB, a few milliseconds) leaves the writer a
/// short pause: about what is committed while such a pass runs.
const SHORT_PASS_FRAMES: i64 = 256;

/// How often the checkpointer copies committed WAL pages into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// A thread with its own connection that runs passive checkpoints: copying WAL pages into
/// the database file and syncing it no longer happens inside a group commit. Passive
/// checkpoints never wait for the writer, and under steady writes never quite finish, so
/// when the WAL has grown past [`RESTART_WAL_PAGES`] the writer is asked to finish one
/// (see [`CatchUp`]).
struct Checkpointer {
    handle: JoinHandle<()>,
    stop: std::sync::mpsc::Sender<()>,
}

impl Checkpointer {
    /// Starts on the writer's database; `None` (the writer checkpoints by itself) for an
    /// in-memory database or when a second connection cannot be opened.
    fn start(writer: &Connection, shared: Arc<Shared>) -> Option<Checkpointer> {
        let path = writer.path().filter(|path| !path.is_empty())?.to_string();
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = Connection::open_with_flags(&path, flags)
            .and_then(|connection| connection.pragma_update(None, "synchronous", "FULL").map(|()| connection))
            .map_err(|err| tracing::warn!(error = %err, "store: no background checkpointer; the writer checkpoints"))
            .ok()?;
        let (stop, stopped) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpoint_until_stopped(&connection, &stopped, &shared))
            .map_err(|err| tracing::warn!(error = %err, "store: no background checkpointer; the writer checkpoints"))
            .ok()?;
        Some(Checkpointer { handle, stop })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.handle.join();
    }
}

fn checkpoint_until_stopped(
    connection: &Connection,
    stopped: &std::sync::mpsc::Receiver<()>,
    shared: &Shared,
) {
    let mut seen_commits = 0;
    // WAL frames copied into the database file and synced there (see
    // [`database_needs_sync`]).
    let mut synced_frames = 0;
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        stopped.recv_timeout(CHECKPOINT_EVERY)
    {
        let commits = shared.commits.load(Ordering::Relaxed);
        if commits == seen_commits {
            continue;
        }
        seen_commits = commits;
        let mut pass = || -> rusqlite::Result<WalState> {
            let wal = passive_checkpoint(connection)?;
            if database_needs_sync(wal, synced_frames) {
                sync_database_file(connection)?;
            }
            synced_frames = wal.checkpointed;
            Ok(wal)
        };
        let wal = match pass() {
            Ok(wal) => wal,
            Err(err) => {
                log_checkpoint_failure(shared, &err);
                continue;
            }
        };
        let wanted = if wal.frames >= FORCE_RESTART_WAL_PAGES {
            // Passes right away, each copying what was committed during the one before,
            // until one is short: the writer's pause then copies only what is committed
            // during that last pass.
            let mut copied_through = wal.checkpointed;
            for _ in 0..MAX_CONVERGING_PASSES {
                match pass() {
                    Ok(next) => {
                        let copied = next.checkpointed - copied_through;
                        copied_through = next.checkpointed;
                        if copied <= SHORT_PASS_FRAMES {
                            break;
                        }
                    }
                    Err(err) => {
                        log_checkpoint_failure(shared, &err);
                        break;
                    }
                }
            }
            CatchUp::Now
        } else if wal.frames >= RESTART_WAL_PAGES {
            CatchUp::WhenIdle
        } else {
            CatchUp::No
        };
        shared.catch_up.store(wanted as u8, Ordering::Relaxed);
    }
}

fn log_checkpoint_failure(shared: &Shared, err: &rusqlite::Error) {
    if let Some(suppressed) = shared.failure_log.admit("checkpoint_failed") {
        tracing::warn!(error = %err, suppressed, "store: background checkpoint failed");
    }
}

/// What `PRAGMA wal_checkpoint` reports, in WAL frames (pages).
#[derive(Clone, Copy, Debug)]
struct WalState {
    /// Frames in the WAL.
    frames: i64,
    /// Frames of it copied into the database file.
    checkpointed: i64,
}

/// Whether the database file must be synced after a pass that left `wal`, when the frames
/// up to `synced_frames` are already synced there: whenever the pass copied anything.
///
/// SQLite syncs the database file itself only when a pass ends at the WAL's end *as it
/// stands when the pass finishes*. Under steady writes the WAL has always grown by then,
/// yet the pass still reports every frame of the WAL it started on as copied
/// (`checkpointed == frames`), so "not at the end" cannot be read from the result. An
/// earlier rule synced only when `checkpointed < frames` and so almost never did: the
/// copied pages piled up in the page cache, and the writer's catch-up `fsync` flushed
/// ~0.75 s of them while every caller waited (55–110 ms pauses under wrk; 4–13 ms since).
/// A redundant sync after a pass SQLite already synced finds nothing to write.
fn database_needs_sync(wal: WalState, synced_frames: i64) -> bool {
    wal.checkpointed != synced_frames
}

/// Runs `PRAGMA wal_checkpoint(PASSIVE)`.
fn passive_checkpoint(connection: &Connection) -> rusqlite::Result<WalState> {
    connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok(WalState {
            frames: row.get(1)?,
            checkpointed: row.get(2)?,
        })
    })
}

/// Syncs the database file of `connection` to disk, off the commit path.
///
/// A passive checkpoint that does not reach the WAL's end (under steady writes, almost
/// every one) writes pages into the database file but leaves the sync to the checkpoint
/// that completes — the writer's catch-up, which would then flush up to a second of
/// copied pages while every caller waits. This thread syncs after each pass that copied
/// anything instead (see [`database_needs_sync`]), keeping the file's dirty pages to
/// ~50 ms worth.
fn sync_database_file(connection: &Connection) -> rusqlite::Result<()> {
    let mut file: *mut rusqlite::ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: the handle is this open connection's, used only by this thread;
    // SQLITE_FCNTL_FILE_POINTER stores the main database's `sqlite3_file` (owned by the
    // connection, open while it is) into `file`.
    let code = unsafe {
        rusqlite::ffi::sqlite3_file_control(
            connection.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_FILE_POINTER,
            (&mut file as *mut *mut rusqlite::ffi::sqlite3_file).cast(),
        )
    };
    if code != rusqlite::ffi::SQLITE_OK || file.is_null() {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            Some("no database file to sync".to_string()),
        ));
    }
    // SAFETY: `file` is the connection's open database file; its methods are the VFS's,
    // and `xSync` may be called at any time on an open file (SQLite's own checkpoint does
    // the same on this file).
    let code = unsafe {
        match (*file).pMethods.as_ref().and_then(|methods| methods.xSync) {
            Some(sync) => sync(file, rusqlite::ffi::SQLITE_SYNC_NORMAL),
            None => rusqlite::ffi::SQLITE_MISUSE,
        }
    };
    if code == rusqlite::ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            Some("cannot sync the database file".to_string()),
        ))
    }
}

/// Marks the writer ended when its thread leaves `run`, by return or by panic.
struct EndedGuard<'a>(&'a Shared);

impl Drop for EndedGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("store: the writer thread died; no write can be committed");
        }
        self.0.ended.store(true, Ordering::SeqCst);
        self.0.ended_notify.notify_one();
    }
}

impl WriterHandle {
    /// What the writer's last attempt says about committing now, and when it was.
    pub fn health(&self) -> (WriterHealth, Option<Instant>) {
        if self.shared.ended.load(Ordering::SeqCst) {
            return (WriterHealth::Stopped, None);
        }
        let last = self
            .shared
            .last_outcome
            .lock()
            .ok()
            .and_then(|last| last.clone());
        match last {
            None => (WriterHealth::Unknown, None),
            Some((at, Ok(()))) => (WriterHealth::Writing, Some(at)),
            Some((at, Err(reason))) => (WriterHealth::Failing(reason), Some(at)),
        }
    }

    /// Records an outcome seen by a caller (a readiness write that failed in its job).
    pub fn record_failure(&self, reason: String) {
        if let Ok(mut last) = self.shared.last_outcome.lock() {
            *last = Some((Instant::now(), Err(reason)));
        }
    }

    /// Resolves when the writer thread has ended (at shutdown, or when it died).
    pub async fn ended(&self) {
        loop {
            let notified = self.shared.ended_notify.notified();
            if self.shared.ended.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    /// Runs `job` in the next group transaction and answers after the commit.
    /// An error from `job` undoes only its own writes. `job` may run more than once
    /// (when another job of its group fails, the group is rolled back and run again),
    /// so it must act only through `tx`.
    pub async fn write<T, F>(&self, job: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&WriteTx<'_, '_>) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let work = Work {
            job: Box::new(TypedJob {
                job,
                result: None,
                reply,
            }),
            inbox: reply_inbox::this_thread(),
        };
        self.sender
            .send(Message::Work(work))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

impl WriterThread {
    /// Commits what is queued, then stops the thread and waits for it.
    pub async fn stop(mut self) {
        let _ = self.sender.send(Message::Stop).await;
        let writer = self.handle.take();
        let checkpointer = self.checkpointer.take();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(writer) = writer {
                let _ = writer.join();
            }
            if let Some(checkpointer) = checkpointer {
                checkpointer.stop();
            }
        })
        .await;
    }
}

fn run(
    connection: Connection,
    replay: ReplayIndex,
    mut receiver: mpsc::Receiver<Message>,
    max_batch: usize,
    metrics: Metrics,
    shared: &Shared,
) {
    let replay = RefCell::new(replay);
    let statements = StatementShelf::new(&connection);
    let mut stopping = false;
    while !stopping {
        let waiting_since = Instant::now();
        let Some(first) = receiver.blocking_recv() else {
            break;
        };
        let waited = waiting_since.elapsed();
        let mut batch = Vec::with_capacity(64);
        match first {
            Message::Work(work) => batch.push(work),
            Message::Stop => stopping = true,
        }
        // Everything that queued while the previous group was committing joins this one.
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(Message::Work(work)) => batch.push(work),
                Ok(Message::Stop) => stopping = true,
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            commit_group(&statements, &replay, batch, &metrics, shared);
            shared.commits.fetch_add(1, Ordering::Relaxed);
        }
        let catch_up = match CatchUp::from_u8(shared.catch_up.load(Ordering::Relaxed)) {
            CatchUp::Now => true,
            // An empty queue alone is no sign of idleness: under a saturating load every
            // caller may be in the group just committed, about to send again.
            CatchUp::WhenIdle => waited >= IDLE_BEFORE_GROUP && receiver.is_empty(),
            CatchUp::No => false,
        };
        if catch_up && !stopping {
            shared.catch_up.store(CatchUp::No as u8, Ordering::Relaxed);
            let started = Instant::now();
            let finished = passive_checkpoint(&connection);
            let paused = started.elapsed();
            metrics
                .store_checkpoint_pause_seconds
                .observe(paused.as_secs_f64());
            tracing::debug!(
                paused_ms = paused.as_secs_f64() * 1000.0,
                wal_frames = finished.as_ref().map_or(0, |wal| wal.frames),
                "store: the writer finished a checkpoint"
            );
            if let Err(err) = finished {
                if let Some(suppressed) = shared.failure_log.admit("catch_up_failed") {
                    tracing::warn!(error = %err, suppressed, "store: catch-up checkpoint failed");
                }
            }
        }
    }
    // Drain anything sent after Stop so no caller waits forever.
    receiver.close();
    let mut rest = Vec::new();
    while let Ok(message) = receiver.try_recv() {
        if let Message::Work(work) = message {
            rest.push(work);
        }
    }
    if !rest.is_empty() {
        commit_group(&statements, &replay, rest, &metrics, shared);
    }
}

/// Runs a parameterless statement through the statement cache.
fn run_cached(connection: &Connection, sql: &str) -> rusqlite::Result<()> {
    connection.prepare_cached(sql)?.execute([])?;
    Ok(())
}

fn commit_group(
    statements: &StatementShelf<'_>,
    replay: &RefCell<ReplayIndex>,
    mut batch: Vec<Work>,
    metrics: &Metrics,
    shared: &Shared,
) {
    let connection = statements.connection();
    let started = Instant::now();
    let size = batch.len();
    let mut unwritable = None;
    let mut changes_before = connection.total_changes();
    let committed = match run_shared(statements, replay, &mut batch, &mut unwritable) {
        Ok(true) => Ok(()),
        Ok(false) => {
            replay.borrow_mut().roll_back();
            changes_before = connection.total_changes();
            run_isolated(statements, replay, &mut batch, &mut unwritable)
        }
        Err(err) => Err(err),
    };
    // The replay index keeps exactly the claims of a committed transaction.
    {
        let mut replay = replay.borrow_mut();
        match committed {
            Ok(()) => replay.commit(),
            Err(_) => replay.roll_back(),
        }
        metrics
            .replay_cache_entries
            .set(i64::try_from(replay.len()).unwrap_or(i64::MAX));
    }
    // Only a commit that changed rows proves the database writable: a group whose jobs
    // changed nothing commits even on a read-only file or a full disk.
    let wrote = connection.total_changes() > changes_before;
    let outcome = match (&committed, unwritable) {
        (Err(err), _) => Some(Err(err.to_string())),
        (Ok(()), Some(reason)) => Some(Err(reason)),
        (Ok(()), None) if wrote => Some(Ok(())),
        (Ok(()), None) => None,
    };
    if let Some(outcome) = outcome {
        if let Ok(mut last) = shared.last_outcome.lock() {
            *last = Some((Instant::now(), outcome));
        }
    }
    metrics
        .store_commit_seconds
        .observe(started.elapsed().as_secs_f64());
    metrics.store_group_size.observe(size as f64);
    let err = committed.err().map(|err| {
        if let Some(suppressed) = shared.failure_log.admit("commit_failed") {
            tracing::error!(error = %err, group = size, suppressed, "store: commit failed; nothing in the group is acknowledged");
        }
        StoreError::from_sqlite(&err)
    });
    let mut replies = ReplyBatch::default();
    for Work { job, inbox } in batch {
        let err = err.clone();
        replies.push(inbox.as_ref(), Box::new(move || job.finish(err)));
    }
    replies.deliver();
}

/// The fast path: every job of the group in one plain transaction, committed. `Ok(false)`
/// when a job failed: the transaction is rolled back and the group must run again under
/// [`run_isolated`].
fn run_shared(
    statements: &StatementShelf<'_>,
    replay: &RefCell<ReplayIndex>,
    batch: &mut [Work],
    unwritable: &mut Option<String>,
) -> rusqlite::Result<bool> {
    // Unchecked: the kept statements borrow the connection too. This thread is the only
    // user of the connection and opens one transaction at a time.
    let transaction =
        Transaction::new_unchecked(statements.connection(), TransactionBehavior::Immediate)?;
    let tx = WriteTx {
        connection: &transaction,
        statements,
        replay,
    };
    for work in batch.iter_mut() {
        match work.run(&tx) {
            JobRun::Succeeded => {}
            JobRun::Failed => return Ok(false),
            JobRun::Unavailable(reason) => {
                *unwritable = Some(reason);
                // Dropping the transaction rolls it back.
                return Ok(false);
            }
        }
    }
    transaction.commit()?;
    Ok(true)
}

/// Each job under its own savepoint, so a failing one undoes only itself. (A savepoint
/// copies every page a job touches into its journal first: about a sixth of the writer's
/// time, paid only after a failure.)
fn run_isolated(
    statements: &StatementShelf<'_>,
    replay: &RefCell<ReplayIndex>,
    batch: &mut [Work],
    unwritable: &mut Option<String>,
) -> rusqlite::Result<()> {
    // Unchecked: the kept statements borrow the connection too. This thread is the only
    // user of the connection and opens one transaction at a time.
    let transaction =
        Transaction::new_unchecked(statements.connection(), TransactionBehavior::Immediate)?;
    let tx = WriteTx {
        connection: &transaction,
        statements,
        replay,
    };
    for work in batch.iter_mut() {
        // Cached statements: rusqlite's `savepoint()` parses its SQL anew for every job.
        run_cached(&transaction, "SAVEPOINT job")?;
        let mark = replay.borrow().mark();
        let run = work.run(&tx);
        if run == JobRun::Succeeded {
            run_cached(&transaction, "RELEASE job")?;
        } else {
            replay.borrow_mut().undo_to(mark);
            if let JobRun::Unavailable(reason) = run {
                *unwritable = Some(reason);
            }
            run_cached(&transaction, "ROLLBACK TO job")?;
            run_cached(&transaction, "RELEASE job")?;
        }
    }
    transaction.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_that_copied_frames_is_synced_even_when_it_reports_the_whole_wal_copied() {
        let synced = 1_000;
        // Copied everything of the WAL it saw, while the writer appended more: SQLite did
        // not sync (the WAL's end had moved), so this thread must.
        let caught_up = WalState {
            frames: 4_000,
            checkpointed: 4_000,
        };
        assert!(database_needs_sync(caught_up, synced));
        let partial = WalState {
            frames: 4_000,
            checkpointed: 3_000,
        };
        assert!(database_needs_sync(partial, synced));
        // Nothing copied since the last sync (a reader held the WAL back).
        let idle = WalState {
            frames: 4_000,
            checkpointed: synced,
        };
        assert!(!database_needs_sync(idle, synced));
    }

    /// The largest size the WAL file reached while `rounds` groups of `bytes` each were
    /// committed with the writer waiting `pause` between them.
    async fn wal_high_water(rounds: usize, bytes: usize, pause: Duration) -> (u64, u64) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("wal.db");
        let connection = super::super::open_writer(&path, Duration::from_secs(5)).expect("open");
        connection
            .execute_batch("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
            .expect("create");
        let (writer, thread) = start(connection, ReplayIndex::default(), 512, Metrics::new());
        let wal = dir.path().join("wal.db-wal");
        let mut high_water = 0;
        for _ in 0..rounds {
            writer
                .write(move |c| {
                    c.execute(
                        "INSERT INTO blobs (data) VALUES (zeroblob(?1))",
                        [bytes as i64],
                    )?;
                    Ok(())
                })
                .await
                .expect("write");
            high_water = high_water.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
            tokio::time::sleep(pause).await;
        }
        thread.stop().await;
        (high_water, (rounds * bytes) as u64)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_job_undoes_only_itself_and_its_replay_claims_and_the_rest_commit_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("groups.db");
        let connection = super::super::open_writer(&path, Duration::from_secs(5)).expect("open");
        connection
            .execute_batch("CREATE TABLE marks (job INTEGER NOT NULL)")
            .expect("create");
        let metrics = Metrics::new();
        let (writer, thread) = start(connection, ReplayIndex::default(), 512, metrics.clone());
        // Queued together, so they share groups; every 10th writes, then fails.
        let jobs = (0..60_i64).map(|job| {
            let writer = writer.clone();
            async move {
                writer
                    .write(move |c| {
                        c.execute("INSERT INTO marks (job) VALUES (?1)", [job])?;
                        c.replay()
                            .claim("p", &format!("n{job}"), &format!("ev-{job}"), job);
                        if job % 10 == 3 {
                            return Err(StoreError::Database(format!("job {job} fails")));
                        }
                        Ok(job)
                    })
                    .await
            }
        });
        let answers = futures_util::future::join_all(jobs).await;
        for (job, answer) in answers.iter().enumerate() {
            match answer {
                Ok(value) => assert_eq!(*value, job as i64),
                Err(err) => {
                    assert_eq!(job % 10, 3, "job {job}: {err}");
                    assert!(err.to_string().contains(&format!("job {job} fails")));
                }
            }
        }
        let counted: Vec<(i64, i64)> = writer
            .write(|c| {
                let mut statement =
                    c.prepare("SELECT job, COUNT(*) FROM marks GROUP BY job ORDER BY job")?;
                let rows = statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
            .expect("count");
        let expected: Vec<(i64, i64)> = (0..60).filter(|j| j % 10 != 3).map(|j| (j, 1)).collect();
        assert_eq!(counted, expected);
        // The nonces of the committed jobs are held; a failed job's claim was undone.
        let holders: Vec<Option<String>> = writer
            .write(|c| {
                let mut replay = c.replay();
                let holders = (0..60).map(|job| replay.claim("p", &format!("n{job}"), "x", 99));
                Ok(holders.collect())
            })
            .await
            .expect("claims");
        for (job, holder) in holders.iter().enumerate() {
            let expected = (job % 10 != 3).then(|| format!("ev-{job}"));
            assert_eq!(holder, &expected, "job {job}");
        }
        // Jobs did share groups (the failures had company to spare).
        let groups = metrics.store_group_size.get_sample_count();
        assert!(groups < 61, "{groups} groups for 61 jobs");
        thread.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_fails_alone_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("panics.db");
        let connection = super::super::open_writer(&path, Duration::from_secs(5)).expect("open");
        connection
            .execute_batch("CREATE TABLE marks (job INTEGER NOT NULL)")
            .expect("create");
        let (writer, thread) = start(connection, ReplayIndex::default(), 512, Metrics::new());
        // Queued together so the panicking one shares a group with the others.
        let jobs = (0..20_i64).map(|job| {
            let writer = writer.clone();
            async move {
                writer
                    .write(move |c| {
                        c.execute("INSERT INTO marks (job) VALUES (?1)", [job])?;
                        if job == 7 {
                            panic!("job 7 panics");
                        }
                        Ok(job)
                    })
                    .await
            }
        });
        let answers = futures_util::future::join_all(jobs).await;

        for (job, answer) in answers.iter().enumerate() {
            if job == 7 {
                assert!(
                    matches!(answer, Err(StoreError::Database(reason)) if reason.contains("panicked")),
                    "{answer:?}"
                );
            } else {
                assert_eq!(answer.as_ref().ok(), Some(&(job as i64)), "job {job}");
            }
        }
        let stored: i64 = writer
            .write(|c| {
                Ok(
                    c.query_row("SELECT COUNT(*) FROM marks WHERE job <> 7", [], |r| {
                        r.get(0)
                    })?,
                )
            })
            .await
            .expect("the writer still commits");
        assert_eq!(stored, 19);
        assert_eq!(writer.health().0, WriterHealth::Writing);
        thread.stop().await;
    }

    /// A panic payload whose drop panics again: it escapes `catch_unwind`, so the writer
    /// thread really dies (the "dies anyway" case).
    struct PanicOnDrop;

    impl Drop for PanicOnDrop {
        fn drop(&mut self) {
            panic!("the payload panics when dropped");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_thread_that_dies_is_reported_stopped_and_ended() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("dies.db");
        let connection = super::super::open_writer(&path, Duration::from_secs(5)).expect("open");
        let (writer, _thread) = start(connection, ReplayIndex::default(), 512, Metrics::new());

        let answer = writer
            .write(|_| -> Result<(), StoreError> { std::panic::panic_any(PanicOnDrop) })
            .await;

        assert!(answer.is_err(), "{answer:?}");
        tokio::time::timeout(Duration::from_secs(10), writer.ended())
            .await
            .expect("ended() resolves once the thread is gone");
        assert_eq!(writer.health().0, WriterHealth::Stopped);
        let later = writer.write(|_| Ok(())).await;
        assert!(matches!(later, Err(StoreError::Closed)), "{later:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_logs_the_first_failed_commit_then_one_line_per_interval() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("full-disk.db");
        let connection = super::super::open_writer(&path, Duration::from_secs(5)).expect("open");
        connection
            .execute_batch("CREATE TABLE marks (job INTEGER NOT NULL)")
            .expect("create");
        let (writer, thread) = start(connection, ReplayIndex::default(), 512, Metrics::new());
        super::super::wal_batch::fault::fail_write_outs(
            "full-disk.db-wal",
            rusqlite::ffi::SQLITE_FULL,
            u32::MAX,
        );

        for job in 0..20_i64 {
            let answer = writer
                .write(move |c| {
                    c.execute("INSERT INTO marks (job) VALUES (?1)", [job])?;
                    c.replay().claim("p", &format!("n{job}"), "ev", job);
                    Ok(())
                })
                .await;
            assert!(answer.is_err(), "job {job} committed on a full disk");
        }
        super::super::wal_batch::fault::clear("full-disk.db-wal");
        // No failed commit kept a replay claim: a provider's retry of the same request is
        // taken as new.
        let retaken = writer
            .write(|c| {
                let mut replay = c.replay();
                Ok((0..20).all(|job| replay.claim("p", &format!("n{job}"), "ev", 99).is_none()))
            })
            .await
            .expect("claims");
        assert!(retaken);

        // The first failure was logged, the 19 after it held back for the next line.
        let next_line = Instant::now() + FAILURE_LOG_EVERY;
        assert_eq!(
            writer
                .shared
                .failure_log
                .0
                .admit("store", "commit_failed", next_line),
            LogVerdict::Log { suppressed: 19 }
        );
        assert!(matches!(writer.health().0, WriterHealth::Failing(_)));
        thread.stop().await;
    }

    #[test]
    fn the_checkpointer_syncs_its_database_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sync.db");
        let connection = Connection::open(&path).expect("open");
        connection
            .execute_batch(
                "PRAGMA journal_mode=WAL; CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);",
            )
            .expect("write");
        let wal = passive_checkpoint(&connection).expect("checkpoint");
        assert_eq!(wal.checkpointed, wal.frames, "{wal:?}");
        sync_database_file(&connection).expect("sync");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_background_checkpointer_keeps_the_wal_bounded() {
        // 64 MiB committed: four times the WAL size at which a restart is wanted.
        let (high_water, written) = wal_high_water(256, 256 * 1024, IDLE_BEFORE_GROUP * 2).await;
        let restart_bytes = (RESTART_WAL_PAGES * 4096) as u64;
        assert!(
            high_water < 2 * restart_bytes,
            "WAL reached {high_water} bytes for {written} written (restart wanted at {restart_bytes})"
        );
    }
}
