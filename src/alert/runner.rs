//! The alert pass: load facts, evaluate, plan, apply, log; and the wake-ups that run it
//! early (a conflict, a quarantine, a burst of rejections, a reconcile pass).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::{Mutex, Notify};

use super::rules::{PollHealth, ProviderFacts};
use super::shared::SharedSignals;
use super::{evaluate, plan, AlertFacts, AlertKind, AlertSignals, LifecycleSettings, RuleSettings};
use crate::app::AppState;
use crate::state::CashoutStatus;
use crate::store::{to_millis, AlertFactsQuery, StoreError};
use crate::wakeups::{Wake, WakeRelay};

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassSummary {
    pub opened: usize,
    pub resolved: usize,
    /// Notices sent to the sinks (firing and resolved).
    pub notices: usize,
    /// Alerts open after the pass.
    pub open: usize,
}

/// The alerting state shared by handlers, the poller and the background jobs.
pub struct Alerting {
    /// Rejections, poll outcomes and webhook times the rules need.
    pub signals: Arc<AlertSignals>,
    waker: Arc<Notify>,
    outbox_waker: Arc<Notify>,
    /// Passes never overlap; `true` once the signals were seeded from the store.
    pass: Mutex<bool>,
    /// Passes completed since start.
    passes: AtomicU64,
    /// Wake-ups also announced to the other instances (see [`crate::wakeups`]).
    relay: WakeRelay,
}

impl Alerting {
    /// Starts tracking signals at `now`.
    pub fn new(now: DateTime<Utc>) -> Alerting {
        Alerting {
            signals: Arc::new(AlertSignals::new(to_millis(now))),
            waker: Arc::new(Notify::new()),
            outbox_waker: Arc::new(Notify::new()),
            pass: Mutex::new(false),
            passes: AtomicU64::new(0),
            relay: WakeRelay::default(),
        }
    }

    /// How many passes have completed since start.
    pub fn passes_completed(&self) -> u64 {
        self.passes.load(Ordering::Acquire)
    }

    /// Asks for a pass soon (the scheduled alert job runs one at once; on several
    /// instances, the one holding the alert pass's lease).
    pub fn wake(&self) {
        self.waker.notify_one();
        self.relay.relay(Wake::AlertPass);
    }

    /// Where alert wake-ups go to the other instances.
    pub fn wake_relay(&self) -> &WakeRelay {
        &self.relay
    }

    /// What the alert job waits on between passes.
    pub fn waker(&self) -> Arc<Notify> {
        self.waker.clone()
    }

    /// What the outbox worker waits on between deliveries.
    pub fn outbox_waker(&self) -> Arc<Notify> {
        self.outbox_waker.clone()
    }

    /// One pass at `now`: evaluates every rule, applies the lifecycle plan, logs what it
    /// sends and wakes the outbox worker.
    pub async fn run_pass(
        &self,
        state: &AppState,
        now: DateTime<Utc>,
    ) -> Result<PassSummary, StoreError> {
        let mut seeded = self.pass.lock().await;
        let now_ms = to_millis(now);
        let settings = &state.settings;
        let query = AlertFactsQuery {
            providers: settings
                .providers
                .iter()
                .map(|p| {
                    let stuck_after =
                        i64::try_from(p.stuck_after.as_millis()).unwrap_or(i64::MAX / 4);
                    (p.id.clone(), now_ms.saturating_sub(stuck_after))
                })
                .collect(),
            seed: !*seeded,
        };
        let loaded = state.store.alert_facts(query).await?;
        for (provider, last_webhook_at, last_poll_ok_at) in &loaded.seeds {
            self.signals
                .seed(provider, *last_webhook_at, *last_poll_ok_at);
        }
        *seeded = true;
        // With several instances, what the others saw (webhooks, polls, rejections) too.
        let shared = SharedSignals::load(&state.store).await?;
        // Stopped instances' rows that add nothing any more (each start is a new instance).
        let retired = shared.retired(&self.signals, now_ms);
        if let Err(err) = state
            .store
            .forget_peer_signals(&retired, super::shared::RETIRE_AFTER)
            .await
        {
            tracing::debug!(error = %err, "cannot forget stopped instances' alert signals");
        }

        let mut facts = AlertFacts {
            mismatches: loaded.mismatches,
            quarantined: loaded.quarantined,
            stuck: loaded.stuck,
            providers: Vec::with_capacity(settings.providers.len()),
        };
        state.metrics.oldest_in_flight_seconds.reset();
        for provider in &settings.providers {
            let signals = shared.snapshot(&self.signals, &provider.id, now_ms);
            let in_flight: Vec<_> = loaded
                .in_flight
                .iter()
                .filter(|s| s.provider == provider.id)
                .collect();
            for status in [CashoutStatus::Pending, CashoutStatus::Processing] {
                let oldest = in_flight
                    .iter()
                    .find(|s| s.status == status)
                    .map_or(0, |s| (now_ms - s.oldest_created_at).max(0) / 1000);
                state
                    .metrics
                    .oldest_in_flight_seconds
                    .with_label_values(&[&provider.id, status.as_str()])
                    .set(oldest);
            }
            let poll = if state.poller.off_reason(&provider.id).is_some() {
                PollHealth::Off
            } else {
                match signals.consecutive_poll_failures {
                    None => PollHealth::Unknown,
                    Some(consecutive_failures) => PollHealth::Cycles {
                        consecutive_failures,
                        last_error: signals.last_poll_error.clone(),
                    },
                }
            };
            facts.providers.push(ProviderFacts {
                id: provider.id.clone(),
                stuck_after: provider.stuck_after,
                silent_after: provider.silent_after,
                sends_webhooks: state
                    .providers
                    .get(&provider.id)
                    .is_some_and(|p| p.adapter.sends_webhooks()),
                in_flight: in_flight.iter().map(|s| s.count).sum(),
                oldest_in_flight_at: in_flight.iter().map(|s| s.oldest_created_at).min(),
                last_webhook_at: signals.last_webhook_at,
                last_poll_ok_at: signals.last_poll_ok_at,
                poll,
                rejections_last_minute: signals.rejections_last_minute,
            });
        }

        let rules = RuleSettings {
            signature_failures_per_minute: settings.alerts.signature_failures_per_minute,
            poll_failing_cycles: settings.alerts.poll_failing_cycles,
        };
        let lifecycle = LifecycleSettings {
            renotify_after: settings.alerts.renotify_after,
            group_over: settings.alerts.group_over,
        };
        let evaluation = evaluate(&facts, &rules, now_ms);
        let planned = plan(&evaluation, &loaded.open_alerts, &lifecycle, now_ms);
        let mut summary = PassSummary {
            opened: planned.open.len(),
            resolved: planned.resolve.len(),
            ..PassSummary::default()
        };
        let enqueue = settings.alerts.webhook_url.is_some();
        let applied = state.store.apply_alert_plan(planned, now, enqueue).await?;
        for notice in &applied.notices {
            notice.log();
        }
        summary.notices = applied.notices.len();
        if enqueue && !applied.notices.is_empty() {
            self.outbox_waker.notify_one();
            self.relay.relay(Wake::AlertOutbox);
        }
        for kind in AlertKind::ALL {
            let open = applied
                .open_by_kind
                .iter()
                .find(|(k, _)| *k == kind)
                .map_or(0, |(_, n)| *n);
            state
                .metrics
                .alerts_open
                .with_label_values(&[kind.as_str()])
                .set(open);
            summary.open += usize::try_from(open).unwrap_or(0);
        }
        self.passes.fetch_add(1, Ordering::AcqRel);
        Ok(summary)
    }
}
