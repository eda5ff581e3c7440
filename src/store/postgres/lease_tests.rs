//! Job leases through the store's interface on PostgreSQL: one holder per job across two
//! pools (two instances), takeover after expiry, and a fenced write refused once taken over.

use std::time::Duration;

use chrono::{TimeZone, Utc};

use super::testing::TestDatabase;
use super::PgStore;
use crate::store::lease::under;
use crate::store::{JobLease, JobName, StoreError};

fn poll_of(provider: &str) -> JobName {
    JobName::PollCycle {
        provider: provider.to_string(),
    }
}

/// Takes `job` for `ttl` as `store` once its current holder's lease lapsed (polled against
/// a deadline: no fixed sleep).
async fn take_over(store: &PgStore, job: JobName, ttl: Duration) -> JobLease {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(lease) = store.lease(job.clone(), ttl).await.expect("lease") {
            return lease;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease of {job} never lapsed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_lease_has_one_holder_across_instances_and_is_given_back() {
    let db = TestDatabase::create().await;
    let (a, b) = (db.migrated(4).await, db.store(4));
    let long = Duration::from_secs(60);

    let held = a
        .lease(poll_of("fiserv"), long)
        .await
        .expect("a")
        .expect("free");
    assert_eq!(held.holder, a.claimer());
    assert_eq!(held.job, poll_of("fiserv"));
    assert!(b.lease(poll_of("fiserv"), long).await.expect("b").is_none());
    // Other jobs are other leases.
    assert!(b.lease(poll_of("mannco"), long).await.expect("b").is_some());
    assert!(b
        .lease(JobName::AlertPass, long)
        .await
        .expect("b")
        .is_some());

    // The holder renews (same token) and asks again (extended, same token).
    let renewed = a.renew(&held, long).await.expect("renew").expect("held");
    assert_eq!(renewed.token, held.token);
    let again = a
        .lease(poll_of("fiserv"), long)
        .await
        .expect("a")
        .expect("own");
    assert_eq!(again.token, held.token);

    // Released: the other instance takes it at once, with a new token; the old holder's
    // renewal then fails.
    assert!(a.release(&held).await.expect("release"));
    let taken = b
        .lease(poll_of("fiserv"), long)
        .await
        .expect("b")
        .expect("free");
    assert_eq!(taken.token, held.token + 1);
    assert!(a.renew(&held, long).await.expect("renew").is_none());
    assert!(!a.release(&held).await.expect("release"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_under_a_lease_taken_over_is_refused_and_changes_nothing() {
    let db = TestDatabase::create().await;
    let (a, b) = (db.migrated(4).await, db.store(4));
    let job = poll_of("fiserv");
    let first = Utc.with_ymd_and_hms(2026, 11, 29, 10, 0, 0).unwrap();
    let later = Utc.with_ymd_and_hms(2026, 11, 29, 11, 0, 0).unwrap();

    let stale = a
        .lease(job.clone(), Duration::from_millis(300))
        .await
        .expect("a")
        .expect("free");
    under(stale.clone(), a.set_watermark("fiserv".into(), first))
        .await
        .expect("a write under a held lease");

    // `a` stops renewing (paused, partitioned): `b` takes over once the lease lapses.
    let taken = take_over(&b, job.clone(), Duration::from_secs(60)).await;
    assert!(taken.token > stale.token);

    match under(stale.clone(), a.set_watermark("fiserv".into(), later)).await {
        Err(StoreError::LeaseLost { job }) => assert_eq!(job, "poll:fiserv"),
        other => panic!("a write under a lost lease must be refused: {other:?}"),
    }
    assert_eq!(
        a.watermark("fiserv".into()).await.expect("read"),
        Some(first)
    );
    assert!(a
        .renew(&stale, Duration::from_secs(60))
        .await
        .expect("renew")
        .is_none());

    // The reconciliation plan and cursor, and the reports index, likewise.
    for job in [
        JobName::ReconcilePass,
        JobName::DailyReport {
            date: first.date_naive(),
        },
    ] {
        let lapsing = a
            .lease(job.clone(), Duration::from_millis(300))
            .await
            .expect("a")
            .expect("free");
        take_over(&b, job.clone(), Duration::from_secs(60)).await;
        let refused = match &job {
            JobName::ReconcilePass => under(
                lapsing,
                a.apply_reconcile_plan(Vec::new(), Vec::new(), None, Utc::now()),
            )
            .await
            .map(|_| ()),
            _ => {
                under(
                    lapsing,
                    a.record_report(crate::store::ReportIndexRow {
                        date: "2026-11-29".into(),
                        is_final: true,
                        rows: 0,
                        sha256: String::new(),
                        generated_at: 0,
                    }),
                )
                .await
            }
        };
        assert!(
            matches!(refused, Err(StoreError::LeaseLost { .. })),
            "{job}: {refused:?}"
        );
    }
    assert_eq!(a.get_report("2026-11-29".into()).await.expect("read"), None);

    // The new holder writes; a write outside any job is not fenced.
    under(taken, b.set_watermark("fiserv".into(), later))
        .await
        .expect("the new holder writes");
    assert_eq!(
        b.watermark("fiserv".into()).await.expect("read"),
        Some(later)
    );
    a.set_watermark("mannco".into(), first)
        .await
        .expect("an unfenced write");
}
