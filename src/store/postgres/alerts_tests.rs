//! The alert operations: scenarios written once over [`AlertOps`] and run against both
//! stores, then the multi-instance ones on PostgreSQL: two pools claiming deliveries at
//! once, two instances applying one plan at once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Barrier;

use super::ingest_tests::{accepted, record, sqlite, status_webhook, Book, PROVIDER};
use super::testing::TestDatabase;
use super::PgStore;
use crate::alert::lifecycle::{OpenAlert, ResolveAlert, UpdateAlert};
use crate::alert::{AlertKind, AlertPlan, Delivery, DesiredAlert, NoticeStatus, Severity};
use crate::state::CashoutStatus;
use crate::store::{
    AlertFactsQuery, AlertFilter, AlertView, AppliedAlerts, DeliveryView, LoadedAlertFacts,
    OutboxItem, OutboxNext, Store, StoreError,
};

/// The operations under test, with the facade's signatures.
#[async_trait]
trait AlertOps: Book {
    async fn facts(&self, query: AlertFactsQuery) -> Result<LoadedAlertFacts, StoreError>;
    async fn apply(&self, plan: AlertPlan, enqueue: bool) -> Result<AppliedAlerts, StoreError>;
    async fn claim(
        &self,
        now: DateTime<Utc>,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<OutboxItem>, StoreError>;
    async fn record(
        &self,
        outbox_id: i64,
        http_status: Option<u16>,
        error: Option<String>,
        next: OutboxNext,
    ) -> Result<(), StoreError>;
    async fn counts(&self) -> Result<(i64, i64), StoreError>;
    async fn list(&self, filter: AlertFilter) -> Result<(Vec<AlertView>, Option<i64>), StoreError>;
    async fn get(&self, id: i64) -> Result<Option<(AlertView, Vec<DeliveryView>)>, StoreError>;
}

/// The same forwarding for both stores (their methods share names and signatures).
macro_rules! forward_alert_ops {
    ($store:ty) => {
        #[async_trait]
        impl AlertOps for $store {
            async fn facts(&self, query: AlertFactsQuery) -> Result<LoadedAlertFacts, StoreError> {
                <$store>::alert_facts(self, query).await
            }
            async fn apply(
                &self,
                plan: AlertPlan,
                enqueue: bool,
            ) -> Result<AppliedAlerts, StoreError> {
                <$store>::apply_alert_plan(self, plan, Utc::now(), enqueue).await
            }
            async fn claim(
                &self,
                now: DateTime<Utc>,
                lease: Duration,
                limit: usize,
            ) -> Result<Vec<OutboxItem>, StoreError> {
                <$store>::claim_alert_deliveries(self, now, lease, limit).await
            }
            async fn record(
                &self,
                outbox_id: i64,
                http_status: Option<u16>,
                error: Option<String>,
                next: OutboxNext,
            ) -> Result<(), StoreError> {
                <$store>::record_alert_delivery(
                    self,
                    outbox_id,
                    Utc::now(),
                    http_status,
                    error,
                    12,
                    next,
                )
                .await
            }
            async fn counts(&self) -> Result<(i64, i64), StoreError> {
                <$store>::alert_outbox_counts(self).await
            }
            async fn list(
                &self,
                filter: AlertFilter,
            ) -> Result<(Vec<AlertView>, Option<i64>), StoreError> {
                <$store>::list_alerts(self, filter).await
            }
            async fn get(
                &self,
                id: i64,
            ) -> Result<Option<(AlertView, Vec<DeliveryView>)>, StoreError> {
                <$store>::get_alert(self, id).await
            }
        }
    };
}

forward_alert_ops!(Store);
forward_alert_ops!(PgStore);

fn desired(kind: AlertKind, subject: &str) -> DesiredAlert {
    DesiredAlert {
        kind,
        subject: subject.to_string(),
        provider: PROVIDER.to_string(),
        severity: Severity::Warning,
        summary: format!("{kind} {subject}"),
        since: 0,
    }
}

fn opening(kind: AlertKind, subject: &str) -> OpenAlert {
    OpenAlert {
        alert: desired(kind, subject),
        delivery: Delivery::Individual,
        notify: true,
    }
}

fn plan_opening(subjects: &[&str]) -> AlertPlan {
    AlertPlan {
        open: subjects
            .iter()
            .map(|subject| opening(AlertKind::Stuck, subject))
            .collect(),
        ..AlertPlan::default()
    }
}

fn filter(open_only: bool) -> AlertFilter {
    AlertFilter {
        open_only,
        limit: 100,
        ..AlertFilter::default()
    }
}

fn later() -> DateTime<Utc> {
    Utc::now() + chrono::Duration::seconds(1)
}

const LEASE: Duration = Duration::from_secs(60);

async fn the_lifecycle_opens_updates_and_resolves_once(ops: &dyn AlertOps) {
    let a = format!("{PROVIDER}/ref-a");
    let b = format!("{PROVIDER}/ref-b");
    let applied = ops
        .apply(plan_opening(&[&a, &b]), true)
        .await
        .expect("applied");
    assert_eq!(applied.notices.len(), 2);
    assert!(applied
        .notices
        .iter()
        .all(|n| n.status == NoticeStatus::Firing));
    assert_eq!(applied.open_by_kind, vec![(AlertKind::Stuck, 2)]);
    assert_eq!(ops.counts().await.expect("counts"), (2, 0));

    // The same plan again (made from stale rows): nothing opens twice, nothing is sent.
    let again = ops
        .apply(plan_opening(&[&a, &b]), true)
        .await
        .expect("applied");
    assert!(again.notices.is_empty());
    assert_eq!(again.open_by_kind, vec![(AlertKind::Stuck, 2)]);
    assert_eq!(ops.counts().await.expect("counts"), (2, 0));

    let facts = ops
        .facts(AlertFactsQuery {
            providers: vec![(PROVIDER.to_string(), 0)],
            seed: true,
        })
        .await
        .expect("facts");
    assert_eq!(facts.open_alerts.len(), 2);
    assert_eq!(facts.seeds, vec![(PROVIDER.to_string(), None, None)]);
    assert!(facts.stuck.is_empty() && facts.in_flight.is_empty());
    let first = facts
        .open_alerts
        .iter()
        .find(|alert| alert.subject == a)
        .expect("a is open")
        .clone();
    assert_eq!(first.kind, AlertKind::Stuck);
    assert_eq!(first.severity, Severity::Warning);
    assert!(first.last_sent_at.is_some());

    // An escalation is sent; a silent update is not.
    let update = AlertPlan {
        update: vec![
            UpdateAlert {
                id: first.id,
                severity: Severity::Critical,
                summary: "worse".to_string(),
                delivery: Delivery::Individual,
                notify: true,
            },
            UpdateAlert {
                id: first.id + 1_000,
                severity: Severity::Critical,
                summary: "no such alert".to_string(),
                delivery: Delivery::Individual,
                notify: true,
            },
        ],
        ..AlertPlan::default()
    };
    let updated = ops.apply(update, false).await.expect("applied");
    assert_eq!(updated.notices.len(), 1);
    assert_eq!(updated.notices[0].severity, Severity::Critical);
    assert_eq!(updated.notices[0].subject, a);
    assert_eq!(ops.counts().await.expect("counts"), (2, 0), "not enqueued");

    let resolve = AlertPlan {
        resolve: vec![ResolveAlert {
            id: first.id,
            notify: true,
        }],
        ..AlertPlan::default()
    };
    let resolved = ops.apply(resolve.clone(), true).await.expect("applied");
    assert_eq!(resolved.notices.len(), 1);
    assert_eq!(resolved.notices[0].status, NoticeStatus::Resolved);
    assert_eq!(resolved.notices[0].summary, "worse");
    assert_eq!(resolved.open_by_kind, vec![(AlertKind::Stuck, 1)]);
    // Resolving again changes nothing.
    assert!(ops
        .apply(resolve, true)
        .await
        .expect("applied")
        .notices
        .is_empty());
    // The subject can open again once resolved.
    let reopened = ops
        .apply(plan_opening(&[&a]), false)
        .await
        .expect("applied");
    assert_eq!(reopened.notices.len(), 1);
    assert_ne!(reopened.notices[0].id, first.id);

    let (open, next) = ops.list(filter(true)).await.expect("listed");
    assert_eq!(open.len(), 2);
    assert!(next.is_none());
    let (all, _) = ops.list(filter(false)).await.expect("listed");
    assert_eq!(all.len(), 3);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    let (page, cursor) = ops
        .list(AlertFilter {
            limit: 2,
            ..filter(false)
        })
        .await
        .expect("listed");
    assert_eq!(page.len(), 2);
    let (rest, none) = ops
        .list(AlertFilter {
            limit: 2,
            before_id: cursor,
            ..filter(false)
        })
        .await
        .expect("listed");
    assert_eq!((rest.len(), none), (1, None));
    assert_eq!(rest[0].id, first.id);
    assert_eq!(rest[0].status, NoticeStatus::Resolved);
    let (by_kind, _) = ops
        .list(AlertFilter {
            kind: Some(AlertKind::PollFailing),
            ..filter(false)
        })
        .await
        .expect("listed");
    assert!(by_kind.is_empty());

    let (view, deliveries) = ops.get(first.id).await.expect("read").expect("exists");
    assert_eq!(view.subject, a);
    assert_eq!(view.severity, Severity::Critical);
    assert!(view.resolved_at.is_some());
    let statuses: Vec<NoticeStatus> = deliveries.iter().map(|d| d.status).collect();
    assert_eq!(statuses, vec![NoticeStatus::Firing, NoticeStatus::Resolved]);
    assert!(deliveries.iter().all(|d| d.state == "pending"));
    assert!(ops.get(first.id + 1_000).await.expect("read").is_none());
}

async fn the_outbox_claims_retries_and_gives_up(ops: &dyn AlertOps) {
    let a = format!("{PROVIDER}/ref-a");
    let b = format!("{PROVIDER}/ref-b");
    let opened = ops
        .apply(plan_opening(&[&a, &b]), true)
        .await
        .expect("applied");
    let alert_a = opened.notices[0].id;
    let alert_b = opened.notices[1].id;
    ops.apply(
        AlertPlan {
            resolve: vec![ResolveAlert {
                id: alert_a,
                notify: true,
            }],
            ..AlertPlan::default()
        },
        true,
    )
    .await
    .expect("resolved");
    assert_eq!(ops.counts().await.expect("counts"), (3, 0));

    // Only the oldest notice of each alert is claimable.
    let claimed = ops.claim(later(), LEASE, 10).await.expect("claimed");
    assert_eq!(
        claimed.iter().map(|i| i.alert_id).collect::<Vec<_>>(),
        vec![alert_a, alert_b]
    );
    assert!(claimed.iter().all(|i| i.attempts == 0));
    assert!(claimed[0].body.contains("firing"));
    // Claimed: nobody else gets them until the claim expires.
    assert!(ops
        .claim(later(), LEASE, 10)
        .await
        .expect("claimed")
        .is_empty());
    let expired = ops
        .claim(later() + chrono::Duration::seconds(61), LEASE, 10)
        .await
        .expect("claimed");
    assert_eq!(
        expired.iter().map(|i| &i.webhook_id).collect::<Vec<_>>(),
        claimed.iter().map(|i| &i.webhook_id).collect::<Vec<_>>(),
        "an expired claim is retaken, same webhook ids"
    );

    // A failed attempt retries later with the same webhook id.
    let retry_at = Utc::now() + chrono::Duration::seconds(30);
    ops.record(
        claimed[0].id,
        Some(503),
        None,
        OutboxNext::RetryAt(retry_at),
    )
    .await
    .expect("recorded");
    ops.record(claimed[1].id, Some(204), None, OutboxNext::Delivered)
        .await
        .expect("recorded");
    assert_eq!(ops.counts().await.expect("counts"), (2, 0));
    assert!(
        ops.claim(later(), LEASE, 10)
            .await
            .expect("claimed")
            .is_empty(),
        "the retry is not due; the resolution waits behind it"
    );
    let retried = ops
        .claim(retry_at + chrono::Duration::seconds(1), LEASE, 10)
        .await
        .expect("claimed");
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].webhook_id, claimed[0].webhook_id);
    assert_eq!(retried[0].attempts, 1);
    ops.record(
        retried[0].id,
        None,
        Some("connection refused".to_string()),
        OutboxNext::GaveUp,
    )
    .await
    .expect("recorded");
    assert_eq!(ops.counts().await.expect("counts"), (1, 1));

    // Then the resolution of a.
    let resolution = ops
        .claim(retry_at + chrono::Duration::seconds(1), LEASE, 10)
        .await
        .expect("claimed");
    assert_eq!(resolution.len(), 1);
    assert_eq!(resolution[0].alert_id, alert_a);
    assert!(resolution[0].body.contains("resolved"));

    let (_, deliveries) = ops.get(alert_a).await.expect("read").expect("exists");
    assert_eq!(deliveries.len(), 2);
    assert_eq!(deliveries[0].state, "failed");
    assert_eq!(deliveries[0].webhook_id, claimed[0].webhook_id);
    let attempts: Vec<(Option<u16>, Option<&str>)> = deliveries[0]
        .attempts
        .iter()
        .map(|a| (a.http_status, a.error.as_deref()))
        .collect();
    assert_eq!(
        attempts,
        vec![(Some(503), None), (None, Some("connection refused"))]
    );
    assert!(deliveries[0].failed_at.is_some() && deliveries[0].next_attempt_at.is_none());
    assert_eq!(deliveries[1].state, "pending");
    let (_, deliveries) = ops.get(alert_b).await.expect("read").expect("exists");
    assert_eq!(deliveries[0].state, "delivered");
    assert_eq!(deliveries[0].attempts[0].http_status, Some(204));
    assert_eq!(deliveries[0].attempts[0].duration_ms, 12);
}

