//! Background jobs run under their leases, so that with several instances on one store
//! each job runs on one instance at a time and a killed instance's jobs are taken over
//! once their leases lapse (`instances.lease_ttl`).
//!
//! A run takes the job's lease (or is skipped, at DEBUG, while another instance holds
//! it), renews it every `instances.renew_every` while the job runs, and runs the job
//! under it, so the job's fenced writes are refused once another instance took over (see
//! [`crate::store::lease`]). A lost lease stops the job at once: its future is dropped,
//! and a write in flight is refused by its fence. A periodic job keeps its lease until
//! its next run is due (plus one TTL), so the other instances skip their runs meanwhile
//! and the job stays on one instance while that instance lives; a one-off job gives its
//! lease back when done. On SQLite a lease is always granted (one instance).
//!
//! Metrics: `cashout_recon_leases_held{job}` (1 while held) and
//! `cashout_recon_leases_lost_total{job}`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use tokio::time::Instant;

use crate::config::InstanceSettings;
use crate::metrics::Metrics;
use crate::store::lease::under;
use crate::store::postgres::PgStore;
use crate::store::{JobLease, JobName, Store, StoreError};

/// The lease operations of a store (`Store::lease`, `renew`, `release`).
#[async_trait]
pub trait LeaseStore: Send + Sync {
    async fn lease(&self, job: JobName, ttl: Duration) -> Result<Option<JobLease>, StoreError>;
    async fn renew(&self, lease: &JobLease, ttl: Duration) -> Result<Option<JobLease>, StoreError>;
    async fn release(&self, lease: &JobLease) -> Result<bool, StoreError>;
}

#[async_trait]
impl LeaseStore for Store {
    async fn lease(&self, job: JobName, ttl: Duration) -> Result<Option<JobLease>, StoreError> {
        Store::lease(self, job, ttl).await
    }
    async fn renew(&self, lease: &JobLease, ttl: Duration) -> Result<Option<JobLease>, StoreError> {
        Store::renew(self, lease, ttl).await
    }
    async fn release(&self, lease: &JobLease) -> Result<bool, StoreError> {
        Store::release(self, lease).await
    }
}

#[async_trait]
impl LeaseStore for PgStore {
    async fn lease(&self, job: JobName, ttl: Duration) -> Result<Option<JobLease>, StoreError> {
        PgStore::lease(self, job, ttl).await
    }
    async fn renew(&self, lease: &JobLease, ttl: Duration) -> Result<Option<JobLease>, StoreError> {
        PgStore::renew(self, lease, ttl).await
    }
    async fn release(&self, lease: &JobLease) -> Result<bool, StoreError> {
        PgStore::release(self, lease).await
    }
}

/// What happens to a job's lease after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRun {
    /// Given back at once (a one-off job: a daily report, retention).
    Release,
    /// Kept until the next run is due this long after the run started, plus one lease
    /// TTL (a periodic job: the other instances skip their runs meanwhile).
    KeepFor(Duration),
}

/// Runs jobs under their leases (one per daemon, shared by the jobs).
pub struct JobLeases {
    store: Arc<dyn LeaseStore>,
    metrics: Metrics,
    settings: InstanceSettings,
    /// Leases kept between runs of periodic jobs (given back at shutdown).
    kept: Mutex<HashMap<JobName, JobLease>>,
}

