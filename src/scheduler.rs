//! Background jobs: a poll cycle per provider every `poll_every` (tokio-cron-scheduler),
//! a status-fetch worker per provider woken by thin notifications, the continuous
//! reconciliation pass every `reconcile.every`, the daily report at `reports.daily_at`,
//! the alert pass (every `alerts.evaluate_every` and when woken), the alert outbox
//! worker, and housekeeping.
//! Jobs never overlap themselves, one provider's outage never delays another's jobs,
//! and shutdown cancels them and waits for running cycles.
//!
//! With several instances on one store, the poll cycles, the reconciliation pass, the
//! daily report, the alert pass and retention run under their leases ([`JobLeases`]):
//! one instance at a time runs each. The fetch workers and the alert outbox worker need
//! none: they claim their rows one by one (`FOR UPDATE SKIP LOCKED` with a claim expiry).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::leases::{AfterRun, JobLeases};
use crate::store::JobName;

/// How often a fetch worker looks at its queue even when nobody woke it (deferred retries).
const FETCH_WORKER_TICK: Duration = Duration::from_secs(1);
/// How often the replay cache is pruned.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);
/// How often raw-body retention runs (the first run: one housekeeping period after start).
const RETENTION_EVERY: Duration = Duration::from_secs(3_600);
/// The shortest time between two alert passes.
const ALERT_PASS_GAP: Duration = Duration::from_millis(500);
/// How often the scheduler shows it is alive (see [`crate::app::Heartbeat`]).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// The running background jobs.
pub struct Scheduler {
    jobs: JobScheduler,
    cancel: CancellationToken,
    workers: Vec<JoinHandle<()>>,
    state: Arc<AppState>,
    leases: Arc<JobLeases>,
}

impl Scheduler {
    /// Starts every job for the providers whose poller is on.
    pub async fn start(state: Arc<AppState>) -> anyhow::Result<Scheduler> {
        let jobs = JobScheduler::new()
            .await
            .context("creating the job scheduler")?;
        let cancel = CancellationToken::new();
        let mut workers = Vec::new();
        let leases = Arc::new(JobLeases::new(
            Arc::new(state.store.clone()),
            state.metrics.clone(),
            state.settings.instances,
        ));
        for provider in state.poller.active_providers() {
            let every = state
                .poller
                .poll_every(&provider)
                .unwrap_or(Duration::from_secs(300));
            let job_state = state.clone();
            let job_leases = leases.clone();
            let job_provider = provider.clone();
            let job = Job::new_repeated_async(every, move |_id, _scheduler| {
                let state = job_state.clone();
                let leases = job_leases.clone();
                let provider = job_provider.clone();
                Box::pin(async move {
                    let job = JobName::PollCycle {
                        provider: provider.clone(),
                    };
                    let cycle = state.poller.scheduled_cycle(&provider);
                    if let Some(Err(err)) = leases.run(job, AfterRun::KeepFor(every), cycle).await {
                        tracing::error!(provider, error = %err, "poll cycle failed");
                    }
                })
            })
            .with_context(|| format!("scheduling the poll of {provider}"))?;
            jobs.add(job)
                .await
                .with_context(|| format!("adding the poll job of {provider}"))?;
            workers.push(tokio::spawn(fetch_worker(
                state.clone(),
                provider,
                cancel.clone(),
            )));
        }
        workers.push(tokio::spawn(housekeeping(
            state.clone(),
            leases.clone(),
            cancel.clone(),
        )));
        workers.push(tokio::spawn(continuous_reconciliation(
            state.clone(),
            leases.clone(),
            cancel.clone(),
        )));
        workers.push(tokio::spawn(daily_reports(
            state.clone(),
            leases.clone(),
            cancel.clone(),
        )));
        workers.push(tokio::spawn(alert_passes(
            state.clone(),
            leases.clone(),
            cancel.clone(),
        )));
        if let Some(sink) = crate::alert::delivery::Sink::from_settings(&state.settings.alerts) {
            workers.push(tokio::spawn(crate::alert::delivery::run_outbox(
                state.store.clone(),
                state.metrics.clone(),
                sink,
                state.alerting.outbox_waker(),
                cancel.clone(),
            )));
        }
        jobs.start().await.context("starting the job scheduler")?;
        Ok(Scheduler {
            jobs,
            cancel,
            workers,
            state,
            leases,
        })
    }

