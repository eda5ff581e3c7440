//! The poller's and the ledger's store operations: scenarios written once over [`Ops`] and
//! run against both stores, then the multi-instance ones on PostgreSQL: two pools
//! claiming due fetches at once, two instances registering ledger entries at once.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use tokio::sync::Barrier;

use super::ingest_tests::{
    accepted, observation, record_at, sqlite, status_webhook, Book, PROVIDER,
};
use super::testing::TestDatabase;
use super::PgStore;
use crate::ingest::FetchReason;
use crate::state::CashoutStatus;
use crate::store::{CompletedRecheck, LedgerEntry, LedgerOutcome, Store, StoreError};

/// The operations under test, with the facade's signatures, and the cash-out's external id.
#[async_trait]
trait Ops: Book {
    async fn watermark(&self) -> Result<Option<DateTime<Utc>>, StoreError>;
    async fn set_watermark(&self, watermark: DateTime<Utc>) -> Result<(), StoreError>;
    async fn due_status_checks(
        &self,
        cutoff: DateTime<Utc>,
        recheck: Option<CompletedRecheck>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;
    async fn mark_status_checked(&self, provider_ref: &str) -> Result<(), StoreError>;
    async fn request_fetch(&self, provider_ref: &str) -> Result<bool, StoreError>;
    async fn due_fetches(&self, limit: usize) -> Result<Vec<(String, String)>, StoreError>;
    async fn complete_fetch(&self, provider_ref: &str) -> Result<(), StoreError>;
    async fn defer_fetch(&self, provider_ref: &str, max_attempts: i64) -> Result<bool, StoreError>;
    async fn queued_fetch_count(&self) -> Result<i64, StoreError>;
    async fn prune_replay_cache(&self, before: DateTime<Utc>) -> Result<usize, StoreError>;
    async fn register(&self, entry: LedgerEntry) -> Result<LedgerOutcome, StoreError>;
    async fn ledger_refs_unseen(
        &self,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;
    async fn external_id(&self, provider_ref: &str) -> Option<String>;
}

/// The same forwarding for both stores (their methods share names and signatures).
macro_rules! forward_ops {
    ($store:ty, $external_id:ident) => {
        #[async_trait]
        impl Ops for $store {
            async fn watermark(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
                <$store>::watermark(self, PROVIDER.to_string()).await
            }
            async fn set_watermark(&self, watermark: DateTime<Utc>) -> Result<(), StoreError> {
                <$store>::set_watermark(self, PROVIDER.to_string(), watermark).await
            }
            async fn due_status_checks(
                &self,
                cutoff: DateTime<Utc>,
                recheck: Option<CompletedRecheck>,
                limit: usize,
            ) -> Result<Vec<String>, StoreError> {
                <$store>::due_status_checks(self, PROVIDER.to_string(), cutoff, recheck, limit)
                    .await
            }
            async fn mark_status_checked(&self, provider_ref: &str) -> Result<(), StoreError> {
                <$store>::mark_status_checked(self, PROVIDER.to_string(), provider_ref.to_string())
                    .await
            }
            async fn request_fetch(&self, provider_ref: &str) -> Result<bool, StoreError> {
                <$store>::request_status_fetch(
                    self,
                    PROVIDER.to_string(),
                    provider_ref.to_string(),
                    FetchReason::ThinNotification,
                    1000,
                    Utc::now(),
                )
                .await
            }
            async fn due_fetches(&self, limit: usize) -> Result<Vec<(String, String)>, StoreError> {
                <$store>::due_fetches(self, PROVIDER.to_string(), limit).await
            }
            async fn complete_fetch(&self, provider_ref: &str) -> Result<(), StoreError> {
                <$store>::complete_fetch(self, PROVIDER.to_string(), provider_ref.to_string()).await
            }
            async fn defer_fetch(
                &self,
                provider_ref: &str,
                max_attempts: i64,
            ) -> Result<bool, StoreError> {
                <$store>::defer_fetch(
                    self,
                    PROVIDER.to_string(),
                    provider_ref.to_string(),
                    max_attempts,
                )
                .await
            }
            async fn queued_fetch_count(&self) -> Result<i64, StoreError> {
                <$store>::queued_fetch_count(self, PROVIDER.to_string()).await
            }
            async fn prune_replay_cache(&self, before: DateTime<Utc>) -> Result<usize, StoreError> {
                <$store>::prune_replay_cache(self, before).await
            }
            async fn register(&self, entry: LedgerEntry) -> Result<LedgerOutcome, StoreError> {
                <$store>::register_expected(self, entry).await
            }
            async fn ledger_refs_unseen(
                &self,
                cutoff: DateTime<Utc>,
                limit: usize,
            ) -> Result<Vec<String>, StoreError> {
                <$store>::ledger_refs_unseen(self, PROVIDER.to_string(), cutoff, limit).await
            }
            async fn external_id(&self, provider_ref: &str) -> Option<String> {
                $external_id(self, provider_ref).await
            }
        }
    };
}

forward_ops!(Store, external_id_of_sqlite);
forward_ops!(PgStore, external_id_of_pg);

async fn external_id_of_sqlite(store: &Store, provider_ref: &str) -> Option<String> {
    store
        .get_cashout(PROVIDER.to_string(), provider_ref.to_string())
        .await
        .expect("read a cash-out")
        .and_then(|(row, _)| row.external_id)
}

async fn external_id_of_pg(store: &PgStore, provider_ref: &str) -> Option<String> {
    let client = store.client().await.expect("a connection");
    client
        .query_opt(
            "SELECT external_id FROM cashouts WHERE provider = $1 AND provider_ref = $2",
            &[&PROVIDER, &provider_ref],
        )
        .await
        .expect("read a cash-out")
        .and_then(|row| row.get(0))
}

fn entry(external_id: &str, amount_minor: i64, provider_ref: Option<&str>) -> LedgerEntry {
    LedgerEntry {
        provider: PROVIDER.to_string(),
        external_id: external_id.to_string(),
        amount_minor,
        currency: "USD".to_string(),
        provider_ref: provider_ref.map(str::to_string),
        created_at: None,
    }
}

/// A webhook for `provider_ref` received at `at`.
async fn ingest_at(
    ops: &dyn Ops,
    event_id: &str,
    provider_ref: &str,
    status: CashoutStatus,
    at: DateTime<Utc>,
) {
    let body = format!(r#"{{"id":"{event_id}","ref":"{provider_ref}","status":"{status}"}}"#);
    accepted(
        &ops.ingest(record_at(
            event_id,
            &format!("key-{event_id}"),
            &body,
            None,
            Ok(observation(provider_ref, Some(status))),
            at,
        ))
        .await
        .expect("ingested"),
    );
}

async fn watermarks_never_move_backwards(ops: &dyn Ops) {
    assert_eq!(ops.watermark().await.expect("read"), None);
    let t1 = Utc::now() - Duration::hours(2);
    let t2 = t1 + Duration::hours(1);
    ops.set_watermark(t2).await.expect("set");
    ops.set_watermark(t1).await.expect("set backwards");
    let read = ops.watermark().await.expect("read").expect("set");
    assert_eq!(read.timestamp_millis(), t2.timestamp_millis());
    let t3 = t2 + Duration::minutes(30);
    ops.set_watermark(t3).await.expect("set forwards");
    let read = ops.watermark().await.expect("read").expect("set");
    assert_eq!(read.timestamp_millis(), t3.timestamp_millis());
}

async fn due_status_checks_least_recently_checked_first(ops: &dyn Ops) {
    let hour_ago = Utc::now() - Duration::hours(1);
    ingest_at(ops, "ev-a", "ref-a", CashoutStatus::Processing, hour_ago).await;
    ingest_at(
        ops,
        "ev-b",
        "ref-b",
        CashoutStatus::Completed,
        hour_ago + Duration::seconds(1),
    )
    .await;
    ingest_at(
        ops,
        "ev-c",
        "ref-c",
        CashoutStatus::Pending,
        hour_ago + Duration::seconds(2),
    )
    .await;
    ingest_at(
        ops,
        "ev-d",
        "ref-d",
        CashoutStatus::Failed,
        hour_ago + Duration::seconds(3),
    )
    .await;
    let cutoff = Utc::now() - Duration::minutes(30);
    assert_eq!(
        ops.due_status_checks(cutoff, None, 10).await.expect("due"),
        vec!["ref-a", "ref-c"]
    );
    // All updated after this cutoff: none due.
    assert!(ops
        .due_status_checks(hour_ago - Duration::minutes(1), None, 10)
        .await
        .expect("due")
        .is_empty());
    ops.mark_status_checked("ref-a").await.expect("checked");
    assert_eq!(
        ops.due_status_checks(cutoff, None, 10).await.expect("due"),
        vec!["ref-c"]
    );
    let recheck = CompletedRecheck {
        completed_since: hour_ago - Duration::minutes(1),
        checked_before: cutoff,
    };
    assert_eq!(
        ops.due_status_checks(cutoff, Some(recheck), 10)
            .await
            .expect("due"),
        vec!["ref-c", "ref-b"]
    );
    assert_eq!(
        ops.due_status_checks(cutoff, Some(recheck), 1)
            .await
            .expect("due"),
        vec!["ref-c"]
    );
    // Completed before `completed_since`: not asked again.
    let later = CompletedRecheck {
        completed_since: hour_ago + Duration::minutes(10),
        ..recheck
    };
    assert_eq!(
        ops.due_status_checks(cutoff, Some(later), 10)
            .await
            .expect("due"),
        vec!["ref-c"]
    );
    ops.mark_status_checked("ref-b").await.expect("checked");
    assert_eq!(
        ops.due_status_checks(cutoff, Some(recheck), 10)
            .await
            .expect("due"),
        vec!["ref-c"]
    );
    // Unknown cash-out: nothing to mark, no error.
    ops.mark_status_checked("ref-none").await.expect("no-op");
}

async fn the_fetch_queue_completes_defers_and_gives_up(ops: &dyn Ops) {
    for provider_ref in ["ref-f1", "ref-f2", "ref-f3"] {
        assert!(ops.request_fetch(provider_ref).await.expect("queued"));
    }
    assert!(!ops.request_fetch("ref-f1").await.expect("already queued"));
    assert_eq!(ops.queued_fetch_count().await.expect("count"), 3);
    let due = ops.due_fetches(10).await.expect("due");
    let reason = FetchReason::ThinNotification.as_str().to_string();
    assert_eq!(
        due,
        ["ref-f1", "ref-f2", "ref-f3"]
            .map(|r| (r.to_string(), reason.clone()))
            .to_vec()
    );
    ops.complete_fetch("ref-f1").await.expect("completed");
    assert_eq!(ops.queued_fetch_count().await.expect("count"), 2);
    assert!(ops.defer_fetch("ref-f2", 5).await.expect("deferred"));
    assert!(!ops.defer_fetch("ref-f3", 1).await.expect("given up"));
    assert_eq!(ops.queued_fetch_count().await.expect("count"), 1);
    // ref-f2 waits out its backoff.
    assert!(ops.due_fetches(10).await.expect("due").is_empty());
    assert!(!ops
        .defer_fetch("ref-none", 5)
        .await
        .expect("nothing queued"));
    ops.complete_fetch("ref-f2").await.expect("completed");
    ops.complete_fetch("ref-none").await.expect("no-op");
    assert_eq!(ops.queued_fetch_count().await.expect("count"), 0);
}

async fn old_replay_cache_entries_are_pruned(ops: &dyn Ops) {
    let now = Utc::now();
    for (i, at) in [now - Duration::hours(3), now - Duration::hours(2), now]
        .into_iter()
        .enumerate()
    {
        let body = format!(r#"{{"ref":"ref-r{i}","status":"processing"}}"#);
        accepted(
            &ops.ingest(record_at(
                &format!("ev-r{i}"),
                &format!("key-r{i}"),
                &body,
                Some(&format!("nonce-r{i}")),
                Ok(observation(
                    &format!("ref-r{i}"),
                    Some(CashoutStatus::Processing),
                )),
                at,
            ))
            .await
            .expect("ingested"),
        );
    }
    assert_eq!(
        ops.prune_replay_cache(now - Duration::hours(1))
            .await
            .expect("pruned"),
        2
    );
    assert_eq!(
        ops.prune_replay_cache(now - Duration::hours(1))
            .await
            .expect("pruned"),
        0
    );
    assert_eq!(
        ops.prune_replay_cache(now + Duration::minutes(1))
            .await
            .expect("pruned"),
        1
    );
}

async fn ledger_registration_is_idempotent_and_links_known_cashouts(ops: &dyn Ops) {
    accepted(
        &ops.ingest(status_webhook("ev-k", "ref-k", CashoutStatus::Processing))
            .await
            .expect("ingested"),
    );
    let events_before = ops.cashout("ref-k").await.expect("stored").events;
    let known = entry("ext-1", 1000, Some("ref-k"));
    assert_eq!(
        ops.register(known.clone()).await.expect("new"),
        LedgerOutcome::Created
    );
    assert_eq!(ops.external_id("ref-k").await.as_deref(), Some("ext-1"));
    assert_eq!(
        ops.cashout("ref-k").await.expect("stored").events,
        events_before + 1,
        "the link is on the timeline"
    );
    assert_eq!(
        ops.register(known.clone()).await.expect("again"),
        LedgerOutcome::Unchanged
    );
    let dated = LedgerEntry {
        created_at: Some(Utc::now() - Duration::days(3)),
        ..known.clone()
    };
    assert_eq!(
        ops.register(dated).await.expect("dated"),
        LedgerOutcome::Conflict
    );
    assert_eq!(
        ops.register(entry("ext-1", 1001, Some("ref-k")))
            .await
            .expect("other amount"),
        LedgerOutcome::Conflict
    );
    assert_eq!(
        ops.register(entry("ext-1", 1000, None))
            .await
            .expect("no ref"),
        LedgerOutcome::Conflict
    );
    // Another entry naming a cash-out already linked: registered, the link kept.
    assert_eq!(
        ops.register(entry("ext-2", 500, Some("ref-k")))
            .await
            .expect("new"),
        LedgerOutcome::Created
    );
    assert_eq!(ops.external_id("ref-k").await.as_deref(), Some("ext-1"));
    assert_eq!(
        ops.register(entry("ext-3", 700, Some("ref-unseen")))
            .await
            .expect("new"),
        LedgerOutcome::Created
    );
    assert_eq!(
        ops.register(entry("ext-4", 700, None)).await.expect("new"),
        LedgerOutcome::Created
    );
    let cutoff = Utc::now() + Duration::minutes(1);
    assert_eq!(
        ops.ledger_refs_unseen(cutoff, 10).await.expect("unseen"),
        vec!["ref-unseen"]
    );
    assert!(ops
        .ledger_refs_unseen(Utc::now() - Duration::hours(1), 10)
        .await
        .expect("unseen")
        .is_empty());
    // Once the book sees it, it is no longer unseen.
    accepted(
        &ops.ingest(status_webhook("ev-u", "ref-unseen", CashoutStatus::Pending))
            .await
            .expect("ingested"),
    );
    assert!(ops
        .ledger_refs_unseen(cutoff, 10)
        .await
        .expect("unseen")
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
    watermarks_never_move_backwards,
    due_status_checks_least_recently_checked_first,
    the_fetch_queue_completes_defers_and_gives_up,
    old_replay_cache_entries_are_pruned,
    ledger_registration_is_idempotent_and_links_known_cashouts,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_draining_due_fetches_at_once_never_get_the_same_row() {
    const ROWS: usize = 150;
    let database = TestDatabase::create().await;
    let pools = [database.migrated(4).await, database.store(4)];
    assert_ne!(pools[0].claimer(), pools[1].claimer());
    for i in 0..ROWS {
        assert!(Ops::request_fetch(&pools[0], &format!("ref-{i:03}"))
            .await
            .expect("queued"));
    }
    let barrier = Arc::new(Barrier::new(2));
    let mut tasks = Vec::new();
    for pool in &pools {
        let pool = pool.clone();
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut got = Vec::new();
            loop {
                let batch = Ops::due_fetches(&pool, 7).await.expect("claimed");
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch.into_iter().map(|(provider_ref, _)| provider_ref));
            }
        }));
    }
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.push(task.await.expect("task"));
    }
    let all: BTreeSet<&String> = claimed.iter().flatten().collect();
    assert_eq!(
        claimed.iter().map(Vec::len).sum::<usize>(),
        ROWS,
        "each row claimed once: {:?}",
        claimed.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_eq!(all.len(), ROWS);
    // Claimed rows stay queued until completed; a deferral by the other pool is refused.
    assert_eq!(
        Ops::queued_fetch_count(&pools[0]).await.expect("count"),
        ROWS as i64
    );
    let [mine, _] = &claimed[..] else {
        panic!("two tasks")
    };
    if let Some(first) = mine.first() {
        assert!(!Ops::defer_fetch(&pools[1], first, 5)
            .await
            .expect("not its claim"));
        assert!(Ops::defer_fetch(&pools[0], first, 5)
            .await
            .expect("its claim"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_registering_one_ledger_entry_at_once_create_it_once() {
    const ENTRIES: usize = 30;
    let database = TestDatabase::create().await;
    let pools = [database.migrated(4).await, database.store(4)];
    // Half the entries name a cash-out the book knows: it is linked once.
    for i in (0..ENTRIES).step_by(2) {
        accepted(
            &pools[0]
                .ingest_webhook(status_webhook(
                    &format!("ev-{i}"),
                    &format!("ref-{i}"),
                    CashoutStatus::Processing,
                ))
                .await
                .expect("ingested"),
        );
    }
    let register_both = |first: LedgerEntry, second: LedgerEntry| {
        let barrier = Arc::new(Barrier::new(2));
        let tasks: Vec<_> = [first, second]
            .into_iter()
            .zip(pools.iter().cloned())
            .map(|(entry, pool)| {
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    barrier.wait().await;
                    pool.register_expected(entry).await
                })
            })
            .collect();
        async move {
            let mut outcomes = Vec::new();
            for task in tasks {
                outcomes.push(task.await.expect("task").expect("no store error"));
            }
            outcomes
        }
    };
    for i in 0..ENTRIES {
        let same = entry(
            &format!("ext-{i}"),
            100 + i as i64,
            Some(&format!("ref-{i}")),
        );
        let mut outcomes = register_both(same.clone(), same.clone()).await;
        outcomes.sort_by_key(|o| format!("{o:?}"));
        assert_eq!(
            outcomes,
            vec![LedgerOutcome::Created, LedgerOutcome::Unchanged],
            "entry {i}"
        );
        let other = LedgerEntry {
            amount_minor: same.amount_minor + 1,
            ..same
        };
        assert_eq!(
            pools[i % 2]
                .register_expected(other)
                .await
                .expect("other body"),
            LedgerOutcome::Conflict
        );
    }
    // Two different bodies at once: one registered, the other a conflict.
    for i in 0..ENTRIES {
        let a = entry(&format!("race-{i}"), 1, None);
        let b = entry(&format!("race-{i}"), 2, None);
        let mut outcomes = register_both(a, b).await;
        outcomes.sort_by_key(|o| format!("{o:?}"));
        assert_eq!(
            outcomes,
            vec![LedgerOutcome::Conflict, LedgerOutcome::Created],
            "race {i}"
        );
    }
    let client = pools[1].client().await.expect("a connection");
    let count = |sql: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(sql, &[])
                .await
                .expect("count")
                .get::<_, i64>(0)
        }
    };
    assert_eq!(
        count("SELECT COUNT(*) FROM ledger").await,
        2 * ENTRIES as i64
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM events WHERE outcome = 'ledger_linked'").await,
        ENTRIES.div_ceil(2) as i64
    );
    for i in (0..ENTRIES).step_by(2) {
        assert_eq!(
            external_id_of_pg(&pools[0], &format!("ref-{i}")).await,
            Some(format!("ext-{i}"))
        );
    }
}
