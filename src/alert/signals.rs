//! What the alert rules need that the store does not hold: rejected webhooks per provider
//! per minute, poll cycle outcomes, and when each provider last sent a verified webhook.
//! Fed by the webhook handler and the poller; cheap enough for the webhook hot path. With
//! several instances each one publishes its own and the readers merge them (see
//! [`super::shared`]).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// A per-second count of events over the last minute.
#[derive(Clone, Debug)]
struct MinuteWindow {
    buckets: [u32; 60],
    /// The unix second each bucket counts.
    seconds: [i64; 60],
}

impl Default for MinuteWindow {
    fn default() -> Self {
        MinuteWindow {
            buckets: [0; 60],
            seconds: [i64::MIN / 2; 60],
        }
    }
}

impl MinuteWindow {
    fn add(&mut self, now_ms: i64) -> u32 {
        let second = now_ms.div_euclid(1000);
        let slot = second.rem_euclid(60) as usize;
        if self.seconds[slot] != second {
            self.seconds[slot] = second;
            self.buckets[slot] = 0;
        }
        self.buckets[slot] = self.buckets[slot].saturating_add(1);
        self.count(now_ms)
    }

    fn count(&self, now_ms: i64) -> u32 {
        let second = now_ms.div_euclid(1000);
        self.seconds
            .iter()
            .zip(self.buckets.iter())
            .filter(|(at, _)| second - **at < 60 && **at <= second)
            .map(|(_, count)| *count)
            .fold(0u32, u32::saturating_add)
    }
}

/// A per-minute count of events over the last hour (for the ops console; in memory, so
/// it starts from zero when the daemon restarts).
#[derive(Clone, Debug)]
struct HourWindow {
    buckets: [u32; 60],
    /// The unix minute each bucket counts.
    minutes: [i64; 60],
}

impl Default for HourWindow {
    fn default() -> Self {
        HourWindow {
            buckets: [0; 60],
            minutes: [i64::MIN / 2; 60],
        }
    }
}

impl HourWindow {
    fn add(&mut self, now_ms: i64) {
        let minute = now_ms.div_euclid(60_000);
        let slot = minute.rem_euclid(60) as usize;
        if self.minutes[slot] != minute {
            self.minutes[slot] = minute;
            self.buckets[slot] = 0;
        }
        self.buckets[slot] = self.buckets[slot].saturating_add(1);
    }

    fn count(&self, now_ms: i64) -> u32 {
        let minute = now_ms.div_euclid(60_000);
        self.minutes
            .iter()
            .zip(self.buckets.iter())
            .filter(|(at, _)| minute - **at < 60 && **at <= minute)
            .map(|(_, count)| *count)
            .fold(0u32, u32::saturating_add)
    }
}

#[derive(Clone, Debug, Default)]
struct ProviderSignals {
    rejections: MinuteWindow,
    rejections_hour: HourWindow,
    last_webhook_at: Option<i64>,
    /// `None` until a poll cycle has finished since start.
    consecutive_poll_failures: Option<u32>,
    last_poll_error: Option<String>,
    /// When the last poll cycle finished, whatever its outcome.
    last_poll_at: Option<i64>,
    last_poll_ok_at: Option<i64>,
}

/// One provider's signals at a moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SignalSnapshot {
    pub rejections_last_minute: Option<u32>,
    /// Signature failures in the last hour (since start when the daemon ran less long).
    pub rejections_last_hour: u32,
    pub last_webhook_at: Option<i64>,
    pub consecutive_poll_failures: Option<u32>,
    pub last_poll_error: Option<String>,
    /// When the last poll cycle finished, whatever its outcome (`None` before the first).
    pub last_poll_at: Option<i64>,
    pub last_poll_ok_at: Option<i64>,
}

/// The signals of every provider, shared by the handlers, the poller and the alert pass.
#[derive(Debug)]
pub struct AlertSignals {
    /// When tracking began (unix ms): rejection rates are judged a minute after it.
    started_at: i64,
    providers: Mutex<HashMap<String, ProviderSignals>>,
}

impl AlertSignals {
    /// Starts tracking at `now_ms`.
    pub fn new(now_ms: i64) -> AlertSignals {
        AlertSignals {
            started_at: now_ms,
            providers: Mutex::new(HashMap::new()),
        }
    }

    fn providers(&self) -> MutexGuard<'_, HashMap<String, ProviderSignals>> {
        // A panic while holding this lock cannot leave the counters inconsistent.
        self.providers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn with<T>(&self, provider: &str, f: impl FnOnce(&mut ProviderSignals) -> T) -> T {
        let mut providers = self.providers();
        if let Some(signals) = providers.get_mut(provider) {
            return f(signals);
        }
        f(providers.entry(provider.to_string()).or_default())
    }

    /// A webhook of `provider` verified at `now_ms`.
    pub fn webhook_verified(&self, provider: &str, now_ms: i64) {
        self.with(provider, |s| {
            s.last_webhook_at = Some(s.last_webhook_at.map_or(now_ms, |at| at.max(now_ms)));
        });
    }

    /// A webhook of `provider` failed verification at `now_ms`; `true` when this one
    /// took the last minute's count over `threshold` (time to evaluate the rules).
    pub fn signature_rejected(&self, provider: &str, now_ms: i64, threshold: u32) -> bool {
        self.with(provider, |s| {
            s.rejections_hour.add(now_ms);
            s.rejections.add(now_ms)
        }) == threshold.saturating_add(1)
    }

