//! Ingestion scenarios written once over [`Book`] and run against both stores (the
//! SQLite [`Store`] and [`PgStore`] on a fresh test database), then the multi-instance
//! ones: two pools on one PostgreSQL database taking the same webhooks at once.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::SeedableRng;
use tokio::sync::Barrier;

use super::testing::TestDatabase;
use super::PgStore;
use crate::config::StoreSettings;
use crate::ingest::plan::PollKind;
use crate::ingest::{body_sha256, Applied, IngestOutcome, WebhookRecord};
use crate::metrics::Metrics;
use crate::providers::Observation;
use crate::reconcile::MismatchKind;
use crate::state::{CashoutStatus, StatusUpdate, Transition};
use crate::store::{Store, StoreError};

pub(super) const PROVIDER: &str = "fiserv";

/// A cash-out as the scenarios check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Seen {
    pub(super) status: CashoutStatus,
    pub(super) held: bool,
    pub(super) webhook_count: i64,
    pub(super) recovered_by_poll: i64,
    /// Events on its timeline.
    pub(super) events: usize,
}

/// The ingestion entry points of a store and what the scenarios read back.
#[async_trait]
pub(super) trait Book: Send + Sync {
    async fn ingest(&self, record: WebhookRecord) -> Result<IngestOutcome, StoreError>;
    async fn poll(
        &self,
        observation: Observation,
        kind: PollKind,
        counts_as_missed: bool,
    ) -> Result<Applied, StoreError>;
    async fn reprocess(
        &self,
        event_id: &str,
        parsed: Result<Observation, String>,
    ) -> Result<Option<IngestOutcome>, StoreError>;
    async fn cashout(&self, provider_ref: &str) -> Option<Seen>;
    async fn event_outcome(&self, event_id: &str) -> Option<String>;
    /// The provider refs of `kind`'s findings (open ones only when `open_only`).
    async fn findings(&self, kind: MismatchKind, open_only: bool) -> Vec<String>;
    /// The provider refs with a queued status fetch.
    async fn fetches(&self) -> Vec<String>;
}

#[async_trait]
impl Book for Store {
    async fn ingest(&self, record: WebhookRecord) -> Result<IngestOutcome, StoreError> {
        self.ingest_webhook(record).await
    }

    async fn poll(
        &self,
        observation: Observation,
        kind: PollKind,
        counts_as_missed: bool,
    ) -> Result<Applied, StoreError> {
        let provider = PROVIDER.to_string();
        match kind {
            PollKind::Sweep => {
                self.apply_polled(provider, observation, counts_as_missed, Utc::now())
                    .await
            }
            PollKind::StatusFetch => {
                self.record_fetched_status(provider, observation, counts_as_missed, Utc::now())
                    .await
            }
        }
    }

    async fn reprocess(
        &self,
        event_id: &str,
        parsed: Result<Observation, String>,
    ) -> Result<Option<IngestOutcome>, StoreError> {
        self.reprocess_event(event_id.to_string(), parsed, Utc::now())
            .await
    }

    async fn cashout(&self, provider_ref: &str) -> Option<Seen> {
        let (row, events) = self
            .get_cashout(PROVIDER.to_string(), provider_ref.to_string())
            .await
            .expect("read a cash-out")?;
        Some(Seen {
            status: row.status,
            held: row.held,
            webhook_count: row.webhook_count,
            recovered_by_poll: row.recovered_by_poll,
            events: events.len(),
        })
    }

    async fn event_outcome(&self, event_id: &str) -> Option<String> {
        self.get_event(event_id.to_string())
            .await
            .expect("read an event")
            .map(|event| event.outcome.as_str().to_string())
    }

    async fn findings(&self, kind: MismatchKind, open_only: bool) -> Vec<String> {
        self.list_mismatches(Some(kind.as_str().to_string()), open_only)
            .await
            .expect("read findings")
            .into_iter()
            .filter_map(|row| row.provider_ref)
            .collect()
    }

    async fn fetches(&self) -> Vec<String> {
        self.pending_status_fetches(PROVIDER.to_string(), 1000)
            .await
            .expect("read the fetch queue")
            .into_iter()
            .map(|(provider_ref, _)| provider_ref)
            .collect()
    }
}

#[async_trait]
impl Book for PgStore {
    async fn ingest(&self, record: WebhookRecord) -> Result<IngestOutcome, StoreError> {
        self.ingest_webhook(record).await
    }

    async fn poll(
        &self,
        observation: Observation,
        kind: PollKind,
        counts_as_missed: bool,
    ) -> Result<Applied, StoreError> {
        let provider = PROVIDER.to_string();
        match kind {
            PollKind::Sweep => {
                self.apply_polled(provider, observation, counts_as_missed, Utc::now())
                    .await
            }
            PollKind::StatusFetch => {
                self.record_fetched_status(provider, observation, counts_as_missed, Utc::now())
                    .await
            }
        }
    }

