//! The alert rules (SPEC §7), pure: what the store and the signals say → the alerts that
//! should be open now.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{short_duration, AlertKind, Severity};
use crate::reconcile::MismatchKind;
use crate::state::CashoutStatus;

/// An open mismatch as loaded from the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenMismatch {
    /// The kind (alerts come from some kinds only).
    pub kind: MismatchKind,
    pub provider: String,
    /// The cash-out's provider_ref, or `ext:<external_id>` for a ledger entry.
    pub subject: String,
    pub detail: String,
    pub opened_at: i64,
}

/// A webhook that was verified but could not be parsed, not yet reprocessed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuarantinedEvent {
    pub provider: String,
    pub event_id: String,
    pub error: Option<String>,
    pub received_at: i64,
}

/// A non-terminal cash-out at least its provider's `stuck_after` old.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlightCashout {
    pub provider: String,
    pub provider_ref: String,
    pub status: CashoutStatus,
    pub created_at: i64,
}

/// How a provider's poll cycles have gone since the daemon started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PollHealth {
    /// The poller is off (no outbound credentials): nothing to judge.
    Off,
    /// No cycle has finished since start: the open alert (if any) stays as it is.
    Unknown,
    /// The last `consecutive_failures` cycles failed (0: the last one succeeded).
    Cycles {
        consecutive_failures: u32,
        last_error: Option<String>,
    },
}

/// What the rules know about one provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderFacts {
    pub id: String,
    pub stuck_after: Duration,
    pub silent_after: Duration,
    /// Whether the provider sends webhooks (else `provider_silent` watches its polls).
    pub sends_webhooks: bool,
    /// Non-terminal cash-outs.
    pub in_flight: u64,
    /// Creation time of the oldest non-terminal cash-out.
    pub oldest_in_flight_at: Option<i64>,
    /// The last verified webhook.
    pub last_webhook_at: Option<i64>,
    /// The last poll cycle that succeeded.
    pub last_poll_ok_at: Option<i64>,
    pub poll: PollHealth,
    /// Rejected webhooks in the last minute; `None` while less than a minute is tracked.
    pub rejections_last_minute: Option<u32>,
}

/// Everything the rules look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlertFacts {
    pub mismatches: Vec<OpenMismatch>,
    pub quarantined: Vec<QuarantinedEvent>,
    /// Non-terminal cash-outs past their provider's `stuck_after`.
    pub stuck: Vec<InFlightCashout>,
    pub providers: Vec<ProviderFacts>,
}

/// Thresholds of the rules (`[alerts]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleSettings {
    pub signature_failures_per_minute: u32,
    pub poll_failing_cycles: u32,
}

/// An alert that should be open now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredAlert {
    pub kind: AlertKind,
    /// `provider/provider_ref`, `provider/ext:<external_id>`, `provider/<event_id>`, or
    /// the provider id for per-provider kinds.
    pub subject: String,
    pub provider: String,
    pub severity: Severity,
    /// What is wrong, without the severity tag.
    pub summary: String,
    /// Since when the cause holds (for "the oldest" in grouped alerts).
    pub since: i64,
}

/// The rules' answer: what should be open, and what cannot be judged now (an open alert
/// of that kind and subject is left as it is: signals lost by a restart never resolve or
/// re-fire an alert).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evaluation {
    pub desired: Vec<DesiredAlert>,
    pub undetermined: Vec<(AlertKind, String)>,
}

/// The alert kind a mismatch kind raises, if any.
pub fn alert_kind_of_mismatch(kind: MismatchKind) -> Option<(AlertKind, Severity)> {
    match kind {
        MismatchKind::StatusConflict => Some((AlertKind::StatusConflict, Severity::Critical)),
        MismatchKind::DuplicatePayout => Some((AlertKind::DuplicatePayout, Severity::Critical)),
        MismatchKind::AmountMismatch => Some((AlertKind::AmountMismatch, Severity::Critical)),
        MismatchKind::UnknownToLedger => Some((AlertKind::UnknownToLedger, Severity::Warning)),
        MismatchKind::MissingAtProvider
        | MismatchKind::CurrencyMismatch
        | MismatchKind::FeeMismatch
        | MismatchKind::MissedWebhook
        | MismatchKind::Stuck
        | MismatchKind::AmbiguousMatch => None,
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX / 4)
}

