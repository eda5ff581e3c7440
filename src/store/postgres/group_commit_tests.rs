//! The webhook batches of [`super::group_commit`]: one batch ends as the same webhooks in
//! sequential transactions would (several of one cash-out, duplicates, replays, shared
//! keys), a key committed by another pool meanwhile, and failures: a batch failing midway
//! acknowledges nothing and commits on its retry; one poisoned webhook fails alone; two
//! batches creating the same cash-outs in opposite orders do not deadlock.

use std::sync::Arc;

use chrono::Utc;
use tokio::sync::Barrier;

use super::ingest_tests::{accepted, observation, record, sqlite, status_webhook, Book};
use super::testing::TestDatabase;
use super::PgStore;
use crate::ingest::{IngestOutcome, WebhookRecord};
use crate::reconcile::MismatchKind;
use crate::state::{CashoutStatus, Transition};

/// The after-snapshot status of each event, by event id.
async fn snapshots(store: &PgStore) -> Vec<(String, Option<String>, Option<i64>)> {
    let client = store.client().await.expect("a connection");
    client
        .query(
            "SELECT event_id, after_status, after_webhooks FROM events ORDER BY event_id",
            &[],
        )
        .await
        .expect("events")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

/// A mixed batch: several webhooks of one cash-out (created, advanced, out of order, a
/// conflict), a thin notification, an unparseable body, a duplicate and a replay.
fn mixed_batch() -> Vec<WebhookRecord> {
    use CashoutStatus::*;
    let mut thin = observation("ref-t", None);
    thin.external_id = Some("ext-t".into());
    vec![
        status_webhook("ev-01", "ref-a", Pending),
        status_webhook("ev-02", "ref-b", Processing),
        status_webhook("ev-03", "ref-a", Processing),
        record("ev-04", "dedup-thin", r#"{"thin":1}"#, None, Ok(thin)),
        status_webhook("ev-05", "ref-a", Completed),
        record("ev-06", "dedup-q", "{", None, Err("broken".into())),
        status_webhook("ev-07", "ref-a", Pending),
        status_webhook("ev-08", "ref-a", Failed),
        status_webhook("ev-09", "ref-b", Completed),
        // The same delivery as ev-02 (same key, same body), and its key with another body.
        status_webhook("ev-02", "ref-b", Processing),
        record(
            "ev-11",
            "key-ev-09",
            "another body",
            None,
            Ok(observation("ref-b", Some(Failed))),
        ),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, mut webhook)| {
        // The copy of ev-02 arrives under a new event id.
        if i == 9 {
            webhook.event_id = "ev-10".into();
        }
        webhook
    })
    .collect()
}

#[tokio::test]
async fn a_batch_ends_as_its_webhooks_in_sequential_transactions_would() {
    let database = TestDatabase::create().await;
    let store = database.migrated(4).await;
    let webhooks = mixed_batch();
    let batched: Vec<IngestOutcome> = store
        .ingest_webhooks(webhooks.clone())
        .await
        .into_iter()
        .map(|outcome| outcome.expect("no store error"))
        .collect();

    let (_dir, sequential) = sqlite();
    let mut expected = Vec::new();
    for webhook in webhooks {
        expected.push(sequential.ingest(webhook).await.expect("sqlite"));
    }
    // Cash-out ids differ between the stores; everything else is the same.
    let without_ids = |outcomes: &[IngestOutcome]| -> Vec<IngestOutcome> {
        outcomes
            .iter()
            .cloned()
            .map(|mut outcome| {
                if let IngestOutcome::Accepted { applied, .. } = &mut outcome {
                    applied.cashout_id = applied.cashout_id.map(|_| 0);
                }
                outcome
            })
            .collect()
    };
    assert_eq!(without_ids(&batched), without_ids(&expected));
    use CashoutStatus::*;
    assert_eq!(
        accepted(&batched[2]).transition,
        Some(Transition::Advanced { from: Pending })
    );
    assert_eq!(
        batched[9],
        IngestOutcome::Duplicate {
            event_id: "ev-02".into()
        }
    );
    assert_eq!(batched[10], IngestOutcome::Replayed);
    for provider_ref in ["ref-a", "ref-b"] {
        assert_eq!(
            store.cashout(provider_ref).await,
            sequential.cashout(provider_ref).await,
            "{provider_ref}"
        );
    }
    assert_eq!(
        store.findings(MismatchKind::StatusConflict, true).await,
        sequential
            .findings(MismatchKind::StatusConflict, true)
            .await
    );
    assert_eq!(store.fetches().await, vec!["ref-t".to_string()]);
    assert!(accepted(&batched[3]).status_fetch_queued);
    // Each event's snapshot is its cash-out right after it, not after the batch.
    let snapshots = snapshots(&store).await;
    let status_after = |event_id: &str| {
        snapshots
            .iter()
            .find(|(id, _, _)| id == event_id)
            .map(|(_, status, webhooks)| (status.clone(), *webhooks))
    };
    assert_eq!(
        status_after("ev-01"),
        Some((Some("pending".into()), Some(1)))
    );
    assert_eq!(
        status_after("ev-03"),
        Some((Some("processing".into()), Some(2)))
    );
    assert_eq!(
        status_after("ev-05"),
        Some((Some("completed".into()), Some(3)))
    );
    assert_eq!(
        status_after("ev-08"),
        Some((Some("completed".into()), Some(5)))
    );
    assert_eq!(status_after("ev-06"), Some((None, None)));
    assert_eq!(status_after("ev-10"), None);
    assert_eq!(status_after("ev-11"), None);
    sequential.close().await;
}

#[tokio::test]
async fn webhooks_sharing_a_key_or_a_nonce_in_one_batch_are_taken_in_order() {
    let database = TestDatabase::create().await;
    let store = database.migrated(4).await;
    let body = r#"{"ref":"ref-n","status":"processing"}"#;
    let parsed = |status| Ok(observation("ref-n", Some(status)));
    use CashoutStatus::*;
    let outcomes: Vec<IngestOutcome> = store
        .ingest_webhooks(vec![
            record("ev-n1", "req-a", body, Some("nonce-1"), parsed(Processing)),
            // Re-encoded: another request id, the same MAC.
            record("ev-n2", "req-b", body, Some("nonce-1"), parsed(Processing)),
            record("ev-n3", "req-c", "other", Some("nonce-1"), parsed(Failed)),
            // The refused delivery freed req-c.
            record(
                "ev-n4",
                "req-c",
                "genuine",
                Some("nonce-2"),
                parsed(Completed),
            ),
        ])
        .await
        .into_iter()
        .map(|outcome| outcome.expect("no store error"))
        .collect();
    assert_eq!(accepted(&outcomes[0]).transition, Some(Transition::Created));
    assert_eq!(
        outcomes[1],
        IngestOutcome::Duplicate {
            event_id: "ev-n1".into()
        }
    );
    assert_eq!(outcomes[2], IngestOutcome::Replayed);
    assert_eq!(accepted(&outcomes[3]).status, Completed);
    let seen = store.cashout("ref-n").await.expect("stored");
    assert_eq!(
        (seen.status, seen.webhook_count, seen.events),
        (Completed, 2, 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_committed_by_another_pool_is_a_duplicate_in_a_batch() {
    let database = TestDatabase::create().await;
    let (this, other) = (database.migrated(4).await, database.store(4));
    use CashoutStatus::*;
    let first = status_webhook("ev-w", "ref-w", Processing);
    accepted(
        &other
            .ingest_webhook(first.clone())
            .await
            .expect("other pool"),
    );
    let mut copy = first;
    copy.event_id = "ev-w-copy".into();
    let outcomes: Vec<IngestOutcome> = this
        .ingest_webhooks(vec![
            status_webhook("ev-x", "ref-w", Pending),
            copy,
            status_webhook("ev-y", "ref-w", Completed),
        ])
        .await
        .into_iter()
        .map(|outcome| outcome.expect("no store error"))
        .collect();
    assert_eq!(
        accepted(&outcomes[0]).transition,
        Some(Transition::OutOfOrder)
    );
    assert_eq!(
        outcomes[1],
        IngestOutcome::Duplicate {
            event_id: "ev-w".into()
        }
    );
    assert_eq!(
        accepted(&outcomes[2]).transition,
        Some(Transition::Advanced { from: Processing })
    );
    let seen = this.cashout("ref-w").await.expect("stored");
    assert_eq!(
        (seen.status, seen.webhook_count, seen.events),
        (Completed, 3, 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_taken_by_another_pool_during_the_batch_runs_it_again() {
    // The other pool holds ev-k's dedup key uncommitted while this batch loads: this
    // batch finds no holder, plans it new, waits on the key at its insert, and once the
    // other commits runs again and answers it as a duplicate.
    let database = TestDatabase::create().await;
    let (this, other) = (database.migrated(4).await, database.store(4));
    let webhook = status_webhook("ev-k", "ref-k", CashoutStatus::Completed);
    let mut client = other.client().await.expect("a connection");
    let tx = client.transaction().await.expect("tx");
    assert_eq!(
        super::claims::claim_dedup_key(&tx, &webhook)
            .await
            .expect("claimed"),
        None
    );
    let mut copy = webhook.clone();
    copy.event_id = "ev-k-copy".into();
    let batch = tokio::spawn({
        let this = this.clone();
        async move {
            this.ingest_webhooks(vec![
                status_webhook("ev-j", "ref-j", CashoutStatus::Pending),
                copy,
            ])
            .await
        }
    });
    super::tests::wait_for_lock_waiter(&this, "INSERT INTO events").await;
    tx.commit().await.expect("commit");
    let outcomes = batch.await.expect("task");
    accepted(outcomes[0].as_ref().expect("ev-j"));
    assert_eq!(
        outcomes[1].as_ref().expect("the copy"),
        &IngestOutcome::Duplicate {
            event_id: "ev-k".into()
        }
    );
    assert_eq!(this.cashout("ref-j").await.map(|seen| seen.events), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_creating_the_same_cashouts_in_opposite_orders_do_not_deadlock() {
    // Another pool's batch creates ref-a, then ref-b (not committed yet); this pool's batch
    // has them the other way round. It waits on ref-a before it takes ref-b, so the other
    // creates ref-b without waiting on it: no cycle for PostgreSQL's deadlock detection to
    // break after `deadlock_timeout`.
    use super::claims;
    use crate::state::CurrentState;
    use CashoutStatus::*;
    let database = TestDatabase::create().await;
    let (this, other) = (database.migrated(4).await, database.store(4));
    let mut client = other.client().await.expect("a connection");
    let tx = client.transaction().await.expect("tx");
    // Any wait on a lock fails the other's insert (long before a deadlock would be found).
    tx.batch_execute("SET LOCAL lock_timeout = '500ms'")
        .await
        .expect("lock_timeout");
    let pending = CurrentState {
        status: Pending,
        held: false,
    };
    let provider = super::ingest_tests::PROVIDER;
    let a = claims::cashout_or_insert_for_update(&tx, provider, "ref-a", pending, Utc::now())
        .await
        .expect("ref-a");
    assert!(a.inserted);
    let batch = tokio::spawn({
        let this = this.clone();
        async move {
            this.ingest_webhooks(vec![
                status_webhook("ev-b", "ref-b", Processing),
                status_webhook("ev-a", "ref-a", Processing),
            ])
            .await
        }
    });
    super::tests::wait_for_lock_waiter(&this, "INSERT INTO cashouts").await;
    let b = claims::cashout_or_insert_for_update(&tx, provider, "ref-b", pending, Utc::now())
        .await
        .expect("ref-b created without waiting on the batch");
    assert!(b.inserted);
    tx.commit().await.expect("commit");
    // The batch runs again against both committed cash-outs.
    for outcome in batch.await.expect("task") {
        assert_eq!(
            accepted(outcome.as_ref().expect("ingested")).transition,
            Some(Transition::Advanced { from: Pending })
        );
    }
    for provider_ref in ["ref-a", "ref-b"] {
        let seen = this.cashout(provider_ref).await.expect("stored");
        assert_eq!(
            (seen.status, seen.webhook_count, seen.events),
            (Processing, 1, 1)
        );
    }
}

/// Installs a trigger failing the insert of event `event_id` with `sqlstate`: on the
/// first `times` attempts only (a sequence counts them across rollbacks), or always.
async fn fail_event_insert(store: &PgStore, event_id: &str, sqlstate: &str, times: Option<u32>) {
    let client = store.client().await.expect("a connection");
    let fails = match times {
        Some(times) => format!("nextval('insert_attempts') <= {times}"),
        None => "nextval('insert_attempts') > 0".to_string(),
    };
    client
        .batch_execute(&format!(
            "CREATE SEQUENCE insert_attempts;
             CREATE FUNCTION fail_event_insert() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.event_id = '{event_id}' THEN
                 IF {fails} THEN
                   RAISE EXCEPTION 'injected failure' USING ERRCODE = '{sqlstate}';
                 END IF;
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER fail_event_insert BEFORE INSERT ON events
               FOR EACH ROW EXECUTE FUNCTION fail_event_insert();"
        ))
        .await
        .expect("the trigger");
}

async fn insert_attempts(store: &PgStore) -> i64 {
    let client = store.client().await.expect("a connection");
    client
        .query_one("SELECT last_value FROM insert_attempts", &[])
        .await
        .expect("the sequence")
        .get(0)
}

fn three_webhooks() -> Vec<WebhookRecord> {
    use CashoutStatus::*;
    vec![
        status_webhook("ev-a", "ref-f", Pending),
        status_webhook("ev-b", "ref-f", Processing),
        status_webhook("ev-c", "ref-g", Completed),
    ]
}

#[tokio::test]
async fn a_batch_failing_midway_acknowledges_nothing_and_commits_on_its_retry() {
    let database = TestDatabase::create().await;
    let store = database.migrated(4).await;
    // ev-b's event fails after the batch wrote ref-f's and ref-g's cash-outs and ev-a.
    fail_event_insert(&store, "ev-b", "40001", Some(1)).await;
    let outcomes = store.ingest_webhooks(three_webhooks()).await;
    for outcome in &outcomes {
        accepted(outcome.as_ref().expect("committed on the retry"));
    }
    assert_eq!(
        insert_attempts(&store).await,
        2,
        "one failed attempt, one retry"
    );
    // Nothing of the failed attempt remains: every webhook counted once.
    let f = store.cashout("ref-f").await.expect("ref-f");
    assert_eq!(
        (f.status, f.webhook_count, f.events),
        (CashoutStatus::Processing, 2, 2)
    );
    let g = store.cashout("ref-g").await.expect("ref-g");
    assert_eq!((g.webhook_count, g.events), (1, 1));
}

#[tokio::test]
async fn a_batch_that_cannot_commit_acknowledges_none_of_its_webhooks() {
    let database = TestDatabase::create().await;
    let store = database.migrated(4).await;
    // A conflict every time: the batch, then each webhook alone, give up.
    fail_event_insert(&store, "ev-b", "40001", None).await;
    let outcomes = store.ingest_webhooks(three_webhooks()).await;
    assert!(
        matches!(&outcomes[1], Err(crate::store::StoreError::Unavailable(_))),
        "{outcomes:?}"
    );
    // The others committed alone; ev-b left nothing behind.
    accepted(outcomes[0].as_ref().expect("ev-a alone"));
    accepted(outcomes[2].as_ref().expect("ev-c alone"));
    assert_eq!(store.event_outcome("ev-b").await, None);
    let f = store.cashout("ref-f").await.expect("ref-f");
    assert_eq!(
        (f.status, f.webhook_count, f.events),
        (CashoutStatus::Pending, 1, 1)
    );
}

#[tokio::test]
async fn a_poisoned_webhook_fails_alone_the_rest_of_its_batch_commits() {
    let database = TestDatabase::create().await;
    let store = database.migrated(4).await;
    fail_event_insert(&store, "ev-b", "P0001", None).await;
    let outcomes = store.ingest_webhooks(three_webhooks()).await;
    assert!(
        matches!(&outcomes[1], Err(crate::store::StoreError::Database(_))),
        "{outcomes:?}"
    );
    accepted(outcomes[0].as_ref().expect("ev-a"));
    accepted(outcomes[2].as_ref().expect("ev-c"));
    assert_eq!(store.event_outcome("ev-b").await, None);
    assert_eq!(
        store
            .cashout("ref-f")
            .await
            .map(|f| (f.webhook_count, f.events)),
        Some((1, 1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_webhooks_are_gathered_into_batches_and_answered_each() {
    let database = TestDatabase::create().await;
    let store = database.migrated(4).await;
    let barrier = Arc::new(Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let store = store.clone();
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .ingest_webhook(status_webhook(
                        &format!("ev-{i:03}"),
                        &format!("ref-{}", i % 10),
                        CashoutStatus::Processing,
                    ))
                    .await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let outcome = task.await.expect("task").expect("no store error");
        match outcome {
            IngestOutcome::Accepted { event_id, .. } => assert_eq!(event_id, format!("ev-{i:03}")),
            other => panic!("not accepted: {other:?}"),
        }
    }
    for r in 0..10 {
        let seen = store.cashout(&format!("ref-{r}")).await.expect("stored");
        assert_eq!((seen.webhook_count, seen.events), (10, 10));
    }
}

/// The plan each batch statement keeps for a second (a generic plan, made under the
/// batch's settings) on a big, analyzed book: every table is read through the index of
/// the key looked up, never from end to end.
#[tokio::test]
async fn every_batch_statement_keeps_a_plan_that_reads_by_key() {
    use super::console_tests::{plan_nodes, seed_big_book};
    use super::group_commit::*;
    let database = TestDatabase::create().await;
    let pg = database.migrated(2).await;
    seed_big_book(&pg, 30_000).await;
    let client = pg.client().await.expect("a connection");
    client
        .batch_execute(
            "INSERT INTO replay_cache (provider, nonce, body_sha256, event_id, seen_at)
             SELECT 'fiserv', 'nonce-' || i, md5(i::TEXT), 'ev-' || i, i FROM generate_series(1, 30000) AS i;
             INSERT INTO ledger (provider, external_id, amount_minor, currency, provider_ref, created_at, registered_at)
             SELECT 'fiserv', 'ext-' || i, i, 'BRL', 'ref-' || i, i, i FROM generate_series(1, 30000) AS i;
             ANALYZE",
        )
        .await
        .expect("replay cache and ledger");
    let statements: [(&str, &str, &[&str]); 12] = [
        ("load priors", LOAD_PRIORS, &["events_dedup"]),
        (
            "load nonce holders",
            LOAD_NONCE_HOLDERS,
            &["replay_cache_pkey"],
        ),
        (
            "lock cash-outs",
            LOCK_CASHOUTS,
            &["cashouts_provider_provider_ref_key"],
        ),
        ("load ledger", LOAD_LEDGER, &["ledger_by_ref"]),
        ("insert cash-outs", INSERT_CASHOUTS, &[]),
        (
            "link earlier events",
            LINK_EARLIER_EVENTS,
            &["events_unlinked", "cashouts_provider_provider_ref_key"],
        ),
        (
            "advance cash-outs",
            ADVANCE_CASHOUTS,
            &["cashouts_provider_provider_ref_key"],
        ),
        (
            "fill in cash-outs",
            FILL_IN_CASHOUTS,
            &["cashouts_provider_provider_ref_key"],
        ),
        ("open findings", OPEN_FINDINGS, &[]),
        ("queue fetches", QUEUE_FETCHES, &[]),
        ("claim nonces", CLAIM_NONCES, &[]),
        (
            "insert events",
            INSERT_EVENTS,
            &["cashouts_provider_provider_ref_key"],
        ),
    ];
    for (label, sql, uses) in statements {
        // As many NULL arguments as parameters: a generic plan does not look at them.
        let parameters = (1..=20)
            .rev()
            .find(|n| sql.contains(&format!("${n}")))
            .expect("a parameter");
        let args = vec!["NULL"; parameters].join(", ");
        let messages = client
            .simple_query(&format!(
                "BEGIN; {BATCH_PLAN_SETTINGS}; PREPARE planned AS {sql};
                 EXPLAIN (FORMAT JSON) EXECUTE planned({args}); DEALLOCATE planned; ROLLBACK"
            ))
            .await
            .unwrap_or_else(|err| panic!("{label}: {err:?}"));
        let json = messages
            .iter()
            .find_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                _ => None,
            })
            .expect("a plan");
        let parsed: serde_json::Value = serde_json::from_str(&json).expect("plan JSON");
        let mut nodes = Vec::new();
        plan_nodes(&parsed[0]["Plan"], &mut nodes);
        let shown = format!("{label}: {nodes:?}");
        for (node, relation, _) in &nodes {
            assert!(
                node != "Seq Scan",
                "{relation} read from end to end: {shown}"
            );
        }
        for index in uses {
            assert!(
                nodes.iter().any(|(_, _, used)| used == index),
                "does not read {index}: {shown}"
            );
        }
    }
}