    async fn reprocess(
        &self,
        event_id: &str,
        parsed: Result<Observation, String>,
    ) -> Result<Option<IngestOutcome>, StoreError> {
        self.reprocess_event(event_id.to_string(), parsed, Utc::now())
            .await
    }

    async fn cashout(&self, provider_ref: &str) -> Option<Seen> {
        let client = self.client().await.expect("a connection");
        let row = client
            .query_opt(
                "SELECT c.status, c.held, c.webhook_count, c.recovered_by_poll,
                        (SELECT COUNT(*) FROM events e WHERE e.cashout_id = c.id)
                 FROM cashouts c WHERE c.provider = $1 AND c.provider_ref = $2",
                &[&PROVIDER, &provider_ref],
            )
            .await
            .expect("read a cash-out")?;
        let status: String = row.get(0);
        let events: i64 = row.get(4);
        Some(Seen {
            status: status.parse().expect("a status"),
            held: row.get(1),
            webhook_count: row.get(2),
            recovered_by_poll: row.get(3),
            events: usize::try_from(events).expect("a count"),
        })
    }

    async fn event_outcome(&self, event_id: &str) -> Option<String> {
        let client = self.client().await.expect("a connection");
        client
            .query_opt(
                "SELECT outcome FROM events WHERE event_id = $1",
                &[&event_id],
            )
            .await
            .expect("read an event")
            .map(|row| row.get(0))
    }

    async fn findings(&self, kind: MismatchKind, open_only: bool) -> Vec<String> {
        let client = self.client().await.expect("a connection");
        client
            .query(
                "SELECT provider_ref FROM mismatches WHERE kind = $1 AND (NOT $2 OR resolved_at IS NULL)
                 ORDER BY id",
                &[&kind.as_str(), &open_only],
            )
            .await
            .expect("read findings")
            .iter()
            .filter_map(|row| row.get::<_, Option<String>>(0))
            .collect()
    }

    async fn fetches(&self) -> Vec<String> {
        let client = self.client().await.expect("a connection");
        client
            .query(
                "SELECT provider_ref FROM status_fetch_queue WHERE provider = $1 ORDER BY requested_at",
                &[&PROVIDER],
            )
            .await
            .expect("read the fetch queue")
            .iter()
            .map(|row| row.get(0))
            .collect()
    }
}

/// A SQLite store in a temporary directory.
pub(super) fn sqlite() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(
        &StoreSettings {
            backend: crate::config::StoreBackend::Sqlite,
            path: dir.path().join("book.db"),
            busy_timeout: std::time::Duration::from_secs(30),
            max_batch: 64,
            read_connections: 2,
            replay_window: crate::config::MIN_REPLAY_WINDOW,
        },
        Metrics::new(),
    )
    .expect("open the SQLite store");
    (dir, store)
}

pub(super) fn observation(provider_ref: &str, status: Option<CashoutStatus>) -> Observation {
    let mut observation = Observation::new(provider_ref);
    observation.status = status.map(StatusUpdate::to);
    observation.raw_status = status.map(|s| s.as_str().to_uppercase());
    observation
}

pub(super) fn record_at(
    event_id: &str,
    dedup_key: &str,
    body: &str,
    nonce: Option<&str>,
    parsed: Result<Observation, String>,
    received_at: DateTime<Utc>,
) -> WebhookRecord {
    WebhookRecord {
        event_id: event_id.to_string(),
        provider: PROVIDER.to_string(),
        dedup_key: dedup_key.to_string(),
        nonce: nonce.map(str::to_string),
        body_sha256: body_sha256(body.as_bytes()),
        raw_body: body.as_bytes().to_vec(),
        headers_json: "{}".to_string(),
        secret_index: 0,
        received_at,
        parsed,
    }
}

pub(super) fn record(
    event_id: &str,
    dedup_key: &str,
    body: &str,
    nonce: Option<&str>,
    parsed: Result<Observation, String>,
) -> WebhookRecord {
    record_at(event_id, dedup_key, body, nonce, parsed, Utc::now())
}