/// Evaluates every rule at `now` (unix ms).
pub fn evaluate(facts: &AlertFacts, settings: &RuleSettings, now: i64) -> Evaluation {
    let mut evaluation = Evaluation::default();
    let providers: BTreeMap<&str, &ProviderFacts> =
        facts.providers.iter().map(|p| (p.id.as_str(), p)).collect();

    for mismatch in &facts.mismatches {
        let Some((kind, severity)) = alert_kind_of_mismatch(mismatch.kind) else {
            continue;
        };
        let subject = format!("{}/{}", mismatch.provider, mismatch.subject);
        evaluation.desired.push(DesiredAlert {
            kind,
            summary: format!("{subject}: {}", mismatch.detail),
            subject,
            provider: mismatch.provider.clone(),
            severity,
            since: mismatch.opened_at,
        });
    }

    for event in &facts.quarantined {
        let subject = format!("{}/{}", event.provider, event.event_id);
        evaluation.desired.push(DesiredAlert {
            kind: AlertKind::QuarantinedWebhook,
            summary: format!(
                "webhook {} from {} quarantined: {}; fix the mapping, then POST /api/v1/events/{}/reprocess",
                event.event_id,
                event.provider,
                event.error.as_deref().unwrap_or("cannot be parsed"),
                event.event_id
            ),
            subject,
            provider: event.provider.clone(),
            severity: Severity::Warning,
            since: event.received_at,
        });
    }

    for cashout in &facts.stuck {
        let Some(provider) = providers.get(cashout.provider.as_str()) else {
            continue;
        };
        let stuck_after = millis(provider.stuck_after);
        let age = now - cashout.created_at;
        if age < stuck_after {
            continue;
        }
        let severity = if age >= stuck_after.saturating_mul(2) {
            Severity::Critical
        } else {
            Severity::Warning
        };
        let subject = format!("{}/{}", cashout.provider, cashout.provider_ref);
        evaluation.desired.push(DesiredAlert {
            kind: AlertKind::Stuck,
            summary: format!(
                "{subject} {} for {} (stuck_after {})",
                cashout.status,
                short_duration(age),
                short_duration(stuck_after)
            ),
            subject,
            provider: cashout.provider.clone(),
            severity,
            since: cashout.created_at,
        });
    }

    for provider in &facts.providers {
        signature_failures(provider, settings, now, &mut evaluation);
        poll_failing(provider, settings, now, &mut evaluation);
        provider_silent(provider, now, &mut evaluation);
    }
    evaluation
}

fn signature_failures(
    provider: &ProviderFacts,
    settings: &RuleSettings,
    now: i64,
    evaluation: &mut Evaluation,
) {
    let kind = AlertKind::SignatureFailures;
    match provider.rejections_last_minute {
        None => evaluation.undetermined.push((kind, provider.id.clone())),
        Some(count) if count > settings.signature_failures_per_minute => {
            evaluation.desired.push(DesiredAlert {
                kind,
                subject: provider.id.clone(),
                provider: provider.id.clone(),
                severity: Severity::Critical,
                summary: format!(
                    "{}: {count} webhooks rejected in the last minute (threshold {}/min): a rotated or wrong secret, or forged traffic",
                    provider.id, settings.signature_failures_per_minute
                ),
                since: now,
            });
        }
        Some(_) => {}
    }
}

