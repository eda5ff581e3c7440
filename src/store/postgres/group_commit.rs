//! Group commit of webhooks on PostgreSQL, as the SQLite store's writer does it: a
//! per-pool batcher gathers the webhooks that arrive while the previous batch commits
//! (at most [`MAX_BATCH`]) and ingests them in one transaction, with a few multi-row
//! statements instead of a handful of statements per webhook, and one `COMMIT` (one WAL
//! flush). Each caller gets its own outcome only after that `COMMIT` returned.
//!
//! One batch, in one transaction:
//! 1. **Load** (one pipelined round trip): the events holding the batch's dedup keys, the
//!    replay-cache rows holding its nonces, its cash-outs locked `FOR UPDATE` in key order
//!    (two batches never wait on each other's cash-outs in a cycle), the ledger entries
//!    naming the cash-outs it may create.
//! 2. **Plan**, per webhook in arrival order, with the same pure
//!    [`crate::ingest::plan::plan_webhook`] as a single transaction: a duplicate or a
//!    replay writes nothing. Webhooks of one cash-out are planned in rounds, the n-th of
//!    each cash-out in round n against the state the earlier rounds left, exactly as
//!    sequential transactions would see it.
//! 3. **Apply** each round with multi-row statements (`UNNEST` arrays): new cash-outs
//!    first (their ids), then in one pipelined round trip the updates, findings, fetches,
//!    nonces and the events with the cash-out's after-snapshot (sent in that order, so the
//!    snapshot reads the round's updates). Each insert takes its rows in the order of the
//!    unique key it may wait on (cash-outs by provider ref, events by dedup key, nonces by
//!    nonce), so two batches creating the same rows wait on each other in one order, never
//!    in a cycle.
//! 4. **Claim by inserting**: an event is inserted `ON CONFLICT (provider, dedup_key) DO
//!    NOTHING` and a nonce `ON CONFLICT (provider, nonce) DO NOTHING`; the unique keys
//!    are the arbiter, the load only a forecast. When another delivery took a key since
//!    the load (another pool, another instance), a row is missing from `RETURNING`: the
//!    transaction rolls back and the batch runs again, and sees that delivery committed.
//!    A cash-out inserted meanwhile by another instance is retried the same way.
//!
//! Webhooks sharing a dedup key or a nonce never go in one transaction: the batch is cut
//! before the second one, which runs in the next transaction and sees the first.
//! A conflict (above, a serialization failure, a deadlock) runs the batch again, at most
//! [`TX_ATTEMPTS`] times; any other failure, or too many conflicts, commits the batch's
//! webhooks one by one (the single-webhook transaction of [`super::ingest`]), so one
//! poisoned webhook fails alone. Nothing is acknowledged that was not committed.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Mutex, OwnedMutexGuard};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};

use super::claims::stored;
use super::ingest::{queue_status_fetch, TxError, TxResult, TX_ATTEMPTS};
use super::{cached, PgClient, PgStore, PgTransaction};
use crate::ingest::plan::{
    self, Admission, CashoutChange, ConflictMark, Loaded, NewEvent, NonceClaim, PriorDelivery,
    StoredCashout, WebhookLoaded, WebhookPlan,
};
use crate::ingest::{Applied, IngestOutcome, WebhookRecord};
use crate::state::CashoutStatus;
use crate::store::{to_millis, StoreError};

/// At most this many webhooks in one transaction (the SQLite writer's `max_batch`).
pub const MAX_BATCH: usize = 64;

/// Batches of one pool in flight at once: while one commits, the next is gathered,
/// loaded, planned and written on another connection (one at a time: see [`work`]). A
/// pool of fewer than 8 connections has one.
pub const BATCH_WORKERS: usize = 2;

/// Webhooks waiting for a batch before a caller's submission waits (back-pressure).
const QUEUE_DEPTH: usize = 4 * MAX_BATCH;

type Answer = Result<IngestOutcome, StoreError>;

struct Job {
    record: WebhookRecord,
    reply: oneshot::Sender<Answer>,
}

/// A pool's webhook queue and the workers that commit it in batches. Its workers end when
/// the last clone of the pool's [`PgStore`] is dropped.
pub(super) struct Batcher {
    jobs: mpsc::Sender<Job>,
}

/// The batcher of a pool, started by its first webhook.
pub(super) type BatcherCell = Arc<OnceLock<Batcher>>;

impl Batcher {
    fn start(store: PgStore) -> Batcher {
        let (jobs, queue) = mpsc::channel(QUEUE_DEPTH);
        let queue = Arc::new(Mutex::new(queue));
        let turn = Arc::new(Mutex::new(()));
        let workers = BATCH_WORKERS.min(store.pool.status().max_size / 4).max(1);
        for _ in 0..workers {
            tokio::spawn(work(store.clone(), Arc::clone(&queue), Arc::clone(&turn)));
        }
        Batcher { jobs }
    }
}

/// Takes the webhooks waiting (at most [`MAX_BATCH`]), commits them, answers each.
///
/// The workers take turns: one gathers, loads, plans and writes its batch while holding
/// `turn`, and gives it up when it sends `COMMIT`. The next batch is then built while the
/// previous one waits for its WAL flush, and is made of every webhook that arrived in the
/// meantime: batches stay as big as one worker's (31 webhooks a commit under
/// `bench-ingest`, against 16 when two workers built at once) with the flushes overlapped.
async fn work(store: PgStore, queue: Arc<Mutex<mpsc::Receiver<Job>>>, turn: Arc<Mutex<()>>) {
    // Kept from batch to batch while webhooks keep coming (no pool checkout, no check
    // query per batch); given back to the pool when idle or after a failure.
    let mut connection = None;
    loop {
        let mut my_turn = Some(Arc::clone(&turn).lock_owned().await);
        let jobs = {
            let mut queue = queue.lock().await;
            let first = match queue.try_recv() {
                Ok(job) => job,
                Err(_) => {
                    connection = None;
                    let Some(job) = queue.recv().await else {
                        return;
                    };
                    job
                }
            };
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            jobs
        };
        let (records, replies): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|job| (job.record, job.reply)).unzip();
        let answers = store
            .ingest_webhooks_on(&mut connection, &mut my_turn, records)
            .await;
        for (reply, answer) in replies.into_iter().zip(answers) {
            // A caller that went away: its webhook is committed all the same.
            let _ = reply.send(answer);
        }
    }
}

