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
//!    snapshot reads the round's updates).
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
use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_postgres::Statement;

use super::claims::stored;
use super::ingest::{queue_status_fetch, TxError, TxResult, TX_ATTEMPTS};
use super::{cached, PgStore, PgTransaction};
use crate::ingest::plan::{
    self, Admission, CashoutChange, ConflictMark, Loaded, NewEvent, NonceClaim, PriorDelivery,
    StoredCashout, WebhookLoaded, WebhookPlan,
};
use crate::ingest::{Applied, IngestOutcome, WebhookRecord};
use crate::state::CashoutStatus;
use crate::store::{to_millis, StoreError};

/// At most this many webhooks in one transaction (the SQLite writer's `max_batch`).
pub const MAX_BATCH: usize = 64;

/// Batches of one pool in flight at once: while one commits, the next is gathered and
/// loaded on another connection.
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
        for _ in 0..BATCH_WORKERS {
            tokio::spawn(work(store.clone(), Arc::clone(&queue)));
        }
        Batcher { jobs }
    }
}

/// Takes the webhooks waiting (at most [`MAX_BATCH`]), commits them, answers each.
async fn work(store: PgStore, queue: Arc<Mutex<mpsc::Receiver<Job>>>) {
    loop {
        let jobs = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
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
        let answers = store.ingest_webhooks(records).await;
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
        let mut answers = Vec::with_capacity(records.len());
        for run in runs_without_shared_claims(records) {
            answers.extend(self.commit_run(run).await);
        }
        answers
    }

    /// One transaction for `records` (no two share a claim), again on a conflict; one by
    /// one when it fails otherwise.
    async fn commit_run(&self, records: Vec<WebhookRecord>) -> Vec<Answer> {
        let mut last = String::new();
        for attempt in 1..=TX_ATTEMPTS {
            match self.attempt_run(&records).await {
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

    async fn attempt_run(&self, records: &[WebhookRecord]) -> TxResult<Vec<IngestOutcome>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let outcomes = ingest_run(&tx, records).await?;
        tx.commit().await?;
        Ok(outcomes)
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
const LOAD_PRIORS: &str = "SELECT k.i, e.event_id, e.body_sha256
     FROM unnest($1::TEXT[], $2::TEXT[]) WITH ORDINALITY AS k(provider, dedup_key, i)
     CROSS JOIN LATERAL (SELECT event_id, body_sha256 FROM events
                         WHERE events.provider = k.provider AND events.dedup_key = k.dedup_key
                           AND events.dedup_key IS NOT NULL
                         LIMIT 1) e";

const LOAD_NONCE_HOLDERS: &str = "SELECT k.i, r.event_id, r.body_sha256
     FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[]) AS k(provider, nonce, i)
     CROSS JOIN LATERAL (SELECT event_id, body_sha256 FROM replay_cache
                         WHERE replay_cache.provider = k.provider AND replay_cache.nonce = k.nonce
                         LIMIT 1) r";

/// Locked in the arrays' order (sorted by the caller: every batch locks in one order).
const LOCK_CASHOUTS: &str = "SELECT c.id, c.status, c.held, c.provider, c.provider_ref
     FROM unnest($1::TEXT[], $2::TEXT[]) WITH ORDINALITY AS k(provider, provider_ref, i)
     CROSS JOIN LATERAL (SELECT id, status, held, provider, provider_ref FROM cashouts
                         WHERE cashouts.provider = k.provider AND cashouts.provider_ref = k.provider_ref
                         FOR UPDATE) c
     ORDER BY k.i";

const LOAD_LEDGER: &str = "SELECT k.provider, k.provider_ref, l.external_id
     FROM unnest($1::TEXT[], $2::TEXT[]) AS k(provider, provider_ref)
     CROSS JOIN LATERAL (SELECT external_id FROM ledger
                         WHERE ledger.provider = k.provider AND ledger.provider_ref = k.provider_ref
                         LIMIT 2) l";

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
    let (prior_rows, holder_rows, cashout_rows, ledger_rows) = futures_util::try_join!(
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

    let mut state: HashMap<CashoutKey, StoredCashout> = std::mem::take(&mut loads.cashouts);
    let first_round_writes = !quarantined.is_empty() || !nonce_claims.is_empty();
    let rounds = groups
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(0)
        .max(usize::from(first_round_writes));
    for round in 0..rounds {
        let members: Vec<usize> = if round == 0 {
            quarantined.clone()
        } else {
            Vec::new()
        }
        .into_iter()
        .chain(groups.iter().filter_map(|group| group.get(round).copied()))
        .collect();
        let mut plans = Vec::with_capacity(members.len());
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
            }
            plans.push((i, plan::plan_webhook(record, webhook)));
        }
        let nonces: &[usize] = if round == 0 { &nonce_claims } else { &[] };
        let written = write_round(tx, records, &plans, nonces).await?;
        for (i, webhook_plan) in plans {
            let record = &records[i];
            outcomes[i] = Some(match webhook_plan {
                WebhookPlan::Apply(plan) => {
                    let key = key_of(&record.provider, &plan.observation.provider_ref);
                    let cashout_id = match &plan.change {
                        CashoutChange::Nothing { id } => *id,
                        CashoutChange::Insert { state: next, .. } => {
                            let id = written.inserted.get(&key).copied();
                            if let Some(id) = id {
                                state.insert(key.clone(), StoredCashout { id, state: *next });
                            }
                            id
                        }
                        CashoutChange::Advance { id, state: next, .. } => {
                            state.insert(
                                key.clone(),
                                StoredCashout {
                                    id: *id,
                                    state: *next,
                                },
                            );
                            Some(*id)
                        }
                        CashoutChange::FillIn { id, .. } => Some(*id),
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
fn outcome_without_writes(record: &WebhookRecord, plan: WebhookPlan<'_>) -> TxResult<IngestOutcome> {
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

/// What a round wrote that its outcomes report.
struct RoundWritten {
    /// The ids of the cash-outs it inserted.
    inserted: HashMap<CashoutKey, i64>,
    /// The webhooks (indexes) whose status fetch it queued.
    fetch_queued: HashSet<usize>,
}

const INSERT_CASHOUTS: &str = "INSERT INTO cashouts (provider, provider_ref, external_id, status, held, provider_status,
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
     ON CONFLICT (provider, provider_ref) DO NOTHING
     RETURNING id, provider, provider_ref";

const LINK_EARLIER_EVENTS: &str = "UPDATE events e SET cashout_id = u.id
     FROM unnest($1::BIGINT[], $2::TEXT[], $3::TEXT[]) AS u(id, provider, provider_ref)
     WHERE e.provider_ref = ANY($3) AND e.cashout_id IS NULL
       AND e.provider = u.provider AND e.provider_ref = u.provider_ref";

const ADVANCE_CASHOUTS: &str = "UPDATE cashouts c SET status = u.status, held = u.held,
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
     FROM unnest($1::BIGINT[], $2::TEXT[], $3::BOOLEAN[], $4::TEXT[], $5::TEXT[], $6::BIGINT[], $7::TEXT[],
                 $8::BIGINT[], $9::TEXT[], $10::BIGINT[], $11::BIGINT[], $12::BIGINT[], $13::BIGINT[],
                 $14::BIGINT[], $15::BIGINT[], $16::TEXT[], $17::BIGINT[])
          AS u(id, status, held, provider_status, reason_code, amount_minor, currency, fee_minor, external_id,
               created_at, updated_at, completed_at, now, webhooks, recovered, method, net_minor)
     WHERE c.id = ANY($1) AND c.id = u.id";

const FILL_IN_CASHOUTS: &str = "UPDATE cashouts c SET
        amount_minor = COALESCE(c.amount_minor, u.amount_minor), currency = COALESCE(c.currency, u.currency),
        fee_minor = COALESCE(c.fee_minor, u.fee_minor), external_id = COALESCE(c.external_id, u.external_id),
        provider_created_at = COALESCE(c.provider_created_at, u.created_at),
        created_at = COALESCE(c.provider_created_at, u.created_at, c.created_at),
        webhook_count = c.webhook_count + u.webhooks,
        method = COALESCE(c.method, u.method), net_minor = COALESCE(c.net_minor, u.net_minor),
        conflict_status = CASE WHEN u.set_conflict THEN u.conflict_status ELSE c.conflict_status END,
        book_changed_at = u.now
     FROM unnest($1::BIGINT[], $2::BIGINT[], $3::TEXT[], $4::BIGINT[], $5::TEXT[], $6::BIGINT[], $7::BIGINT[],
                 $8::TEXT[], $9::BIGINT[], $10::BOOLEAN[], $11::TEXT[], $12::BIGINT[])
          AS u(id, amount_minor, currency, fee_minor, external_id, created_at, webhooks, method, net_minor,
               set_conflict, conflict_status, now)
     WHERE c.id = ANY($1) AND c.id = u.id";

/// Open findings are opened unless one of their kind is open (the partial unique index);
/// resolved ones never conflict with it (outside its predicate), so they are always kept.
const OPEN_FINDINGS: &str = "INSERT INTO mismatches (kind, provider, subject, provider_ref, external_id, detail, opened_at,
                            resolved_at)
     SELECT kind, provider, provider_ref, provider_ref, external_id, detail, opened_at, resolved_at
     FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::BIGINT[], $7::BIGINT[])
          AS u(kind, provider, provider_ref, external_id, detail, opened_at, resolved_at)
     ON CONFLICT (kind, provider, subject) WHERE resolved_at IS NULL DO NOTHING";

const QUEUE_FETCHES: &str = "INSERT INTO status_fetch_queue (provider, provider_ref, reason, requested_at, next_attempt_at)
     SELECT provider, provider_ref, reason, at, at
     FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[]) AS u(provider, provider_ref, reason, at)
     ON CONFLICT (provider, provider_ref) DO NOTHING
     RETURNING provider, provider_ref";

const CLAIM_NONCES: &str = "INSERT INTO replay_cache (provider, nonce, body_sha256, event_id, seen_at)
     SELECT provider, nonce, body_sha256, event_id, seen_at
     FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[])
          AS u(provider, nonce, body_sha256, event_id, seen_at)
     ON CONFLICT (provider, nonce) DO NOTHING
     RETURNING nonce";

const INSERT_EVENTS: &str = "INSERT INTO events (event_id, provider, source, dedup_key, body_sha256, raw_body, headers,
                        secret_index, outcome, error, provider_ref, raw_status, reason_code, status, applied,
                        received_at, cashout_id, book_at, after_status, after_provider_status,
                        after_external_id, after_amount_minor, after_currency, after_fee_minor,
                        after_net_minor, after_created_at, after_updated_at, after_completed_at,
                        after_webhooks, after_recovered)
     SELECT u.event_id, u.provider, u.source, u.dedup_key, u.body_sha256, u.raw_body, u.headers,
            u.secret_index, u.outcome, u.error, u.provider_ref, u.raw_status, u.reason_code, u.status,
            u.applied, u.received_at, u.cashout_id, u.received_at, c.status, c.provider_status,
            c.external_id, c.amount_minor, c.currency, c.fee_minor, c.net_minor, c.created_at,
            c.updated_at, c.completed_at, c.webhook_count, c.recovered_by_poll
     FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::BYTEA[], $7::TEXT[],
                 $8::BIGINT[], $9::TEXT[], $10::TEXT[], $11::TEXT[], $12::TEXT[], $13::TEXT[],
                 $14::TEXT[], $15::BOOLEAN[], $16::BIGINT[], $17::BIGINT[])
          WITH ORDINALITY AS u(event_id, provider, source, dedup_key, body_sha256, raw_body, headers,
                               secret_index, outcome, error, provider_ref, raw_status, reason_code,
                               status, applied, received_at, cashout_id, row_number)
     LEFT JOIN LATERAL (SELECT * FROM cashouts WHERE cashouts.id = u.cashout_id LIMIT 1) c ON TRUE
     ORDER BY u.row_number
     ON CONFLICT (provider, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
     RETURNING event_id";

/// Step 3 for one round: new cash-outs (one round trip, for their ids), then the rest in
/// one pipelined round trip. `plans` hold at most one webhook per cash-out.
async fn write_round(
    tx: &PgTransaction<'_>,
    records: &[WebhookRecord],
    plans: &[(usize, WebhookPlan<'_>)],
    nonce_claims: &[usize],
) -> TxResult<RoundWritten> {
    let inserted = insert_cashouts(tx, records, plans).await?;
    let cashout_id = |i: usize, change: &CashoutChange| -> Option<i64> {
        match change {
            CashoutChange::Insert { .. } => match &records[i].parsed {
                Ok(observation) => inserted
                    .get(&key_of(&records[i].provider, &observation.provider_ref))
                    .copied(),
                Err(_) => None,
            },
            other => other.existing_id(),
        }
    };

    let mut links = (Vec::new(), Vec::new(), Vec::new());
    let mut advances = AdvanceRows::default();
    let mut fill_ins = FillInRows::default();
    let mut findings = FindingRows::default();
    let mut fetches = FetchRows::default();
    let mut bounded_fetches = Vec::new();
    let mut events = EventRows::default();
    for (i, webhook_plan) in plans {
        let record = &records[*i];
        match webhook_plan {
            WebhookPlan::Apply(plan) => {
                let observation = plan.observation;
                let id = cashout_id(*i, &plan.change);
                match &plan.change {
                    CashoutChange::Nothing { .. } => {}
                    CashoutChange::Insert {
                        link_earlier_events,
                        ..
                    } => {
                        if let (true, Some(id)) = (*link_earlier_events, id) {
                            links.0.push(id);
                            links.1.push(record.provider.as_str());
                            links.2.push(observation.provider_ref.as_str());
                        }
                    }
                    CashoutChange::Advance {
                        id,
                        state,
                        completed_at,
                        webhook,
                        recovered,
                    } => advances.push(
                        *id,
                        state.status,
                        state.held,
                        *completed_at,
                        *webhook,
                        *recovered,
                        plan,
                    ),
                    CashoutChange::FillIn {
                        id,
                        webhook,
                        conflict,
                    } => fill_ins.push(*id, *webhook, *conflict, plan),
                }
                for finding in &plan.findings {
                    findings.kind.push(finding.kind.as_str());
                    findings.provider.push(record.provider.as_str());
                    findings.provider_ref.push(observation.provider_ref.as_str());
                    findings.external_id.push(observation.external_id.as_deref());
                    findings.detail.push(finding.detail.as_str());
                    findings.opened_at.push(plan.event.received_at);
                    findings
                        .resolved_at
                        .push(finding.resolved.then_some(plan.event.received_at));
                }
                for fetch in &plan.fetches {
                    match fetch.max_pending {
                        None => {
                            fetches.provider.push(record.provider.as_str());
                            fetches.provider_ref.push(observation.provider_ref.as_str());
                            fetches.reason.push(fetch.reason.as_str());
                            fetches.at.push(plan.event.received_at);
                            fetches.webhook.push(*i);
                        }
                        Some(max_pending) => {
                            bounded_fetches.push((*i, fetch.reason, max_pending, plan))
                        }
                    }
                }
                events.push(record, &plan.event, id);
            }
            WebhookPlan::Quarantine { event, .. } => events.push(record, event, None),
            WebhookPlan::Duplicate { .. } | WebhookPlan::Replayed => {}
        }
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

    // Prepared first: the statements below are then sent in the order they are first
    // polled (tokio-postgres' pipelining), so the events' snapshots read the updates.
    let [link_sql, advance_sql, fill_in_sql, findings_sql, fetches_sql, nonces_sql, events_sql] =
        prepared(
            tx,
            [
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
    let a = &advances;
    let f = &fill_ins;
    let e = &events;
    let (_, _, _, _, fetch_rows, nonce_rows, event_rows) = futures_util::try_join!(
        async {
            if links.0.is_empty() {
                return Ok(0);
            }
            tx.execute(&link_sql, &[&links.0, &links.1, &links.2]).await
        },
        async {
            if a.id.is_empty() {
                return Ok(0);
            }
            tx.execute(
                &advance_sql,
                &[
                    &a.id,
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
            )
            .await
        },
        async {
            if f.id.is_empty() {
                return Ok(0);
            }
            tx.execute(
                &fill_in_sql,
                &[
                    &f.id,
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
            )
            .await
        },
        async {
            if findings.kind.is_empty() {
                return Ok(0);
            }
            tx.execute(
                &findings_sql,
                &[
                    &findings.kind,
                    &findings.provider,
                    &findings.provider_ref,
                    &findings.external_id,
                    &findings.detail,
                    &findings.opened_at,
                    &findings.resolved_at,
                ],
            )
            .await
        },
        async {
            if fetches.provider.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(
                &fetches_sql,
                &[
                    &fetches.provider,
                    &fetches.provider_ref,
                    &fetches.reason,
                    &fetches.at,
                ],
            )
            .await
        },
        async {
            if nonces.provider.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(
                &nonces_sql,
                &[
                    &nonces.provider,
                    &nonces.nonce,
                    &nonces.body_sha256,
                    &nonces.event_id,
                    &nonces.seen_at,
                ],
            )
            .await
        },
        async {
            if e.event_id.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(
                &events_sql,
                &[
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
                    &e.cashout_id,
                ],
            )
            .await
        },
    )?;
    if event_rows.len() != events.event_id.len() {
        return Err(TxError::Retry(format!(
            "{} of {} webhooks' dedup keys were taken by concurrent deliveries",
            events.event_id.len() - event_rows.len(),
            events.event_id.len()
        )));
    }
    if nonce_rows.len() != nonces.nonce.len() {
        return Err(TxError::Retry(format!(
            "{} of {} nonces were taken by concurrent deliveries",
            nonces.nonce.len() - nonce_rows.len(),
            nonces.nonce.len()
        )));
    }
    let mut queued_keys = HashSet::new();
    for row in fetch_rows {
        queued_keys.insert((row.try_get::<_, String>(0)?, row.try_get::<_, String>(1)?));
    }
    let mut fetch_queued: HashSet<usize> = fetches
        .webhook
        .iter()
        .zip(fetches.provider.iter().zip(&fetches.provider_ref))
        .filter(|(_, (provider, provider_ref))| {
            queued_keys.contains(&key_of(provider, provider_ref))
        })
        .map(|(i, _)| *i)
        .collect();
    // A bounded fetch counts the provider's queue first: one at a time (none of a
    // webhook's plan has one today).
    for (i, reason, max_pending, plan) in bounded_fetches {
        let record = &records[i];
        if queue_status_fetch(
            tx,
            &record.provider,
            &plan.observation.provider_ref,
            reason,
            max_pending,
            plan.event.received_at,
        )
        .await?
        {
            fetch_queued.insert(i);
        }
    }
    Ok(RoundWritten {
        inserted,
        fetch_queued,
    })
}

/// The round's new cash-outs, in key order; their ids. A cash-out another instance
/// inserted since the load retries the batch (judged again against that row).
async fn insert_cashouts(
    tx: &PgTransaction<'_>,
    records: &[WebhookRecord],
    plans: &[(usize, WebhookPlan<'_>)],
) -> TxResult<HashMap<CashoutKey, i64>> {
    let mut new = Vec::new();
    for (i, webhook_plan) in plans {
        if let WebhookPlan::Apply(plan) = webhook_plan {
            if let CashoutChange::Insert { .. } = plan.change {
                new.push((records[*i].provider.as_str(), plan));
            }
        }
    }
    if new.is_empty() {
        return Ok(HashMap::new());
    }
    new.sort_by(|a, b| (a.0, &a.1.observation.provider_ref).cmp(&(b.0, &b.1.observation.provider_ref)));
    let mut rows = InsertRows::default();
    for (provider, plan) in &new {
        if let CashoutChange::Insert {
            external_id,
            state,
            completed_at,
            webhook,
            recovered,
            ..
        } = &plan.change
        {
            let observation = plan.observation;
            rows.provider.push(*provider);
            rows.provider_ref.push(observation.provider_ref.as_str());
            rows.external_id.push(external_id.as_deref());
            rows.status.push(state.status.as_str());
            rows.held.push(state.held);
            rows.provider_status.push(observation.raw_status.as_deref());
            rows.reason_code.push(observation.reason_code.as_deref());
            rows.amount_minor.push(observation.amount.map(|m| m.minor));
            rows.currency.push(observation.amount.map(|m| m.currency.code()));
            rows.fee_minor.push(observation.fee_minor);
            rows.created_at.push(observation.created_at.map(to_millis));
            rows.updated_at.push(observation.updated_at.map(to_millis));
            rows.completed_at.push(*completed_at);
            rows.now.push(plan.event.received_at);
            rows.webhooks.push(i64::from(*webhook));
            rows.recovered.push(i64::from(*recovered));
            rows.method.push(observation.method.as_deref());
            rows.net_minor.push(observation.net_minor);
        }
    }
    let statement = cached(tx, INSERT_CASHOUTS).await?;
    let returned = tx
        .query(
            &statement,
            &[
                &rows.provider,
                &rows.provider_ref,
                &rows.external_id,
                &rows.status,
                &rows.held,
                &rows.provider_status,
                &rows.reason_code,
                &rows.amount_minor,
                &rows.currency,
                &rows.fee_minor,
                &rows.created_at,
                &rows.updated_at,
                &rows.completed_at,
                &rows.now,
                &rows.webhooks,
                &rows.recovered,
                &rows.method,
                &rows.net_minor,
            ],
        )
        .await?;
    let mut ids = HashMap::with_capacity(returned.len());
    for row in returned {
        ids.insert((row.try_get(1)?, row.try_get(2)?), row.try_get(0)?);
    }
    if ids.len() != new.len() {
        return Err(TxError::Retry(format!(
            "{} of {} new cash-outs were inserted concurrently",
            new.len() - ids.len(),
            new.len()
        )));
    }
    Ok(ids)
}

#[derive(Default)]
struct InsertRows<'a> {
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

#[derive(Default)]
struct AdvanceRows<'a> {
    id: Vec<i64>,
    status: Vec<&'static str>,
    held: Vec<bool>,
    provider_status: Vec<Option<&'a str>>,
    reason_code: Vec<Option<&'a str>>,
    amount_minor: Vec<Option<i64>>,
    currency: Vec<Option<&'static str>>,
    fee_minor: Vec<Option<i64>>,
    external_id: Vec<Option<&'a str>>,
    created_at: Vec<Option<i64>>,
    updated_at: Vec<Option<i64>>,
    completed_at: Vec<Option<i64>>,
    now: Vec<i64>,
    webhooks: Vec<i64>,
    recovered: Vec<i64>,
    method: Vec<Option<&'a str>>,
    net_minor: Vec<Option<i64>>,
}

impl<'a> AdvanceRows<'a> {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        id: i64,
        status: CashoutStatus,
        held: bool,
        completed_at: Option<i64>,
        webhook: bool,
        recovered: bool,
        plan: &plan::ObservationPlan<'a>,
    ) {
        let observation = plan.observation;
        self.id.push(id);
        self.status.push(status.as_str());
        self.held.push(held);
        self.provider_status.push(observation.raw_status.as_deref());
        self.reason_code.push(observation.reason_code.as_deref());
        self.amount_minor.push(observation.amount.map(|m| m.minor));
        self.currency.push(observation.amount.map(|m| m.currency.code()));
        self.fee_minor.push(observation.fee_minor);
        self.external_id.push(observation.external_id.as_deref());
        self.created_at.push(observation.created_at.map(to_millis));
        self.updated_at.push(observation.updated_at.map(to_millis));
        self.completed_at.push(completed_at);
        self.now.push(plan.event.received_at);
        self.webhooks.push(i64::from(webhook));
        self.recovered.push(i64::from(recovered));
        self.method.push(observation.method.as_deref());
        self.net_minor.push(observation.net_minor);
    }
}

#[derive(Default)]
struct FillInRows<'a> {
    id: Vec<i64>,
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
    fn push(
        &mut self,
        id: i64,
        webhook: bool,
        conflict: ConflictMark,
        plan: &plan::ObservationPlan<'a>,
    ) {
        let observation = plan.observation;
        let (set_conflict, conflict_status) = match conflict {
            ConflictMark::Set(reported) => (true, Some(reported.as_str())),
            ConflictMark::Clear => (true, None),
            ConflictMark::Keep => (false, None),
        };
        self.id.push(id);
        self.amount_minor.push(observation.amount.map(|m| m.minor));
        self.currency.push(observation.amount.map(|m| m.currency.code()));
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
    cashout_id: Vec<Option<i64>>,
}

impl<'a> EventRows<'a> {
    /// The plan's event, with the delivery's columns (as the single transaction writes it).
    fn push(&mut self, record: &'a WebhookRecord, event: &NewEvent<'a>, cashout_id: Option<i64>) {
        let observation = event.observation;
        let delivery = event.delivery;
        self.event_id.push(event.event_id);
        self.provider.push(record.provider.as_str());
        self.source.push(event.source.as_str());
        self.dedup_key.push(delivery.map(|d| d.dedup_key.as_str()));
        self.body_sha256.push(delivery.map(|d| d.body_sha256.as_str()));
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
        self.cashout_id.push(cashout_id);
    }
}