fn poll_failing(
    provider: &ProviderFacts,
    settings: &RuleSettings,
    now: i64,
    evaluation: &mut Evaluation,
) {
    let kind = AlertKind::PollFailing;
    match &provider.poll {
        PollHealth::Off => {}
        PollHealth::Unknown => evaluation.undetermined.push((kind, provider.id.clone())),
        PollHealth::Cycles {
            consecutive_failures,
            last_error,
        } => {
            if *consecutive_failures >= settings.poll_failing_cycles {
                evaluation.desired.push(DesiredAlert {
                    kind,
                    subject: provider.id.clone(),
                    provider: provider.id.clone(),
                    severity: Severity::Critical,
                    summary: format!(
                        "{}: {consecutive_failures} consecutive poll cycles failed (last error: {})",
                        provider.id,
                        last_error.as_deref().unwrap_or("unknown")
                    ),
                    since: provider.last_poll_ok_at.unwrap_or(now),
                });
            }
        }
    }
}

fn provider_silent(provider: &ProviderFacts, now: i64, evaluation: &mut Evaluation) {
    let kind = AlertKind::ProviderSilent;
    let Some(oldest_in_flight) = provider.oldest_in_flight_at else {
        return;
    };
    if provider.in_flight == 0 {
        return;
    }
    // The provider had `silent_after` to say something about what is in flight.
    let last_heard = if provider.sends_webhooks {
        provider.last_webhook_at
    } else {
        match (&provider.poll, provider.last_poll_ok_at) {
            (PollHealth::Off, _) => return,
            (PollHealth::Unknown, None) => {
                evaluation.undetermined.push((kind, provider.id.clone()));
                return;
            }
            (_, last) => last,
        }
    };
    let baseline = last_heard.map_or(oldest_in_flight, |at| at.max(oldest_in_flight));
    let silent_for = now - baseline;
    if silent_for < millis(provider.silent_after) {
        return;
    }
    let heard = match (provider.sends_webhooks, last_heard) {
        (true, Some(_)) => format!("no webhook for {}", short_duration(now - baseline)),
        (true, None) => "no webhook ever received".to_string(),
        (false, Some(_)) => format!("no successful poll for {}", short_duration(now - baseline)),
        (false, None) => "no successful poll yet".to_string(),
    };
    evaluation.desired.push(DesiredAlert {
        kind,
        subject: provider.id.clone(),
        provider: provider.id.clone(),
        severity: Severity::Critical,
        summary: format!(
            "{}: {heard} (silent_after {}) while {} cash-outs are in flight",
            provider.id,
            short_duration(millis(provider.silent_after)),
            provider.in_flight
        ),
        since: baseline,
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const MIN: i64 = 60_000;
    pub const HOUR: i64 = 60 * MIN;

    pub fn provider(id: &str) -> ProviderFacts {
        ProviderFacts {
            id: id.to_string(),
            stuck_after: Duration::from_secs(1800),
            silent_after: Duration::from_secs(3600),
            sends_webhooks: true,
            in_flight: 0,
            oldest_in_flight_at: None,
            last_webhook_at: None,
            last_poll_ok_at: None,
            poll: PollHealth::Cycles {
                consecutive_failures: 0,
                last_error: None,
            },
            rejections_last_minute: Some(0),
        }
    }

    pub const SETTINGS: RuleSettings = RuleSettings {
        signature_failures_per_minute: 20,
        poll_failing_cycles: 3,
    };

    fn kinds(evaluation: &Evaluation) -> Vec<(AlertKind, String, Severity)> {
        evaluation
            .desired
            .iter()
            .map(|a| (a.kind, a.subject.clone(), a.severity))
            .collect()
    }

    #[test]
    fn stuck_warns_at_stuck_after_and_is_critical_at_twice_it() {
        let now = 10 * HOUR;
        let cashout = |age: i64| InFlightCashout {
            provider: "fiserv".into(),
            provider_ref: format!("tx-{age}"),
            status: CashoutStatus::Pending,
            created_at: now - age,
        };
        let facts = AlertFacts {
            stuck: vec![cashout(29 * MIN), cashout(30 * MIN), cashout(2 * HOUR)],
            providers: vec![provider("fiserv")],
            ..AlertFacts::default()
        };
        let evaluation = evaluate(&facts, &SETTINGS, now);
        assert_eq!(
            kinds(&evaluation),
            vec![
                (
                    AlertKind::Stuck,
                    format!("fiserv/tx-{}", 30 * MIN),
                    Severity::Warning
                ),
                (
                    AlertKind::Stuck,
                    format!("fiserv/tx-{}", 2 * HOUR),
                    Severity::Critical
                ),
            ]
        );
        assert_eq!(
            evaluation.desired[1].summary,
            format!("fiserv/tx-{} pending for 2h (stuck_after 30m)", 2 * HOUR)
        );
    }

    #[test]
    fn mismatches_raise_their_alert_kinds_only() {
        let mismatch = |kind: MismatchKind, subject: &str| OpenMismatch {
            kind,
            provider: "simpay".into(),
            subject: subject.into(),
            detail: "detail".into(),
            opened_at: 1,
        };
        let facts = AlertFacts {
            mismatches: vec![
                mismatch(MismatchKind::StatusConflict, "1"),
                mismatch(MismatchKind::DuplicatePayout, "2"),
                mismatch(MismatchKind::UnknownToLedger, "3"),
                mismatch(MismatchKind::AmountMismatch, "4"),
                mismatch(MismatchKind::MissedWebhook, "5"),
                mismatch(MismatchKind::FeeMismatch, "6"),
                mismatch(MismatchKind::AmountMismatch, "ext:ord-7"),
            ],
            ..AlertFacts::default()
        };
        let evaluation = evaluate(&facts, &SETTINGS, 10);
        assert_eq!(
            kinds(&evaluation),
            vec![
                (
                    AlertKind::StatusConflict,
                    "simpay/1".into(),
                    Severity::Critical
                ),
                (
                    AlertKind::DuplicatePayout,
                    "simpay/2".into(),
                    Severity::Critical
                ),
                (
                    AlertKind::UnknownToLedger,
                    "simpay/3".into(),
                    Severity::Warning
                ),
                (
                    AlertKind::AmountMismatch,
                    "simpay/4".into(),
                    Severity::Critical
                ),
                (
                    AlertKind::AmountMismatch,
                    "simpay/ext:ord-7".into(),
                    Severity::Critical
                ),
            ]
        );
    }

    #[test]
    fn quarantined_events_raise_a_warning_each() {
        let facts = AlertFacts {
            quarantined: vec![QuarantinedEvent {
                provider: "fiserv".into(),
                event_id: "ev-1".into(),
                error: Some("bad amount".into()),
                received_at: 5,
            }],
            ..AlertFacts::default()
        };
        let evaluation = evaluate(&facts, &SETTINGS, 10);
        assert_eq!(
            kinds(&evaluation),
            vec![(
                AlertKind::QuarantinedWebhook,
                "fiserv/ev-1".into(),
                Severity::Warning
            )]
        );
        assert!(evaluation.desired[0].summary.contains("bad amount"));
    }

    #[test]
    fn signature_failures_fire_over_the_threshold_and_are_undetermined_before_a_minute() {
        let table = [
            (Some(20), false, false, "at the threshold: quiet"),
            (Some(21), true, false, "over it: firing"),
            (
                None,
                false,
                true,
                "less than a minute tracked: undetermined",
            ),
        ];
        for (count, fires, undetermined, case) in table {
            let facts = AlertFacts {
                providers: vec![ProviderFacts {
                    rejections_last_minute: count,
                    ..provider("fiserv")
                }],
                ..AlertFacts::default()
            };
            let evaluation = evaluate(&facts, &SETTINGS, 10);
            assert_eq!(
                evaluation
                    .desired
                    .iter()
                    .any(|a| a.kind == AlertKind::SignatureFailures),
                fires,
                "{case}"
            );
            assert_eq!(
                evaluation
                    .undetermined
                    .contains(&(AlertKind::SignatureFailures, "fiserv".into())),
                undetermined,
                "{case}"
            );
        }
    }

    #[test]
    fn poll_failing_fires_after_n_consecutive_failures() {
        let table = [
            (PollHealth::Off, false, false, "poller off"),
            (PollHealth::Unknown, false, true, "no cycle since start"),
            (
                PollHealth::Cycles {
                    consecutive_failures: 2,
                    last_error: None,
                },
                false,
                false,
                "two failures",
            ),
            (
                PollHealth::Cycles {
                    consecutive_failures: 3,
                    last_error: Some("503".into()),
                },
                true,
                false,
                "three failures",
            ),
        ];
        for (poll, fires, undetermined, case) in table {
            let facts = AlertFacts {
                providers: vec![ProviderFacts {
                    poll,
                    ..provider("tupay")
                }],
                ..AlertFacts::default()
            };
            let evaluation = evaluate(&facts, &SETTINGS, 10);
            assert_eq!(
                evaluation
                    .desired
                    .iter()
                    .any(|a| a.kind == AlertKind::PollFailing),
                fires,
                "{case}"
            );
            assert_eq!(
                evaluation
                    .undetermined
                    .contains(&(AlertKind::PollFailing, "tupay".into())),
                undetermined,
                "{case}"
            );
        }
    }

    #[test]
    fn provider_silent_needs_cash_outs_in_flight_for_silent_after() {
        let now = 10 * HOUR;
        let table = [
            (
                0,
                Some(now - 3 * HOUR),
                Some(now - 2 * HOUR),
                false,
                "nothing in flight",
            ),
            (
                5,
                Some(now - 3 * HOUR),
                Some(now - 2 * HOUR),
                true,
                "in flight, silent 2h",
            ),
            (
                5,
                Some(now - 30 * MIN),
                Some(now - 3 * HOUR),
                false,
                "a webhook 30m ago",
            ),
            (
                5,
                Some(now - 3 * HOUR),
                Some(now - 20 * MIN),
                false,
                "in flight only for 20m",
            ),
            (5, None, Some(now - 2 * HOUR), true, "never any webhook"),
        ];
        for (in_flight, last_webhook_at, oldest, fires, case) in table {
            let facts = AlertFacts {
                providers: vec![ProviderFacts {
                    in_flight,
                    oldest_in_flight_at: oldest,
                    last_webhook_at,
                    ..provider("fiserv")
                }],
                ..AlertFacts::default()
            };
            let evaluation = evaluate(&facts, &SETTINGS, now);
            assert_eq!(
                evaluation
                    .desired
                    .iter()
                    .any(|a| a.kind == AlertKind::ProviderSilent),
                fires,
                "{case}: {evaluation:?}"
            );
        }
    }

    #[test]
    fn poll_only_providers_are_silent_by_their_last_successful_poll() {
        let now = 10 * HOUR;
        let mannco = |last_poll_ok_at: Option<i64>, poll: PollHealth| ProviderFacts {
            sends_webhooks: false,
            in_flight: 2,
            oldest_in_flight_at: Some(now - 5 * HOUR),
            last_poll_ok_at,
            poll,
            ..provider("mannco")
        };
        let failing = PollHealth::Cycles {
            consecutive_failures: 1,
            last_error: None,
        };
        let table = [
            (
                mannco(Some(now - 10 * MIN), failing.clone()),
                false,
                "polled 10m ago",
            ),
            (
                mannco(Some(now - 2 * HOUR), failing),
                true,
                "last good poll 2h ago",
            ),
            (
                mannco(None, PollHealth::Unknown),
                false,
                "unknown since start",
            ),
        ];
        for (facts, fires, case) in table {
            let evaluation = evaluate(
                &AlertFacts {
                    providers: vec![facts],
                    ..AlertFacts::default()
                },
                &SETTINGS,
                now,
            );
            assert_eq!(
                evaluation
                    .desired
                    .iter()
                    .any(|a| a.kind == AlertKind::ProviderSilent),
                fires,
                "{case}"
            );
        }
    }
}
