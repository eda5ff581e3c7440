//! The alert lifecycle, pure: what should be open vs what is stored → a plan of opens,
//! updates (renotify, escalation, grouping, inhibition) and resolutions.
//!
//! One open alert per (kind, subject). An alert is sent when it opens, when its severity
//! rises, and every `renotify_after` while open; its resolution is sent when it was ever
//! sent. Storm control: past `group_over` open subjects of one kind and provider, one
//! grouped alert (subject `provider:<id>`) is sent instead of each; a provider's `stuck`
//! alerts are folded into its open `poll_failing` / `provider_silent` alert. Folded and
//! grouped alerts stay open and listed, they are just not sent on their own.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use super::{rfc3339, AlertKind, Delivery, DesiredAlert, Evaluation, Severity};

/// An open alert as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAlert {
    pub id: i64,
    pub kind: AlertKind,
    pub subject: String,
    pub provider: Option<String>,
    pub severity: Severity,
    pub summary: String,
    pub opened_at: i64,
    /// When it was last sent; `None`: never.
    pub last_sent_at: Option<i64>,
    pub delivery: Delivery,
}

/// `[alerts]` keys of the lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LifecycleSettings {
    pub renotify_after: Duration,
    pub group_over: usize,
}

/// A new alert to store (and send when `notify`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenAlert {
    pub alert: DesiredAlert,
    pub delivery: Delivery,
    pub notify: bool,
}

/// A change to an open alert. The stored text changes only when it is sent, so a
/// growing age does not rewrite rows every pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateAlert {
    pub id: i64,
    pub severity: Severity,
    pub summary: String,
    pub delivery: Delivery,
    pub notify: bool,
}

/// An open alert whose cause is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolveAlert {
    pub id: i64,
    /// Send the resolution (it was sent while firing).
    pub notify: bool,
}

/// What the store applies, in one transaction: resolutions, then updates, then opens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlertPlan {
    pub resolve: Vec<ResolveAlert>,
    pub update: Vec<UpdateAlert>,
    pub open: Vec<OpenAlert>,
}

impl AlertPlan {
    /// Whether applying it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.resolve.is_empty() && self.update.is_empty() && self.open.is_empty()
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX / 4)
}

/// The subject of a grouped alert.
pub fn group_subject(provider: &str) -> String {
    format!("provider:{provider}")
}

/// Decides what to open, send, and resolve at `now` (unix ms).
pub fn plan(
    evaluation: &Evaluation,
    stored: &[StoredAlert],
    settings: &LifecycleSettings,
    now: i64,
) -> AlertPlan {
    let desired = with_deliveries(&evaluation.desired, settings.group_over);
    let undetermined: HashSet<(AlertKind, &str)> = evaluation
        .undetermined
        .iter()
        .map(|(kind, subject)| (*kind, subject.as_str()))
        .collect();
    let stored_by_key: HashMap<(AlertKind, &str), &StoredAlert> = stored
        .iter()
        .map(|alert| ((alert.kind, alert.subject.as_str()), alert))
        .collect();
    let renotify_after = millis(settings.renotify_after);

    let mut plan = AlertPlan::default();
    let mut wanted: HashSet<(AlertKind, &str)> = HashSet::new();
    for (alert, delivery) in &desired {
        wanted.insert((alert.kind, alert.subject.as_str()));
        let Some(current) = stored_by_key.get(&(alert.kind, alert.subject.as_str())) else {
            plan.open.push(OpenAlert {
                alert: alert.clone(),
                delivery: *delivery,
                notify: delivery.notifies(),
            });
            continue;
        };
        let notify = delivery.notifies()
            && match current.last_sent_at {
                None => true,
                Some(sent) => alert.severity > current.severity || now - sent >= renotify_after,
            };
        if notify || alert.severity != current.severity || *delivery != current.delivery {
            plan.update.push(UpdateAlert {
                id: current.id,
                severity: alert.severity,
                summary: if notify {
                    alert.summary.clone()
                } else {
                    current.summary.clone()
                },
                delivery: *delivery,
                notify,
            });
        }
    }
    for alert in stored {
        let key = (alert.kind, alert.subject.as_str());
        if wanted.contains(&key) || undetermined.contains(&key) {
            continue;
        }
        plan.resolve.push(ResolveAlert {
            id: alert.id,
            notify: alert.last_sent_at.is_some(),
        });
    }
    plan
}