impl JobLeases {
    pub fn new(
        store: Arc<dyn LeaseStore>,
        metrics: Metrics,
        settings: InstanceSettings,
    ) -> JobLeases {
        JobLeases {
            store,
            metrics,
            settings,
            kept: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `work` under `job`'s lease: `None` when another instance holds it (skipped),
    /// when the lease could not be taken (the store out of reach: the next run retries),
    /// or when it was lost while `work` ran (`work` was stopped).
    pub async fn run<F: Future>(
        &self,
        job: JobName,
        after: AfterRun,
        work: F,
    ) -> Option<F::Output> {
        let started = Instant::now();
        let label = job.metric_label();
        let lease = match self.store.lease(job.clone(), self.settings.lease_ttl).await {
            Ok(Some(lease)) => lease,
            Ok(None) => {
                tracing::debug!(%job, "job skipped: another instance holds its lease");
                self.held(&label, false);
                self.forget(&job);
                return None;
            }
            Err(err) => {
                tracing::warn!(%job, error = %err, "job skipped: cannot take its lease");
                return None;
            }
        };
        self.held(&label, true);
        let renewing = self.keep_renewed(lease.clone());
        tokio::pin!(renewing);
        let output = tokio::select! {
            output = under(lease.clone(), work) => output,
            () = &mut renewing => {
                tracing::warn!(%job, "job stopped: its lease was taken over by another instance");
                self.metrics.leases_lost.with_label_values(&[&label]).inc();
                self.held(&label, false);
                self.forget(&job);
                return None;
            }
        };
        let keep = match after {
            AfterRun::Release => Duration::ZERO,
            AfterRun::KeepFor(period) => {
                (period + self.settings.lease_ttl).saturating_sub(started.elapsed())
            }
        };
        if keep.is_zero() {
            self.give_back(&lease).await;
            self.held(&label, false);
            self.forget(&job);
        } else {
            match self.store.renew(&lease, keep).await {
                Ok(Some(kept)) => {
                    self.kept
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(job, kept);
                }
                Ok(None) => {
                    self.held(&label, false);
                    self.forget(&job);
                }
                // Still held until it lapses; the next run asks again.
                Err(err) => tracing::debug!(%job, error = %err, "cannot keep the job's lease"),
            }
        }
        Some(output)
    }

    /// Gives back every lease kept between runs (a clean shutdown: the other instances
    /// take the jobs over at their next runs, not after a TTL).
    pub async fn release_all(&self) {
        let kept: Vec<JobLease> = self
            .kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, lease)| lease)
            .collect();
        for lease in kept {
            self.give_back(&lease).await;
            self.held(&lease.job.metric_label(), false);
        }
    }

    /// Renews `lease` every `renew_every`; returns only once it is lost: taken over, or
    /// past its expiry without a successful renewal (the store out of reach).
    async fn keep_renewed(&self, mut lease: JobLease) {
        loop {
            tokio::time::sleep(self.settings.renew_every).await;
            match self.store.renew(&lease, self.settings.lease_ttl).await {
                Ok(Some(renewed)) => lease = renewed,
                Ok(None) => return,
                Err(err) if Utc::now() >= lease.expires_at => {
                    tracing::warn!(job = %lease.job, error = %err, "job lease lapsed: cannot renew it");
                    return;
                }
                Err(err) => {
                    tracing::debug!(job = %lease.job, error = %err, "job lease not renewed; retrying")
                }
            }
        }
    }

    async fn give_back(&self, lease: &JobLease) {
        if let Err(err) = self.store.release(lease).await {
            tracing::debug!(job = %lease.job, error = %err, "cannot release the job's lease; it lapses");
        }
    }

    fn forget(&self, job: &JobName) {
        self.kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(job);
    }

