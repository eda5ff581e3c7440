//! The reconciliation use cases: the continuous pass over what changed and the full pass
//! of a business day. Each loads through the store, decides with the pure rules of
//! [`crate::reconcile`] and applies the plan through the store.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use crate::config::Settings;
use crate::reconcile::{
    covered_subjects, examine, plan, Finding, MatchGroup, OpenMismatch, Plan, ProviderRules,
    Subject,
};
use crate::report::{BusinessDay, Generated, ReportError};
use crate::store::{DueRule, GroupKey, Store, StoreError};

/// Groups loaded and applied per store call in a continuous pass, and findings per write
/// in a full pass: bounds memory and how long one write holds the writer.
const CHUNK: usize = 2_000;
const WRITE_CHUNK: usize = 5_000;

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PassOutcome {
    pub groups: u64,
    pub opened: u64,
    pub resolved: u64,
}

/// Runs reconciliation passes for the configured providers and produces their reports.
#[derive(Clone)]
pub struct Reconciler {
    store: Store,
    rules: Arc<HashMap<String, ProviderRules>>,
    missing_grace_ms: i64,
    reports_dir: PathBuf,
    timezone: Tz,
    /// One pass at a time: a continuous pass never interleaves with a full one.
    running: Arc<tokio::sync::Mutex<()>>,
}

/// What reconciling a business day did, with the day's report.
#[derive(Clone, Debug)]
pub struct DayOutcome {
    pub pass: PassOutcome,
    pub report: Generated,
}

fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Reconciler {
    /// The rules of every configured provider.
    pub fn new(store: Store, settings: &Settings) -> Reconciler {
        let missing_grace_ms = millis(settings.reconcile.missing_grace);
        let rules = settings
            .providers
            .iter()
            .map(|p| {
                (
                    p.id.clone(),
                    ProviderRules {
                        ledger: p.ledger,
                        stuck_after_ms: millis(p.stuck_after),
                        missing_grace_ms,
                        fees: p.fees.clone(),
                    },
                )
            })
            .collect();
        Reconciler {
            store,
            rules: Arc::new(rules),
            missing_grace_ms,
            reports_dir: settings.reports.dir.clone(),
            timezone: settings.reports.timezone,
            running: Arc::default(),
        }
    }

    /// The reports' time zone.
    pub fn timezone(&self) -> Tz {
        self.timezone
    }

    /// The business day `date` in the reports' time zone.
    pub fn day(&self, date: NaiveDate) -> BusinessDay {
        BusinessDay::of(date, self.timezone)
    }

    /// [`Reconciler::reconcile_day`] at the clock's time once no other pass runs.
    pub async fn reconcile_day_now(&self, date: NaiveDate) -> Result<DayOutcome, ReportError> {
        let running = self.running.lock().await;
        let pass = self.full_pass_locked(self.day(date), Utc::now()).await?;
        drop(running);
        self.report_day(date, pass, Utc::now()).await
    }

    /// The full pass of `date` at `now`, then its report (final once the day is over).
    pub async fn reconcile_day(
        &self,
        date: NaiveDate,
        now: DateTime<Utc>,
    ) -> Result<DayOutcome, ReportError> {
        let pass = self.full_pass(self.day(date), now).await?;
        self.report_day(date, pass, now).await
    }

    async fn report_day(
        &self,
        date: NaiveDate,
        pass: PassOutcome,
        now: DateTime<Utc>,
    ) -> Result<DayOutcome, ReportError> {
        let day = self.day(date);
        let report =
            crate::report::generate(&self.store, &self.reports_dir, day, self.timezone, now)
                .await?;
        tracing::info!(
            date = %report.day.label(),
            groups = pass.groups,
            opened = pass.opened,
            resolved = pass.resolved,
            rows = report.summary.rows,
            r#final = report.summary.is_final,
            "reconciled a business day"
        );
        Ok(DayOutcome { pass, report })
    }

    /// The CSV and summary paths of `date`'s report: a final one as it is on disk, else
    /// generated now.
    pub async fn report_files(
        &self,
        date: NaiveDate,
        now: DateTime<Utc>,
    ) -> Result<(PathBuf, PathBuf), ReportError> {
        crate::report::ensure(
            &self.store,
            &self.reports_dir,
            self.day(date),
            self.timezone,
            now,
        )
        .await
    }

    /// Re-examines what changed since the last pass (events, ledger entries, reprocessed
    /// events) and what became due by time (stuck, past the grace), then stores the cursor.
    pub async fn continuous_pass(&self, now: DateTime<Utc>) -> Result<PassOutcome, StoreError> {
        let _running = self.running.lock().await;
        self.continuous_pass_locked(now).await
    }

    /// [`Reconciler::continuous_pass`] at the clock's time once no other pass runs (so its
    /// findings are never stamped earlier than a pass that ran before it).
    pub async fn continuous_pass_now(&self) -> Result<PassOutcome, StoreError> {
        let _running = self.running.lock().await;
        self.continuous_pass_locked(Utc::now()).await
    }

    async fn continuous_pass_locked(&self, now: DateTime<Utc>) -> Result<PassOutcome, StoreError> {
        let since = self.store.reconcile_cursor().await?.unwrap_or_default();
        let now_ms = now.timestamp_millis();
        let due = self
            .rules
            .iter()
            .map(|(provider, rules)| DueRule {
                provider: provider.clone(),
                stuck_before: now_ms - rules.stuck_after_ms,
                missing_from: since.passed_at - self.missing_grace_ms,
                missing_until: now_ms - self.missing_grace_ms,
            })
            .collect();
        let changes = self.store.reconcile_changes(since, due, now).await?;
        let keys: Vec<GroupKey> = changes
            .keys
            .into_iter()
            .filter(|key| self.rules.contains_key(key.provider()))
            .collect();
        let mut outcome = PassOutcome::default();
        let mut chunks = keys.chunks(CHUNK).peekable();
        let mut cursor = Some((changes.next, changes.queued));
        loop {
            let chunk = chunks.next().unwrap_or_default();
            let mut found = Found::default();
            for (key, group, open) in self.store.load_groups(chunk.to_vec()).await? {
                if let Some(rules) = self.rules.get(key.provider()) {
                    found.add(key.provider(), &group, rules, now_ms, |_| open);
                }
            }
            // The cursor moves with the last chunk, so a pass cut short is redone.
            let last = chunks.peek().is_none();
            let (opened, resolved) = self
                .store
                .apply_reconcile_plan(
                    found.opens,
                    found.resolves,
                    if last { cursor.take() } else { None },
                    now,
                )
                .await?;
            outcome.groups += found.groups;
            outcome.opened += opened;
            outcome.resolved += resolved;
            if last {
                return Ok(outcome);
            }
        }
    }

    /// Examines every ledger entry and cash-out of a business day (and the groups they
    /// belong to) at `now`; opens and resolves accordingly.
    pub async fn full_pass(
        &self,
        day: BusinessDay,
        now: DateTime<Utc>,
    ) -> Result<PassOutcome, StoreError> {
        let _running = self.running.lock().await;
        self.full_pass_locked(day, now).await
    }

    async fn full_pass_locked(
        &self,
        day: BusinessDay,
        now: DateTime<Utc>,
    ) -> Result<PassOutcome, StoreError> {
        let open = Arc::new(self.store.open_mismatches().await?);
        let rules = self.rules.clone();
        let now_ms = now.timestamp_millis();
        let found = Arc::new(Mutex::new(Found::default()));
        let shared = found.clone();
        self.store
            .scan_day(day.start, day.end, move |provider: &str, group| {
                let Some(rules) = rules.get(provider) else {
                    return;
                };
                let open_of = |covered: &[Subject]| match open.get(provider) {
                    Some(of_provider) => covered
                        .iter()
                        .filter_map(|s| of_provider.get(&s.key()))
                        .flatten()
                        .cloned()
                        .collect(),
                    None => Vec::new(),
                };
                if let Ok(mut found) = shared.lock() {
                    found.add(provider, &group, rules, now_ms, open_of);
                }
            })
            .await?;
        let found = std::mem::take(
            &mut *found
                .lock()
                .map_err(|_| StoreError::Database("reconciliation state poisoned".to_string()))?,
        );
        let mut outcome = PassOutcome {
            groups: found.groups,
            ..PassOutcome::default()
        };
        let batches = found
            .opens
            .len()
            .max(found.resolves.len())
            .div_ceil(WRITE_CHUNK);
        for batch in 0..batches {
            let slice =
                |len: usize| (batch * WRITE_CHUNK).min(len)..((batch + 1) * WRITE_CHUNK).min(len);
            let (opened, resolved) = self
                .store
                .apply_reconcile_plan(
                    found.opens[slice(found.opens.len())].to_vec(),
                    found.resolves[slice(found.resolves.len())].to_vec(),
                    None,
                    now,
                )
                .await?;
            outcome.opened += opened;
            outcome.resolved += resolved;
        }
        Ok(outcome)
    }
}

