//! Alerts (SPEC §7): pure rules over the store's state, a pure lifecycle that turns what
//! should be open into a plan (open, renotify, resolve, group, inhibit), the signals the
//! rules need that the store does not hold, and delivery (log + signed webhook outbox).
//!
//! One pass: [`runner::Alerting::run_pass`] loads [`rules::AlertFacts`] from the store and
//! the in-memory [`signals::AlertSignals`] (merged with the other instances' through
//! [`shared`]), [`rules::evaluate`]s them, diffs the result
//! with the stored open alerts in [`lifecycle::plan`], and the store applies the plan in
//! one transaction (alert rows and outbox rows together). The outbox worker in
//! [`delivery`] then POSTs what the plan queued, on its own task and HTTP client.

pub mod delivery;
pub mod lifecycle;
pub mod rules;
pub mod runner;
pub mod shared;
pub mod signals;

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

pub use lifecycle::{plan, AlertPlan, LifecycleSettings, StoredAlert};
pub use rules::{evaluate, AlertFacts, DesiredAlert, Evaluation, RuleSettings};
pub use runner::Alerting;
pub use signals::AlertSignals;

/// What an alert is about (SPEC §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    Stuck,
    StatusConflict,
    DuplicatePayout,
    UnknownToLedger,
    AmountMismatch,
    QuarantinedWebhook,
    SignatureFailures,
    PollFailing,
    ProviderSilent,
}

/// A kind name no alert has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown alert kind {0:?} (one of: stuck, status_conflict, duplicate_payout, unknown_to_ledger, amount_mismatch, quarantined_webhook, signature_failures, poll_failing, provider_silent)")]
pub struct UnknownKind(pub String);

impl AlertKind {
    /// Every kind.
    pub const ALL: [AlertKind; 9] = [
        AlertKind::Stuck,
        AlertKind::StatusConflict,
        AlertKind::DuplicatePayout,
        AlertKind::UnknownToLedger,
        AlertKind::AmountMismatch,
        AlertKind::QuarantinedWebhook,
        AlertKind::SignatureFailures,
        AlertKind::PollFailing,
        AlertKind::ProviderSilent,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Stuck => "stuck",
            AlertKind::StatusConflict => "status_conflict",
            AlertKind::DuplicatePayout => "duplicate_payout",
            AlertKind::UnknownToLedger => "unknown_to_ledger",
            AlertKind::AmountMismatch => "amount_mismatch",
            AlertKind::QuarantinedWebhook => "quarantined_webhook",
            AlertKind::SignatureFailures => "signature_failures",
            AlertKind::PollFailing => "poll_failing",
            AlertKind::ProviderSilent => "provider_silent",
        }
    }

    /// Kinds whose subject is a whole provider (never grouped; one per provider).
    pub fn is_per_provider(self) -> bool {
        match self {
            AlertKind::SignatureFailures | AlertKind::PollFailing | AlertKind::ProviderSilent => {
                true
            }
            AlertKind::Stuck
            | AlertKind::StatusConflict
            | AlertKind::DuplicatePayout
            | AlertKind::UnknownToLedger
            | AlertKind::AmountMismatch
            | AlertKind::QuarantinedWebhook => false,
        }
    }

    /// Kinds that, while open for a provider, fold its `stuck` alerts into themselves.
    pub fn inhibits_stuck(self) -> bool {
        matches!(self, AlertKind::PollFailing | AlertKind::ProviderSilent)
    }
}

impl fmt::Display for AlertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AlertKind {
    type Err = UnknownKind;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        AlertKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| UnknownKind(text.to_string()))
    }
}

/// How urgent an alert is; `Critical` pages, `Warning` informs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    /// The tag that opens a delivered `text` (`[CRITICAL]`).
    pub fn tag(self) -> &'static str {
        match self {
            Severity::Warning => "WARNING",
            Severity::Critical => "CRITICAL",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Severity {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "warning" => Ok(Severity::Warning),
            "critical" => Ok(Severity::Critical),
            other => Err(format!("unknown severity {other:?}")),
        }
    }
}

/// How an open alert reaches the sinks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Delivered on its own.
    Individual,
    /// One of more than `group_over` subjects of its kind and provider: its group's alert
    /// is delivered instead.
    Grouped,
    /// A `stuck` cash-out of a provider that is `poll_failing` or `provider_silent`: that
    /// alert speaks for it.
    Inhibited,
    /// The grouped alert itself (subject `provider:<id>`).
    Group,
}

impl Delivery {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Individual => "individual",
            Delivery::Grouped => "grouped",
            Delivery::Inhibited => "inhibited",
            Delivery::Group => "group",
        }
    }

    /// Whether alerts delivered this way are sent to the sinks themselves.
    pub fn notifies(self) -> bool {
        match self {
            Delivery::Individual | Delivery::Group => true,
            Delivery::Grouped | Delivery::Inhibited => false,
        }
    }
}

impl FromStr for Delivery {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "individual" => Ok(Delivery::Individual),
            "grouped" => Ok(Delivery::Grouped),
            "inhibited" => Ok(Delivery::Inhibited),
            "group" => Ok(Delivery::Group),
            other => Err(format!("unknown alert delivery {other:?}")),
        }
    }
}

/// Whether a delivered alert is firing or resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeStatus {
    Firing,
    Resolved,
}

impl NoticeStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeStatus::Firing => "firing",
            NoticeStatus::Resolved => "resolved",
        }
    }
}