    /// Stops the jobs and waits (bounded) for running cycles and workers.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Err(err) = self.jobs.shutdown().await {
            tracing::warn!(error = %err, "job scheduler did not shut down cleanly");
        }
        for worker in self.workers.drain(..) {
            if tokio::time::timeout(Duration::from_secs(10), worker)
                .await
                .is_err()
            {
                tracing::warn!("a background worker did not stop within 10 s");
            }
        }
        // A scheduled cycle may still be running: wait for it like a manual poll would.
        for provider in self.state.poller.active_providers() {
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                self.state.poller.wait_idle(&provider),
            )
            .await;
        }
        // The other instances take the jobs over at their next runs, not after a TTL.
        self.leases.release_all().await;
    }
}

/// Performs queued status fetches of one provider as soon as they are queued.
async fn fetch_worker(state: Arc<AppState>, provider: String, cancel: CancellationToken) {
    let Some(waker) = state.poller.fetch_waker(&provider) else {
        return;
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = waker.notified() => {}
            _ = tokio::time::sleep(FETCH_WORKER_TICK) => {}
        }
        match state.poller.drain_fetch_queue_of(&provider).await {
            Ok(summary) if summary.fetched > 0 || summary.errors > 0 => {
                tracing::debug!(
                    provider,
                    fetched = summary.fetched,
                    updated = summary.updated,
                    recovered = summary.recovered,
                    errors = summary.errors,
                    "queued status fetches done"
                );
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(provider, error = %err, "queued status fetches failed"),
        }
    }
}

/// Beats the heartbeat `/readyz` reads and prunes replay-cache entries whose timestamps
/// are long past every tolerance.
async fn housekeeping(state: Arc<AppState>, leases: Arc<JobLeases>, cancel: CancellationToken) {
    let keep = chrono::Duration::from_std(state.settings.store.replay_window)
        .unwrap_or(chrono::Duration::MAX);
    let mut last_prune = tokio::time::Instant::now();
    let mut last_retention = None::<tokio::time::Instant>;
    loop {
        state.scheduler_heartbeat.beat();
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(HEARTBEAT_EVERY) => {}
        }
        if last_prune.elapsed() < HOUSEKEEPING_EVERY {
            continue;
        }
        last_prune = tokio::time::Instant::now();
        match state.store.prune_replay_cache(Utc::now() - keep).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "replay cache pruned"),
            Err(err) => tracing::warn!(error = %err, "replay cache pruning failed"),
        }
        if last_retention.is_none_or(|at| at.elapsed() >= RETENTION_EVERY) {
            last_retention = Some(tokio::time::Instant::now());
            let run = retain_raw_bodies(&state);
            leases.run(JobName::Retention, AfterRun::Release, run).await;
        }
    }
}

/// One raw-body retention run (`store.retain_raw_bodies`), logged.
async fn retain_raw_bodies(state: &AppState) {
    let Some(retain) = state.settings.retention.retain_raw_bodies else {
        return;
    };
    let archive_dir = state.settings.retention.archive_dir.as_deref();
    match crate::retention::run(&state.store, retain, archive_dir, Utc::now()).await {
        Ok(run) if run.cleared == 0 && run.pages_freed == 0 => {}
        Ok(run) => tracing::info!(
            cleared = run.cleared,
            archive = run.archive.as_ref().map(|path| path.display().to_string()),
            pages_freed = run.pages_freed,
            vacuum_available = run.vacuum_available,
            "retention: old raw bodies and headers dropped"
        ),
        Err(err) => tracing::warn!(error = %err, "retention run failed; the next run retries"),
    }
}

/// Re-examines what changed every `reconcile.every`, so a mismatch opens within that
/// interval of the event that causes it.
async fn continuous_reconciliation(
    state: Arc<AppState>,
    leases: Arc<JobLeases>,
    cancel: CancellationToken,
) {
    let every = state.settings.reconcile.every;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
        let pass = state.reconciler.continuous_pass_now();
        let Some(result) = leases
            .run(JobName::ReconcilePass, AfterRun::KeepFor(every), pass)
            .await
        else {
            continue;
        };
        match result {
            Ok(outcome) => {
                if failing {
                    tracing::info!("reconciliation pass succeeded again");
                }
                failing = false;
                if outcome.opened > 0 || outcome.resolved > 0 {
                    // Mismatches cause alerts: evaluate them now, not at the next tick.
                    state.wake_alerts();
                    tracing::info!(
                        groups = outcome.groups,
                        opened = outcome.opened,
                        resolved = outcome.resolved,
                        "reconciliation pass"
                    );
                }
            }
            Err(err) => {
                if !failing {
                    tracing::warn!(error = %err, "reconciliation pass failed; retrying every interval");
                }
                failing = true;
            }
        }
    }
}

