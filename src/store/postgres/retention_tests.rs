//! Raw-body retention on both stores: one book of old and new events written through the
//! ingestion entry points, then the retention job's phases (walk with the archive's
//! content, clear range by range) taken the same way on each ([`RetentionOps`]); what
//! would be archived, what is cleared, the cursor and what stays must be equal. Then, on
//! PostgreSQL, two instances clearing at once and the statements' plans.

use async_trait::async_trait;
use chrono::{DateTime, Duration, DurationRound, Utc};

use super::console_tests::{assert_plans, seed_big_book, Planned};
use super::ingest_tests::{accepted, observation, record_at, sqlite, Book, PROVIDER};
use super::retention::{CLEAR, EXPIRED, EXPIRED_WITH_CONTENT};
use super::testing::TestDatabase;
use super::PgStore;
use crate::state::CashoutStatus;
use crate::store::{ConsoleEvent, ExpiredBatch, ExpiredBody, Store, StoreError};

/// Retention's store operations, with the facade's signatures, and the reads that show
/// what stays.
#[async_trait]
trait RetentionOps: Book {
    async fn cursor(&self) -> Result<i64, StoreError>;
    async fn expired(
        &self,
        after_seq: i64,
        cutoff: DateTime<Utc>,
        limit: usize,
        with_content: bool,
    ) -> Result<ExpiredBatch, StoreError>;
    async fn clear(
        &self,
        after_seq: i64,
        through_seq: i64,
        cutoff: DateTime<Utc>,
    ) -> Result<usize, StoreError>;
    async fn event(&self, event_id: &str) -> Result<Option<ConsoleEvent>, StoreError>;
    async fn headers(&self, event_id: &str) -> Result<Option<String>, StoreError>;
    async fn timeline(&self, provider_ref: &str) -> Result<Vec<String>, StoreError>;
}

macro_rules! forward_retention_ops {
    ($store:ty) => {
        #[async_trait]
        impl RetentionOps for $store {
            async fn cursor(&self) -> Result<i64, StoreError> {
                <$store>::retention_cursor(self).await
            }
            async fn expired(
                &self,
                after_seq: i64,
                cutoff: DateTime<Utc>,
                limit: usize,
                with_content: bool,
            ) -> Result<ExpiredBatch, StoreError> {
                <$store>::expired_raw_bodies(self, after_seq, cutoff, limit, with_content).await
            }
            async fn clear(
                &self,
                after_seq: i64,
                through_seq: i64,
                cutoff: DateTime<Utc>,
            ) -> Result<usize, StoreError> {
                <$store>::clear_raw_bodies(self, after_seq, through_seq, cutoff).await
            }
            async fn event(&self, event_id: &str) -> Result<Option<ConsoleEvent>, StoreError> {
                <$store>::console_event(self, event_id.to_string(), true).await
            }
            async fn headers(&self, event_id: &str) -> Result<Option<String>, StoreError> {
                Ok(<$store>::get_event(self, event_id.to_string())
                    .await?
                    .and_then(|event| event.headers_json))
            }
            async fn timeline(&self, provider_ref: &str) -> Result<Vec<String>, StoreError> {
                Ok(
                    <$store>::get_cashout(self, PROVIDER.to_string(), provider_ref.to_string())
                        .await?
                        .map(|(_, events)| events.into_iter().map(|e| e.event_id).collect())
                        .unwrap_or_default(),
                )
            }
        }
    };
}

forward_retention_ops!(Store);
forward_retention_ops!(PgStore);

const OLD: usize = 40;
const NEW: usize = 6;

fn body(n: usize) -> String {
    format!(
        r#"{{"id":"ev-{n:03}","pad":"{}"}}"#,
        "x".repeat(n * 37 % 500)
    )
}