impl PgStore {
    /// Dedup, replay check, then quarantine or the state rule, event log: committed when
    /// this returns (the SQLite store's `Store::ingest_webhook`), in a batch with the
    /// webhooks arriving at the same time (see the module doc).
    pub async fn ingest_webhook(&self, record: WebhookRecord) -> Result<IngestOutcome, StoreError> {
        let batcher = self.webhook_batcher.get_or_init(|| {
            // The workers hold the pool, not this cell: the last store dropped ends them.
            Batcher::start(PgStore {
                pool: self.pool.clone(),
                target: self.target.clone(),
                claimer: self.claimer.clone(),
                webhook_batcher: BatcherCell::default(),
                connect_to: self.connect_to.clone(),
            })
        });
        let (reply, answer) = oneshot::channel();
        batcher
            .jobs
            .send(Job { record, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| {
            StoreError::Unavailable("the webhook's batch ended without an answer".to_string())
        })?
    }

    /// Ingests `records` as one batch (cut before a webhook sharing a dedup key or a nonce
    /// with an earlier one): each one's outcome, in order, once committed.
    pub async fn ingest_webhooks(&self, records: Vec<WebhookRecord>) -> Vec<Answer> {
        self.ingest_webhooks_on(&mut None, &mut None, records).await
    }

    /// [`PgStore::ingest_webhooks`] on `connection` (taken from the pool when `None`);
    /// `turn` (see [`work`]) is given up when the first transaction commits.
    async fn ingest_webhooks_on(
        &self,
        connection: &mut Option<BatchConnection>,
        turn: &mut Option<OwnedMutexGuard<()>>,
        records: Vec<WebhookRecord>,
    ) -> Vec<Answer> {
        let mut answers = Vec::with_capacity(records.len());
        for run in runs_without_shared_claims(records) {
            answers.extend(self.commit_run(connection, turn, run).await);
        }
        answers
    }

    /// One transaction for `records` (no two share a claim), again on a conflict; one by
    /// one when it fails otherwise.
    async fn commit_run(
        &self,
        connection: &mut Option<BatchConnection>,
        turn: &mut Option<OwnedMutexGuard<()>>,
        records: Vec<WebhookRecord>,
    ) -> Vec<Answer> {
        let mut last = String::new();
        for attempt in 1..=TX_ATTEMPTS {
            match self.attempt_run(connection, turn, &records).await {
                Ok(outcomes) => return outcomes.into_iter().map(Ok).collect(),
                Err(TxError::Retry(reason)) => {
                    tracing::debug!(attempt, %reason, webhooks = records.len(),
                        "postgres: webhook batch retried");
                    last = reason;
                }
                Err(TxError::Store(StoreError::Closed)) => {
                    return records.iter().map(|_| Err(StoreError::Closed)).collect();
                }
                Err(TxError::Store(err)) if records.len() == 1 => return vec![Err(err)],
                Err(TxError::Store(err)) => {
                    tracing::warn!(error = %err, webhooks = records.len(),
                        "postgres: a webhook batch failed; committing its webhooks one by one");
                    turn.take();
                    return self.one_by_one(records).await;
                }
            }
        }
        if records.len() == 1 {
            return vec![Err(StoreError::Unavailable(format!(
                "ingest a webhook: still conflicting with concurrent writers after {TX_ATTEMPTS} attempts ({last})"
            )))];
        }
        tracing::warn!(%last, webhooks = records.len(),
            "postgres: a webhook batch kept conflicting; committing its webhooks one by one");
        turn.take();
        self.one_by_one(records).await
    }

    /// Each webhook in a transaction of its own (at once: they share no claim).
    async fn one_by_one(&self, records: Vec<WebhookRecord>) -> Vec<Answer> {
        futures_util::future::join_all(
            records
                .into_iter()
                .map(|record| self.ingest_webhook_alone(record)),
        )
        .await
    }

    async fn attempt_run(
        &self,
        connection: &mut Option<BatchConnection>,
        turn: &mut Option<OwnedMutexGuard<()>>,
        records: &[WebhookRecord],
    ) -> TxResult<Vec<IngestOutcome>> {
        if self.pool.is_closed() {
            *connection = None;
            return Err(TxError::Store(StoreError::Closed));
        }
        let batch = match connection {
            Some(batch) if !batch.client.is_closed() => batch,
            _ => connection.insert(BatchConnection {
                client: self.client().await?,
                planned_at: None,
            }),
        };
        let attempt = async {
            if batch
                .planned_at
                .is_none_or(|at| at.elapsed() >= REPLAN_EVERY)
            {
                batch.client.batch_execute("DISCARD PLANS").await?;
                batch.planned_at = Some(Instant::now());
            }
            let tx = batch.client.transaction().await?;
            let outcomes = ingest_run(&tx, records).await?;
            // The next batch is built while this one's WAL is flushed.
            turn.take();
            tx.commit().await?;
            Ok(outcomes)
        }
        .await;
        if let Err(TxError::Store(_)) = attempt {
            *connection = None;
        }
        attempt
    }
}

/// What one transaction claims: a webhook's dedup key and its nonce, per provider.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Claim {
    DedupKey(String, String),
    Nonce(String, String),
}

fn claims_of(record: &WebhookRecord) -> impl Iterator<Item = Claim> + '_ {
    std::iter::once(Claim::DedupKey(
        record.provider.clone(),
        record.dedup_key.clone(),
    ))
    .chain(
        record
            .nonce
            .iter()
            .map(|nonce| Claim::Nonce(record.provider.clone(), nonce.clone())),
    )
}

/// `records` cut into consecutive runs in which no two webhooks share a claim.
fn runs_without_shared_claims(records: Vec<WebhookRecord>) -> Vec<Vec<WebhookRecord>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    let mut claimed = HashSet::new();
    for record in records {
        if claims_of(&record).any(|claim| claimed.contains(&claim)) {
            runs.push(std::mem::take(&mut run));
            claimed.clear();
        }
        claimed.extend(claims_of(&record));
        run.push(record);
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// A cash-out's key: provider, provider ref.
type CashoutKey = (String, String);

fn key_of(provider: &str, provider_ref: &str) -> CashoutKey {
    (provider.to_string(), provider_ref.to_string())
}

/// What step 1 loaded for a run.
#[derive(Default)]
struct Loads {
    /// Per webhook: the event holding its dedup key.
    priors: Vec<Option<PriorDelivery>>,
    /// Per webhook: the replay-cache row holding its nonce.
    nonce_holders: Vec<Option<PriorDelivery>>,
    /// The run's stored cash-outs, locked.
    cashouts: HashMap<CashoutKey, StoredCashout>,
    /// The external ids of the ledger entries naming a provider ref (at most two read).
    ledger: HashMap<CashoutKey, Vec<String>>,
}

impl Loads {
    /// The external id of the one ledger entry naming `key`, if exactly one does.
    fn ledger_external_id(&self, key: &CashoutKey) -> Option<String> {
        match self.ledger.get(key).map(Vec::as_slice) {
            Some([external_id]) => Some(external_id.clone()),
            _ => None,
        }
    }
}

// Every lookup below is a `LATERAL` subquery that the planner cannot flatten (a `LIMIT`,
// a `FOR UPDATE`): one index probe per array element whatever the plan cached for the
// prepared statement estimated (a generic plan made while a table was small would
// otherwise keep hash-joining it with a sequential scan as it grows).
pub(super) const LOAD_PRIORS: &str = "SELECT k.i, e.event_id, e.body_sha256
     FROM unnest($1::TEXT[], $2::TEXT[]) WITH ORDINALITY AS k(provider, dedup_key, i)
     CROSS JOIN LATERAL (SELECT event_id, body_sha256 FROM events
                         WHERE events.provider = k.provider AND events.dedup_key = k.dedup_key
                           AND events.dedup_key IS NOT NULL
                         LIMIT 1) e";

pub(super) const LOAD_NONCE_HOLDERS: &str = "SELECT k.i, r.event_id, r.body_sha256
     FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[]) AS k(provider, nonce, i)
     CROSS JOIN LATERAL (SELECT event_id, body_sha256 FROM replay_cache
                         WHERE replay_cache.provider = k.provider AND replay_cache.nonce = k.nonce
                         LIMIT 1) r";

