//! The demo's ops side: its own alert receiver (verifying every Standard Webhooks
//! signature, failing the first delivery on purpose), a provider gone silent, and a
//! break fixed so its alert resolves; the summary lists what was raised, delivered and
//! resolved.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;

use crate::app::AppState;
use crate::sim::alert_receiver::{AlertReceiver, ReceiverConfig, ReceiverSummary, DEMO_SECRET};

/// How long alert deliveries (and their retries) may take to drain.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(30);

/// Starts the receiver: it answers the first delivery 500, so the outbox must retry.
pub async fn start_receiver() -> anyhow::Result<AlertReceiver> {
    AlertReceiver::start(ReceiverConfig {
        secret: DEMO_SECRET.to_string(),
        fail_first: 1,
        hang: false,
    })
    .await
    .context("starting the demo's alert receiver")
}

/// Runs an alert pass now and waits until the outbox has delivered everything.
pub async fn raise_and_deliver(state: &AppState) -> anyhow::Result<()> {
    state
        .alerting
        .run_pass(state, Utc::now())
        .await
        .context("running an alert pass")?;
    let deadline = Instant::now() + DELIVERY_DEADLINE;
    loop {
        let (pending, _failed) = state
            .store
            .alert_outbox_counts()
            .await
            .context("reading the alert outbox")?;
        if pending == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{pending} alert deliveries still pending after {DELIVERY_DEADLINE:?}"
        );
        state.alerting.wake();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the receiver's record passes: every request verified, the failure injected
/// and retried, something raised and something resolved.
pub fn judge(summary: &ReceiverSummary) -> Result<(), String> {
    if summary.bad_signatures > 0 {
        return Err(format!(
            "{} alert deliveries failed signature verification",
            summary.bad_signatures
        ));
    }
    if summary.failed_on_purpose == 0 {
        return Err("the receiver never failed a delivery, so no retry was shown".into());
    }
    if summary.firing.is_empty() || summary.resolved.is_empty() {
        return Err(format!(
            "expected alerts raised and resolved, got {} raised and {} resolved",
            summary.firing.len(),
            summary.resolved.len()
        ));
    }
    Ok(())
}

/// The alert part of the demo's summary: counts by kind, and what is still open.
pub fn render(summary: &ReceiverSummary) -> String {
    use std::collections::{BTreeMap, BTreeSet};
    let by_kind = |items: &[String]| {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for item in items {
            *counts
                .entry(item.split_whitespace().next().unwrap_or("?"))
                .or_default() += 1;
        }
        counts
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let resolved: BTreeSet<&String> = summary.resolved.iter().collect();
    let open: BTreeSet<&String> = summary
        .firing
        .iter()
        .filter(|a| !resolved.contains(a))
        .collect();
    let mut text = format!(
        "\nalerts, delivered to the demo's receiver signed with Standard Webhooks (signatures verified: {}; deliveries failed on purpose and retried: {}):\n  raised    {:>3}  ({})\n  resolved  {:>3}  ({})\n  still open:\n",
        if summary.bad_signatures == 0 { "all" } else { "NOT ALL" },
        summary.failed_on_purpose,
        summary.firing.len(),
        by_kind(&summary.firing),
        summary.resolved.len(),
        by_kind(&summary.resolved),
    );
    for alert in open {
        text.push_str(&format!("    {alert}\n"));
    }
    text
}