    /// A poll cycle of `provider` finished at `now_ms`: `Ok` or why it failed.
    pub fn poll_cycle(&self, provider: &str, outcome: Result<(), String>, now_ms: i64) {
        self.with(provider, |s| {
            s.last_poll_at = Some(now_ms);
            match outcome {
                Ok(()) => {
                    s.consecutive_poll_failures = Some(0);
                    s.last_poll_error = None;
                    s.last_poll_ok_at = Some(now_ms);
                }
                Err(error) => {
                    s.consecutive_poll_failures =
                        Some(s.consecutive_poll_failures.unwrap_or(0).saturating_add(1));
                    s.last_poll_error = Some(error);
                }
            }
        });
    }

    /// Fills what the store remembers from before a restart (never moves a time back).
    pub fn seed(&self, provider: &str, last_webhook_at: Option<i64>, last_poll_ok_at: Option<i64>) {
        self.with(provider, |s| {
            if let Some(at) = last_webhook_at {
                s.last_webhook_at = Some(s.last_webhook_at.map_or(at, |known| known.max(at)));
            }
            if let Some(at) = last_poll_ok_at {
                s.last_poll_ok_at = Some(s.last_poll_ok_at.map_or(at, |known| known.max(at)));
            }
        });
    }

    /// `provider`'s signals at `now_ms`.
    pub fn snapshot(&self, provider: &str, now_ms: i64) -> SignalSnapshot {
        let providers = self.providers();
        let signals = providers.get(provider).cloned().unwrap_or_default();
        self.snapshot_of(&signals, now_ms)
    }

    /// The signals of every provider this instance heard of, at `now_ms` (what it
    /// publishes to the other instances).
    pub fn snapshots(&self, now_ms: i64) -> Vec<(String, SignalSnapshot)> {
        let providers = self.providers();
        providers
            .iter()
            .map(|(provider, signals)| (provider.clone(), self.snapshot_of(signals, now_ms)))
            .collect()
    }

    fn snapshot_of(&self, signals: &ProviderSignals, now_ms: i64) -> SignalSnapshot {
        let tracked_a_minute = now_ms - self.started_at >= 60_000;
        let rejections = signals.rejections.count(now_ms);
        SignalSnapshot {
            // Under a minute of history, a rate over the threshold still counts.
            rejections_last_minute: (tracked_a_minute || rejections > 0).then_some(rejections),
            rejections_last_hour: signals.rejections_hour.count(now_ms),
            last_webhook_at: signals.last_webhook_at,
            consecutive_poll_failures: signals.consecutive_poll_failures,
            last_poll_error: signals.last_poll_error.clone(),
            last_poll_at: signals.last_poll_at,
            last_poll_ok_at: signals.last_poll_ok_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_counted_over_the_last_minute_only() {
        let signals = AlertSignals::new(0);
        for i in 0..30 {
            signals.signature_rejected("fiserv", 100_000 + i * 1000, 20);
        }
        assert_eq!(
            signals.snapshot("fiserv", 129_000).rejections_last_minute,
            Some(30)
        );
        assert_eq!(
            signals.snapshot("fiserv", 160_000).rejections_last_minute,
            Some(29),
            "the first second fell out of the window"
        );
        assert_eq!(
            signals.snapshot("fiserv", 200_000).rejections_last_minute,
            Some(0)
        );
    }

    #[test]
    fn rejections_are_counted_over_the_last_hour_by_minute() {
        let signals = AlertSignals::new(0);
        let start = 10 * 60_000;
        signals.signature_rejected("fiserv", start, 100);
        signals.signature_rejected("fiserv", start + 30 * 60_000, 100);
        assert_eq!(
            signals
                .snapshot("fiserv", start + 59 * 60_000)
                .rejections_last_hour,
            2
        );
        assert_eq!(
            signals
                .snapshot("fiserv", start + 60 * 60_000)
                .rejections_last_hour,
            1
        );
        assert_eq!(
            signals
                .snapshot("fiserv", start + 90 * 60_000)
                .rejections_last_hour,
            0
        );
    }

    #[test]
    fn crossing_the_threshold_is_reported_once() {
        let signals = AlertSignals::new(0);
        let crossings = (0..50)
            .filter(|i| signals.signature_rejected("fiserv", 1_000 + i, 20))
            .count();
        assert_eq!(crossings, 1);
    }

    #[test]
    fn rates_are_unknown_for_the_first_minute_unless_something_was_rejected() {
        let signals = AlertSignals::new(0);
        assert_eq!(
            signals.snapshot("fiserv", 30_000).rejections_last_minute,
            None
        );
        assert_eq!(
            signals.snapshot("fiserv", 60_000).rejections_last_minute,
            Some(0)
        );
        signals.signature_rejected("simpay", 10_000, 20);
        assert_eq!(
            signals.snapshot("simpay", 30_000).rejections_last_minute,
            Some(1)
        );
    }

    #[test]
    fn poll_failures_count_until_a_success() {
        let signals = AlertSignals::new(0);
        assert_eq!(signals.snapshot("tupay", 0).consecutive_poll_failures, None);
        signals.poll_cycle("tupay", Err("503".into()), 1);
        signals.poll_cycle("tupay", Err("timeout".into()), 2);
        let snapshot = signals.snapshot("tupay", 3);
        assert_eq!(snapshot.consecutive_poll_failures, Some(2));
        assert_eq!(snapshot.last_poll_error.as_deref(), Some("timeout"));
        signals.poll_cycle("tupay", Ok(()), 4);
        let snapshot = signals.snapshot("tupay", 5);
        assert_eq!(snapshot.consecutive_poll_failures, Some(0));
        assert_eq!(snapshot.last_poll_ok_at, Some(4));
        assert_eq!(snapshot.last_poll_at, Some(4));
        assert_eq!(
            signals.snapshots(5),
            vec![("tupay".to_string(), snapshot)],
            "every provider heard of, for publishing"
        );
    }
}