/// Locked in the arrays' order (sorted by the caller: every batch locks in one order).
pub(super) const LOCK_CASHOUTS: &str = "SELECT c.id, c.status, c.held, c.provider, c.provider_ref
     FROM unnest($1::TEXT[], $2::TEXT[]) WITH ORDINALITY AS k(provider, provider_ref, i)
     CROSS JOIN LATERAL (SELECT id, status, held, provider, provider_ref FROM cashouts
                         WHERE cashouts.provider = k.provider AND cashouts.provider_ref = k.provider_ref
                         FOR UPDATE) c
     ORDER BY k.i";

pub(super) const LOAD_LEDGER: &str = "SELECT k.provider, k.provider_ref, l.external_id
     FROM unnest($1::TEXT[], $2::TEXT[]) AS k(provider, provider_ref)
     CROSS JOIN LATERAL (SELECT external_id FROM ledger
                         WHERE ledger.provider = k.provider AND ledger.provider_ref = k.provider_ref
                         LIMIT 2) l";

/// The batch transaction's planner settings. Its statements keep a generic plan (made
/// again every [`REPLAN_EVERY`]) instead of being planned for every batch: planning was
/// 29 % of the server's CPU per webhook under `bench-ingest`, and dropping it took one
/// instance from 9.5k to 12.5k webhooks/s. No plan reads a table from end to end: every
/// statement finds its rows by key (`every_batch_statement_keeps_a_plan_that_reads_by_key`).
/// The session keeps `force_custom_plan` for every other statement (see
/// [`super::session_settings`]).
pub(super) const BATCH_PLAN_SETTINGS: &str =
    "SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off";

/// How long a batch connection keeps its statements' generic plans. A plan is made from
/// the tables' size at that moment, so it is made again as they grow: one made while
/// `cashouts` was nearly empty reads `cashouts_by_provider_status_created` for a lookup by
/// `(provider, provider_ref)` (every cash-out of the provider, once the table has grown),
/// one made a second later takes the key's own index.
const REPLAN_EVERY: Duration = Duration::from_secs(1);

/// A worker's connection while webhooks keep coming, and when its batch statements were
/// last planned (`None`: not since it was taken from the pool, where another worker may
/// have left plans of any age).
pub(super) struct BatchConnection {
    client: PgClient,
    planned_at: Option<Instant>,
}

/// Prepares (or takes from the connection's cache) every statement of `sqls`, at once.
async fn prepared<const N: usize>(
    tx: &PgTransaction<'_>,
    sqls: [&str; N],
) -> TxResult<[Statement; N]> {
    let statements =
        futures_util::future::try_join_all(sqls.iter().map(|sql| cached(tx, sql))).await?;
    statements.try_into().map_err(|_| {
        TxError::Store(StoreError::Database(
            "a statement of the webhook batch was not prepared".to_string(),
        ))
    })
}

/// A row index from `WITH ORDINALITY` (1-based) or a 0-based one passed in.
fn index(value: i64, base: i64, len: usize) -> TxResult<usize> {
    usize::try_from(value - base)
        .ok()
        .filter(|i| *i < len)
        .ok_or_else(|| {
            TxError::Store(StoreError::Database(format!(
                "the webhook batch read back a row index {value} out of range"
            )))
        })
}

/// Step 1: one pipelined round trip.
async fn load(tx: &PgTransaction<'_>, records: &[WebhookRecord]) -> TxResult<Loads> {
    let n = records.len();
    let providers: Vec<&str> = records.iter().map(|r| r.provider.as_str()).collect();
    let dedup_keys: Vec<&str> = records.iter().map(|r| r.dedup_key.as_str()).collect();
    let (mut nonce_providers, mut nonces, mut nonce_rows) = (Vec::new(), Vec::new(), Vec::new());
    for (i, record) in records.iter().enumerate() {
        if let Some(nonce) = &record.nonce {
            nonce_providers.push(record.provider.as_str());
            nonces.push(nonce.as_str());
            nonce_rows.push(i64::try_from(i).unwrap_or(i64::MAX));
        }
    }
    // Every parsed webhook's cash-out, sorted (the lock order), and those a new cash-out
    // may take the ledger's external id for.
    let mut keys: Vec<(&str, &str)> = Vec::new();
    let mut ledger_keys: Vec<(&str, &str)> = Vec::new();
    for record in records {
        if let Ok(observation) = &record.parsed {
            let key = (record.provider.as_str(), observation.provider_ref.as_str());
            keys.push(key);
            if plan::needs_ledger_external_id(None, observation) {
                ledger_keys.push(key);
            }
        }
    }
    keys.sort_unstable();
    keys.dedup();
    ledger_keys.sort_unstable();
    ledger_keys.dedup();
    let (key_providers, key_refs): (Vec<&str>, Vec<&str>) = keys.into_iter().unzip();
    let (ledger_providers, ledger_refs): (Vec<&str>, Vec<&str>) = ledger_keys.into_iter().unzip();

    let [priors_sql, nonces_sql, lock_sql, ledger_sql] = prepared(
        tx,
        [LOAD_PRIORS, LOAD_NONCE_HOLDERS, LOCK_CASHOUTS, LOAD_LEDGER],
    )
    .await?;
    let ((), prior_rows, holder_rows, cashout_rows, ledger_rows) = futures_util::try_join!(
        // First in the pipeline: the batch's statements run with its plan settings.
        tx.batch_execute(BATCH_PLAN_SETTINGS),
        async { tx.query(&priors_sql, &[&providers, &dedup_keys]).await },
        async {
            if nonces.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(&nonces_sql, &[&nonce_providers, &nonces, &nonce_rows])
                .await
        },
        async {
            if key_refs.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(&lock_sql, &[&key_providers, &key_refs]).await
        },
        async {
            if ledger_refs.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(&ledger_sql, &[&ledger_providers, &ledger_refs])
                .await
        },
    )?;

    let mut loads = Loads {
        priors: vec![None; n],
        nonce_holders: vec![None; n],
        ..Loads::default()
    };
    for row in prior_rows {
        let i = index(row.try_get(0)?, 1, n)?;
        loads.priors[i] = Some(PriorDelivery {
            event_id: row.try_get(1)?,
            body_sha256: row.try_get(2)?,
        });
    }
    for row in holder_rows {
        let i = index(row.try_get(0)?, 0, n)?;
        loads.nonce_holders[i] = Some(PriorDelivery {
            event_id: row.try_get(1)?,
            body_sha256: row.try_get(2)?,
        });
    }
    for row in cashout_rows {
        let cashout = stored(&row)?;
        loads
            .cashouts
            .insert((row.try_get(3)?, row.try_get(4)?), cashout);
    }
    for row in ledger_rows {
        loads
            .ledger
            .entry((row.try_get(0)?, row.try_get(1)?))
            .or_default()
            .push(row.try_get(2)?);
    }
    Ok(loads)
}