/// A webhook reporting `status` for `provider_ref`, its body and dedup key unique.
pub(super) fn status_webhook(
    event_id: &str,
    provider_ref: &str,
    status: CashoutStatus,
) -> WebhookRecord {
    let body = format!(r#"{{"id":"{event_id}","ref":"{provider_ref}","status":"{status}"}}"#);
    record(
        event_id,
        &format!("key-{event_id}"),
        &body,
        None,
        Ok(observation(provider_ref, Some(status))),
    )
}

pub(super) fn accepted(outcome: &IngestOutcome) -> &Applied {
    match outcome {
        IngestOutcome::Accepted { applied, .. } => applied,
        other => panic!("not accepted: {other:?}"),
    }
}

async fn new_then_duplicate_then_replayed(book: &dyn Book) {
    let parsed = || Ok(observation("ref-1", Some(CashoutStatus::Processing)));
    let body = r#"{"ref":"ref-1","status":"processing"}"#;
    let first = book
        .ingest(record("ev-1", "dedup-1", body, None, parsed()))
        .await
        .expect("first");
    let applied = accepted(&first);
    assert_eq!(applied.transition, Some(Transition::Created));
    assert_eq!(applied.status, CashoutStatus::Processing);
    assert!(applied.cashout_id.is_some());

    let again = book
        .ingest(record("ev-2", "dedup-1", body, None, parsed()))
        .await
        .expect("again");
    assert_eq!(
        again,
        IngestOutcome::Duplicate {
            event_id: "ev-1".into()
        }
    );
    let other_body = book
        .ingest(record(
            "ev-3",
            "dedup-1",
            r#"{"ref":"ref-1","status":"completed"}"#,
            None,
            Ok(observation("ref-1", Some(CashoutStatus::Completed))),
        ))
        .await
        .expect("other body");
    assert_eq!(other_body, IngestOutcome::Replayed);

    let seen = book.cashout("ref-1").await.expect("stored");
    assert_eq!(seen.status, CashoutStatus::Processing);
    assert_eq!((seen.webhook_count, seen.events), (1, 1));
    assert_eq!(book.event_outcome("ev-1").await.as_deref(), Some("applied"));
    assert_eq!(book.event_outcome("ev-2").await, None);
    assert_eq!(book.event_outcome("ev-3").await, None);
}

async fn a_nonce_again_is_a_duplicate_or_a_replay(book: &dyn Book) {
    let body = r#"{"ref":"ref-n","status":"processing"}"#;
    let parsed = || Ok(observation("ref-n", Some(CashoutStatus::Processing)));
    let first = book
        .ingest(record("ev-n1", "req-a", body, Some("nonce-1"), parsed()))
        .await
        .expect("first");
    accepted(&first);
    // The same signed request re-encoded: a new unsigned request id, the same MAC.
    let re_encoded = book
        .ingest(record("ev-n2", "req-b", body, Some("nonce-1"), parsed()))
        .await
        .expect("re-encoded");
    assert_eq!(
        re_encoded,
        IngestOutcome::Duplicate {
            event_id: "ev-n1".into()
        }
    );
    let replayed = book
        .ingest(record(
            "ev-n3",
            "req-c",
            r#"{"ref":"ref-n","status":"failed"}"#,
            Some("nonce-1"),
            Ok(observation("ref-n", Some(CashoutStatus::Failed))),
        ))
        .await
        .expect("replayed");
    assert_eq!(replayed, IngestOutcome::Replayed);
    // A refused delivery frees its dedup key: the genuine request under it is new.
    let genuine = book
        .ingest(record(
            "ev-n4",
            "req-c",
            r#"{"ref":"ref-n","status":"completed"}"#,
            Some("nonce-2"),
            Ok(observation("ref-n", Some(CashoutStatus::Completed))),
        ))
        .await
        .expect("genuine");
    assert_eq!(accepted(&genuine).status, CashoutStatus::Completed);
    let seen = book.cashout("ref-n").await.expect("stored");
    assert_eq!(
        (seen.status, seen.webhook_count),
        (CashoutStatus::Completed, 2)
    );
}

async fn unparseable_is_quarantined_then_reprocessed(book: &dyn Book) {
    let quarantined = book
        .ingest(record(
            "ev-q",
            "dedup-q",
            "{not json",
            None,
            Err("expected value at line 1".into()),
        ))
        .await
        .expect("quarantined");
    assert_eq!(
        quarantined,
        IngestOutcome::Quarantined {
            event_id: "ev-q".into(),
            reason: "expected value at line 1".into()
        }
    );
    assert_eq!(
        book.event_outcome("ev-q").await.as_deref(),
        Some("quarantined")
    );
    assert!(book.cashout("ref-q").await.is_none());

    let still = book
        .reprocess("ev-q", Err("still broken".into()))
        .await
        .expect("still");
    assert!(
        matches!(&still, Some(IngestOutcome::Quarantined { reason, .. }) if reason == "still broken"),
        "{still:?}"
    );
    let fixed = book
        .reprocess(
            "ev-q",
            Ok(observation("ref-q", Some(CashoutStatus::Completed))),
        )
        .await
        .expect("fixed")
        .expect("it was quarantined");
    assert_eq!(accepted(&fixed).status, CashoutStatus::Completed);
    assert_eq!(book.event_outcome("ev-q").await.as_deref(), Some("applied"));
    let seen = book.cashout("ref-q").await.expect("created");
    assert_eq!((seen.status, seen.events), (CashoutStatus::Completed, 1));
    let again = book
        .reprocess(
            "ev-q",
            Ok(observation("ref-q", Some(CashoutStatus::Completed))),
        )
        .await
        .expect("again");
    assert_eq!(again, None);
    assert_eq!(
        book.reprocess("ev-none", Err("x".into())).await.ok(),
        Some(None)
    );
}

async fn out_of_order_and_conflict(book: &dyn Book) {
    let created = book
        .ingest(status_webhook("ev-o1", "ref-o", CashoutStatus::Completed))
        .await
        .expect("completed");
    assert_eq!(accepted(&created).transition, Some(Transition::Created));
    let late = book
        .ingest(status_webhook("ev-o2", "ref-o", CashoutStatus::Processing))
        .await
        .expect("late");
    assert_eq!(accepted(&late).transition, Some(Transition::OutOfOrder));
    assert_eq!(
        book.event_outcome("ev-o2").await.as_deref(),
        Some("out_of_order")
    );
    assert!(book
        .findings(MismatchKind::StatusConflict, true)
        .await
        .is_empty());

    let conflicting = book
        .ingest(status_webhook("ev-o3", "ref-o", CashoutStatus::Failed))
        .await
        .expect("conflicting");
    assert_eq!(
        accepted(&conflicting).transition,
        Some(Transition::Conflict {
            current: CashoutStatus::Completed,
            reported: CashoutStatus::Failed
        })
    );
    // A second conflicting report keeps the one open finding.
    let again = book
        .ingest(status_webhook("ev-o4", "ref-o", CashoutStatus::Canceled))
        .await
        .expect("again");
    assert!(matches!(
        accepted(&again).transition,
        Some(Transition::Conflict { .. })
    ));
    assert_eq!(
        book.event_outcome("ev-o3").await.as_deref(),
        Some("conflict")
    );
    assert_eq!(
        book.findings(MismatchKind::StatusConflict, true).await,
        vec!["ref-o".to_string()]
    );
    let seen = book.cashout("ref-o").await.expect("stored");
    assert_eq!(seen.status, CashoutStatus::Completed);
    assert_eq!((seen.webhook_count, seen.events), (4, 4));
}

async fn a_poll_recovering_a_state_is_a_missed_webhook(book: &dyn Book) {
    accepted(
        &book
            .ingest(status_webhook("ev-m1", "ref-m", CashoutStatus::Processing))
            .await
            .expect("processing"),
    );
    let polled = book
        .poll(
            observation("ref-m", Some(CashoutStatus::Completed)),
            PollKind::Sweep,
            true,
        )
        .await
        .expect("polled");
    assert!(polled.missed_webhook);
    assert_eq!(polled.status, CashoutStatus::Completed);
    assert_eq!(
        book.event_outcome(&polled.event_id).await.as_deref(),
        Some("missed_webhook")
    );
    assert_eq!(
        book.findings(MismatchKind::MissedWebhook, false).await,
        vec!["ref-m".to_string()]
    );
    // Recorded resolved: it was recovered.
    assert!(book
        .findings(MismatchKind::MissedWebhook, true)
        .await
        .is_empty());
    // The same state again is no news.
    let again = book
        .poll(
            observation("ref-m", Some(CashoutStatus::Completed)),
            PollKind::Sweep,
            true,
        )
        .await
        .expect("again");
    assert!(!again.missed_webhook);
    let seen = book.cashout("ref-m").await.expect("stored");
    assert_eq!(
        (seen.status, seen.recovered_by_poll, seen.events),
        (CashoutStatus::Completed, 1, 3)
    );
}

async fn a_thin_notification_queues_a_fetch_its_answer_resolves(book: &dyn Book) {
    let thin = book
        .ingest(record(
            "ev-t",
            "dedup-t",
            r#"{"ref":"ref-t"}"#,
            None,
            Ok(observation("ref-t", None)),
        ))
        .await
        .expect("thin");
    let applied = accepted(&thin);
    assert!(applied.status_fetch_queued);
    assert_eq!((applied.transition, applied.cashout_id), (None, None));
    assert_eq!(book.event_outcome("ev-t").await.as_deref(), Some("thin"));
    assert_eq!(book.fetches().await, vec!["ref-t".to_string()]);
    assert!(book.cashout("ref-t").await.is_none());

    let fetched = book
        .poll(
            observation("ref-t", Some(CashoutStatus::Completed)),
            PollKind::StatusFetch,
            true,
        )
        .await
        .expect("fetched");
    // It answers the thin notification: no webhook was missed.
    assert!(!fetched.missed_webhook);
    assert!(book.fetches().await.is_empty());
    let seen = book.cashout("ref-t").await.expect("created");
    // The thin event is linked to the cash-out its fetch created.
    assert_eq!((seen.status, seen.events), (CashoutStatus::Completed, 2));
    assert!(book
        .findings(MismatchKind::MissedWebhook, false)
        .await
        .is_empty());
}

/// Runs a scenario against a fresh SQLite store and a fresh PostgreSQL database.
macro_rules! both_stores {
    ($($scenario:ident),+ $(,)?) => {$(
        mod $scenario {
            use super::*;

            #[tokio::test]
            async fn sqlite() {
                let (_dir, store) = super::sqlite();
                super::$scenario(&store).await;
                store.close().await;
            }

            #[tokio::test]
            async fn postgres() {
                let database = TestDatabase::create().await;
                let store = database.migrated(4).await;
                super::$scenario(&store).await;
                store.close();
            }
        }
    )+};
}

both_stores!(
    new_then_duplicate_then_replayed,
    a_nonce_again_is_a_duplicate_or_a_replay,
    unparseable_is_quarantined_then_reprocessed,
    out_of_order_and_conflict,
    a_poll_recovering_a_state_is_a_missed_webhook,
    a_thin_notification_queues_a_fetch_its_answer_resolves,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_copies_of_one_webhook_across_two_instances_are_one_accepted_39_duplicates() {
    let database = TestDatabase::create().await;
    let pools = [database.migrated(8).await, database.store(8)];
    let body = r#"{"ref":"ref-40","status":"completed"}"#;
    let barrier = Arc::new(Barrier::new(40));
    let mut tasks = Vec::new();
    for i in 0..40 {
        let pool = pools[i % 2].clone();
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let copy = record(
                &format!("ev-copy-{i}"),
                "dedup-40",
                body,
                Some("nonce-40"),
                Ok(observation("ref-40", Some(CashoutStatus::Completed))),
            );
            barrier.wait().await;
            pool.ingest_webhook(copy).await
        }));
    }
    let mut accepted_ids = Vec::new();
    let mut duplicates_of = Vec::new();
    for task in tasks {
        match task.await.expect("task").expect("no store error") {
            IngestOutcome::Accepted { event_id, .. } => accepted_ids.push(event_id),
            IngestOutcome::Duplicate { event_id } => duplicates_of.push(event_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(accepted_ids.len(), 1, "{accepted_ids:?}");
    assert_eq!(duplicates_of.len(), 39);
    assert!(duplicates_of.iter().all(|id| *id == accepted_ids[0]));
    let seen = pools[1].cashout("ref-40").await.expect("stored");
    assert_eq!(
        (seen.status, seen.webhook_count, seen.events),
        (CashoutStatus::Completed, 1, 1)
    );
    assert_eq!(
        pools[0].event_outcome(&accepted_ids[0]).await.as_deref(),
        Some("applied")
    );
}

/// The states one cash-out goes through up to `top`, in rank order: any order of these
/// reports ends in `top` under the state rule.
fn chain(top: CashoutStatus) -> Vec<CashoutStatus> {
    use CashoutStatus::*;
    match top {
        Reversed => vec![Pending, Processing, Completed, Reversed],
        top => vec![Pending, Processing, top],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_shuffled_webhooks_for_twenty_cashouts_across_two_instances_end_as_the_rule_says(
) {
    use CashoutStatus::*;
    let tops = [Completed, Failed, Canceled, Expired, Reversed];
    let mut rng = StdRng::seed_from_u64(10);
    let mut webhooks = Vec::new();
    let mut expected = BTreeMap::new();
    let received_at = Utc::now();
    for c in 0..20 {
        let provider_ref = format!("ref-{c:02}");
        let top = tops[c % tops.len()];
        let states = chain(top);
        let mut reports = states.clone();
        while reports.len() < 10 {
            reports.push(*states.choose(&mut rng).expect("a state"));
        }
        for (n, status) in reports.into_iter().enumerate() {
            let event_id = format!("ev-{c:02}-{n}");
            let body =
                format!(r#"{{"id":"{event_id}","ref":"{provider_ref}","status":"{status}"}}"#);
            webhooks.push(record_at(
                &event_id,
                &format!("key-{event_id}"),
                &body,
                None,
                Ok(observation(&provider_ref, Some(status))),
                received_at,
            ));
        }
        expected.insert(provider_ref, top);
    }
    webhooks.shuffle(&mut rng);

    let database = TestDatabase::create().await;
    let pools = [database.migrated(8).await, database.store(8)];
    let barrier = Arc::new(Barrier::new(webhooks.len()));
    let mut tasks = Vec::new();
    for (i, webhook) in webhooks.iter().cloned().enumerate() {
        let pool = pools[i % 2].clone();
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            pool.ingest_webhook(webhook).await
        }));
    }
    for task in tasks {
        let outcome = task.await.expect("task").expect("no store error");
        accepted(&outcome);
    }

    // The SQLite store fed the same webhooks, one after the other.
    let (_dir, sqlite) = sqlite();
    for webhook in webhooks {
        accepted(&sqlite.ingest_webhook(webhook).await.expect("sqlite"));
    }
    for (provider_ref, top) in &expected {
        let on_postgres = pools[0].cashout(provider_ref).await.expect("on postgres");
        let on_sqlite = sqlite.cashout(provider_ref).await.expect("on sqlite");
        assert_eq!(on_postgres.status, *top, "{provider_ref}");
        assert_eq!(on_postgres, on_sqlite, "{provider_ref}");
        // No update was lost: every webhook counted, every event on the timeline.
        assert_eq!((on_postgres.webhook_count, on_postgres.events), (10, 10));
    }
    sqlite.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cashout_inserted_by_another_instance_meanwhile_is_judged_again_not_duplicated() {
    use super::claims;
    use crate::state::CurrentState;
    let database = TestDatabase::create().await;
    let (this, other) = (database.migrated(4).await, database.store(4));
    // Another instance is creating ref-race (pending), not committed yet.
    let mut client = other.client().await.expect("a connection");
    let tx = client.transaction().await.expect("tx");
    let locked = claims::cashout_or_insert_for_update(
        &tx,
        PROVIDER,
        "ref-race",
        CurrentState {
            status: CashoutStatus::Pending,
            held: false,
        },
        Utc::now(),
    )
    .await
    .expect("insert");
    assert!(locked.inserted);
    // This one sees no cash-out, plans an insert, and waits on the other's unique key...
    let webhook = status_webhook("ev-race", "ref-race", CashoutStatus::Completed);
    let ingesting = tokio::spawn({
        let this = this.clone();
        async move { this.ingest_webhook(webhook).await }
    });
    super::tests::wait_for_lock_waiter(&this, "INSERT INTO cashouts").await;
    tx.commit().await.expect("commit");
    // ...then runs again against the row the other committed.
    let outcome = ingesting.await.expect("task").expect("ingested");
    assert_eq!(
        accepted(&outcome).transition,
        Some(Transition::Advanced {
            from: CashoutStatus::Pending
        })
    );
    let seen = this.cashout("ref-race").await.expect("one cash-out");
    assert_eq!(
        (seen.status, seen.webhook_count, seen.events),
        (CashoutStatus::Completed, 1, 1)
    );
}

#[tokio::test]
async fn events_keep_the_cashout_after_them_and_their_book_time_as_on_sqlite() {
    let database = TestDatabase::create().await;
    let store = database.migrated(2).await;
    let mut completed = observation("ref-s", Some(CashoutStatus::Completed));
    completed.amount = Some(crate::money::Money {
        minor: 12_345,
        currency: crate::money::Currency::from_code("BRL").expect("BRL"),
    });
    completed.fee_minor = Some(45);
    let received_at = chrono::TimeZone::timestamp_millis_opt(&Utc, 1_700_000_000_123)
        .single()
        .expect("a time");
    let webhook = record_at(
        "ev-s1",
        "dedup-s1",
        r#"{"ref":"ref-s"}"#,
        None,
        Ok(completed),
        received_at,
    );
    accepted(&store.ingest_webhook(webhook).await.expect("ingested"));
    let quarantined = record_at(
        "ev-s2",
        "dedup-s2",
        "{",
        None,
        Err("broken".into()),
        received_at,
    );
    store
        .ingest_webhook(quarantined)
        .await
        .expect("quarantined");
    let client = store.client().await.expect("a connection");
    let rows = client
        .query(
            "SELECT event_id, source, outcome, status, applied, book_at, after_status, after_amount_minor,
                    after_currency, after_fee_minor, after_webhooks, after_recovered, cashout_id IS NOT NULL,
                    raw_body, error
             FROM events ORDER BY event_id",
            &[],
        )
        .await
        .expect("events");
    let applied = &rows[0];
    assert_eq!(applied.get::<_, String>(0), "ev-s1");
    assert_eq!(applied.get::<_, String>(1), "webhook");
    assert_eq!(applied.get::<_, String>(2), "applied");
    assert_eq!(
        applied.get::<_, Option<String>>(3).as_deref(),
        Some("completed")
    );
    assert!(applied.get::<_, bool>(4));
    assert_eq!(applied.get::<_, Option<i64>>(5), Some(1_700_000_000_123));
    assert_eq!(
        applied.get::<_, Option<String>>(6).as_deref(),
        Some("completed")
    );
    assert_eq!(applied.get::<_, Option<i64>>(7), Some(12_345));
    assert_eq!(applied.get::<_, Option<String>>(8).as_deref(), Some("BRL"));
    assert_eq!(applied.get::<_, Option<i64>>(9), Some(45));
    assert_eq!(applied.get::<_, Option<i64>>(10), Some(1));
    assert_eq!(applied.get::<_, Option<i64>>(11), Some(0));
    assert!(applied.get::<_, bool>(12));
    let quarantined = &rows[1];
    assert_eq!(quarantined.get::<_, String>(2), "quarantined");
    assert_eq!(
        quarantined.get::<_, Option<i64>>(5),
        Some(1_700_000_000_123)
    );
    assert_eq!(quarantined.get::<_, Option<String>>(6), None);
    assert!(!quarantined.get::<_, bool>(12));
    assert_eq!(
        quarantined.get::<_, Option<Vec<u8>>>(13),
        Some(b"{".to_vec())
    );
    assert_eq!(
        quarantined.get::<_, Option<String>>(14).as_deref(),
        Some("broken")
    );
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_for_ingestion() {
    let store = PgStore::connect(
        "postgres://nobody:nothing@127.0.0.1:1/none",
        super::PgOptions {
            max_connections: 1,
            connect_timeout: std::time::Duration::from_secs(2),
            wait_timeout: std::time::Duration::from_secs(2),
            lock_timeout: std::time::Duration::from_secs(2),
        },
    )
    .expect("a pool");
    let outcome = store
        .ingest_webhook(status_webhook("ev-u", "ref-u", CashoutStatus::Completed))
        .await;
    assert!(
        matches!(outcome, Err(StoreError::Unavailable(_))),
        "{outcome:?}"
    );
    let queued = store
        .request_status_fetch(
            PROVIDER.to_string(),
            "ref-u".to_string(),
            crate::ingest::FetchReason::UnverifiedWebhook,
            10,
            Utc::now(),
        )
        .await;
    assert!(
        matches!(queued, Err(StoreError::Unavailable(_))),
        "{queued:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_event_reprocessed_by_two_instances_at_once_is_applied_once() {
    let database = TestDatabase::create().await;
    let pools = [database.migrated(4).await, database.store(4)];
    pools[0]
        .ingest_webhook(record("ev-rq", "dedup-rq", "{", None, Err("broken".into())))
        .await
        .expect("quarantined");
    let barrier = Arc::new(Barrier::new(2));
    let tasks: Vec<_> = pools
        .iter()
        .cloned()
        .map(|pool| {
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                pool.reprocess_event(
                    "ev-rq".to_string(),
                    Ok(observation("ref-rq", Some(CashoutStatus::Completed))),
                    Utc::now(),
                )
                .await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("task").expect("no store error"));
    }
    assert_eq!(
        outcomes.iter().filter(|o| o.is_none()).count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(outcomes.iter().flatten().count(), 1, "{outcomes:?}");
    let seen = pools[0].cashout("ref-rq").await.expect("created");
    assert_eq!((seen.status, seen.events), (CashoutStatus::Completed, 1));
}

#[test]
fn serialization_failures_and_deadlocks_are_retried_other_errors_are_not() {
    use super::ingest::is_retried;
    assert!(is_retried(&StoreError::Unavailable(
        "40P01: deadlock detected".into()
    )));
    assert!(is_retried(&StoreError::Unavailable(
        "40001: could not serialize access due to concurrent update".into()
    )));
    assert!(!is_retried(&StoreError::Unavailable(
        "PostgreSQL connection closed".into()
    )));
    assert!(!is_retried(&StoreError::Database(
        "40001: not unavailable".into()
    )));
}

/// A measurement, not a check: webhooks per second and latency percentiles of
/// `ingest_webhook` on PostgreSQL (one transaction per webhook without group commit, then
/// batched: one pool, then two pools) and on SQLite, the same
/// webhooks at the same concurrency. `PG_INGEST_WEBHOOKS` (default 4000),
/// `PG_INGEST_CONCURRENCY` (default 32).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: cargo test --lib pg_ingest_rate -- --ignored --nocapture"]
async fn pg_ingest_rate() {
    use std::time::{Duration, Instant};
    let count: usize = std::env::var("PG_INGEST_WEBHOOKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let concurrency: usize = std::env::var("PG_INGEST_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let statuses = [
        CashoutStatus::Pending,
        CashoutStatus::Processing,
        CashoutStatus::Completed,
    ];
    let webhooks: Vec<WebhookRecord> = (0..count)
        .map(|i| {
            status_webhook(
                &format!("ev-{i}"),
                &format!("ref-{}", i / 3),
                statuses[i % 3],
            )
        })
        .collect();

    async fn run(
        books: Vec<Arc<dyn Book>>,
        webhooks: &[WebhookRecord],
        concurrency: usize,
    ) -> (f64, Duration, Duration) {
        let queue = Arc::new(std::sync::Mutex::new(webhooks.to_vec()));
        let started = Instant::now();
        let mut workers = Vec::new();
        for w in 0..concurrency {
            let book = Arc::clone(&books[w % books.len()]);
            let queue = Arc::clone(&queue);
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let next = queue.lock().expect("queue").pop();
                    let Some(webhook) = next else { break };
                    let at = Instant::now();
                    accepted(&book.ingest(webhook).await.expect("ingested"));
                    latencies.push(at.elapsed());
                }
                latencies
            }));
        }
        let mut latencies = Vec::new();
        for worker in workers {
            latencies.extend(worker.await.expect("worker"));
        }
        let elapsed = started.elapsed();
        latencies.sort();
        let at =
            |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
        (
            latencies.len() as f64 / elapsed.as_secs_f64(),
            at(0.5),
            at(0.99),
        )
    }

    /// The pool without group commit: each webhook in a transaction of its own.
    struct OneTransactionEach(PgStore);

    #[async_trait]
    impl Book for OneTransactionEach {
        async fn ingest(&self, record: WebhookRecord) -> Result<IngestOutcome, StoreError> {
            self.0.ingest_webhook_alone(record).await
        }
        async fn poll(
            &self,
            observation: Observation,
            kind: PollKind,
            counts_as_missed: bool,
        ) -> Result<Applied, StoreError> {
            self.0.poll(observation, kind, counts_as_missed).await
        }
        async fn reprocess(
            &self,
            event_id: &str,
            parsed: Result<Observation, String>,
        ) -> Result<Option<IngestOutcome>, StoreError> {
            self.0.reprocess(event_id, parsed).await
        }
        async fn cashout(&self, provider_ref: &str) -> Option<Seen> {
            self.0.cashout(provider_ref).await
        }
        async fn event_outcome(&self, event_id: &str) -> Option<String> {
            self.0.event_outcome(event_id).await
        }
        async fn findings(&self, kind: MismatchKind, open_only: bool) -> Vec<String> {
            self.0.findings(kind, open_only).await
        }
        async fn fetches(&self) -> Vec<String> {
            self.0.fetches().await
        }
    }

    let (_dir, sqlite) = sqlite();
    let sqlite: Arc<dyn Book> = Arc::new(sqlite);
    let alone = TestDatabase::create().await;
    let alone_pool: Arc<dyn Book> = Arc::new(OneTransactionEach(alone.migrated(16).await));
    let one = TestDatabase::create().await;
    let one_pool: Arc<dyn Book> = Arc::new(one.migrated(16).await);
    let two = TestDatabase::create().await;
    let two_pools: Vec<Arc<dyn Book>> =
        vec![Arc::new(two.migrated(8).await), Arc::new(two.store(8))];
    for (name, books) in [
        ("sqlite", vec![sqlite]),
        ("postgres, one transaction per webhook", vec![alone_pool]),
        ("postgres, one pool", vec![one_pool]),
        ("postgres, two pools", two_pools),
    ] {
        let (rate, p50, p99) = run(books, &webhooks, concurrency).await;
        println!(
            "{name}: {count} webhooks at concurrency {concurrency}: {rate:.0}/s, p50 {:.1} ms, p99 {:.1} ms",
            p50.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0
        );
    }
}

#[tokio::test]
async fn a_ledger_entry_gives_a_cashout_without_one_its_external_id_once() {
    let database = TestDatabase::create().await;
    let store = database.migrated(2).await;
    accepted(
        &store
            .ingest_webhook(status_webhook("ev-l", "ref-l", CashoutStatus::Processing))
            .await
            .expect("ingested"),
    );
    let link = |external_id: &str| {
        store.link_to_ledger(
            PROVIDER.to_string(),
            "ref-l".to_string(),
            external_id.to_string(),
            Utc::now(),
        )
    };
    assert!(link("ext-1").await.expect("linked"));
    assert!(!link("ext-2").await.expect("already linked"));
    assert!(!store
        .link_to_ledger(
            PROVIDER.to_string(),
            "ref-unknown".to_string(),
            "ext-3".to_string(),
            Utc::now(),
        )
        .await
        .expect("no such cash-out"));
    let client = store.client().await.expect("a connection");
    let external_id: Option<String> = client
        .query_one(
            "SELECT external_id FROM cashouts WHERE provider_ref = 'ref-l'",
            &[],
        )
        .await
        .expect("cash-out")
        .get(0);
    assert_eq!(external_id.as_deref(), Some("ext-1"));
    let linked: Vec<(String, Option<String>)> = client
        .query(
            "SELECT source, after_external_id FROM events WHERE outcome = 'ledger_linked'",
            &[],
        )
        .await
        .expect("events")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        linked,
        vec![("ledger".to_string(), Some("ext-1".to_string()))]
    );
    assert_eq!(store.cashout("ref-l").await.expect("stored").events, 2);
}
