//! The single writer: one thread owns the write connection and commits queued writes in
//! groups (one fsync for many), answering each caller only after its own commit.
//!
//! A second thread checkpoints the WAL in the background (copying committed pages into
//! the database file and syncing it), so that work stays off the commit path; see
//! [`Checkpointer`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::StoreError;
use crate::metrics::Metrics;

/// Sends one job's answer once the fate of its transaction is known.
type Finisher = Box<dyn FnOnce(Option<StoreError>) + Send>;

/// A unit of work queued for the writer.
trait Job: Send {
    /// Runs inside the group's transaction (under its own savepoint); says whether it
    /// succeeded and returns how to answer its caller once the commit is done.
    fn run(self: Box<Self>, connection: &Connection) -> (bool, Finisher);
    /// Answers the caller without running (the transaction could not start).
    fn abort(self: Box<Self>, err: StoreError);
}

type Work = Box<dyn Job>;

struct TypedJob<T, F> {
    job: F,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for TypedJob<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    fn run(self: Box<Self>, connection: &Connection) -> (bool, Finisher) {
        let TypedJob { job, reply } = *self;
        let result = job(connection);
        let ok = result.is_ok();
        let finisher: Finisher = Box::new(move |commit_error| {
            let _ = reply.send(match commit_error {
                Some(err) => Err(err),
                None => result,
            });
        });
        (ok, finisher)
    }

    fn abort(self: Box<Self>, err: StoreError) {
        let _ = self.reply.send(Err(err));
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
}

/// The writer thread (and its checkpointer), joined on shutdown.
pub struct WriterThread {
    handle: Option<JoinHandle<()>>,
    sender: mpsc::Sender<Message>,
    checkpointer: Option<Checkpointer>,
}

/// What the writer and the checkpointer share.
#[derive(Default)]
struct Shared {
    /// Group commits so far (the checkpointer skips its turn when nothing was committed).
    commits: AtomicU64,
    /// Held by the writer for each group and by the checkpointer for a full catch-up.
    commit_lock: Mutex<()>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ()> {
        // The guarded value is `()`: a panic elsewhere cannot leave it inconsistent.
        self.commit_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Starts the writer thread on `connection`, and the background checkpointer.
pub fn start(
    connection: Connection,
    max_batch: usize,
    metrics: Metrics,
) -> (WriterHandle, WriterThread) {
    // Each job runs under a savepoint; keep its rollback journal in memory rather than in a
    // temporary file (a spilled statement journal cost a quarter of the writer's time).
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
    let handle = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || run(connection, receiver, max_batch, metrics, &shared))
        .ok();
    (
        WriterHandle {
            sender: sender.clone(),
        },
        WriterThread {
            handle,
            sender,
            checkpointer,
        },
    )
}

/// WAL pages after which the checkpointer pauses the writer for a full catch-up, so the
/// next transaction restarts the WAL from its beginning (bounding the file at ~32 MiB).
const RESTART_WAL_PAGES: i64 = 8_192;

/// WAL pages after which the writer checkpoints by itself, should the checkpointer fall
/// behind (SQLite's default of 1000 put a checkpoint in every ~40th group commit).
const WRITER_CHECKPOINT_PAGES: i64 = 4 * RESTART_WAL_PAGES;

/// How often the checkpointer copies committed WAL pages into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// A thread with its own connection that runs passive checkpoints: copying WAL pages into
/// the database file and syncing it no longer happens inside a group commit. Passive
/// checkpoints never wait for the writer; when the WAL has grown past
/// [`RESTART_WAL_PAGES`], one is run between two groups so that it completes and the
/// writer can restart the WAL.
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
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        stopped.recv_timeout(CHECKPOINT_EVERY)
    {
        let commits = shared.commits.load(Ordering::Relaxed);
        if commits == seen_commits {
            continue;
        }
        seen_commits = commits;
        let wal_pages = match passive_checkpoint(connection) {
            Ok(wal_pages) => wal_pages,
            Err(err) => {
                tracing::warn!(error = %err, "store: background checkpoint failed");
                continue;
            }
        };
        if wal_pages >= RESTART_WAL_PAGES {
            // Only the frames committed during the pass above are left: a short pause.
            let _paused = shared.lock();
            if let Err(err) = passive_checkpoint(connection) {
                tracing::warn!(error = %err, "store: catch-up checkpoint failed");
            }
        }
    }
}

/// Runs `PRAGMA wal_checkpoint(PASSIVE)`; returns the WAL's size in pages.
fn passive_checkpoint(connection: &Connection) -> rusqlite::Result<i64> {
    connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        row.get::<_, i64>(1)
    })
}

impl WriterHandle {
    /// Runs `job` in the next group transaction and answers after the commit.
    /// An error from `job` rolls back only its own savepoint.
    pub async fn write<T, F>(&self, job: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let work: Work = Box::new(TypedJob { job, reply });
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
    mut connection: Connection,
    mut receiver: mpsc::Receiver<Message>,
    max_batch: usize,
    metrics: Metrics,
    shared: &Shared,
) {
    let mut stopping = false;
    while !stopping {
        let Some(first) = receiver.blocking_recv() else {
            break;
        };
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
            let _committing = shared.lock();
            commit_group(&mut connection, batch, &metrics);
            shared.commits.fetch_add(1, Ordering::Relaxed);
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
        commit_group(&mut connection, rest, &metrics);
    }
}

fn commit_group(connection: &mut Connection, batch: Vec<Work>, metrics: &Metrics) {
    let started = Instant::now();
    let size = batch.len();
    let mut transaction = match connection.transaction_with_behavior(TransactionBehavior::Immediate)
    {
        Ok(transaction) => transaction,
        Err(err) => {
            tracing::error!(error = %err, "store: cannot begin a write transaction");
            // Run nothing: answer every caller with the failure.
            for work in batch {
                work.abort(StoreError::from_sqlite(&err));
            }
            return;
        }
    };
    let mut finishers = Vec::with_capacity(size);
    for work in batch {
        let savepoint = match transaction.savepoint() {
            Ok(savepoint) => savepoint,
            Err(err) => {
                work.abort(StoreError::from_sqlite(&err));
                continue;
            }
        };
        let (ok, finisher) = work.run(&savepoint);
        let closed = if ok {
            savepoint.commit()
        } else {
            savepoint.finish()
        };
        if let Err(err) = closed {
            tracing::error!(error = %err, "store: cannot close a savepoint");
        }
        finishers.push(finisher);
    }
    let commit = transaction.commit();
    let elapsed = started.elapsed();
    metrics.store_commit_seconds.observe(elapsed.as_secs_f64());
    metrics.store_group_size.observe(size as f64);
    match commit {
        Ok(()) => {
            for finish in finishers {
                finish(None);
            }
        }
        Err(err) => {
            tracing::error!(error = %err, group = size, "store: commit failed; nothing in the group is acknowledged");
            for finish in finishers {
                finish(Some(StoreError::from_sqlite(&err)));
            }
        }
    }
}