/// The id the plans carry for a cash-out an earlier round of the same batch creates: its
/// real id comes back from the insert, in the same pipeline as the statements that touch
/// it, so the batch's writes address cash-outs by `(provider, provider_ref)`, never by
/// the plans' ids.
const CREATED_IN_THIS_BATCH: i64 = 0;

/// Steps 2 and 3 for a run whose webhooks share no claim: each one's outcome, in order.
async fn ingest_run(
    tx: &PgTransaction<'_>,
    records: &[WebhookRecord],
) -> TxResult<Vec<IngestOutcome>> {
    let mut loads = load(tx, records).await?;
    let mut outcomes: Vec<Option<IngestOutcome>> = vec![None; records.len()];
    let mut loaded: Vec<WebhookLoaded> = vec![WebhookLoaded::default(); records.len()];
    // The admitted webhooks: unparseable ones (quarantined in the first round), the
    // others grouped by cash-out in arrival order.
    let mut quarantined = Vec::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut group_of: HashMap<CashoutKey, usize> = HashMap::new();
    let mut nonce_claims = Vec::new();
    for (i, record) in records.iter().enumerate() {
        let prior = loads.priors[i].take();
        let nonce = match (&prior, &record.nonce) {
            (None, Some(_)) => Some(match loads.nonce_holders[i].take() {
                Some(holder) => NonceClaim::Taken(holder),
                None => NonceClaim::Claimed,
            }),
            _ => None,
        };
        let webhook = WebhookLoaded {
            prior,
            nonce,
            observation: Loaded::default(),
        };
        if webhook.admission(&record.body_sha256) != Admission::Admit {
            // A duplicate or a replay: nothing to write.
            outcomes[i] = Some(outcome_without_writes(
                record,
                plan::plan_webhook(record, webhook),
            )?);
            continue;
        }
        if record.nonce.is_some() {
            nonce_claims.push(i);
        }
        match &record.parsed {
            Ok(observation) => {
                let key = key_of(&record.provider, &observation.provider_ref);
                let group = *group_of.entry(key).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[group].push(i);
            }
            Err(_) => quarantined.push(i),
        }
        loaded[i] = webhook;
    }

    // Round n plans the n-th webhook of each cash-out against the state the plans of the
    // earlier rounds leave (what their transactions, one after the other, would load).
    let mut ids: HashMap<CashoutKey, i64> = loads
        .cashouts
        .iter()
        .map(|(key, cashout)| (key.clone(), cashout.id))
        .collect();
    let mut state: HashMap<CashoutKey, StoredCashout> = std::mem::take(&mut loads.cashouts);
    let round_count = groups
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(0)
        .max(usize::from(!quarantined.is_empty()));
    let mut rounds: Vec<Vec<(usize, WebhookPlan<'_>)>> = Vec::with_capacity(round_count);
    for round in 0..round_count {
        let first = if round == 0 {
            quarantined.as_slice()
        } else {
            &[]
        };
        let members = first
            .iter()
            .copied()
            .chain(groups.iter().filter_map(|group| group.get(round).copied()));
        let mut plans = Vec::new();
        for i in members {
            let record = &records[i];
            let mut webhook = std::mem::take(&mut loaded[i]);
            if let Ok(observation) = &record.parsed {
                let key = key_of(&record.provider, &observation.provider_ref);
                let cashout = state.get(&key).copied();
                webhook.observation = Loaded {
                    cashout,
                    ledger_external_id: if plan::needs_ledger_external_id(cashout, observation) {
                        loads.ledger_external_id(&key)
                    } else {
                        None
                    },
                };
                let webhook_plan = plan::plan_webhook(record, webhook);
                if let WebhookPlan::Apply(plan) = &webhook_plan {
                    let next = match plan.change {
                        CashoutChange::Insert { state: next, .. } => Some(StoredCashout {
                            id: CREATED_IN_THIS_BATCH,
                            state: next,
                        }),
                        CashoutChange::Advance {
                            id, state: next, ..
                        } => Some(StoredCashout { id, state: next }),
                        CashoutChange::Nothing { .. } | CashoutChange::FillIn { .. } => None,
                    };
                    if let Some(next) = next {
                        state.insert(key, next);
                    }
                }
                plans.push((i, webhook_plan));
            } else {
                plans.push((i, plan::plan_webhook(record, webhook)));
            }
        }
        rounds.push(plans);
    }

    let written = write_rounds(tx, records, &rounds, &nonce_claims).await?;
    ids.extend(written.inserted);
    for (i, webhook_plan) in rounds.into_iter().flatten() {
        let record = &records[i];
        outcomes[i] = Some(match webhook_plan {
            WebhookPlan::Apply(plan) => {
                let key = key_of(&record.provider, &plan.observation.provider_ref);
                let has_cashout = match plan.change {
                    CashoutChange::Nothing { id } => id.is_some(),
                    _ => true,
                };
                let cashout_id = match (has_cashout, ids.get(&key)) {
                    (false, _) => None,
                    (true, Some(id)) => Some(*id),
                    (true, None) => {
                        return Err(TxError::Store(StoreError::Database(format!(
                            "the batch lost the id of cash-out {}/{}",
                            key.0, key.1
                        ))))
                    }
                };
                IngestOutcome::Accepted {
                    event_id: record.event_id.clone(),
                    applied: Applied {
                        transition: plan.transition,
                        status: plan.status,
                        status_fetch_queued: written.fetch_queued.contains(&i),
                        event_id: plan.event.event_id.to_string(),
                        missed_webhook: plan.missed_webhook,
                        cashout_id,
                    },
                }
            }
            WebhookPlan::Quarantine { reason, .. } => IngestOutcome::Quarantined {
                event_id: record.event_id.clone(),
                reason: reason.to_string(),
            },
            refused => outcome_without_writes(record, refused)?,
        });
    }
    outcomes
        .into_iter()
        .map(|outcome| {
            outcome.ok_or_else(|| {
                TxError::Store(StoreError::Database(
                    "a webhook of the batch was left without an outcome".to_string(),
                ))
            })
        })
        .collect()
}

/// The outcome of a duplicate or a replay (which write nothing).
fn outcome_without_writes(
    record: &WebhookRecord,
    plan: WebhookPlan<'_>,
) -> TxResult<IngestOutcome> {
    match plan {
        WebhookPlan::Duplicate { event_id } => Ok(IngestOutcome::Duplicate { event_id }),
        WebhookPlan::Replayed => Ok(IngestOutcome::Replayed),
        WebhookPlan::Quarantine { .. } | WebhookPlan::Apply(_) => {
            Err(TxError::Store(StoreError::Database(format!(
                "the webhook {} was admitted after its admission was refused",
                record.event_id
            ))))
        }
    }
}

/// What the writes returned that the outcomes report.
struct Written {
    /// The ids of the cash-outs the batch inserted.
    inserted: HashMap<CashoutKey, i64>,
    /// The webhooks (indexes) whose status fetch was queued.
    fetch_queued: HashSet<usize>,
}

// Every insert below takes its rows in key order (`ORDER BY` the unique key it may wait
// on), whatever order the batch planned them in: two batches (two workers, two pools, two
// instances) creating the same new cash-outs, fetches, findings, events or nonces wait on
// each other's keys in one global order, so one waits for the other's `COMMIT` and runs
// again instead of both waiting until PostgreSQL's `deadlock_timeout` breaks the cycle.
pub(super) const INSERT_CASHOUTS: &str = "INSERT INTO cashouts (provider, provider_ref, external_id, status, held, provider_status,
                          reason_code, amount_minor, currency, fee_minor, created_at, provider_created_at,
                          provider_updated_at, first_seen_at, updated_at, completed_at, webhook_count,
                          recovered_by_poll, method, net_minor, book_changed_at)
     SELECT provider, provider_ref, external_id, status, held, provider_status, reason_code, amount_minor,
            currency, fee_minor, COALESCE(created_at, now), created_at, updated_at, now, now, completed_at,
            webhooks, recovered, method, net_minor, now
     FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BOOLEAN[], $6::TEXT[], $7::TEXT[],
                 $8::BIGINT[], $9::TEXT[], $10::BIGINT[], $11::BIGINT[], $12::BIGINT[], $13::BIGINT[],
                 $14::BIGINT[], $15::BIGINT[], $16::BIGINT[], $17::TEXT[], $18::BIGINT[])
          AS u(provider, provider_ref, external_id, status, held, provider_status, reason_code, amount_minor,
               currency, fee_minor, created_at, updated_at, completed_at, now, webhooks, recovered, method,
               net_minor)
     ORDER BY provider, provider_ref
     ON CONFLICT (provider, provider_ref) DO NOTHING
     RETURNING id, provider, provider_ref";