/// At `reports.daily_at` (local time in `reports.timezone`) reconciles the day before in
/// full and writes its final report; on start-up, catches up a missed one.
async fn daily_reports(state: Arc<AppState>, leases: Arc<JobLeases>, cancel: CancellationToken) {
    let tz = state.reconciler.timezone();
    let daily_at = state.settings.reports.daily_at;
    // A daemon that was down at the daily time writes the missed report now.
    let today = crate::report::BusinessDay::containing(Utc::now(), tz);
    let (due, missed) = crate::reconciler::next_daily_run(
        today.start - chrono::Duration::milliseconds(1),
        daily_at,
        tz,
    );
    // A store that knew nothing before that day has no report to catch up.
    let knew_it = state
        .store
        .first_entry_at()
        .await
        .ok()
        .flatten()
        .is_some_and(|first| first < crate::report::BusinessDay::of(missed, tz).end);
    if due <= Utc::now() && knew_it {
        // Any final report of that day will do.
        run_daily(&state, &leases, missed, DateTime::<Utc>::MIN_UTC).await;
    }
    loop {
        let (at, date) = crate::reconciler::next_daily_run(Utc::now(), daily_at, tz);
        let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        run_daily(&state, &leases, date, at).await;
    }
}

/// The daily reconciliation and final report of `date`, under the date's lease, unless a
/// final report of it was generated at or after `since` (by this instance or another:
/// several instances' daily runs, one report).
async fn run_daily(
    state: &AppState,
    leases: &JobLeases,
    date: chrono::NaiveDate,
    since: DateTime<Utc>,
) {
    let job = JobName::DailyReport { date };
    leases
        .run(
            job,
            AfterRun::Release,
            reconcile_day_once(state, date, since),
        )
        .await;
}

async fn reconcile_day_once(state: &AppState, date: chrono::NaiveDate, since: DateTime<Utc>) {
    let since = since.timestamp_millis();
    let done = state
        .store
        .get_report(date.format("%Y-%m-%d").to_string())
        .await
        .ok()
        .flatten()
        .is_some_and(|r| r.is_final && r.generated_at >= since);
    if done {
        tracing::debug!(%date, "daily report already written by another instance");
        return;
    }
    match state.reconciler.reconcile_day_now(date).await {
        Ok(outcome) => {
            if outcome.pass.opened > 0 || outcome.pass.resolved > 0 {
                state.wake_alerts();
            }
        }
        Err(err) => tracing::error!(%date, error = %err, "daily reconciliation failed"),
    }
}

/// Runs an alert pass at start, every `alerts.evaluate_every`, and as soon as something
/// that can open an alert happened (passes coalesce: many wake-ups, one pass).
async fn alert_passes(state: Arc<AppState>, leases: Arc<JobLeases>, cancel: CancellationToken) {
    let waker = state.alerting.waker();
    let every = state.settings.alerts.evaluate_every;
    loop {
        let started = tokio::time::Instant::now();
        let pass = state.alerting.run_pass(&state, Utc::now());
        match leases
            .run(JobName::AlertPass, AfterRun::KeepFor(every), pass)
            .await
        {
            Some(Ok(summary)) if summary.opened > 0 || summary.resolved > 0 => {
                tracing::debug!(?summary, "alert pass");
            }
            Some(Ok(_)) | None => {}
            Some(Err(err)) => tracing::warn!(error = %err, "alert pass failed"),
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = waker.notified() => {}
            _ = tokio::time::sleep(every) => {}
        }
        // A storm of wake-ups (quarantined webhooks, forged traffic) runs at most one
        // pass per ALERT_PASS_GAP.
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(started + ALERT_PASS_GAP) => {}
        }
    }
}