impl FromStr for NoticeStatus {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "firing" => Ok(NoticeStatus::Firing),
            "resolved" => Ok(NoticeStatus::Resolved),
            other => Err(format!("unknown notice status {other:?}")),
        }
    }
}

/// One message to the sinks: an alert firing (first time, escalated or re-sent) or
/// resolved. Its JSON is SPEC §7's payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertNotice {
    pub id: i64,
    pub kind: AlertKind,
    pub severity: Severity,
    pub status: NoticeStatus,
    pub subject: String,
    pub provider: Option<String>,
    /// The alert's own text, without the severity tag.
    pub summary: String,
    pub opened_at: i64,
    pub resolved_at: Option<i64>,
}

impl AlertNotice {
    /// The one-line text for Slack and the log: `[CRITICAL] stuck: fiserv/tx-1 pending for 2h (stuck_after 30m)`.
    pub fn text(&self) -> String {
        match self.status {
            NoticeStatus::Firing => {
                format!("[{}] {}: {}", self.severity.tag(), self.kind, self.summary)
            }
            NoticeStatus::Resolved => format!("[RESOLVED] {}: {}", self.kind, self.summary),
        }
    }

    /// SPEC §7's JSON, the exact bytes that are signed and POSTed.
    pub fn body(&self) -> String {
        serde_json::json!({
            "id": self.id,
            "kind": self.kind.as_str(),
            "severity": self.severity.as_str(),
            "status": self.status.as_str(),
            "subject": self.subject,
            "provider": self.provider,
            "text": self.text(),
            "opened_at": rfc3339(self.opened_at),
            "resolved_at": self.resolved_at.map(rfc3339),
        })
        .to_string()
    }

    /// Writes the notice to the log: one line, critical at ERROR, warning at WARN,
    /// resolutions at INFO.
    pub fn log(&self) {
        let text = self.text();
        let provider = self.provider.as_deref().unwrap_or("");
        let (kind, severity, status) = (
            self.kind.as_str(),
            self.severity.as_str(),
            self.status.as_str(),
        );
        match (self.status, self.severity) {
            (NoticeStatus::Resolved, _) => tracing::info!(
                alert_id = self.id,
                kind,
                severity,
                status,
                subject = %self.subject,
                provider,
                "{text}"
            ),
            (NoticeStatus::Firing, Severity::Critical) => tracing::error!(
                alert_id = self.id,
                kind,
                severity,
                status,
                subject = %self.subject,
                provider,
                "{text}"
            ),
            (NoticeStatus::Firing, Severity::Warning) => tracing::warn!(
                alert_id = self.id,
                kind,
                severity,
                status,
                subject = %self.subject,
                provider,
                "{text}"
            ),
        }
    }
}

/// RFC 3339 UTC (seconds) of unix milliseconds.
pub fn rfc3339(millis: i64) -> String {
    crate::store::from_millis(millis).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A duration in milliseconds as people write it: `2h`, `1h 5m`, `45m`, `30s`, `3d 4h`.
pub fn short_duration(millis: i64) -> String {
    let total = (millis.max(0) / 1000) as u64;
    let units = [("d", 86_400u64), ("h", 3_600), ("m", 60), ("s", 1)];
    let mut parts = Vec::new();
    let mut rest = total;
    for (name, size) in units {
        if rest >= size {
            parts.push(format!("{}{name}", rest / size));
            rest %= size;
        }
        if parts.len() == 2 {
            break;
        }
    }
    if parts.is_empty() {
        "0s".to_string()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_unknown_ones_are_named() {
        for kind in AlertKind::ALL {
            assert_eq!(kind.as_str().parse::<AlertKind>(), Ok(kind));
        }
        let err = "stuk".parse::<AlertKind>().unwrap_err();
        assert!(err.to_string().contains("\"stuk\""), "{err}");
    }

    #[test]
    fn durations_read_like_people_write_them() {
        for (millis, text) in [
            (0, "0s"),
            (30_000, "30s"),
            (1_800_000, "30m"),
            (7_200_000, "2h"),
            (3_900_000, "1h 5m"),
            (273_600_000, "3d 4h"),
        ] {
            assert_eq!(short_duration(millis), text, "{millis} ms");
        }
    }

    #[test]
    fn notice_text_is_one_slack_line() {
        let notice = AlertNotice {
            id: 7,
            kind: AlertKind::Stuck,
            severity: Severity::Critical,
            status: NoticeStatus::Firing,
            subject: "fiserv/tx-1".into(),
            provider: Some("fiserv".into()),
            summary: "fiserv/tx-1 pending for 2h (stuck_after 30m)".into(),
            opened_at: 0,
            resolved_at: None,
        };
        assert_eq!(
            notice.text(),
            "[CRITICAL] stuck: fiserv/tx-1 pending for 2h (stuck_after 30m)"
        );
        let body: serde_json::Value = serde_json::from_str(&notice.body()).unwrap();
        assert_eq!(body["id"], 7);
        assert_eq!(body["status"], "firing");
        assert_eq!(body["resolved_at"], serde_json::Value::Null);
        assert_eq!(body["opened_at"], "1970-01-01T00:00:00Z");
        let resolved = AlertNotice {
            status: NoticeStatus::Resolved,
            resolved_at: Some(1000),
            ..notice
        };
        assert!(resolved.text().starts_with("[RESOLVED] stuck: fiserv/tx-1"));
    }
}