pub(super) const LINK_EARLIER_EVENTS: &str = "UPDATE events e SET cashout_id = c.id
     FROM unnest($1::TEXT[], $2::TEXT[]) AS u(provider, provider_ref)
     JOIN cashouts c ON c.provider = u.provider AND c.provider_ref = u.provider_ref
     WHERE e.provider_ref = ANY($2) AND e.cashout_id IS NULL
       AND e.provider = u.provider AND e.provider_ref = u.provider_ref";

// The updates find their rows through the `(provider, provider_ref)` index (the `ANY`
// conditions), whatever plan the prepared statement caches.
pub(super) const ADVANCE_CASHOUTS: &str = "UPDATE cashouts c SET status = u.status, held = u.held,
        provider_status = u.provider_status, reason_code = u.reason_code,
        amount_minor = COALESCE(u.amount_minor, c.amount_minor), currency = COALESCE(u.currency, c.currency),
        fee_minor = COALESCE(u.fee_minor, c.fee_minor), external_id = COALESCE(c.external_id, u.external_id),
        provider_created_at = COALESCE(c.provider_created_at, u.created_at),
        created_at = COALESCE(c.provider_created_at, u.created_at, c.created_at),
        provider_updated_at = COALESCE(u.updated_at, c.provider_updated_at),
        completed_at = COALESCE(u.completed_at, c.completed_at),
        updated_at = u.now, webhook_count = c.webhook_count + u.webhooks,
        recovered_by_poll = c.recovered_by_poll + u.recovered,
        method = COALESCE(u.method, c.method), net_minor = COALESCE(u.net_minor, c.net_minor),
        conflict_status = NULL, book_changed_at = u.now
     FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BOOLEAN[], $5::TEXT[], $6::TEXT[], $7::BIGINT[],
                 $8::TEXT[], $9::BIGINT[], $10::TEXT[], $11::BIGINT[], $12::BIGINT[], $13::BIGINT[],
                 $14::BIGINT[], $15::BIGINT[], $16::BIGINT[], $17::TEXT[], $18::BIGINT[])
          AS u(provider, provider_ref, status, held, provider_status, reason_code, amount_minor, currency,
               fee_minor, external_id, created_at, updated_at, completed_at, now, webhooks, recovered, method,
               net_minor)
     WHERE c.provider = ANY($1) AND c.provider_ref = ANY($2)
       AND c.provider = u.provider AND c.provider_ref = u.provider_ref";

pub(super) const FILL_IN_CASHOUTS: &str = "UPDATE cashouts c SET
        amount_minor = COALESCE(c.amount_minor, u.amount_minor), currency = COALESCE(c.currency, u.currency),
        fee_minor = COALESCE(c.fee_minor, u.fee_minor), external_id = COALESCE(c.external_id, u.external_id),
        provider_created_at = COALESCE(c.provider_created_at, u.created_at),
        created_at = COALESCE(c.provider_created_at, u.created_at, c.created_at),
        webhook_count = c.webhook_count + u.webhooks,
        method = COALESCE(c.method, u.method), net_minor = COALESCE(c.net_minor, u.net_minor),
        conflict_status = CASE WHEN u.set_conflict THEN u.conflict_status ELSE c.conflict_status END,
        book_changed_at = u.now
     FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::BIGINT[], $6::TEXT[], $7::BIGINT[],
                 $8::BIGINT[], $9::TEXT[], $10::BIGINT[], $11::BOOLEAN[], $12::TEXT[], $13::BIGINT[])
          AS u(provider, provider_ref, amount_minor, currency, fee_minor, external_id, created_at, webhooks,
               method, net_minor, set_conflict, conflict_status, now)
     WHERE c.provider = ANY($1) AND c.provider_ref = ANY($2)
       AND c.provider = u.provider AND c.provider_ref = u.provider_ref";

/// Open findings are opened unless one of their kind is open (the partial unique index);
/// resolved ones never conflict with it (outside its predicate), so they are always kept.
pub(super) const OPEN_FINDINGS: &str = "INSERT INTO mismatches (kind, provider, subject, provider_ref, external_id, detail, opened_at,
                            resolved_at)
     SELECT kind, provider, provider_ref, provider_ref, external_id, detail, opened_at, resolved_at
     FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::BIGINT[], $7::BIGINT[])
          AS u(kind, provider, provider_ref, external_id, detail, opened_at, resolved_at)
     ORDER BY kind, provider, provider_ref
     ON CONFLICT (kind, provider, subject) WHERE resolved_at IS NULL DO NOTHING";

pub(super) const QUEUE_FETCHES: &str = "INSERT INTO status_fetch_queue (provider, provider_ref, reason, requested_at, next_attempt_at)
     SELECT provider, provider_ref, reason, at, at
     FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[]) AS u(provider, provider_ref, reason, at)
     ORDER BY provider, provider_ref
     ON CONFLICT (provider, provider_ref) DO NOTHING
     RETURNING provider, provider_ref";

pub(super) const CLAIM_NONCES: &str =
    "INSERT INTO replay_cache (provider, nonce, body_sha256, event_id, seen_at)
     SELECT provider, nonce, body_sha256, event_id, seen_at
     FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[])
          AS u(provider, nonce, body_sha256, event_id, seen_at)
     ORDER BY provider, nonce
     ON CONFLICT (provider, nonce) DO NOTHING
     RETURNING nonce";