/// `OLD` events 500 to 461 days old (every third a status webhook of `ref-<n / 6>`, the
/// rest quarantined), then `NEW` events 399 days old.
async fn write_book(ops: &dyn RetentionOps, now: DateTime<Utc>) {
    for n in 0..OLD + NEW {
        let age = if n < OLD {
            Duration::days(500 - n as i64)
        } else {
            Duration::days(399)
        };
        let parsed = if n % 3 == 0 {
            Ok(observation(
                &format!("ref-{}", n / 6),
                Some(CashoutStatus::Processing),
            ))
        } else {
            Err("kept as quarantined on purpose".to_string())
        };
        let mut record = record_at(
            &format!("ev-{n:03}"),
            &format!("key-{n}"),
            &body(n),
            None,
            parsed,
            now - age,
        );
        record.headers_json = format!(r#"{{"x-request-id":"req-{n}"}}"#);
        let outcome = ops.ingest(record).await.expect("ingested");
        if n % 3 == 0 {
            accepted(&outcome);
        }
    }
}

/// What a run saw and did, in comparable form.
#[derive(Debug, PartialEq)]
struct Run {
    /// What the archive would hold (`seq` cleared: each store numbers its own).
    archived: Vec<ExpiredBody>,
    batches: usize,
    cleared: usize,
}

/// The job's phases 1 and 2 (src/retention.rs) in batches of `limit`.
async fn run(ops: &dyn RetentionOps, cutoff: DateTime<Utc>, limit: usize) -> Run {
    let mut after = ops.cursor().await.expect("cursor");
    let mut ranges = Vec::new();
    let mut archived = Vec::new();
    loop {
        let batch = ops
            .expired(after, cutoff, limit, true)
            .await
            .expect("a batch");
        // Without content the walk is the same, bodies and headers left out.
        let bare = ops
            .expired(after, cutoff, limit, false)
            .await
            .expect("a bare batch");
        assert_eq!(
            (bare.through_seq, bare.done, bare.rows.len()),
            (batch.through_seq, batch.done, batch.rows.len())
        );
        assert!(bare
            .rows
            .iter()
            .all(|row| row.raw_body.is_none() && row.headers_json.is_none()));
        if batch.through_seq > after {
            ranges.push((after, batch.through_seq));
            after = batch.through_seq;
        }
        archived.extend(batch.rows.into_iter().map(|mut row| {
            row.seq = 0;
            row
        }));
        if batch.done {
            break;
        }
    }
    let mut cleared = 0;
    for (after_seq, through_seq) in &ranges {
        cleared += ops
            .clear(*after_seq, *through_seq, cutoff)
            .await
            .expect("cleared");
    }
    assert_eq!(ops.cursor().await.expect("cursor"), after);
    Run {
        archived,
        batches: ranges.len(),
        cleared,
    }
}

/// What the book shows after retention: each event's hash, body size, body and headers,
/// and the timelines.
async fn what_stays(ops: &dyn RetentionOps) -> Vec<(Option<ConsoleEvent>, Option<String>)> {
    let mut out = Vec::new();
    for n in 0..OLD + NEW {
        let id = format!("ev-{n:03}");
        let event = ops.event(&id).await.expect("an event").map(|mut event| {
            event.seq = 0;
            event
        });
        let event = event.expect("the event stays");
        assert!(event.body_sha256.is_some(), "the hash stays");
        out.push((Some(event), ops.headers(&id).await.expect("headers")));
    }
    for k in 0..(OLD + NEW) / 6 + 1 {
        let timeline = ops.timeline(&format!("ref-{k}")).await.expect("a timeline");
        out.push((None, Some(timeline.join(","))));
    }
    out
}

async fn scenario(
    ops: &dyn RetentionOps,
    now: DateTime<Utc>,
) -> (Vec<Run>, Vec<Vec<(Option<ConsoleEvent>, Option<String>)>>) {
    write_book(ops, now).await;
    let before = what_stays(ops).await;
    let cutoff = now - Duration::days(400);
    let first = run(ops, cutoff, 7).await;
    assert_eq!(first.cleared, OLD);
    assert_eq!(first.archived.len(), OLD);
    let archived = &first.archived[5];
    assert_eq!(archived.event_id, "ev-005");
    assert_eq!(archived.raw_body.as_deref(), Some(body(5).as_bytes()));
    assert_eq!(
        archived.headers_json.as_deref(),
        Some(r#"{"x-request-id":"req-5"}"#)
    );
    let after = what_stays(ops).await;
    for n in 0..OLD + NEW {
        let (event, headers) = &after[n];
        let event = event.as_ref().expect("an event");
        if n < OLD {
            assert_eq!((event.raw_body.as_ref(), event.body_bytes), (None, None));
            assert_eq!(headers, &None);
        } else {
            assert_eq!(event.raw_body.as_deref(), Some(body(n).as_bytes()));
            assert_eq!(after[n], before[n]);
        }
        assert_eq!(
            event.body_sha256,
            before[n].0.as_ref().and_then(|e| e.body_sha256.clone())
        );
    }
    assert_eq!(after[OLD + NEW..], before[OLD + NEW..], "timelines stay");

    // Nothing more is due; two days later the cut-off passes the newer events.
    let again = run(ops, cutoff, 7).await;
    assert_eq!((again.cleared, again.archived.len()), (0, 0));
    let later = run(ops, cutoff + Duration::days(2), 100).await;
    assert_eq!(later.cleared, NEW);
    let end = what_stays(ops).await;
    (vec![first, again, later], vec![before, after, end])
}

#[tokio::test]
async fn retention_archives_and_clears_the_same_events_on_both_stores() {
    let now = Utc::now()
        .duration_trunc(Duration::seconds(1))
        .expect("a whole second");
    let (_dir, sqlite_store) = sqlite();
    let on_sqlite = scenario(&sqlite_store, now).await;
    sqlite_store.close().await;

    let database = TestDatabase::create().await;
    let pg = database.migrated(2).await;
    let on_postgres = scenario(&pg, now).await;
    // PostgreSQL has no free-page list to give back: the vacuum phase does nothing.
    assert_eq!(pg.free_pages().await.expect("free pages"), 0);
    assert_eq!(pg.incremental_vacuum(1_000).await.expect("vacuum"), Some(0));
    pg.close();

    assert_eq!(on_sqlite.0, on_postgres.0);
    for (sqlite_stays, pg_stays) in on_sqlite.1.iter().zip(&on_postgres.1) {
        for (a, b) in sqlite_stays.iter().zip(pg_stays) {
            assert_eq!(a, b);
        }
    }
    assert_eq!(on_sqlite.1, on_postgres.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_clearing_one_range_at_once_clear_each_event_once() {
    let database = TestDatabase::create().await;
    let (a, b) = (database.migrated(2).await, database.store(2));
    let now = Utc::now();
    write_book(&a, now).await;
    let cutoff = now - Duration::days(400);
    let batch = a
        .expired_raw_bodies(0, cutoff, 1_000, false)
        .await
        .expect("a batch");
    assert_eq!(batch.rows.len(), OLD);
    assert!(batch.done);
    let (cleared_a, cleared_b) = tokio::join!(
        a.clear_raw_bodies(0, batch.through_seq, cutoff),
        b.clear_raw_bodies(0, batch.through_seq, cutoff)
    );
    let (cleared_a, cleared_b) = (cleared_a.expect("a clears"), cleared_b.expect("b clears"));
    assert_eq!(cleared_a + cleared_b, OLD, "{cleared_a} + {cleared_b}");
    // A late, smaller range never moves the cursor back.
    assert_eq!(a.clear_raw_bodies(0, 3, cutoff).await.expect("again"), 0);
    assert_eq!(
        a.retention_cursor().await.expect("cursor"),
        batch.through_seq
    );
    a.close();
    b.close();
}

#[tokio::test]
async fn the_retention_walk_and_clear_read_the_event_log_by_seq_range() {
    let database = TestDatabase::create().await;
    let pg = database.migrated(2).await;
    seed_big_book(&pg, 30_000).await;
    assert_plans(
        &pg,
        &[
            Planned {
                generic: true,
                label: "walk with content",
                sql: EXPIRED_WITH_CONTENT.to_string(),
                args: "1000, 500",
                uses: &["events_pkey"],
                ordered: true,
            },
            Planned {
                generic: true,
                label: "walk",
                sql: EXPIRED.to_string(),
                args: "1000, 500",
                uses: &["events_pkey"],
                ordered: true,
            },
            Planned {
                generic: true,
                label: "clear",
                sql: CLEAR.to_string(),
                args: "1000, 1500, 99999999",
                uses: &["events_pkey"],
                ordered: true,
            },
        ],
    )
    .await;
    pg.close();
}
