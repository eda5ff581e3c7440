//! `cashout P REF`: one cash-out and its timeline (webhooks, polls, ledger), read-only.

use std::path::PathBuf;

use anyhow::Context;

use super::cashouts::{
    amount_text, cell, known_provider, load_settings, open_store, status_text, time_text,
    write_out, Table,
};
use super::CommandError;

/// Arguments of `cashout`.
#[derive(clap::Args, Debug)]
pub struct CashoutArgs {
    /// The provider's id in the config.
    pub provider: String,
    /// The provider's reference of the cash-out (as in the API's `provider_ref`).
    pub provider_ref: String,
    /// Config file (default: $CASHOUT_RECON_CONFIG, then ./config.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Prints the cash-out, then its timeline in arrival order.
pub async fn run(args: CashoutArgs) -> Result<(), CommandError> {
    let settings = load_settings(args.config)?;
    known_provider(&settings, &args.provider)?;
    let store = open_store(&settings)?;
    let found = store
        .get_cashout(args.provider.clone(), args.provider_ref.clone())
        .await
        .context("reading the cash-out")?;
    let Some((row, events)) = found else {
        return Err(CommandError::Runtime(anyhow::anyhow!(
            "no cash-out {} of provider {} in {}",
            cell(&args.provider_ref),
            args.provider,
            store.describe()
        )));
    };
    let optional = |value: &Option<String>| value.as_deref().map(cell).unwrap_or("-".into());
    let fields = [
        ("provider", cell(&row.provider)),
        ("ref", cell(&row.provider_ref)),
        ("external id", optional(&row.external_id)),
        ("status", status_text(&row)),
        ("provider status", optional(&row.provider_status)),
        ("reason code", optional(&row.reason_code)),
        (
            "amount",
            amount_text(row.amount_minor, row.currency.as_deref(), true),
        ),
        (
            "fee",
            amount_text(row.fee_minor, row.currency.as_deref(), false),
        ),
        ("created", time_text(row.created_at)),
        ("updated", time_text(row.updated_at)),
        (
            "completed",
            row.completed_at.map(time_text).unwrap_or("-".into()),
        ),
        ("webhooks", row.webhook_count.to_string()),
        (
            "recovered by poll",
            if row.recovered_by_poll > 0 {
                "yes"
            } else {
                "no"
            }
            .to_string(),
        ),
    ];
    let mut out = String::new();
    for (name, value) in fields {
        out.push_str(&format!("{:<18} {value}\n", format!("{name}:")));
    }
    out.push('\n');
    if events.is_empty() {
        out.push_str("timeline: no events\n");
        return write_out(&out);
    }
    out.push_str(&format!(
        "timeline ({} event{}, oldest first):\n",
        events.len(),
        if events.len() == 1 { "" } else { "s" }
    ));
    let mut table = Table::new(&[
        "RECEIVED",
        "SOURCE",
        "RAW STATUS",
        "STATUS",
        "APPLIED",
        "OUTCOME",
        "SECRET",
        "EVENT ID",
    ]);
    for event in &events {
        table.row(vec![
            time_text(event.received_at),
            event.source.to_string(),
            event
                .raw_status
                .clone()
                .or_else(|| event.reason_code.clone().map(|r| format!("reason {r}")))
                .unwrap_or_else(|| "-".to_string()),
            event
                .status
                .map_or_else(|| "-".to_string(), |s| s.to_string()),
            if event.applied { "yes" } else { "no" }.to_string(),
            event.outcome.to_string(),
            event
                .secret_index
                .map(|i| format!("#{i}"))
                .unwrap_or_else(|| "-".to_string()),
            event.event_id.clone(),
        ]);
    }
    out.push_str(&table.render());
    if events.iter().any(|e| e.secret_index.is_some()) {
        out.push_str(
            "(SECRET: the position in webhook_secrets_env (or the key) that verified it, #0 = the first)\n",
        );
    }
    write_out(&out)
}