/// The events with their cash-out's id and after-snapshot, read by key when the event has
/// a cash-out (after the round's writes, which come first in the pipeline).
pub(super) const INSERT_EVENTS: &str = "INSERT INTO events (event_id, provider, source, dedup_key, body_sha256, raw_body, headers,
                        secret_index, outcome, error, provider_ref, raw_status, reason_code, status, applied,
                        received_at, cashout_id, book_at, after_status, after_provider_status,
                        after_external_id, after_amount_minor, after_currency, after_fee_minor,
                        after_net_minor, after_created_at, after_updated_at, after_completed_at,
                        after_webhooks, after_recovered)
     SELECT u.event_id, u.provider, u.source, u.dedup_key, u.body_sha256, u.raw_body, u.headers,
            u.secret_index, u.outcome, u.error, u.provider_ref, u.raw_status, u.reason_code, u.status,
            u.applied, u.received_at, c.id, u.received_at, c.status, c.provider_status,
            c.external_id, c.amount_minor, c.currency, c.fee_minor, c.net_minor, c.created_at,
            c.updated_at, c.completed_at, c.webhook_count, c.recovered_by_poll
     FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::BYTEA[], $7::TEXT[],
                 $8::BIGINT[], $9::TEXT[], $10::TEXT[], $11::TEXT[], $12::TEXT[], $13::TEXT[],
                 $14::TEXT[], $15::BOOLEAN[], $16::BIGINT[], $17::BOOLEAN[])
          WITH ORDINALITY AS u(event_id, provider, source, dedup_key, body_sha256, raw_body, headers,
                               secret_index, outcome, error, provider_ref, raw_status, reason_code,
                               status, applied, received_at, has_cashout, row_number)
     LEFT JOIN LATERAL (SELECT * FROM cashouts
                        WHERE u.has_cashout AND cashouts.provider = u.provider
                          AND cashouts.provider_ref = u.provider_ref
                        LIMIT 1) c ON TRUE
     ORDER BY u.provider, u.dedup_key, u.row_number
     ON CONFLICT (provider, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
     RETURNING event_id";

/// One request of a pipeline: its rows (none for a statement without `RETURNING`).
type Request<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Row>, tokio_postgres::Error>> + Send + 'a>>;

/// One statement of a pipeline, with its parameters.
fn request<'a>(
    tx: &'a PgTransaction<'_>,
    statement: &'a Statement,
    params: Vec<&'a (dyn ToSql + Sync)>,
) -> Request<'a> {
    Box::pin(async move { tx.query(statement, &params).await })
}

