//! `reconcile --date YYYY-MM-DD`: the full pass of one business date now, then its CSV
//! and summary in `reports.dir`.

use std::path::PathBuf;

use anyhow::Context;
use chrono::NaiveDate;

use super::CommandError;
use crate::config::{config_path, Settings};
use crate::metrics::Metrics;
use crate::reconciler::Reconciler;
use crate::report::Summary;
use crate::store::Store;

/// Reconciles `date` against the configured store and prints the summary.
pub async fn run(date: String, config: Option<PathBuf>) -> Result<(), CommandError> {
    let date = NaiveDate::parse_from_str(&date, "%Y-%m-%d")
        .map_err(|_| CommandError::Config(format!("--date: expected YYYY-MM-DD, got {date:?}")))?;
    let settings = Settings::load(&config_path(config))?;
    let store = Store::connect(&settings.store, Metrics::new())
        .await
        .context("opening the store")?;
    let reconciler = Reconciler::new(store.clone(), &settings);
    let result = reconciler.reconcile_day_now(date).await;
    store.close().await;
    let outcome = result.context("reconciling")?;
    println!(
        "reconciled {}: {} groups examined, {} mismatches opened, {} resolved",
        outcome.report.day.label(),
        outcome.pass.groups,
        outcome.pass.opened,
        outcome.pass.resolved
    );
    print!("{}", summary_table(&outcome.report.summary));
    println!("CSV:     {}", outcome.report.csv_path.display());
    println!("summary: {}", outcome.report.summary_path.display());
    Ok(())
}

/// The summary as a few aligned lines for a terminal.
pub fn summary_table(summary: &Summary) -> String {
    let mut out = format!(
        "{} ({}, {}): {} rows — matched {}, open {}, mismatch {}\n",
        summary.date,
        summary.timezone,
        if summary.is_final {
            "final"
        } else {
            "provisional"
        },
        summary.rows,
        summary.match_counts.get("matched").copied().unwrap_or(0),
        summary.match_counts.get("open").copied().unwrap_or(0),
        summary.match_counts.get("mismatch").copied().unwrap_or(0),
    );
    out.push_str(&format!(
        "{:<10} {:<4} {:>7} {:>16} {:>16} {:>12} {:>16}\n",
        "provider", "cur", "rows", "expected", "provider", "fees", "net"
    ));
    for totals in &summary.totals {
        out.push_str(&format!(
            "{:<10} {:<4} {:>7} {:>16} {:>16} {:>12} {:>16}\n",
            totals.provider,
            totals.currency,
            totals.rows,
            totals.expected_amount,
            totals.provider_amount,
            totals.fees,
            totals.net_amount
        ));
    }
    let kinds: Vec<String> = summary
        .mismatches
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    out.push_str(&format!(
        "mismatches: {}\n",
        if kinds.is_empty() {
            "none".to_string()
        } else {
            kinds.join(", ")
        }
    ));
    out
}