/// What a pass found so far: findings to open (with their provider), mismatches to resolve.
#[derive(Default)]
struct Found {
    groups: u64,
    opens: Vec<(String, Finding)>,
    resolves: Vec<i64>,
}

impl Found {
    fn add(
        &mut self,
        provider: &str,
        group: &MatchGroup,
        rules: &ProviderRules,
        now_ms: i64,
        open_of: impl FnOnce(&[Subject]) -> Vec<OpenMismatch>,
    ) {
        self.groups += 1;
        let covered = covered_subjects(group);
        let open = open_of(&covered);
        let Plan { open: new, resolve } = plan(examine(group, rules, now_ms), &open, &covered);
        self.opens
            .extend(new.into_iter().map(|f| (provider.to_string(), f)));
        self.resolves.extend(resolve);
    }
}

/// When the daily report of the day before runs next: at `daily_at` local time in `tz`,
/// but never before the previous day is final (its end plus the settling lag).
pub fn next_daily_run(
    now: DateTime<Utc>,
    daily_at: chrono::NaiveTime,
    tz: Tz,
) -> (DateTime<Utc>, NaiveDate) {
    let today = BusinessDay::containing(now, tz);
    let mut date = today.date;
    loop {
        let day = BusinessDay::of(date, tz);
        let local = date.and_time(daily_at);
        let at = chrono::TimeZone::from_local_datetime(&tz, &local)
            .earliest()
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(day.start)
            .max(day.start + crate::report::FINALITY_LAG);
        if at > now {
            return (at, date.pred_opt().unwrap_or(date));
        }
        date = date.succ_opt().unwrap_or(date);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daily_run_is_the_next_daily_at_in_the_reports_time_zone() {
        let tz: Tz = "America/Sao_Paulo".parse().unwrap();
        let at = chrono::NaiveTime::from_hms_opt(0, 30, 0).unwrap();
        // 01:00 UTC on the 21st is 22:00 on the 20th in São Paulo: next run 00:30 local on
        // the 21st (03:30 UTC), for the 20th.
        let now = "2026-11-21T01:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let (run, date) = next_daily_run(now, at, tz);
        assert_eq!(run.to_rfc3339(), "2026-11-21T03:30:00+00:00");
        assert_eq!(date.to_string(), "2026-11-20");
        // Just after it: the next day's.
        let (run, date) = next_daily_run(run, at, tz);
        assert_eq!(run.to_rfc3339(), "2026-11-22T03:30:00+00:00");
        assert_eq!(date.to_string(), "2026-11-21");
        // daily_at 00:00 waits for the previous day to settle.
        let midnight = chrono::NaiveTime::from_hms_opt(0, 0, 0).unwrap();
        let (run, _) = next_daily_run(now, midnight, Tz::UTC);
        assert_eq!(run.to_rfc3339(), "2026-11-22T00:01:00+00:00");
    }
}
