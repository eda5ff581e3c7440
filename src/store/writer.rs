//! The single writer: one thread owns the write connection and commits queued writes in
//! groups (one fsync for many), answering each caller only after its own commit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// The writer thread, joined on shutdown.
pub struct WriterThread {
    handle: Option<JoinHandle<()>>,
    sender: mpsc::Sender<Message>,
    checkpointer: Option<Checkpointer>,
}

/// Starts the writer thread on `connection`.
pub fn start(
    connection: Connection,
    max_batch: usize,
    metrics: Metrics,
) -> (WriterHandle, WriterThread) {
    let knob = |name: &str| std::env::var(name).ok();
    if knob("XB_CACHE").as_deref() != Some("0") {
        if let Err(err) = connection.pragma_update(None, "cache_size", -65536) {
            tracing::warn!(error = %err, "store: cannot grow the page cache");
        }
    }
    if knob("XB_TEMP").as_deref() != Some("0") {
        if let Err(err) = connection.pragma_update(None, "temp_store", "MEMORY") {
            tracing::warn!(error = %err, "store: cannot keep savepoint journals in memory");
        }
    }
    let commits = Arc::new(AtomicU64::new(0));
    let checkpointer = if knob("XB_CKPT").as_deref() != Some("0") {
        Checkpointer::start(&connection, commits.clone())
    } else {
        None
    };
    if checkpointer.is_some() {
        let pages: i64 = knob("XB_AUTO")
            .and_then(|v| v.parse().ok())
            .unwrap_or(WRITER_CHECKPOINT_PAGES);
        if let Err(err) = connection.pragma_update(None, "wal_autocheckpoint", pages) {
            tracing::warn!(error = %err, "store: cannot set the writer's checkpoint threshold");
        }
    }
    let (sender, receiver) = mpsc::channel(16_384);
    let handle = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || run(connection, receiver, max_batch, metrics, &commits))
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

/// WAL pages after which the writer checkpoints by itself (SQLite's default is 1000).
/// The background checkpointer has normally copied all but the last few by then, so the
/// writer's own checkpoint is short; it also lets the WAL restart from its beginning.
const WRITER_CHECKPOINT_PAGES: i64 = 10_000;

/// How often the background checkpointer copies committed WAL pages into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);

/// A thread with its own connection that runs passive checkpoints, so copying WAL pages
/// into the database file (and syncing it) does not hold up group commits.
struct Checkpointer {
    handle: JoinHandle<()>,
    stop: std::sync::mpsc::Sender<()>,
}

impl Checkpointer {
    /// Starts on the writer's database; `None` (the writer checkpoints alone) when it is
    /// in memory or a second connection cannot be opened.
    fn start(writer: &Connection, commits: Arc<AtomicU64>) -> Option<Checkpointer> {
        let path = writer.path().filter(|p| !p.is_empty())?.to_string();
        let connection = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .and_then(|c| c.pragma_update(None, "synchronous", "FULL").map(|_| c))
            .map_err(|err| tracing::warn!(error = %err, "store: no background checkpointer; the writer checkpoints"))
            .ok()?;
        let (stop, stopped) = std::sync::mpsc::channel();
        let every = std::env::var("XB_EVERY")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(CHECKPOINT_EVERY);
        let handle = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpoint_until_stopped(&connection, &stopped, &commits, every))
            .map_err(|err| tracing::warn!(error = %err, "store: no background checkpointer; the writer checkpoints"))
            .ok()?;
        Some(Checkpointer { handle, stop })
    }
}

fn checkpoint_until_stopped(
    connection: &Connection,
    stopped: &std::sync::mpsc::Receiver<()>,
    commits: &AtomicU64,
    every: Duration,
) {
    let mut checkpointed_at = 0;
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
        let now = commits.load(Ordering::Relaxed);
        if now == checkpointed_at {
            continue;
        }
        checkpointed_at = now;
        // PASSIVE never waits for the writer or readers: it copies what it can.
        let result = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            row.get::<_, i64>(0)
        });
        if let Err(err) = result {
            tracing::warn!(error = %err, "store: background checkpoint failed");
        }
    }
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
                let _ = checkpointer.stop.send(());
                let _ = checkpointer.handle.join();
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
    commits: &AtomicU64,
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
            commit_group(&mut connection, batch, &metrics);
            commits.fetch_add(1, Ordering::Relaxed);
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
    let ran = started.elapsed();
    let commit = transaction.commit();
    let elapsed = started.elapsed();
    if std::env::var("XB_TRACE").is_ok() {
        eprintln!("XB {} {} {}", size, ran.as_micros(), elapsed.as_micros());
    }
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