/// Runs `requests` pipelined, each first polled in order: tokio-postgres sends them, and
/// the server executes them, in that order (a later one sees the earlier ones' writes).
/// Their rows, in the same order; the first error.
async fn pipelined(requests: Vec<Request<'_>>) -> Result<Vec<Vec<Row>>, tokio_postgres::Error> {
    let mut pending: Vec<Option<Request<'_>>> = requests.into_iter().map(Some).collect();
    let mut results: Vec<Vec<Row>> = pending.iter().map(|_| Vec::new()).collect();
    futures_util::future::poll_fn(|cx| {
        let mut done = true;
        for (slot, result) in pending.iter_mut().zip(results.iter_mut()) {
            if let Some(request) = slot {
                match request.as_mut().poll(cx) {
                    Poll::Ready(Ok(rows)) => {
                        *result = rows;
                        *slot = None;
                    }
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending => done = false,
                }
            }
        }
        if done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await?;
    Ok(results)
}

/// What one pipelined request is, to read its answer.
enum Sent {
    /// A round's new cash-outs (this many).
    Cashouts(usize),
    /// A round's fetches.
    Fetches(usize),
    /// A round's events (this many).
    Events(usize),
    /// The nonces (this many).
    Nonces(usize),
    Other,
}

/// The writes of one round, as arrays.
#[derive(Default)]
struct RoundRows<'a> {
    inserts: CashoutRows<'a>,
    links: (Vec<&'a str>, Vec<&'a str>),
    advances: CashoutRows<'a>,
    fill_ins: FillInRows<'a>,
    findings: FindingRows<'a>,
    fetches: FetchRows<'a>,
    events: EventRows<'a>,
}

/// Step 3: every round's writes in one pipelined round trip (round by round, each
/// round's cash-outs before its events), the nonces last; then the checks that the unique
/// keys took every claim.
async fn write_rounds<'a>(
    tx: &PgTransaction<'_>,
    records: &'a [WebhookRecord],
    rounds: &'a [Vec<(usize, WebhookPlan<'a>)>],
    nonce_claims: &[usize],
) -> TxResult<Written> {
    let mut bounded_fetches = Vec::new();
    let mut round_rows: Vec<RoundRows<'a>> = Vec::with_capacity(rounds.len());
    for plans in rounds {
        let mut rows = RoundRows::default();
        for (i, webhook_plan) in plans {
            let record = &records[*i];
            let provider = record.provider.as_str();
            match webhook_plan {
                WebhookPlan::Apply(plan) => {
                    let observation = plan.observation;
                    let has_cashout = match &plan.change {
                        CashoutChange::Nothing { id } => id.is_some(),
                        CashoutChange::Insert {
                            link_earlier_events,
                            ..
                        } => {
                            rows.inserts.push(provider, plan);
                            if *link_earlier_events {
                                rows.links.0.push(provider);
                                rows.links.1.push(observation.provider_ref.as_str());
                            }
                            true
                        }
                        CashoutChange::Advance { .. } => {
                            rows.advances.push(provider, plan);
                            true
                        }
                        CashoutChange::FillIn { .. } => {
                            rows.fill_ins.push(provider, plan);
                            true
                        }
                    };
                    for finding in &plan.findings {
                        let findings = &mut rows.findings;
                        findings.kind.push(finding.kind.as_str());
                        findings.provider.push(provider);
                        findings
                            .provider_ref
                            .push(observation.provider_ref.as_str());
                        findings
                            .external_id
                            .push(observation.external_id.as_deref());
                        findings.detail.push(finding.detail.as_str());
                        findings.opened_at.push(plan.event.received_at);
                        findings
                            .resolved_at
                            .push(finding.resolved.then_some(plan.event.received_at));
                    }
                    for fetch in &plan.fetches {
                        match fetch.max_pending {
                            None => {
                                let fetches = &mut rows.fetches;
                                fetches.provider.push(provider);
                                fetches.provider_ref.push(observation.provider_ref.as_str());
                                fetches.reason.push(fetch.reason.as_str());
                                fetches.at.push(plan.event.received_at);
                                fetches.webhook.push(*i);
                            }
                            Some(max_pending) => bounded_fetches.push((
                                *i,
                                fetch.reason,
                                max_pending,
                                observation.provider_ref.as_str(),
                                plan.event.received_at,
                            )),
                        }
                    }
                    rows.events.push(record, &plan.event, has_cashout);
                }
                WebhookPlan::Quarantine { event, .. } => rows.events.push(record, event, false),
                WebhookPlan::Duplicate { .. } | WebhookPlan::Replayed => {}
            }
        }
        round_rows.push(rows);
    }
    let mut nonces = NonceRows::default();
    for &i in nonce_claims {
        let record = &records[i];
        if let Some(nonce) = &record.nonce {
            nonces.provider.push(record.provider.as_str());
            nonces.nonce.push(nonce.as_str());
            nonces.body_sha256.push(record.body_sha256.as_str());
            nonces.event_id.push(record.event_id.as_str());
            nonces.seen_at.push(to_millis(record.received_at));
        }
    }

    let [insert_sql, link_sql, advance_sql, fill_in_sql, findings_sql, fetches_sql, nonces_sql, events_sql] =
        prepared(
            tx,
            [
                INSERT_CASHOUTS,
                LINK_EARLIER_EVENTS,
                ADVANCE_CASHOUTS,
                FILL_IN_CASHOUTS,
                OPEN_FINDINGS,
                QUEUE_FETCHES,
                CLAIM_NONCES,
                INSERT_EVENTS,
            ],
        )
        .await?;
    let mut requests: Vec<Request<'_>> = Vec::new();
    let mut sent = Vec::new();
    for (round, rows) in round_rows.iter().enumerate() {
        let r = &rows.inserts;
        if !r.provider.is_empty() {
            sent.push(Sent::Cashouts(r.provider.len()));
            requests.push(request(
                tx,
                &insert_sql,
                vec![
                    &r.provider,
                    &r.provider_ref,
                    &r.external_id,
                    &r.status,
                    &r.held,
                    &r.provider_status,
                    &r.reason_code,
                    &r.amount_minor,
                    &r.currency,
                    &r.fee_minor,
                    &r.created_at,
                    &r.updated_at,
                    &r.completed_at,
                    &r.now,
                    &r.webhooks,
                    &r.recovered,
                    &r.method,
                    &r.net_minor,
                ],
            ));
        }
        let links = &rows.links;
        if !links.0.is_empty() {
            sent.push(Sent::Other);
            requests.push(request(tx, &link_sql, vec![&links.0, &links.1]));
        }
        let a = &rows.advances;
        if !a.provider.is_empty() {
            sent.push(Sent::Other);
            requests.push(request(
                tx,
                &advance_sql,
                vec![
                    &a.provider,
                    &a.provider_ref,
                    &a.status,
                    &a.held,
                    &a.provider_status,
                    &a.reason_code,
                    &a.amount_minor,
                    &a.currency,
                    &a.fee_minor,
                    &a.external_id,
                    &a.created_at,
                    &a.updated_at,
                    &a.completed_at,
                    &a.now,
                    &a.webhooks,
                    &a.recovered,
                    &a.method,
                    &a.net_minor,
                ],
            ));
        }
        let f = &rows.fill_ins;
        if !f.provider.is_empty() {
            sent.push(Sent::Other);
            requests.push(request(
                tx,
                &fill_in_sql,
                vec![
                    &f.provider,
                    &f.provider_ref,
                    &f.amount_minor,
                    &f.currency,
                    &f.fee_minor,
                    &f.external_id,
                    &f.created_at,
                    &f.webhooks,
                    &f.method,
                    &f.net_minor,
                    &f.set_conflict,
                    &f.conflict_status,
                    &f.now,
                ],
            ));
        }
        let findings = &rows.findings;
        if !findings.kind.is_empty() {
            sent.push(Sent::Other);
            requests.push(request(
                tx,
                &findings_sql,
                vec![
                    &findings.kind,
                    &findings.provider,
                    &findings.provider_ref,
                    &findings.external_id,
                    &findings.detail,
                    &findings.opened_at,
                    &findings.resolved_at,
                ],
            ));
        }
        let fetches = &rows.fetches;
        if !fetches.provider.is_empty() {
            sent.push(Sent::Fetches(round));
            requests.push(request(
                tx,
                &fetches_sql,
                vec![
                    &fetches.provider,
                    &fetches.provider_ref,
                    &fetches.reason,
                    &fetches.at,
                ],
            ));
        }
        let e = &rows.events;
        if !e.event_id.is_empty() {
            sent.push(Sent::Events(e.event_id.len()));
            requests.push(request(
                tx,
                &events_sql,
                vec![
                    &e.event_id,
                    &e.provider,
                    &e.source,
                    &e.dedup_key,
                    &e.body_sha256,
                    &e.raw_body,
                    &e.headers,
                    &e.secret_index,
                    &e.outcome,
                    &e.error,
                    &e.provider_ref,
                    &e.raw_status,
                    &e.reason_code,
                    &e.status,
                    &e.applied,
                    &e.received_at,
                    &e.has_cashout,
                ],
            ));
        }
    }
    if !nonces.provider.is_empty() {
        sent.push(Sent::Nonces(nonces.nonce.len()));
        requests.push(request(
            tx,
            &nonces_sql,
            vec![
                &nonces.provider,
                &nonces.nonce,
                &nonces.body_sha256,
                &nonces.event_id,
                &nonces.seen_at,
            ],
        ));
    }

    let answers = pipelined(requests).await?;
    let mut written = Written {
        inserted: HashMap::new(),
        fetch_queued: HashSet::new(),
    };
    for (what, rows) in sent.into_iter().zip(answers) {
        match what {
            Sent::Cashouts(expected) => {
                if rows.len() != expected {
                    return Err(TxError::Retry(format!(
                        "{} of {expected} new cash-outs were inserted concurrently",
                        expected - rows.len()
                    )));
                }
                for row in rows {
                    written
                        .inserted
                        .insert((row.try_get(1)?, row.try_get(2)?), row.try_get(0)?);
                }
            }
            Sent::Events(expected) => {
                if rows.len() != expected {
                    return Err(TxError::Retry(format!(
                        "{} of {expected} webhooks' dedup keys were taken by concurrent deliveries",
                        expected - rows.len()
                    )));
                }
            }
            Sent::Nonces(expected) => {
                if rows.len() != expected {
                    return Err(TxError::Retry(format!(
                        "{} of {expected} nonces were taken by concurrent deliveries",
                        expected - rows.len()
                    )));
                }
            }
            Sent::Fetches(round) => {
                let mut queued = HashSet::new();
                for row in rows {
                    queued.insert((row.try_get::<_, String>(0)?, row.try_get::<_, String>(1)?));
                }
                let fetches = &round_rows[round].fetches;
                for (i, key) in fetches
                    .webhook
                    .iter()
                    .zip(fetches.provider.iter().zip(&fetches.provider_ref))
                {
                    if queued.contains(&key_of(key.0, key.1)) {
                        written.fetch_queued.insert(*i);
                    }
                }
            }
            Sent::Other => {}
        }
    }
    // A bounded fetch counts the provider's queue first: one at a time, after the rest
    // (none of a webhook's plans has one today).
    for (i, reason, max_pending, provider_ref, at) in bounded_fetches {
        if queue_status_fetch(
            tx,
            &records[i].provider,
            provider_ref,
            reason,
            max_pending,
            at,
        )
        .await?
        {
            written.fetch_queued.insert(i);
        }
    }
    Ok(written)
}

/// The cash-outs of a round that are inserted, or advanced, as arrays (one of each per
/// round: the two statements take the same columns).
#[derive(Default)]
struct CashoutRows<'a> {
    provider: Vec<&'a str>,
    provider_ref: Vec<&'a str>,
    external_id: Vec<Option<&'a str>>,
    status: Vec<&'static str>,
    held: Vec<bool>,
    provider_status: Vec<Option<&'a str>>,
    reason_code: Vec<Option<&'a str>>,
    amount_minor: Vec<Option<i64>>,
    currency: Vec<Option<&'static str>>,
    fee_minor: Vec<Option<i64>>,
    created_at: Vec<Option<i64>>,
    updated_at: Vec<Option<i64>>,
    completed_at: Vec<Option<i64>>,
    now: Vec<i64>,
    webhooks: Vec<i64>,
    recovered: Vec<i64>,
    method: Vec<Option<&'a str>>,
    net_minor: Vec<Option<i64>>,
}

