//! The single writer: one thread owns the write connection and commits queued writes in
//! groups (one fsync for many), answering each caller only after its own commit.

use std::thread::JoinHandle;
use std::time::Instant;

use rusqlite::{Connection, TransactionBehavior};
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
}

/// Starts the writer thread on `connection`.
pub fn start(connection: Connection, max_batch: usize, metrics: Metrics) -> (WriterHandle, WriterThread) {
    let (sender, receiver) = mpsc::channel(16_384);
    let handle = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || run(connection, receiver, max_batch, metrics))
        .ok();
    (WriterHandle { sender: sender.clone() }, WriterThread { handle, sender })
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
        if let Some(handle) = self.handle.take() {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

fn run(mut connection: Connection, mut receiver: mpsc::Receiver<Message>, max_batch: usize, metrics: Metrics) {
    let mut stopping = false;
    while !stopping {
        let Some(first) = receiver.blocking_recv() else { break };
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
    let mut transaction = match connection.transaction_with_behavior(TransactionBehavior::Immediate) {
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
        let closed = if ok { savepoint.commit() } else { savepoint.finish() };
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
