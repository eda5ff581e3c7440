//! Job leases behind the store: one instance at a time runs each background job (a
//! provider's poll cycle, the reconciliation pass, a date's daily report, the alert pass,
//! retention), and the writes a job makes under its lease are fenced.
//!
//! On SQLite the process is the only instance (the store lock refuses a second one), so a
//! lease is always granted, renewed and released at once, in memory: no table, no SQL. On
//! PostgreSQL the same calls are `postgres::lease` rows with fencing tokens.
//!
//! Fencing: a job runs inside [`under`], which makes its lease the fence of every store
//! write the job's task makes. The PostgreSQL writes whose double execution would be wrong
//! (the poll watermark, the reconciliation plan and cursor, the reports index, the alert
//! plan) check that fence in their own transaction ([`fence_in_scope`]) and fail with
//! [`StoreError::LeaseLost`] once another instance took the lease over. Work spawned onto
//! another task is outside the scope and unfenced.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};

use super::{Store, StoreError};

/// A background job that one instance at a time may run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JobName {
    /// A provider's poll cycle (search sweep, queued fetches, status checks).
    PollCycle { provider: String },
    /// The continuous reconciliation pass.
    ReconcilePass,
    /// The daily reconciliation and report of one business date.
    DailyReport { date: NaiveDate },
    /// The alert pass (evaluate, open, resolve, queue deliveries).
    AlertPass,
    /// Raw-body retention.
    Retention,
}

impl JobName {
    /// The lease's name in the store: unique per job.
    pub fn lease_name(&self) -> String {
        match self {
            JobName::PollCycle { provider } => format!("poll:{provider}"),
            JobName::ReconcilePass => "reconcile".to_string(),
            JobName::DailyReport { date } => format!("report:{}", date.format("%Y-%m-%d")),
            JobName::AlertPass => "alerts".to_string(),
            JobName::Retention => "retention".to_string(),
        }
    }

    /// The `job` label of the lease metrics: bounded (a daily report's date left out).
    pub fn metric_label(&self) -> String {
        match self {
            JobName::DailyReport { .. } => "report".to_string(),
            other => other.lease_name(),
        }
    }
}

impl std::fmt::Display for JobName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.lease_name())
    }
}

/// A held job lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobLease {
    pub job: JobName,
    /// Who holds it (this store's instance).
    pub holder: String,
    /// The fencing token: grows with every takeover.
    pub token: i64,
    /// When it lapses unless renewed (the store's clock).
    pub expires_at: DateTime<Utc>,
}

/// The holder name of the only instance of a SQLite store.
pub const LOCAL_HOLDER: &str = "local";

tokio::task_local! {
    static FENCE: JobLease;
}

/// Runs `work` with `lease` as the fence of the store writes it makes (on this task).
pub async fn under<F: std::future::Future>(lease: JobLease, work: F) -> F::Output {
    FENCE.scope(lease, work).await
}

/// The lease the current task runs under, if any (a write checks it as its fence).
pub fn fence_in_scope() -> Option<JobLease> {
    FENCE.try_with(JobLease::clone).ok()
}

/// A lease granted in memory until `now + ttl` (SQLite: this process is the only one).
fn local_lease(job: JobName, ttl: Duration) -> JobLease {
    JobLease {
        job,
        holder: LOCAL_HOLDER.to_string(),
        token: 1,
        expires_at: Utc::now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX),
    }
}

impl Store {
    /// Takes `job`'s lease for `ttl`: `None` while another instance holds it. A SQLite
    /// store is the only instance (its file lock refuses a second one): always granted.
    pub async fn lease(&self, job: JobName, ttl: Duration) -> Result<Option<JobLease>, StoreError> {
        match self.postgres() {
            Some(postgres) => postgres.lease(job, ttl).await,
            None => Ok(Some(local_lease(job, ttl))),
        }
    }

    /// Extends a held lease by `ttl` from now: `None` when another instance took it over
    /// (the holder must stop). Never on SQLite.
    pub async fn renew(
        &self,
        lease: &JobLease,
        ttl: Duration,
    ) -> Result<Option<JobLease>, StoreError> {
        match self.postgres() {
            Some(postgres) => postgres.renew(lease, ttl).await,
            None => Ok(Some(local_lease(lease.job.clone(), ttl))),
        }
    }

    /// Gives a lease up (another instance may take it at once); `false` when it had been
    /// taken over already. Nothing to do on SQLite.
    pub async fn release(&self, lease: &JobLease) -> Result<bool, StoreError> {
        match self.postgres() {
            Some(postgres) => postgres.release(lease).await,
            None => Ok(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_unique_per_job_and_labels_bounded() {
        let date = NaiveDate::from_ymd_opt(2026, 11, 29).unwrap();
        let names = [
            JobName::PollCycle {
                provider: "fiserv".into(),
            },
            JobName::ReconcilePass,
            JobName::DailyReport { date },
            JobName::AlertPass,
            JobName::Retention,
        ]
        .map(|job| job.lease_name());
        assert_eq!(
            names,
            [
                "poll:fiserv",
                "reconcile",
                "report:2026-11-29",
                "alerts",
                "retention"
            ]
        );
        assert_eq!(JobName::DailyReport { date }.metric_label(), "report");
    }

    #[tokio::test]
    async fn the_fence_is_in_scope_only_under_the_lease() {
        let lease = local_lease(JobName::AlertPass, Duration::from_secs(5));
        assert_eq!(fence_in_scope(), None);
        let seen = under(lease.clone(), async { fence_in_scope() }).await;
        assert_eq!(seen, Some(lease));
        assert_eq!(fence_in_scope(), None);
    }
}