    fn held(&self, label: &str, held: bool) {
        self.metrics
            .leases_held
            .with_label_values(&[label])
            .set(i64::from(held));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::Notify;

    use super::*;
    use crate::config::StoreSettings;
    use crate::store::postgres::testing::TestDatabase;

    /// Short leases, as a two-instance test would configure them.
    const SHORT: InstanceSettings = InstanceSettings {
        lease_ttl: Duration::from_millis(1_500),
        renew_every: Duration::from_millis(200),
    };
    const WITHIN: Duration = Duration::from_secs(30);

    fn runner(store: Arc<dyn LeaseStore>) -> (JobLeases, Metrics) {
        let metrics = Metrics::new();
        (JobLeases::new(store, metrics.clone(), SHORT), metrics)
    }

    fn held(metrics: &Metrics, label: &str) -> i64 {
        metrics.leases_held.with_label_values(&[label]).get()
    }

    #[tokio::test]
    async fn on_sqlite_every_job_runs_and_its_lease_is_local() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(
            &StoreSettings {
                backend: crate::config::StoreBackend::Sqlite,
                path: dir.path().join("book.db"),
                busy_timeout: Duration::from_secs(30),
                max_batch: 64,
                read_connections: 2,
                replay_window: crate::config::MIN_REPLAY_WINDOW,
            },
            Metrics::new(),
        )
        .expect("open");
        let lease = store
            .lease(JobName::AlertPass, SHORT.lease_ttl)
            .await
            .expect("lease")
            .expect("always granted");
        assert_eq!(lease.holder, crate::store::lease::LOCAL_HOLDER);
        // A second ask (as another job run would) is granted too: one instance only.
        assert!(store
            .lease(JobName::AlertPass, SHORT.lease_ttl)
            .await
            .expect("lease")
            .is_some());
        assert!(store
            .renew(&lease, SHORT.lease_ttl)
            .await
            .expect("renew")
            .is_some());
        assert!(store.release(&lease).await.expect("release"));

        let (leases, metrics) = runner(Arc::new(store.clone()));
        let ran = leases
            .run(
                JobName::ReconcilePass,
                AfterRun::KeepFor(Duration::from_secs(60)),
                async { crate::store::lease::fence_in_scope().map(|fence| fence.job) },
            )
            .await;
        assert_eq!(ran, Some(Some(JobName::ReconcilePass)));
        assert_eq!(held(&metrics, "reconcile"), 1);
        leases.release_all().await;
        assert_eq!(held(&metrics, "reconcile"), 0);
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_postgres_the_store_facade_leases_in_the_database() {
        // Review finding: the facade granted every lease in memory whatever its backend,
        // so two daemons on one PostgreSQL database both ran every job.
        let db = TestDatabase::create().await;
        let (a, b) = (Store::from(db.migrated(2).await), Store::from(db.store(2)));
        let job = JobName::AlertPass;
        let held_by_a = a
            .lease(job.clone(), SHORT.lease_ttl)
            .await
            .expect("a")
            .expect("free");
        assert_ne!(held_by_a.holder, crate::store::lease::LOCAL_HOLDER);
        assert_eq!(
            b.lease(job.clone(), SHORT.lease_ttl).await.expect("b"),
            None
        );
        assert!(a
            .renew(&held_by_a, SHORT.lease_ttl)
            .await
            .expect("renew")
            .is_some());
        assert!(a.release(&held_by_a).await.expect("release"));
        let taken = b
            .lease(job, SHORT.lease_ttl)
            .await
            .expect("b")
            .expect("released");
        assert!(taken.token > held_by_a.token);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_runs_on_one_instance_and_is_taken_over_when_its_lease_lapses() {
        let db = TestDatabase::create().await;
        let (a_store, b_store) = (db.migrated(4).await, db.store(4));
        let (a, a_metrics) = runner(Arc::new(a_store.clone()));
        let (b, _) = runner(Arc::new(b_store.clone()));
        let job = || JobName::PollCycle {
            provider: "fiserv".into(),
        };

        // `a` runs the cycle; meanwhile `b`'s run is skipped without running its work.
        let started = Arc::new(Notify::new());
        let finish = Arc::new(Notify::new());
        let a_run = {
            let (started, finish) = (started.clone(), finish.clone());
            async move {
                a.run(
                    job(),
                    AfterRun::KeepFor(Duration::from_millis(100)),
                    async {
                        started.notify_one();
                        finish.notified().await;
                        "a ran"
                    },
                )
                .await
                .map(|ran| (ran, a))
            }
        };
        let a_run = tokio::spawn(a_run);
        tokio::time::timeout(WITHIN, started.notified())
            .await
            .expect("a's cycle started");
        let b_ran = AtomicUsize::new(0);
        let skipped = b
            .run(job(), AfterRun::Release, async {
                b_ran.fetch_add(1, Ordering::SeqCst);
            })
            .await;
        assert_eq!(skipped, None);
        assert_eq!(b_ran.load(Ordering::SeqCst), 0);
        finish.notify_one();
        let (ran, a) = a_run.await.expect("a's run").expect("a held the lease");
        assert_eq!(ran, "a ran");
        assert_eq!(
            held(&a_metrics, "poll:fiserv"),
            1,
            "kept for the next period"
        );

        // `a` stops (killed: it neither renews nor releases): `b` takes the cycle over once
        // the kept lease lapses (period + TTL), polled against a deadline.
        drop(a);
        let deadline = Instant::now() + WITHIN;
        loop {
            let ran = b
                .run(job(), AfterRun::Release, async {
                    b_ran.fetch_add(1, Ordering::SeqCst);
                })
                .await;
            if ran.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "the lease never lapsed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(b_ran.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_whose_lease_is_taken_over_stops_and_its_writes_are_refused() {
        let db = TestDatabase::create().await;
        let (a_store, b_store) = (db.migrated(4).await, db.store(4));
        let (a, a_metrics) = runner(Arc::new(a_store.clone()));
        let job = JobName::PollCycle {
            provider: "fiserv".into(),
        };

        // `a`'s job writes once, then waits (a long cycle) and would write again.
        let wrote_once = Arc::new(Notify::new());
        let second_write = Arc::new(AtomicUsize::new(0));
        let a_run = {
            let (a_store, wrote_once, second_write) =
                (a_store.clone(), wrote_once.clone(), second_write.clone());
            let job = job.clone();
            tokio::spawn(async move {
                let ran = a
                    .run(job, AfterRun::Release, async {
                        a_store
                            .set_watermark("fiserv".into(), Utc::now())
                            .await
                            .expect("a write under the held lease");
                        wrote_once.notify_one();
                        std::future::pending::<()>().await;
                        second_write.fetch_add(1, Ordering::SeqCst);
                    })
                    .await;
                (ran, a)
            })
        };
        tokio::time::timeout(WITHIN, wrote_once.notified())
            .await
            .expect("a wrote");

        // `a` is partitioned long enough for its lease to lapse (simulated: expired at
        // once), and `b` takes it over with a new token.
        let stale = crate::store::postgres::lease::current(
            &a_store.client().await.expect("client"),
            &job.lease_name(),
        )
        .await
        .expect("read")
        .expect("row");
        a_store
            .client()
            .await
            .expect("client")
            .execute(
                "UPDATE leases SET expires_at = '-infinity' WHERE name = $1",
                &[&job.lease_name()],
            )
            .await
            .expect("expire");
        let taken = b_store
            .lease(job.clone(), Duration::from_secs(60))
            .await
            .expect("b")
            .expect("lapsed");
        assert!(taken.token > stale.token);

        // `a`'s next renewal finds it gone: the job is stopped and counted as lost.
        let (ran, _a) = tokio::time::timeout(WITHIN, a_run)
            .await
            .expect("a stopped")
            .expect("a's task");
        assert_eq!(ran, None);
        assert_eq!(second_write.load(Ordering::SeqCst), 0);
        assert_eq!(
            a_metrics
                .leases_lost
                .with_label_values(&["poll:fiserv"])
                .get(),
            1
        );
        assert_eq!(held(&a_metrics, "poll:fiserv"), 0);

        // A write still under the stale lease is refused.
        let stale_lease = JobLease {
            job: job.clone(),
            holder: stale.holder,
            token: stale.token,
            expires_at: stale.expires_at,
        };
        let refused = under(
            stale_lease,
            a_store.set_watermark("fiserv".into(), Utc::now()),
        )
        .await;
        assert!(
            matches!(refused, Err(StoreError::LeaseLost { .. })),
            "{refused:?}"
        );
    }
}
