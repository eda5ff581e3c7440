//! Tests of the PostgreSQL foundation against a real server (see [`super::testing`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::ResponseError;
use chrono::Utc;
use tokio::sync::Barrier;

use super::claims;
use super::lease::{self, FenceError};
use super::queue::{self, Deferred};
use super::testing::{with_database, TestDatabase};
use super::{schema, PgOptions, PgStore};
use crate::http::error::ApiError;
use crate::ingest::plan::{NonceClaim, PriorDelivery};
use crate::ingest::{FetchReason, WebhookRecord};
use crate::state::{CashoutStatus, CurrentState};
use crate::store::StoreError;

/// Generous: the machine is small and busy.
const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` until it holds or the deadline passes.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_once_when_two_pools_start_at_once() {
    let db = TestDatabase::create().await;
    let (a, b) = (db.store(2), db.store(2));
    let (ran_a, ran_b) = tokio::join!(a.migrate(), b.migrate());
    let (ran_a, ran_b) = (ran_a.expect("a migrates"), ran_b.expect("b migrates"));
    let all: Vec<i64> = schema::MIGRATIONS.iter().map(|m| m.version).collect();
    assert!(
        (ran_a == all && ran_b.is_empty()) || (ran_b == all && ran_a.is_empty()),
        "one pool applies every migration, the other none: {ran_a:?} / {ran_b:?}"
    );
    assert!(a.migrate().await.expect("again").is_empty());
    let client = a.client().await.expect("client");
    let recorded: i64 = client
        .query_one("SELECT COUNT(*) FROM schema_migrations", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(recorded, all.len() as i64);
}

#[tokio::test]
async fn a_database_migrated_from_different_sql_is_refused() {
    let db = TestDatabase::create().await;
    let store = db.migrated(2).await;
    let client = store.client().await.expect("client");
    client
        .execute(
            "UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1",
            &[],
        )
        .await
        .expect("tamper");
    let err = store.migrate().await.expect_err("refused");
    assert!(
        matches!(&err, StoreError::Open { reason, .. } if reason.contains("different SQL")),
        "{err}"
    );
    client
        .execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')",
            &[],
        )
        .await
        .expect("a newer binary's version");
    let err = store.migrate().await.expect_err("refused");
    assert!(matches!(&err, StoreError::Open { .. }), "{err}");
}

/// The PostgreSQL schema has every SQLite table, column and named index (SQLite's final
/// shape), plus what several instances need.
/// Every text column an index of the book holds compares bytes (migration 8), on a
/// database whose default collation does not (the test databases' ICU `en-US`).
#[tokio::test]
async fn every_indexed_text_column_compares_bytes() {
    let database = TestDatabase::create().await;
    let pg = database.migrated(1).await;
    let client = pg.client().await.expect("a connection");
    let others: Vec<(String, String, String)> = client
        .query(
            "SELECT DISTINCT t.relname::TEXT, a.attname::TEXT, COALESCE(co.collname::TEXT, '(default)')
             FROM pg_index i
             JOIN pg_class t ON t.oid = i.indrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = ANY (i.indkey)
             LEFT JOIN pg_collation co ON co.oid = a.attcollation
             WHERE n.nspname = current_schema() AND a.atttypid = 'text'::regtype
               AND t.relname <> 'schema_migrations'
               AND co.collname IS DISTINCT FROM 'C'
             ORDER BY 1, 2",
            &[],
        )
        .await
        .expect("the indexed columns")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(others, Vec::<(String, String, String)>::new());
}

#[tokio::test]
async fn the_schema_mirrors_the_sqlite_book() {
    let mut sqlite = rusqlite::Connection::open_in_memory().expect("sqlite");
    crate::store::schema::migrations()
        .to_latest(&mut sqlite)
        .expect("sqlite migrations");
    let mut sqlite_columns: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let tables: Vec<String> = sqlite
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .expect("tables")
        .query_map([], |row| row.get(0))
        .expect("tables")
        .collect::<Result<_, _>>()
        .expect("tables");
    for table in tables {
        let columns: BTreeSet<String> = sqlite
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .expect("columns")
            .query_map([], |row| row.get(0))
            .expect("columns")
            .collect::<Result<_, _>>()
            .expect("columns");
        sqlite_columns.insert(table, columns);
    }
    let sqlite_indexes: BTreeSet<String> = sqlite
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%'")
        .expect("indexes")
        .query_map([], |row| row.get(0))
        .expect("indexes")
        .collect::<Result<_, _>>()
        .expect("indexes");

    let db = TestDatabase::create().await;
    let store = db.migrated(1).await;
    let client = store.client().await.expect("client");
    let mut pg_columns: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in client
        .query(
            "SELECT table_name::TEXT, column_name::TEXT FROM information_schema.columns
             WHERE table_schema = 'public'",
            &[],
        )
        .await
        .expect("columns")
    {
        pg_columns.entry(row.get(0)).or_default().insert(row.get(1));
    }
    let pg_indexes: BTreeSet<String> = client
        .query(
            "SELECT indexname::TEXT FROM pg_indexes WHERE schemaname = 'public'",
            &[],
        )
        .await
        .expect("indexes")
        .iter()
        .map(|row| row.get(0))
        .collect();

    // Added for several instances: claims on the fetch queue's rows; the transaction ids
    // the continuous pass follows changes by (version 4).
    let instance_columns = BTreeMap::from([
        (
            "status_fetch_queue",
            BTreeSet::from(["claimed_by".to_string(), "claimed_until".to_string()]),
        ),
        ("events", BTreeSet::from(["change_xid".to_string()])),
        ("ledger", BTreeSet::from(["change_xid".to_string()])),
        (
            "reconcile_queue",
            BTreeSet::from(["queued_xid".to_string()]),
        ),
        ("reconcile_cursor", BTreeSet::from(["horizon".to_string()])),
    ]);
    for (table, columns) in &sqlite_columns {
        let mut expected = columns.clone();
        expected.extend(
            instance_columns
                .get(table.as_str())
                .cloned()
                .unwrap_or_default(),
        );
        assert_eq!(
            pg_columns.get(table),
            Some(&expected),
            "table {table}: PostgreSQL's columns differ from SQLite's"
        );
    }
    let only_pg: BTreeSet<&String> = pg_columns
        .keys()
        .filter(|t| !sqlite_columns.contains_key(*t))
        .collect();
    assert_eq!(
        only_pg,
        [
            "leases",
            "provider_request_slots",
            "provider_signals",
            "replay_cache",
            "schema_migrations",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .iter()
        .collect(),
    );
    let missing: Vec<&String> = sqlite_indexes.difference(&pg_indexes).collect();
    assert!(
        missing.is_empty(),
        "indexes missing in PostgreSQL: {missing:?}"
    );
}

#[tokio::test]
async fn every_connection_commits_synchronously_whatever_the_database_default() {
    let db = TestDatabase::create().await;
    let store = db.migrated(2).await;
    let dbname = db.url().rsplit('/').next().unwrap_or_default().to_string();
    store
        .client()
        .await
        .expect("client")
        .batch_execute(&format!(
            "ALTER DATABASE {dbname} SET synchronous_commit = off"
        ))
        .await
        .expect("alter database");
    let fresh = db.store(2);
    let client = fresh.client().await.expect("client");
    let setting: String = client
        .query_one("SHOW synchronous_commit", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(setting, "on");
}

fn webhook(event_id: &str, dedup_key: &str, body_sha256: &str) -> WebhookRecord {
    WebhookRecord {
        event_id: event_id.to_string(),
        provider: "paywise".to_string(),
        dedup_key: dedup_key.to_string(),
        nonce: None,
        body_sha256: body_sha256.to_string(),
        raw_body: b"{}".to_vec(),
        headers_json: "{}".to_string(),
        secret_index: 0,
        received_at: Utc::now(),
        parsed: Err("not parsed in these tests".to_string()),
    }
}

/// 40 copies of one webhook claimed at once through two pools (two instances): one
/// claim wins, the 39 others see the winner's event id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_concurrent_dedup_claims_from_two_pools_have_one_winner() {
    const COPIES: usize = 40;
    let db = TestDatabase::create().await;
    let pools = [db.migrated(COPIES / 2).await, db.store(COPIES / 2)];
    let barrier = Arc::new(Barrier::new(COPIES));
    let mut tasks = Vec::new();
    for i in 0..COPIES {
        let pool = pools[i % 2].clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            // Every task reaches the barrier, also one whose checkout failed.
            let client = pool.client().await;
            barrier.wait().await;
            let mut client = client?;
            let tx = client.transaction().await?;
            let event_id = format!("evt-{i}");
            let claim =
                claims::claim_dedup_key(&tx, &webhook(&event_id, "dedup-1", "sha-1")).await?;
            tx.commit().await?;
            Ok::<_, StoreError>((event_id, claim))
        }));
    }
    let mut winners = Vec::new();
    let mut held_by = Vec::new();
    for task in tasks {
        let (event_id, claim) = task.await.expect("task").expect("claim");
        match claim {
            None => winners.push(event_id),
            Some(PriorDelivery {
                event_id: first,
                body_sha256,
            }) => {
                assert_eq!(body_sha256.as_deref(), Some("sha-1"));
                held_by.push(first);
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one winner: {winners:?}");
    assert_eq!(held_by.len(), COPIES - 1);
    assert!(held_by.iter().all(|id| *id == winners[0]), "{held_by:?}");
    let client = pools[1].client().await.expect("client");
    let rows: i64 = client
        .query_one("SELECT COUNT(*) FROM events", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 1);
}

/// A claimer that rolls back gives the key to the next one waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_dedup_claim_lets_the_waiting_one_win() {
    let db = TestDatabase::create().await;
    let store = db.migrated(3).await;
    let mut first = store.client().await.expect("client");
    let tx = first.transaction().await.expect("tx");
    assert_eq!(
        claims::claim_dedup_key(&tx, &webhook("evt-a", "k", "sha"))
            .await
            .expect("claim"),
        None
    );
    let second = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut client = store.client().await?;
            let tx = client.transaction().await?;
            let claim = claims::claim_dedup_key(&tx, &webhook("evt-b", "k", "sha")).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(claim)
        })
    };
    wait_for_lock_waiter(&store, "INSERT INTO events").await;
    tx.rollback().await.expect("rollback");
    assert_eq!(second.await.expect("task").expect("claim"), None);
}

/// Waits until a session is blocked on a lock running a statement that contains `query`.
pub(super) async fn wait_for_lock_waiter(store: &PgStore, query: &str) {
    let observer = store.client().await.expect("observer");
    let pattern = format!("%{query}%");
    eventually(&format!("a session waiting on a lock in {query:?}"), || {
        let observer = &observer;
        let pattern = pattern.clone();
        async move {
            observer
                .query_one(
                    "SELECT COUNT(*) FROM pg_stat_activity
                     WHERE wait_event_type = 'Lock' AND query LIKE $1 AND datname = current_database()",
                    &[&pattern],
                )
                .await
                .map(|row| row.get::<_, i64>(0) > 0)
                .unwrap_or(false)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonce_is_claimed_once_and_its_holder_named() {
    const COPIES: usize = 10;
    let db = TestDatabase::create().await;
    let pools = [db.migrated(COPIES / 2).await, db.store(COPIES / 2)];
    let barrier = Arc::new(Barrier::new(COPIES));
    let mut tasks = Vec::new();
    for i in 0..COPIES {
        let pool = pools[i % 2].clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let client = pool.client().await;
            barrier.wait().await;
            let mut client = client?;
            let tx = client.transaction().await?;
            let event_id = format!("evt-{i}");
            let body = format!("sha-{i}");
            let record = webhook(&event_id, &format!("dedup-{i}"), &body);
            let claim = claims::claim_nonce(&tx, &record, "000000000001:abc").await?;
            tx.commit().await?;
            Ok::<_, StoreError>((event_id, body, claim))
        }));
    }
    let mut won = Vec::new();
    let mut held = BTreeSet::new();
    for task in tasks {
        let (event_id, body, claim) = task.await.expect("task").expect("claim");
        match claim {
            NonceClaim::Claimed => won.push((event_id, body)),
            NonceClaim::Taken(PriorDelivery {
                event_id,
                body_sha256,
            }) => {
                held.insert((event_id, body_sha256.unwrap_or_default()));
            }
        }
    }
    assert_eq!(won.len(), 1, "{won:?}");
    assert_eq!(held, BTreeSet::from([won[0].clone()]));
}

/// Concurrent reports of one new cash-out: one inserts it, each increments under the row
/// lock, none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lock_or_insert_creates_one_cashout_and_serializes_updates() {
    const WRITERS: usize = 20;
    let db = TestDatabase::create().await;
    let pools = [db.migrated(WRITERS / 2).await, db.store(WRITERS / 2)];
    let barrier = Arc::new(Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for i in 0..WRITERS {
        let pool = pools[i % 2].clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let client = pool.client().await;
            barrier.wait().await;
            let mut client = client?;
            let tx = client.transaction().await?;
            let state = CurrentState {
                status: CashoutStatus::Pending,
                held: false,
            };
            let locked =
                claims::cashout_or_insert_for_update(&tx, "paywise", "ref-1", state, Utc::now())
                    .await?;
            // A read-modify-write that would lose updates without the lock.
            let count: i64 = tx
                .query_one(
                    "SELECT webhook_count FROM cashouts WHERE id = $1",
                    &[&locked.cashout.id],
                )
                .await?
                .get(0);
            tx.execute(
                "UPDATE cashouts SET webhook_count = $2 WHERE id = $1",
                &[&locked.cashout.id, &(count + 1)],
            )
            .await?;
            tx.commit().await?;
            Ok::<_, StoreError>(locked)
        }));
    }
    let mut inserted = 0;
    let mut ids = BTreeSet::new();
    for task in tasks {
        let locked = task.await.expect("task").expect("lock");
        inserted += usize::from(locked.inserted);
        ids.insert(locked.cashout.id);
        assert_eq!(locked.cashout.state.status, CashoutStatus::Pending);
    }
    assert_eq!(inserted, 1);
    assert_eq!(ids.len(), 1);
    let client = pools[0].client().await.expect("client");
    let count: i64 = client
        .query_one("SELECT webhook_count FROM cashouts", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, WRITERS as i64);
    let tx_client = &mut pools[1].client().await.expect("client");
    let tx = tx_client.transaction().await.expect("tx");
    assert!(claims::cashout_for_update(&tx, "paywise", "other")
        .await
        .expect("lock")
        .is_none());
}

/// Waits until the server's clock has passed the lease's expiry.
async fn wait_expired(store: &PgStore, name: &str) {
    let client = store.client().await.expect("client");
    eventually(&format!("lease {name} to expire"), || {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT expires_at < now() FROM leases WHERE name = $1",
                    &[&name],
                )
                .await
                .map(|row| row.get::<_, bool>(0))
                .unwrap_or(false)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_has_one_holder_is_taken_over_on_expiry_and_fences_the_stale_holder() {
    let db = TestDatabase::create().await;
    let (a_store, b_store) = (db.migrated(6).await, db.store(6));
    let a_client = a_store.client().await.expect("a");
    let b_client = b_store.client().await.expect("b");
    let name = "poll:paywise";
    let long = Duration::from_secs(60);
    let short = Duration::from_millis(300);

    let (got_a, got_b) = tokio::join!(
        lease::acquire(&a_client, name, "instance-a", long),
        lease::acquire(&b_client, name, "instance-b", long)
    );
    let (got_a, got_b) = (got_a.expect("a"), got_b.expect("b"));
    assert!(
        got_a.is_some() != got_b.is_some(),
        "one holder: {got_a:?} / {got_b:?}"
    );
    let (mut holder_store, mut other_store) = (a_store.clone(), b_store.clone());
    let (mut held, mut other) = (got_a, "instance-b");
    if held.is_none() {
        (holder_store, other_store) = (b_store.clone(), a_store.clone());
        (held, other) = (got_b, "instance-a");
    }
    let held = held.expect("held");
    assert_eq!(held.token, 1);
    let holder_client = holder_store.client().await.expect("holder");
    let other_client = other_store.client().await.expect("other");

    // Re-acquiring while held keeps the token; the other holder still cannot take it.
    let again = lease::acquire(&holder_client, name, &held.holder, short)
        .await
        .expect("again")
        .expect("still the holder's");
    assert_eq!(again.token, held.token);
    assert!(lease::acquire(&other_client, name, other, long)
        .await
        .expect("other")
        .is_none());

    // A fenced write in flight when the lease lapses: the takeover waits for its commit.
    let mut writer = holder_store.client().await.expect("writer");
    let tx = writer.transaction().await.expect("tx");
    lease::check_fence(&tx, &held).await.expect("fence holds");
    tx.execute(
        "INSERT INTO poll_watermarks (provider, watermark, updated_at) VALUES ('paywise', 1, 1)",
        &[],
    )
    .await
    .expect("write");
    wait_expired(&holder_store, name).await;
    let takeover = {
        let store = other_store.clone();
        let other = other.to_string();
        tokio::spawn(async move {
            let client = store.client().await?;
            lease::acquire(&client, name, &other, long).await
        })
    };
    wait_for_lock_waiter(&holder_store, "INSERT INTO leases").await;
    tx.commit()
        .await
        .expect("the in-flight fenced write commits");
    let taken = takeover
        .await
        .expect("task")
        .expect("acquire")
        .expect("taken over after expiry");
    assert_eq!(taken.token, held.token + 1, "a takeover bumps the token");
    assert_eq!(taken.holder, other);

    // The stale holder, resumed: its renewal fails and its fenced write is refused.
    assert!(lease::renew(&holder_client, &held, long)
        .await
        .expect("renew")
        .is_none());
    let tx = writer.transaction().await.expect("tx");
    match lease::check_fence(&tx, &held).await {
        Err(FenceError::Lost {
            held: t, current, ..
        }) => {
            assert_eq!(t, held.token);
            assert_eq!(current, Some(taken.token));
        }
        other => panic!("the stale holder must be fenced off: {other:?}"),
    }
    drop(tx);
    let watermarks: i64 = other_client
        .query_one("SELECT COUNT(*) FROM poll_watermarks", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(watermarks, 1, "only the write made under the valid lease");

    // The new holder renews, releases; the next acquire (by anyone) bumps the token again.
    let renewed = lease::renew(&other_client, &taken, long)
        .await
        .expect("renew")
        .expect("renewed");
    assert!(renewed.expires_at >= taken.expires_at);
    assert!(lease::release(&other_client, &renewed)
        .await
        .expect("release"));
    let back = lease::acquire(&holder_client, name, &held.holder, long)
        .await
        .expect("acquire")
        .expect("free after release");
    assert_eq!(back.token, taken.token + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_locked_claimers_never_share_a_row_and_expired_claims_are_retaken() {
    const ROWS: usize = 60;
    let db = TestDatabase::create().await;
    let (a, b) = (db.migrated(2).await, db.store(2));
    let now = Utc::now();
    {
        let client = a.client().await.expect("client");
        for i in 0..ROWS {
            assert!(queue::enqueue(
                &client,
                "paywise",
                &format!("ref-{i:03}"),
                FetchReason::ThinNotification,
                now
            )
            .await
            .expect("enqueue"));
        }
        assert!(!queue::enqueue(
            &client,
            "paywise",
            "ref-000",
            FetchReason::ThinNotification,
            now
        )
        .await
        .expect("enqueue"));
    }
    let claimer = |store: PgStore, me: &'static str| async move {
        let client = store.client().await?;
        let mut mine = Vec::new();
        loop {
            let batch = queue::claim_due(
                &client,
                "paywise",
                me,
                Utc::now(),
                4,
                Duration::from_secs(60),
            )
            .await?;
            if batch.is_empty() {
                return Ok::<_, StoreError>(mine);
            }
            mine.extend(batch);
        }
    };
    // Racing claim loops: whatever the interleaving, no row twice, none left out.
    let (raced_a, raced_b) = tokio::join!(claimer(a.clone(), "a"), claimer(b.clone(), "b"));
    let (raced_a, raced_b) = (raced_a.expect("a"), raced_b.expect("b"));
    let raced: BTreeSet<String> = raced_a
        .iter()
        .chain(&raced_b)
        .map(|f| f.provider_ref.clone())
        .collect();
    assert_eq!(
        raced.len(),
        raced_a.len() + raced_b.len(),
        "no row claimed twice"
    );
    assert_eq!(raced.len(), ROWS);
    // Release them all (as if their claims had expired), then claim in two open
    // transactions: the second skips the rows the first has locked, not waiting for it.
    a.client()
        .await
        .expect("client")
        .execute(
            "UPDATE status_fetch_queue SET claimed_by = NULL, claimed_until = NULL",
            &[],
        )
        .await
        .expect("release");
    let mut client_a = a.client().await.expect("client");
    let mut client_b = b.client().await.expect("client");
    let tx_a = client_a.transaction().await.expect("tx");
    let tx_b = client_b.transaction().await.expect("tx");
    let ttl = Duration::from_secs(60);
    let got_a = queue::claim_due(&tx_a, "paywise", "a", Utc::now(), ROWS / 2, ttl)
        .await
        .expect("a claims");
    let got_b = queue::claim_due(&tx_b, "paywise", "b", Utc::now(), ROWS, ttl)
        .await
        .expect("b claims");
    tx_a.commit().await.expect("commit");
    tx_b.commit().await.expect("commit");
    drop((client_a, client_b));
    let refs_a: BTreeSet<String> = got_a.iter().map(|f| f.provider_ref.clone()).collect();
    let refs_b: BTreeSet<String> = got_b.iter().map(|f| f.provider_ref.clone()).collect();
    assert_eq!((refs_a.len(), refs_b.len()), (ROWS / 2, ROWS / 2));
    assert!(refs_a.is_disjoint(&refs_b), "no row claimed by both");

    // a completes its rows; b is "killed" holding its claims.
    let client_a = a.client().await.expect("client");
    for fetch in &got_a {
        assert!(queue::complete(&client_a, fetch, "a")
            .await
            .expect("complete"));
    }
    assert!(queue::claim_due(
        &client_a,
        "paywise",
        "a",
        Utc::now(),
        100,
        Duration::from_secs(60)
    )
    .await
    .expect("claim")
    .is_empty());
    // Shorten b's claims instead of waiting a minute.
    client_a
        .execute(
            "UPDATE status_fetch_queue SET claimed_until = now() + interval '200 milliseconds'",
            &[],
        )
        .await
        .expect("shorten");
    let mut retaken = Vec::new();
    let start = Instant::now();
    while retaken.len() < refs_b.len() {
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for b's claims to expire"
        );
        let batch = queue::claim_due(
            &client_a,
            "paywise",
            "a",
            Utc::now(),
            100,
            Duration::from_secs(60),
        )
        .await
        .expect("claim");
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        retaken.extend(batch);
    }
    let refs_retaken: BTreeSet<String> = retaken.iter().map(|f| f.provider_ref.clone()).collect();
    assert_eq!(refs_retaken, refs_b);

    // b, resumed, can no longer complete or defer what a took over.
    let client_b = b.client().await.expect("client");
    assert!(!queue::complete(&client_b, &got_b[0], "b")
        .await
        .expect("complete"));
    assert_eq!(
        queue::defer(&client_b, &got_b[0], "b", Utc::now(), 5)
            .await
            .expect("defer"),
        Deferred::NotClaimed
    );

    // a defers one: not due now, due after its backoff; given up after max_attempts.
    let first = &retaken[0];
    assert_eq!(
        queue::defer(&client_a, first, "a", now, 3)
            .await
            .expect("defer"),
        Deferred::Retry
    );
    let due_now = queue::claim_due(&client_a, "paywise", "a", now, 100, Duration::from_secs(60))
        .await
        .expect("claim");
    assert!(due_now.iter().all(|f| f.provider_ref != first.provider_ref));
    let later = now + chrono::Duration::seconds(3);
    let again = queue::claim_due(
        &client_a,
        "paywise",
        "a",
        later,
        100,
        Duration::from_secs(60),
    )
    .await
    .expect("claim");
    let again = again
        .into_iter()
        .find(|f| f.provider_ref == first.provider_ref)
        .expect("due after the backoff");
    assert_eq!(again.attempts, 1);
    assert_eq!(
        queue::defer(&client_a, &again, "a", later, 2)
            .await
            .expect("defer"),
        Deferred::GivenUp
    );
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_and_answers_503() {
    // Port 1 on loopback: nothing listens, the connection is refused.
    let store = PgStore::connect(
        "postgres://nobody:secret@127.0.0.1:1/nothing",
        PgOptions {
            max_connections: 1,
            connect_timeout: Duration::from_secs(2),
            wait_timeout: Duration::from_secs(2),
            lock_timeout: Duration::from_secs(2),
        },
    )
    .expect("a pool opens no connection");
    for err in [
        store.ping().await.expect_err("refused"),
        store.migrate().await.expect_err("refused"),
    ] {
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(!err.to_string().contains("secret"), "{err}");
        assert_eq!(ApiError::from(err).status_code().as_u16(), 503);
    }
    assert!(!format!("{store:?}").contains("secret"));
}

#[tokio::test]
async fn a_connection_closed_by_the_server_is_unavailable_and_answers_503() {
    let db = TestDatabase::create().await;
    let store = db.migrated(2).await;
    let victim = store.client().await.expect("victim");
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let killer = store.client().await.expect("killer");
    killer
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    let err = victim
        .query_one("SELECT 1", &[])
        .await
        .map(|_| ())
        .map_err(StoreError::from)
        .expect_err("the connection is gone");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert_eq!(ApiError::from(err).status_code().as_u16(), 503);
    // The pool drops the broken connection and opens a new one.
    drop(victim);
    store.ping().await.expect("a fresh connection");
}

#[test]
fn a_database_name_replaces_the_urls() {
    assert_eq!(
        with_database("postgres://u:p@127.0.0.1:5432/postgres", "t1"),
        "postgres://u:p@127.0.0.1:5432/t1"
    );
    assert_eq!(
        with_database("postgresql://u@localhost?sslmode=disable", "t1"),
        "postgresql://u@localhost/t1?sslmode=disable"
    );
    assert_eq!(
        with_database("host=/run/postgresql user=me", "t1"),
        "host=/run/postgresql user=me dbname=t1"
    );
}

/// A SQLite book with rows in every table: NULLs, flags, non-UTF-8 bytes, and text keys
/// whose byte order differs from a linguistic collation.
fn sqlite_book(path: &std::path::Path) -> rusqlite::Connection {
    let mut sqlite = rusqlite::Connection::open(path).expect("sqlite");
    crate::store::schema::migrations()
        .to_latest(&mut sqlite)
        .expect("sqlite migrations");
    sqlite
        .execute_batch(
            r#"
INSERT INTO cashouts (id, provider, provider_ref, external_id, status, held, amount_minor, currency,
                      created_at, first_seen_at, updated_at, webhook_count, recovered_by_poll, method,
                      net_minor, book_changed_at)
VALUES (7, 'paywise', 'b-1', 'ext-1', 'completed', 0, 150075, 'BRL', 1, 1, 2, 1, 0, 'pix', 150000, 2),
       (9, 'paywise', 'B-2', NULL, 'pending', 1, NULL, NULL, 3, 3, 3, 0, 1, NULL, NULL, 3),
       (12, 'tupay', 'é-3', 'ext-3', 'failed', 0, 2500, 'PEN', 4, 4, 5, 2, 0, NULL, NULL, NULL);
INSERT INTO events (seq, event_id, cashout_id, provider, source, dedup_key, body_sha256, raw_body, headers,
                    secret_index, outcome, applied, received_at, book_at, after_status, after_webhooks,
                    replay_nonce)
VALUES (1, 'evt-1', 7, 'paywise', 'webhook', 'd-1', 'sha-1', X'00FF7B7D', '{"x":"y"}', 0, 'applied', 1, 1, 1,
        'completed', 1, 'b'),
       (2, 'evt-2', NULL, 'tupay', 'webhook', 'd-2', 'sha-2', X'', NULL, 1, 'thin', 0, 2, 2, NULL, NULL, 'é'),
       (5, 'evt-5', 12, 'tupay', 'poll', NULL, NULL, NULL, NULL, NULL, 'applied', 1, 5, 5, 'failed', 0, NULL),
       (6, 'evt-6', NULL, 'tupay', 'webhook', 'd-6', 'sha-6', NULL, NULL, 0, 'quarantined', 0, 604800002, 604800002,
        NULL, NULL, 'c');
INSERT INTO status_fetch_queue VALUES ('tupay', 'é-3', 'thin_notification', 2, 0, 2),
                                      ('tupay', 'Z-4', 'sweep', 3, 2, 9);
INSERT INTO mismatches (id, kind, provider, provider_ref, external_id, detail, opened_at, resolved_at, subject)
VALUES (3, 'status_conflict', 'paywise', 'b-1', 'ext-1', 'conflict', 2, NULL, 'b-1'),
       (4, 'missing_at_provider', 'paywise', NULL, 'ext-9', 'unknown', 2, 4, 'ext:ext-9');
INSERT INTO alerts (id, kind, subject, severity, text, opened_at, provider, delivery)
VALUES (2, 'stuck', 'paywise/b-1', 'warning', 'stuck ✓', 1, 'paywise', 'individual');
INSERT INTO poll_watermarks VALUES ('paywise', 10, 11), ('tupay', 12, 13);
INSERT INTO ledger (id, provider, external_id, amount_minor, currency, provider_ref, created_at, registered_at)
VALUES (4, 'paywise', 'ext-1', 150075, 'BRL', 'b-1', 1, 1), (8, 'paywise', 'ext-9', 10, 'BRL', NULL, 2, 2);
INSERT INTO reconcile_cursor VALUES (1, 5, 8, 20);
INSERT INTO reconcile_queue VALUES (7), (12);
INSERT INTO reports VALUES ('2026-01-01', 1, 3, 'abc', 30), ('2026-01-02', 0, 0, 'def', 31);
INSERT INTO retention_cursor VALUES (1, 2);
INSERT INTO heartbeat VALUES (1, 40);
INSERT INTO alert_outbox (id, alert_id, webhook_id, status, body, created_at, attempts, next_attempt_at,
                          leased_until, delivered_at)
VALUES (6, 2, 'wh-1', 'firing', '{}', 1, 1, 2, NULL, 3);
INSERT INTO alert_delivery_attempts VALUES (11, 6, 2, 200, NULL, 15);
"#,
        )
        .expect("book rows");
    sqlite
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_store_copies_every_table_verified_and_refuses_a_second_copy() {
    use super::copy::{copy_sqlite_book, CopyError, BOOK_TABLES};
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("book.db");
    drop(sqlite_book(&path));
    let db = TestDatabase::create().await;
    let store = db.store(2);
    let copied = copy_sqlite_book(&path, &store).await.expect("copied");
    assert_eq!(copied.len(), BOOK_TABLES.len());
    let counts: BTreeMap<&str, u64> = copied.iter().map(|t| (t.table, t.rows)).collect();
    assert_eq!(counts["cashouts"], 3);
    assert_eq!(counts["events"], 4);
    assert!(counts.values().all(|&rows| rows > 0), "{counts:?}");

    let client = store.client().await.expect("client");
    // PostgreSQL's replay cache holds the nonces of the book's last week (evt-1 is a week
    // and 1 ms older than the newest event, evt-6).
    let nonces: Vec<(String, String, String)> = client
        .query(
            "SELECT provider, nonce, event_id FROM replay_cache ORDER BY event_id",
            &[],
        )
        .await
        .expect("replay cache")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        nonces,
        [
            ("tupay".into(), "é".into(), "evt-2".into()),
            ("tupay".into(), "c".into(), "evt-6".into()),
        ]
    );
    let row = client
        .query_one(
            "SELECT raw_body, applied, headers FROM events WHERE event_id = 'evt-1'",
            &[],
        )
        .await
        .expect("event");
    assert_eq!(row.get::<_, Vec<u8>>(0), vec![0x00, 0xFF, 0x7B, 0x7D]);
    assert!(row.get::<_, bool>(1));
    let held: bool = client
        .query_one("SELECT held FROM cashouts WHERE id = 9", &[])
        .await
        .expect("cash-out")
        .get(0);
    assert!(held);
    // Identity columns continue after the copied ids.
    let next: i64 = client
        .query_one(
            "INSERT INTO cashouts (provider, provider_ref, status, created_at, first_seen_at, updated_at)
             VALUES ('paywise', 'new', 'pending', 9, 9, 9) RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    assert_eq!(next, 13);

    let err = copy_sqlite_book(&path, &store)
        .await
        .expect_err("not empty");
    assert!(
        matches!(err, CopyError::NotEmpty { table: "cashouts" }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_store_refuses_a_book_of_an_older_schema() {
    use super::copy::{copy_sqlite_book, CopyError};
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("book.db");
    let sqlite = sqlite_book(&path);
    sqlite
        .execute_batch("ALTER TABLE cashouts DROP COLUMN method")
        .expect("a column a later migration added");
    drop(sqlite);
    let db = TestDatabase::create().await;
    let err = copy_sqlite_book(&path, &db.store(2))
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, CopyError::Schema { table: "cashouts", reason } if reason.contains("method")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_store_refuses_a_lossy_value_and_commits_nothing() {
    use super::copy::{copy_sqlite_book, CopyError};
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("book.db");
    let sqlite = sqlite_book(&path);
    sqlite
        .execute("UPDATE alerts SET opened_at = 'yesterday' WHERE id = 2", [])
        .expect("a text in an integer column (SQLite allows it)");
    drop(sqlite);
    let db = TestDatabase::create().await;
    let store = db.store(2);
    let err = copy_sqlite_book(&path, &store).await.expect_err("refused");
    match &err {
        CopyError::Value {
            table, key, column, ..
        } => {
            assert_eq!(
                (*table, key.as_str(), column.as_str()),
                ("alerts", "2", "opened_at")
            );
        }
        other => panic!("expected a value error, got {other}"),
    }
    let client = store.client().await.expect("client");
    let cashouts: i64 = client
        .query_one("SELECT COUNT(*) FROM cashouts", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(cashouts, 0, "nothing committed");
}

/// A lock held past `lock_timeout` (the `busy_timeout` of SQLite) fails the waiting
/// statement as unavailable (503) instead of holding the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_past_lock_timeout_is_unavailable_and_answers_503() {
    let db = TestDatabase::create().await;
    db.migrated(1).await;
    let store = PgStore::connect(
        db.url(),
        PgOptions {
            max_connections: 2,
            lock_timeout: Duration::from_millis(200),
            ..PgOptions::default()
        },
    )
    .expect("pool");
    let state = CurrentState {
        status: CashoutStatus::Pending,
        held: false,
    };
    let mut holder = store.client().await.expect("holder");
    let held = holder.transaction().await.expect("tx");
    claims::cashout_or_insert_for_update(&held, "paywise", "ref-1", state, Utc::now())
        .await
        .expect("locked");
    held.commit().await.expect("commit");
    let held = holder.transaction().await.expect("tx");
    claims::cashout_for_update(&held, "paywise", "ref-1")
        .await
        .expect("locked")
        .expect("exists");
    let mut waiter = store.client().await.expect("waiter");
    let tx = waiter.transaction().await.expect("tx");
    let err = claims::cashout_for_update(&tx, "paywise", "ref-1")
        .await
        .expect_err("gives up waiting");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert_eq!(ApiError::from(err).status_code().as_u16(), 503);
}

/// The next wake-up, within the deadline.
async fn next_wake(listener: &mut super::notify::Listener) -> super::notify::Wake {
    tokio::time::timeout(DEADLINE, listener.recv())
        .await
        .expect("a wake-up in time")
        .expect("the listener runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_cross_instances_at_commit_and_a_lost_listener_resubscribes() {
    use super::notify::{notify, Listener, Wake};
    let db = TestDatabase::create().await;
    let store = db.migrated(2).await;
    let mut listener = Listener::start(
        store.connect_to().clone(),
        vec!["fetch_queue".to_string()],
        Duration::from_millis(50),
    );
    assert_eq!(next_wake(&mut listener).await, Wake::Subscribed);

    let mut client = store.client().await.expect("client");
    let tx = client.transaction().await.expect("tx");
    notify(&tx, "fetch_queue", "rolled back")
        .await
        .expect("notify");
    tx.rollback().await.expect("rollback");
    let tx = client.transaction().await.expect("tx");
    notify(&tx, "fetch_queue", "paywise").await.expect("notify");
    notify(&tx, "other_channel", "not listened to")
        .await
        .expect("notify");
    tx.commit().await.expect("commit");
    // Only the committed one on the listened channel arrives (and is the next one).
    assert_eq!(
        next_wake(&mut listener).await,
        Wake::Notified {
            channel: "fetch_queue".to_string(),
            payload: "paywise".to_string()
        }
    );

    // The listener's connection is killed: it reconnects and says so, then hears again.
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'cashout-recon listener' AND datname = current_database()",
            &[],
        )
        .await
        .expect("terminate");
    assert_eq!(next_wake(&mut listener).await, Wake::Subscribed);
    notify(&client, "fetch_queue", "tupay")
        .await
        .expect("notify");
    assert_eq!(
        next_wake(&mut listener).await,
        Wake::Notified {
            channel: "fetch_queue".to_string(),
            payload: "tupay".to_string()
        }
    );
}

#[tokio::test]
async fn readiness_is_a_real_write() {
    let db = TestDatabase::create().await;
    let store = db.migrated(2).await;
    store.readiness().await.expect("ready");
    let dbname = db.url().rsplit('/').next().unwrap_or_default().to_string();
    store
        .client()
        .await
        .expect("client")
        .batch_execute(&format!(
            "ALTER DATABASE {dbname} SET default_transaction_read_only = on"
        ))
        .await
        .expect("alter database");
    // New sessions are read-only (as on a standby): reads work, readiness does not.
    let read_only = db.store(1);
    read_only.ping().await.expect("reads still work");
    let reason = read_only.readiness().await.expect_err("not ready");
    assert!(reason.contains("read-only"), "{reason}");

    let unreachable = PgStore::connect(
        "postgres://nobody:secret@127.0.0.1:1/nothing",
        PgOptions::default(),
    )
    .expect("pool");
    let reason = unreachable.readiness().await.expect_err("not ready");
    assert!(reason.contains("cannot commit"), "{reason}");
}

/// How fast `copy-store` copies and verifies a synthetic book (bench-recon's seed: three
/// events per cash-out and a ledger). A measurement, not a check:
/// `COPY_BENCH_CASHOUTS=100000 cargo test --lib copy_store_rate -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn copy_store_rate() {
    use super::copy::copy_sqlite_book;
    use std::str::FromStr;
    let cashouts: u64 = std::env::var("COPY_BENCH_CASHOUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("book.db");
    {
        let mut sqlite = rusqlite::Connection::open(&path).expect("sqlite");
        crate::store::schema::migrations()
            .to_latest(&mut sqlite)
            .expect("migrations");
    }
    let now = Utc::now().timestamp_millis();
    let spec = crate::store::bench_seed::SeedSpec {
        cashouts,
        plain_provider: "fiserv".to_string(),
        fee_provider: "mannco".to_string(),
        fee_rule: crate::reconcile::fees::FeeRule::from_str("2%").expect("fee rule"),
        start: now - 86_400_000,
        until: now,
    };
    let seeded = crate::store::bench_seed::seed(&path, &spec).expect("seeded");
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let db = TestDatabase::create().await;
    let store = db.store(2);
    let started = Instant::now();
    let copied = copy_sqlite_book(&path, &store).await.expect("copied");
    let elapsed = started.elapsed().as_secs_f64();
    let rows: u64 = copied.iter().map(|t| t.rows).sum();
    println!(
        "copy-store: {} cash-outs, {} events, {} ledger entries ({rows} rows, {:.0} MiB SQLite) copied and verified in {elapsed:.1} s ({:.0} rows/s)",
        seeded.cashouts,
        seeded.events,
        seeded.ledger,
        size as f64 / 1_048_576.0,
        rows as f64 / elapsed
    );
}