/// Each desired alert with how it is delivered, plus the grouped alerts; inhibiting
/// alerts name how many `stuck` cash-outs they hold.
fn with_deliveries(desired: &[DesiredAlert], group_over: usize) -> Vec<(DesiredAlert, Delivery)> {
    let inhibitors: BTreeSet<&str> = desired
        .iter()
        .filter(|a| a.kind.inhibits_stuck())
        .map(|a| a.provider.as_str())
        .collect();
    let inhibited = |alert: &DesiredAlert| {
        alert.kind == AlertKind::Stuck && inhibitors.contains(alert.provider.as_str())
    };
    let mut held_per_provider: BTreeMap<&str, usize> = BTreeMap::new();
    let mut per_group: BTreeMap<(AlertKind, &str), Vec<&DesiredAlert>> = BTreeMap::new();
    for alert in desired {
        if inhibited(alert) {
            *held_per_provider
                .entry(alert.provider.as_str())
                .or_default() += 1;
        } else if !alert.kind.is_per_provider() {
            per_group
                .entry((alert.kind, alert.provider.as_str()))
                .or_default()
                .push(alert);
        }
    }
    let grouped: BTreeSet<(AlertKind, &str)> = per_group
        .iter()
        .filter(|(_, members)| members.len() > group_over)
        .map(|(key, _)| *key)
        .collect();

    let mut out: Vec<(DesiredAlert, Delivery)> = Vec::with_capacity(desired.len());
    for alert in desired {
        let delivery = if inhibited(alert) {
            Delivery::Inhibited
        } else if grouped.contains(&(alert.kind, alert.provider.as_str())) {
            Delivery::Grouped
        } else {
            Delivery::Individual
        };
        let mut alert = alert.clone();
        if alert.kind.inhibits_stuck() {
            if let Some(held) = held_per_provider.get(alert.provider.as_str()) {
                alert.summary = format!(
                    "{}; {held} stuck cash-outs of {} are folded into this alert",
                    alert.summary, alert.provider
                );
            }
        }
        out.push((alert, delivery));
    }
    for (kind, provider) in grouped {
        let members = &per_group[&(kind, provider)];
        let Some(oldest) = members.iter().min_by_key(|a| (a.since, a.subject.as_str())) else {
            continue;
        };
        let severity = members
            .iter()
            .map(|a| a.severity)
            .max()
            .unwrap_or(Severity::Warning);
        out.push((
            DesiredAlert {
                kind,
                subject: group_subject(provider),
                provider: provider.to_string(),
                severity,
                summary: format!(
                    "{} open {kind} alerts at {provider} (grouped over {group_over}); oldest since {}: {}",
                    members.len(),
                    rfc3339(oldest.since),
                    oldest.summary
                ),
                since: oldest.since,
            },
            Delivery::Group,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const SETTINGS: LifecycleSettings = LifecycleSettings {
        renotify_after: Duration::from_secs(3600),
        group_over: 3,
    };

    fn desired(kind: AlertKind, provider: &str, subject: &str, severity: Severity) -> DesiredAlert {
        DesiredAlert {
            kind,
            subject: subject.into(),
            provider: provider.into(),
            severity,
            summary: format!("{subject} is wrong"),
            since: 0,
        }
    }

    fn stuck(provider: &str, n: usize) -> DesiredAlert {
        desired(
            AlertKind::Stuck,
            provider,
            &format!("{provider}/tx-{n}"),
            Severity::Warning,
        )
    }

    fn evaluation(desired: Vec<DesiredAlert>) -> Evaluation {
        Evaluation {
            desired,
            undetermined: Vec::new(),
        }
    }

    /// Applies a plan to the stored set, as the store would.
    fn apply(stored: &mut Vec<StoredAlert>, plan: &AlertPlan, now: i64) -> Vec<(String, bool)> {
        let mut sent = Vec::new();
        for resolve in &plan.resolve {
            let index = stored.iter().position(|a| a.id == resolve.id).unwrap();
            let alert = stored.remove(index);
            if resolve.notify {
                sent.push((format!("resolved {}", alert.subject), true));
            }
        }
        for update in &plan.update {
            let alert = stored.iter_mut().find(|a| a.id == update.id).unwrap();
            alert.severity = update.severity;
            alert.summary = update.summary.clone();
            alert.delivery = update.delivery;
            if update.notify {
                alert.last_sent_at = Some(now);
                sent.push((format!("firing {}", alert.subject), true));
            }
        }
        for open in &plan.open {
            let id = stored.iter().map(|a| a.id).max().unwrap_or(0) + 1;
            stored.push(StoredAlert {
                id,
                kind: open.alert.kind,
                subject: open.alert.subject.clone(),
                provider: Some(open.alert.provider.clone()),
                severity: open.alert.severity,
                summary: open.alert.summary.clone(),
                opened_at: now,
                last_sent_at: open.notify.then_some(now),
                delivery: open.delivery,
            });
            if open.notify {
                sent.push((format!("firing {}", open.alert.subject), true));
            }
        }
        sent
    }

    /// Plans at `now` from the stored set and applies the plan.
    fn step(
        stored: &mut Vec<StoredAlert>,
        evaluation: &Evaluation,
        now: i64,
    ) -> Vec<(String, bool)> {
        let planned = plan(evaluation, stored, &SETTINGS, now);
        apply(stored, &planned, now)
    }

    fn sent_subjects(sent: &[(String, bool)]) -> Vec<&str> {
        sent.iter().map(|(s, _)| s.as_str()).collect()
    }

    #[test]
    fn every_kind_is_raised_once_resent_after_the_interval_and_resolved_with_a_notice() {
        for kind in AlertKind::ALL {
            let subject = if kind.is_per_provider() {
                "fiserv"
            } else {
                "fiserv/tx-1"
            };
            let firing = evaluation(vec![desired(kind, "fiserv", subject, Severity::Warning)]);
            let mut stored = Vec::new();

            // Raised once.
            let sent = step(&mut stored, &firing, 0);
            assert_eq!(
                sent_subjects(&sent),
                [format!("firing {subject}")],
                "{kind}"
            );
            let sent = step(&mut stored, &firing, MIN);
            assert!(sent.is_empty(), "{kind}: not again a minute later");
            let quiet = plan(&firing, &stored, &SETTINGS, 59 * MIN);
            assert!(quiet.is_empty(), "{kind}: nothing to write: {quiet:?}");

            // Re-sent after renotify_after.
            let sent = step(&mut stored, &firing, 60 * MIN);
            assert_eq!(
                sent_subjects(&sent),
                [format!("firing {subject}")],
                "{kind}"
            );

            // Resolved when the cause goes away, and the resolution is sent.
            let gone = evaluation(Vec::new());
            let sent = step(&mut stored, &gone, 61 * MIN);
            assert_eq!(
                sent_subjects(&sent),
                [format!("resolved {subject}")],
                "{kind}"
            );
            assert!(stored.is_empty(), "{kind}");
        }
    }

    #[test]
    fn a_rising_severity_is_sent_at_once_a_falling_one_is_not() {
        let mut stored = Vec::new();
        let warning = evaluation(vec![stuck("fiserv", 1)]);
        step(&mut stored, &warning, 0);
        let mut critical = warning.clone();
        critical.desired[0].severity = Severity::Critical;
        let sent = step(&mut stored, &critical, MIN);
        assert_eq!(sent_subjects(&sent), ["firing fiserv/tx-1"]);
        assert_eq!(stored[0].severity, Severity::Critical);
        let sent = step(&mut stored, &warning, 2 * MIN);
        assert!(sent.is_empty());
        assert_eq!(stored[0].severity, Severity::Warning);
    }

    #[test]
    fn stored_alerts_survive_a_restart_without_refiring() {
        // What a restarted daemon loads: the alerts the last run stored.
        let firing = evaluation(vec![
            stuck("fiserv", 1),
            desired(AlertKind::PollFailing, "tupay", "tupay", Severity::Critical),
        ]);
        let mut stored = Vec::new();
        step(&mut stored, &firing, 0);
        let reloaded = stored.clone();

        // After the restart the poll signal is unknown (no cycle yet): undetermined.
        let after_restart = Evaluation {
            desired: vec![stuck("fiserv", 1)],
            undetermined: vec![(AlertKind::PollFailing, "tupay".into())],
        };
        let restarted = plan(&after_restart, &reloaded, &SETTINGS, 5 * MIN);
        assert!(restarted.is_empty(), "{restarted:?}");
    }

    #[test]
    fn past_group_over_one_grouped_alert_is_sent_and_each_stays_open() {
        let mut stored = Vec::new();
        let five: Vec<DesiredAlert> = (1..=5).map(|n| stuck("fiserv", n)).collect();
        let sent = step(&mut stored, &evaluation(five.clone()), 0);
        assert_eq!(sent_subjects(&sent), ["firing provider:fiserv"]);
        assert_eq!(stored.len(), 6, "five members and the group");
        let group = stored
            .iter()
            .find(|a| a.delivery == Delivery::Group)
            .unwrap();
        assert!(
            group.summary.starts_with("5 open stuck alerts at fiserv"),
            "{}",
            group.summary
        );
        assert_eq!(
            stored
                .iter()
                .filter(|a| a.delivery == Delivery::Grouped)
                .count(),
            5
        );

        // Down to the threshold: the group resolves, each is now sent on its own.
        let three = evaluation(five[..3].to_vec());
        let sent = step(&mut stored, &three, MIN);
        assert_eq!(
            sent_subjects(&sent),
            [
                "resolved provider:fiserv",
                "firing fiserv/tx-1",
                "firing fiserv/tx-2",
                "firing fiserv/tx-3"
            ]
        );
    }

    #[test]
    fn groups_are_per_kind_and_provider() {
        let mut desired_alerts: Vec<DesiredAlert> = (1..=3).map(|n| stuck("fiserv", n)).collect();
        desired_alerts.extend((1..=3).map(|n| stuck("simpay", n)));
        let planned = plan(&evaluation(desired_alerts), &[], &SETTINGS, 0);
        assert!(planned
            .open
            .iter()
            .all(|o| o.delivery == Delivery::Individual));
    }

    #[test]
    fn stuck_cash_outs_behind_a_silent_provider_are_one_message() {
        let mut stored = Vec::new();
        let mut alerts: Vec<DesiredAlert> = (1..=1000).map(|n| stuck("fiserv", n)).collect();
        alerts.push(stuck("simpay", 1));
        alerts.push(desired(
            AlertKind::ProviderSilent,
            "fiserv",
            "fiserv",
            Severity::Critical,
        ));
        let sent = step(&mut stored, &evaluation(alerts.clone()), 0);
        assert_eq!(
            sent_subjects(&sent),
            ["firing simpay/tx-1", "firing fiserv"]
        );
        let silent = stored
            .iter()
            .find(|a| a.kind == AlertKind::ProviderSilent)
            .unwrap();
        assert!(
            silent
                .summary
                .ends_with("1000 stuck cash-outs of fiserv are folded into this alert"),
            "{}",
            silent.summary
        );
        assert_eq!(
            stored
                .iter()
                .filter(|a| a.delivery == Delivery::Inhibited)
                .count(),
            1000
        );

        // The provider speaks again and its cash-outs complete: one resolution.
        let sent = step(&mut stored, &evaluation(vec![stuck("simpay", 1)]), MIN);
        assert_eq!(sent_subjects(&sent), ["resolved fiserv"]);
    }

    #[test]
    fn inhibited_alerts_are_sent_once_the_inhibitor_resolves_while_they_stay() {
        let mut stored = Vec::new();
        let behind = evaluation(vec![
            stuck("fiserv", 1),
            desired(
                AlertKind::PollFailing,
                "fiserv",
                "fiserv",
                Severity::Critical,
            ),
        ]);
        step(&mut stored, &behind, 0);
        let sent = step(&mut stored, &evaluation(vec![stuck("fiserv", 1)]), MIN);
        assert_eq!(
            sent_subjects(&sent),
            ["resolved fiserv", "firing fiserv/tx-1"]
        );
    }
}