async fn the_facts_hold_in_flight_stuck_quarantined_and_seeds(ops: &dyn AlertOps) {
    for (event_id, provider_ref, status) in [
        ("ev-1", "ref-1", CashoutStatus::Pending),
        ("ev-2", "ref-2", CashoutStatus::Processing),
        ("ev-3", "ref-3", CashoutStatus::Completed),
    ] {
        accepted(
            &ops.ingest(status_webhook(event_id, provider_ref, status))
                .await
                .expect("ingested"),
        );
    }
    ops.ingest(record(
        "ev-bad",
        "key-bad",
        "{}",
        None,
        Err("no ref".to_string()),
    ))
    .await
    .expect("quarantined");
    let query = |cutoff: DateTime<Utc>, seed: bool| AlertFactsQuery {
        providers: vec![(PROVIDER.to_string(), cutoff.timestamp_millis())],
        seed,
    };
    let future = Utc::now() + chrono::Duration::hours(1);
    let facts = ops.facts(query(future, true)).await.expect("facts");
    let mut stuck: Vec<(&str, CashoutStatus)> = facts
        .stuck
        .iter()
        .map(|c| (c.provider_ref.as_str(), c.status))
        .collect();
    stuck.sort_by_key(|(provider_ref, _)| *provider_ref);
    assert_eq!(
        stuck,
        vec![
            ("ref-1", CashoutStatus::Pending),
            ("ref-2", CashoutStatus::Processing)
        ]
    );
    let in_flight: Vec<(CashoutStatus, u64)> = facts
        .in_flight
        .iter()
        .map(|s| (s.status, s.count))
        .collect();
    assert_eq!(
        in_flight,
        vec![(CashoutStatus::Pending, 1), (CashoutStatus::Processing, 1)]
    );
    assert_eq!(facts.quarantined.len(), 1);
    assert_eq!(facts.quarantined[0].event_id, "ev-bad");
    assert_eq!(facts.seeds.len(), 1);
    assert!(facts.seeds[0].1.is_some(), "the last webhook is remembered");
    assert!(facts.seeds[0].2.is_none(), "no sweep yet");
    assert!(facts.open_alerts.is_empty());
    let past = Utc::now() - chrono::Duration::days(30);
    let facts = ops.facts(query(past, false)).await.expect("facts");
    assert!(facts.stuck.is_empty());
    assert!(facts.seeds.is_empty());
    assert_eq!(facts.in_flight.len(), 2);
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
    the_facts_hold_in_flight_stuck_quarantined_and_seeds,
    the_lifecycle_opens_updates_and_resolves_once,
    the_outbox_claims_retries_and_gives_up,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_claiming_deliveries_at_once_never_get_the_same_row() {
    const ALERTS: usize = 120;
    let database = TestDatabase::create().await;
    let pools = [database.migrated(4).await, database.store(4)];
    let subjects: Vec<String> = (0..ALERTS)
        .map(|i| format!("{PROVIDER}/ref-{i:03}"))
        .collect();
    let refs: Vec<&str> = subjects.iter().map(String::as_str).collect();
    let opened = AlertOps::apply(&pools[0], plan_opening(&refs), true)
        .await
        .expect("applied");
    assert_eq!(opened.notices.len(), ALERTS);
    let barrier = Arc::new(Barrier::new(2));
    let mut tasks = Vec::new();
    for pool in &pools {
        let pool = pool.clone();
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut got = Vec::new();
            loop {
                let batch = AlertOps::claim(&pool, later(), LEASE, 7)
                    .await
                    .expect("claimed");
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch.into_iter().map(|item| item.webhook_id));
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
        ALERTS,
        "each row claimed once: {:?}",
        claimed.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_eq!(all.len(), ALERTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_applying_one_plan_at_once_open_and_resolve_each_alert_once() {
    const ROUNDS: usize = 10;
    let database = TestDatabase::create().await;
    let pools = [database.migrated(4).await, database.store(4)];
    for round in 0..ROUNDS {
        let subjects: Vec<String> = (0..5)
            .map(|i| format!("{PROVIDER}/round-{round}-{i}"))
            .collect();
        let barrier = Arc::new(Barrier::new(2));
        let mut tasks = Vec::new();
        for pool in &pools {
            let pool = pool.clone();
            let barrier = Arc::clone(&barrier);
            let refs: Vec<String> = subjects.clone();
            tasks.push(tokio::spawn(async move {
                let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
                let plan = plan_opening(&refs);
                barrier.wait().await;
                AlertOps::apply(&pool, plan, true).await.expect("applied")
            }));
        }
        let mut notices = Vec::new();
        for task in tasks {
            notices.extend(task.await.expect("task").notices);
        }
        let sent: BTreeSet<&str> = notices.iter().map(|n| n.subject.as_str()).collect();
        assert_eq!(
            notices.len(),
            subjects.len(),
            "round {round}: each sent once"
        );
        assert_eq!(sent.len(), subjects.len());
    }
    let (open, _) = AlertOps::list(
        &pools[1],
        AlertFilter {
            limit: 1000,
            ..filter(true)
        },
    )
    .await
    .expect("listed");
    assert_eq!(open.len(), ROUNDS * 5);
    assert_eq!(
        AlertOps::counts(&pools[0]).await.expect("counts"),
        (i64::try_from(ROUNDS * 5).expect("small"), 0),
        "one delivery per alert"
    );

    // Both resolve every alert at once: each resolution is applied and sent once.
    let resolve = AlertPlan {
        resolve: open
            .iter()
            .map(|alert| ResolveAlert {
                id: alert.id,
                notify: true,
            })
            .collect(),
        ..AlertPlan::default()
    };
    let barrier = Arc::new(Barrier::new(2));
    let mut tasks = Vec::new();
    for pool in &pools {
        let (pool, plan, barrier) = (pool.clone(), resolve.clone(), Arc::clone(&barrier));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            AlertOps::apply(&pool, plan, true).await.expect("applied")
        }));
    }
    let mut resolved = 0;
    for task in tasks {
        let applied = task.await.expect("task");
        assert!(applied
            .notices
            .iter()
            .all(|n| n.status == NoticeStatus::Resolved));
        resolved += applied.notices.len();
    }
    assert_eq!(resolved, ROUNDS * 5);
    assert_eq!(
        AlertOps::counts(&pools[1]).await.expect("counts"),
        (i64::try_from(ROUNDS * 10).expect("small"), 0),
        "one resolution queued per alert"
    );
}

#[tokio::test]
async fn an_unknown_stored_name_is_a_store_error_naming_the_column() {
    let database = TestDatabase::create().await;
    let store = database.migrated(2).await;
    let client = store.client().await.expect("a connection");
    client
        .execute(
            "INSERT INTO alerts (kind, subject, provider, severity, text, opened_at, delivery)
             VALUES ('stuck', 'fiserv/ref-1', 'fiserv', 'dire', 'x', 0, 'individual')",
            &[],
        )
        .await
        .expect("inserted");
    drop(client);
    let err = AlertOps::list(&store, filter(false))
        .await
        .expect_err("unknown severity");
    assert!(
        err.to_string().contains("alerts.severity") && err.to_string().contains("dire"),
        "{err}"
    );
    store.close();
}