impl<'a> CashoutRows<'a> {
    /// Adds the cash-out `plan` inserts or advances (nothing for another change). A new
    /// cash-out takes the external id the plan gives it, an advanced one the report's.
    fn push(&mut self, provider: &'a str, plan: &'a plan::ObservationPlan<'a>) {
        let observation = plan.observation;
        let (external_id, state, completed_at, webhook, recovered) = match &plan.change {
            CashoutChange::Insert {
                external_id,
                state,
                completed_at,
                webhook,
                recovered,
                ..
            } => (
                external_id.as_deref(),
                state,
                completed_at,
                webhook,
                recovered,
            ),
            CashoutChange::Advance {
                state,
                completed_at,
                webhook,
                recovered,
                ..
            } => (
                observation.external_id.as_deref(),
                state,
                completed_at,
                webhook,
                recovered,
            ),
            CashoutChange::Nothing { .. } | CashoutChange::FillIn { .. } => return,
        };
        self.provider.push(provider);
        self.provider_ref.push(observation.provider_ref.as_str());
        self.external_id.push(external_id);
        self.status.push(state.status.as_str());
        self.held.push(state.held);
        self.provider_status.push(observation.raw_status.as_deref());
        self.reason_code.push(observation.reason_code.as_deref());
        self.amount_minor.push(observation.amount.map(|m| m.minor));
        self.currency
            .push(observation.amount.map(|m| m.currency.code()));
        self.fee_minor.push(observation.fee_minor);
        self.created_at.push(observation.created_at.map(to_millis));
        self.updated_at.push(observation.updated_at.map(to_millis));
        self.completed_at.push(*completed_at);
        self.now.push(plan.event.received_at);
        self.webhooks.push(i64::from(*webhook));
        self.recovered.push(i64::from(*recovered));
        self.method.push(observation.method.as_deref());
        self.net_minor.push(observation.net_minor);
    }
}

#[derive(Default)]
struct FillInRows<'a> {
    provider: Vec<&'a str>,
    provider_ref: Vec<&'a str>,
    amount_minor: Vec<Option<i64>>,
    currency: Vec<Option<&'static str>>,
    fee_minor: Vec<Option<i64>>,
    external_id: Vec<Option<&'a str>>,
    created_at: Vec<Option<i64>>,
    webhooks: Vec<i64>,
    method: Vec<Option<&'a str>>,
    net_minor: Vec<Option<i64>>,
    set_conflict: Vec<bool>,
    conflict_status: Vec<Option<&'static str>>,
    now: Vec<i64>,
}

impl<'a> FillInRows<'a> {
    fn push(&mut self, provider: &'a str, plan: &'a plan::ObservationPlan<'a>) {
        let CashoutChange::FillIn {
            webhook, conflict, ..
        } = plan.change
        else {
            return;
        };
        let observation = plan.observation;
        let (set_conflict, conflict_status) = match conflict {
            ConflictMark::Set(reported) => (true, Some(reported.as_str())),
            ConflictMark::Clear => (true, None),
            ConflictMark::Keep => (false, None),
        };
        self.provider.push(provider);
        self.provider_ref.push(observation.provider_ref.as_str());
        self.amount_minor.push(observation.amount.map(|m| m.minor));
        self.currency
            .push(observation.amount.map(|m| m.currency.code()));
        self.fee_minor.push(observation.fee_minor);
        self.external_id.push(observation.external_id.as_deref());
        self.created_at.push(observation.created_at.map(to_millis));
        self.webhooks.push(i64::from(webhook));
        self.method.push(observation.method.as_deref());
        self.net_minor.push(observation.net_minor);
        self.set_conflict.push(set_conflict);
        self.conflict_status.push(conflict_status);
        self.now.push(plan.event.received_at);
    }
}

#[derive(Default)]
struct FindingRows<'a> {
    kind: Vec<&'static str>,
    provider: Vec<&'a str>,
    provider_ref: Vec<&'a str>,
    external_id: Vec<Option<&'a str>>,
    detail: Vec<&'a str>,
    opened_at: Vec<i64>,
    resolved_at: Vec<Option<i64>>,
}

#[derive(Default)]
struct FetchRows<'a> {
    provider: Vec<&'a str>,
    provider_ref: Vec<&'a str>,
    reason: Vec<&'static str>,
    at: Vec<i64>,
    /// The webhook (index) each row is for.
    webhook: Vec<usize>,
}

#[derive(Default)]
struct NonceRows<'a> {
    provider: Vec<&'a str>,
    nonce: Vec<&'a str>,
    body_sha256: Vec<&'a str>,
    event_id: Vec<&'a str>,
    seen_at: Vec<i64>,
}

#[derive(Default)]
struct EventRows<'a> {
    event_id: Vec<&'a str>,
    provider: Vec<&'a str>,
    source: Vec<&'static str>,
    dedup_key: Vec<Option<&'a str>>,
    body_sha256: Vec<Option<&'a str>>,
    raw_body: Vec<Option<&'a [u8]>>,
    headers: Vec<Option<&'a str>>,
    secret_index: Vec<Option<i64>>,
    outcome: Vec<&'static str>,
    error: Vec<Option<&'a str>>,
    provider_ref: Vec<Option<&'a str>>,
    raw_status: Vec<Option<&'a str>>,
    reason_code: Vec<Option<&'a str>>,
    status: Vec<Option<&'static str>>,
    applied: Vec<bool>,
    received_at: Vec<i64>,
    /// The event's cash-out exists (read by key: it may be this batch's).
    has_cashout: Vec<bool>,
}

impl<'a> EventRows<'a> {
    /// The plan's event, with the delivery's columns (as the single transaction writes it).
    fn push(&mut self, record: &'a WebhookRecord, event: &NewEvent<'a>, has_cashout: bool) {
        let observation = event.observation;
        let delivery = event.delivery;
        self.event_id.push(event.event_id);
        self.provider.push(record.provider.as_str());
        self.source.push(event.source.as_str());
        self.dedup_key.push(delivery.map(|d| d.dedup_key.as_str()));
        self.body_sha256
            .push(delivery.map(|d| d.body_sha256.as_str()));
        self.raw_body.push(delivery.map(|d| d.raw_body.as_slice()));
        self.headers.push(delivery.map(|d| d.headers_json.as_str()));
        self.secret_index
            .push(delivery.map(|d| i64::try_from(d.secret_index).unwrap_or(i64::MAX)));
        self.outcome.push(event.outcome.as_str());
        self.error.push(event.error);
        self.provider_ref
            .push(observation.map(|o| o.provider_ref.as_str()));
        self.raw_status
            .push(observation.and_then(|o| o.raw_status.as_deref()));
        self.reason_code
            .push(observation.and_then(|o| o.reason_code.as_deref()));
        self.status.push(event.status.map(CashoutStatus::as_str));
        self.applied.push(event.applied);
        self.received_at.push(event.received_at);
        self.has_cashout.push(has_cashout);
    }
}
