//! `cashouts [--provider P] [--status S] [--limit N]`: a table of cash-outs, newest first, read-only.

use std::path::PathBuf;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};

use super::CommandError;
use crate::config::{config_path, Environment, ProcessEnvironment, Settings};
use crate::money::Currency;
use crate::state::CashoutStatus;
use crate::store::{CashoutFilter, CashoutRow, Store};

/// Arguments of `cashouts`.
#[derive(clap::Args, Debug)]
pub struct CashoutsArgs {
    /// Only this provider's cash-outs (its id in the config).
    #[arg(long)]
    pub provider: Option<String>,
    /// Only cash-outs in this canonical status (pending, processing, completed, …).
    #[arg(long)]
    pub status: Option<String>,
    /// Most rows shown (1 to 1000).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Config file (default: $CASHOUT_RECON_CONFIG, then ./config.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Prints the table.
pub async fn run(args: CashoutsArgs) -> Result<(), CommandError> {
    let settings = load_settings(args.config)?;
    if let Some(provider) = &args.provider {
        known_provider(&settings, provider)?;
    }
    let status = args
        .status
        .as_deref()
        .map(str::parse::<CashoutStatus>)
        .transpose()
        .map_err(|err| CommandError::Config(format!("--status: {err}")))?;
    if !(1..=1000).contains(&args.limit) {
        return Err(CommandError::Config(format!(
            "--limit: expected 1 to 1000, got {}",
            args.limit
        )));
    }
    let store = open_store(&settings)?;
    let page = store
        .list_cashouts(CashoutFilter {
            provider: args.provider,
            status,
            limit: args.limit,
            ..CashoutFilter::default()
        })
        .await
        .context("reading cash-outs")?;
    if page.items.is_empty() {
        return write_out("no cash-outs match\n");
    }
    let mut table = Table::new(&[
        "PROVIDER",
        "REF",
        "EXTERNAL ID",
        "STATUS",
        "AMOUNT",
        "FEE",
        "CREATED",
        "UPDATED",
        "WEBHOOKS",
    ]);
    for row in &page.items {
        table.row(vec![
            row.provider.clone(),
            row.provider_ref.clone(),
            row.external_id.clone().unwrap_or_else(|| "-".to_string()),
            status_text(row),
            amount_text(row.amount_minor, row.currency.as_deref(), true),
            amount_text(row.fee_minor, row.currency.as_deref(), false),
            time_text(row.created_at),
            time_text(row.updated_at),
            row.webhook_count.to_string(),
        ]);
    }
    let mut out = table.render();
    if page.next.is_some() {
        out.push_str(&format!(
            "(first {} shown; raise --limit or narrow with --provider/--status)\n",
            page.items.len()
        ));
    }
    write_out(&out)
}

/// Writes to stdout; a closed pipe (`| head`) ends the output quietly.
pub(super) fn write_out(text: &str) -> Result<(), CommandError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(err) => Err(CommandError::Runtime(anyhow::anyhow!(
            "cannot write to stdout: {err}"
        ))),
    }
}

/// The process environment, with a placeholder for every variable it does not set: the
/// read-only views use only `store` and the provider ids, so an operator's shell needs
/// none of the daemon's secrets. The placeholder is a valid `whsec_<base64>` so that the
/// checks of secret formats pass; it never reaches a verifier or a client.
struct SecretsNotNeeded;

const PLACEHOLDER_SECRET: &str = "whsec_cmVhZC1vbmx5LXZpZXc=";

impl Environment for SecretsNotNeeded {
    fn var(&self, name: &str) -> Option<String> {
        ProcessEnvironment
            .var(name)
            .or_else(|| Some(PLACEHOLDER_SECRET.to_string()))
    }
}

/// Loads the config for a read-only view (secrets need not be set).
pub(super) fn load_settings(config: Option<PathBuf>) -> Result<Settings, CommandError> {
    let path = config_path(config);
    let text = std::fs::read_to_string(&path).map_err(|err| {
        CommandError::Config(format!("cannot read config file {}: {err}", path.display()))
    })?;
    let base = path.parent().unwrap_or_else(|| std::path::Path::new("."));
    Settings::parse(&text, base, &SecretsNotNeeded)
        .map_err(|err| CommandError::Config(format!("{}: {err}", path.display())))
}

/// Refuses a provider id the config does not name (exit 2).
pub(super) fn known_provider(settings: &Settings, provider: &str) -> Result<(), CommandError> {
    if settings.provider(provider).is_some() {
        return Ok(());
    }
    let known: Vec<&str> = settings.providers.iter().map(|p| p.id.as_str()).collect();
    Err(CommandError::Config(format!(
        "unknown provider {provider:?}: the config has {}",
        known.join(", ")
    )))
}

/// Opens the configured store read-only (no lock, no writer: works beside `serve`).
pub(super) fn open_store(settings: &Settings) -> Result<Store, CommandError> {
    Store::open_read_only(&settings.store)
        .map_err(|err| CommandError::Runtime(anyhow::Error::new(err)))
}

/// `pending (held)` or the plain status.
pub(super) fn status_text(row: &CashoutRow) -> String {
    if row.held {
        format!("{} (held)", row.status)
    } else {
        row.status.to_string()
    }
}

/// `1500.00 BRL`, or `-` when unknown.
pub(super) fn amount_text(minor: Option<i64>, currency: Option<&str>, with_code: bool) -> String {
    match (minor, currency.map(Currency::from_code)) {
        (Some(minor), Some(Ok(currency))) if with_code => {
            format!("{} {}", currency.format_minor(minor), currency.code())
        }
        (Some(minor), Some(Ok(currency))) => currency.format_minor(minor),
        (Some(minor), _) => format!("{minor} (minor units)"),
        (None, _) => "-".to_string(),
    }
}

/// RFC 3339 UTC to the second.
pub(super) fn time_text(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Longest cell shown; longer text ends in `…`.
const MAX_CELL_CHARS: usize = 64;

/// Stored text made safe for a terminal: control characters escaped, length bounded.
pub(super) fn cell(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_CELL_CHARS * 4));
    for (shown, c) in text.chars().enumerate() {
        if shown == MAX_CELL_CHARS {
            out.push('…');
            break;
        }
        if c.is_control()
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
        {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// A left-aligned text table with two spaces between columns.
pub(super) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(super) fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub(super) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.iter().map(|c| cell(c)).collect());
    }

    pub(super) fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.header).chain(&self.rows) {
            let mut text = String::new();
            for (i, (cell, width)) in line.iter().zip(&widths).enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(cell);
                text.extend(std::iter::repeat_n(
                    ' ',
                    width.saturating_sub(cell.chars().count()),
                ));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_escape_control_characters_and_stop_at_the_bound() {
        assert_eq!(cell("a\u{1b}[31mb"), "a\\u{1b}[31mb");
        assert_eq!(cell("x\u{202e}y"), "x\\u{202e}y");
        let long = "z".repeat(500);
        assert_eq!(cell(&long).chars().count(), MAX_CELL_CHARS + 1);
    }

    #[test]
    fn the_table_aligns_columns() {
        let mut table = Table::new(&["A", "BB"]);
        table.row(vec!["xyz".to_string(), "1".to_string()]);
        assert_eq!(table.render(), "A    BB\nxyz  1\n");
    }

    #[test]
    fn amounts_show_the_currency_digits() {
        assert_eq!(amount_text(Some(150000), Some("BRL"), true), "1500.00 BRL");
        assert_eq!(amount_text(Some(5), Some("KWD"), false), "0.005");
        assert_eq!(amount_text(None, Some("BRL"), true), "-");
    }
}
